"""The web config file in a real `python -m sqlalchemy_pool_exporter serve`: the toolkit's flags, mTLS,
a bcrypt user and headers, a certificate rotated under the running process, and bad files that exit 2
with one line (a FIFO, /dev/zero or a huge file among them) without a hang or a traceback."""

from __future__ import annotations

import os
import socket
import ssl
from pathlib import Path

import bcrypt
import pytest
import trustme
from cryptography import x509

from .cli_process import assert_exit_2_one_line, cli_env, run_cli, serving

pytestmark = pytest.mark.reliability

SERVE = ["serve", "--host", "127.0.0.1", "--port", "0"]
# What a client sees when the server closes the connection without an HTTP response.
REFUSED = "refused"


def get(port: int, context: ssl.SSLContext, path: str, authorization: str = "") -> tuple[str, int] | str:
    """(first response line and headers, peer certificate serial) of one HTTPS GET, or REFUSED."""
    auth = f"Authorization: {authorization}\r\n" if authorization else ""
    request = f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n{auth}\r\n".encode()
    with socket.create_connection(("127.0.0.1", port), timeout=30) as raw:
        try:
            with context.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
                der = tls.getpeercert(binary_form=True)
                assert der is not None
                tls.sendall(request)
                data = b""
                while chunk := tls.recv(65536):
                    data += chunk
        except (ssl.SSLEOFError, ConnectionResetError, BrokenPipeError):
            return REFUSED
    if not data:
        return REFUSED
    return data.partition(b"\r\n\r\n")[0].decode(), x509.load_der_x509_certificate(der).serial_number


def serial(cert: trustme.LeafCert) -> int:
    return x509.load_pem_x509_certificate(cert.cert_chain_pems[0].bytes()).serial_number


def issue(ca: trustme.CA, directory: Path) -> trustme.LeafCert:
    """A server certificate for 127.0.0.1 renamed over server.crt and server.key."""
    cert = ca.issue_cert("127.0.0.1")
    for name, pem in (("server.crt", cert.private_key_and_cert_chain_pem), ("server.key", cert.private_key_pem)):
        pem.write_to_path(str(directory / f"{name}.new"))
        os.replace(directory / f"{name}.new", directory / name)
    return cert


def test_the_toolkits_flags_mtls_bcrypt_headers_and_rotation(tmp_path: Path) -> None:
    server_ca, client_ca = trustme.CA(), trustme.CA()
    first = issue(server_ca, tmp_path)
    client_ca.cert_pem.write_to_path(str(tmp_path / "client-ca.pem"))
    hashed = bcrypt.hashpw(b"s3cret", bcrypt.gensalt(4)).decode()
    (tmp_path / "web.yml").write_text(
        "tls_server_config:\n  cert_file: server.crt\n  key_file: server.key\n"
        "  client_auth_type: RequireAndVerifyClientCert\n  client_ca_file: client-ca.pem\n"
        f"basic_auth_users:\n  prom: {hashed}\n"
        "http_server_config:\n  headers:\n    X-Content-Type-Options: nosniff\n"
    )
    anonymous = ssl.create_default_context()
    server_ca.configure_trust(anonymous)
    client = ssl.create_default_context()
    server_ca.configure_trust(client)
    client_ca.issue_cert("prometheus").configure_cert(client)
    good = "Basic cHJvbTpzM2NyZXQ="  # prom:s3cret
    flags = ("--web.telemetry-path", "/probe", "--web.config.file", str(tmp_path / "web.yml"))
    with serving(tmp_path, *flags, listen=("--web.listen-address", "127.0.0.1:0")) as server:
        assert server.base.startswith("https://127.0.0.1:")
        assert get(server.port, anonymous, "/probe", good) == REFUSED
        reply = get(server.port, client, "/probe")
        assert isinstance(reply, tuple) and reply[0].startswith("HTTP/1.1 401 Unauthorized\r\n")
        reply = get(server.port, client, "/probe", good)
        assert isinstance(reply, tuple) and reply[1] == serial(first)
        head = reply[0].split("\r\n")
        assert head[0] == "HTTP/1.1 200 OK" and "X-Content-Type-Options: nosniff" in head
        reply = get(server.port, client, "/metrics", good)
        assert isinstance(reply, tuple) and reply[0].startswith("HTTP/1.1 404 Not Found\r\n")

        second = issue(server_ca, tmp_path)
        reply = get(server.port, client, "/probe", good)
        assert isinstance(reply, tuple) and reply[0].startswith("HTTP/1.1 200 OK\r\n") and reply[1] == serial(second)
        assert server.proc.poll() is None  # the same process: no restart
    log = server.text()
    assert "Traceback" not in log and s3cret_free(log)


def s3cret_free(text: str) -> bool:
    return "s3cret" not in text and "cHJvbTpzM2NyZXQ" not in text


def test_a_malformed_file_is_one_line_exit_2(tmp_path: Path) -> None:
    config = tmp_path / "web.yml"
    config.write_text("tls_server_config:\n  cert_file: server.crt\n    key_file: server.key\n")
    result = run_cli([*SERVE, "--web.config.file", str(config)])
    assert_exit_2_one_line(result, "web_config_file")
    assert result.stderr == (
        "pool-exporter: invalid setting web_config_file (POOL_EXPORTER_WEB_CONFIG_FILE / --web-config-file): "
        f"{config}: not valid YAML: mapping values are not allowed in this context (line 3, column 13)\n"
    )
    # The same through the environment.
    result = run_cli(SERVE, cli_env(POOL_EXPORTER_WEB_CONFIG_FILE=str(config)))
    assert_exit_2_one_line(result, "web_config_file")


def test_bad_files_exit_2_without_hanging_or_echoing(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo.yml"
    os.mkfifo(fifo)
    huge = tmp_path / "huge.yml"
    huge.write_bytes(b"# " + b"x" * (2 << 20) + b"\n")
    password = tmp_path / "password.yml"
    password.write_text("basic_auth_users:\n  prom: Sup3r-Secr3t\n")
    unverified = tmp_path / "unverified.yml"
    unverified.write_text(
        "tls_server_config:\n  cert_file: /dev/zero\n  key_file: /dev/zero\n  client_auth_type: RequireAnyClientCert\n"
    )
    cert_is_a_device = tmp_path / "device.yml"
    cert_is_a_device.write_text("tls_server_config:\n  cert_file: /dev/zero\n  key_file: /dev/zero\n")
    deep = tmp_path / "deep.yml"  # a SIGSEGV in PyYAML 6.0.1's composer, without our depth check
    deep.write_text("basic_auth_users: " + "[" * 100_000 + "]" * 100_000 + "\n")
    for path in (fifo, Path("/dev/zero"), huge, password, unverified, cert_is_a_device, deep):
        result = run_cli([*SERVE, "--web-config-file", str(path)])
        assert_exit_2_one_line(result, "web_config_file", "Secr3t")
