"""The web config file's format: the toolkit's own examples read as they should, each bad field is one
line naming it, and the settings around it (conflicts, aliases) exit 2 with one line."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
import trustme
from cryptography.hazmat.primitives import serialization

from sqlalchemy_pool_exporter.service.cli import listen_address, main
from sqlalchemy_pool_exporter.service.settings import SettingError
from sqlalchemy_pool_exporter.web.config.file import (
    Inline,
    TLSServerConfig,
    WebConfig,
    WebConfigError,
    parse,
)

HASH = "$2y$10$QOauhQNbBCuQDKes6eFzPeMqBSjb7Mr5DUmpZ/VcEd00UAV/LDeSi"
BASE = Path("/etc/pool-exporter")
TLS = "tls_server_config:\n  cert_file: server.crt\n  key_file: server.key\n"
PREFIX = "pool-exporter: invalid setting web_config_file (POOL_EXPORTER_WEB_CONFIG_FILE / --web-config-file): "


def test_the_toolkits_examples() -> None:
    """The toolkit's testdata files that it accepts (web/testdata/*.good.yml), as we read them."""
    assert parse(b"", BASE) == WebConfig()
    assert parse(b"basic_auth_users:\n", BASE) == WebConfig()
    # A null is as if absent, as Go's YAML decoder leaves such a field at its zero value.
    assert parse(b"tls_server_config:\nhttp_server_config: ~\nrate_limit: {interval: ~}\n", BASE) == WebConfig()
    all_ciphers = parse(
        (
            TLS
            + "  client_auth_type: VerifyClientCertIfGiven\n  client_ca_file: ca.pem\n  cipher_suites:\n"
            + "".join(
                f"  - {name}\n"
                for name in (
                    "TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256",
                    "TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256",
                    "TLS_AES_128_GCM_SHA256",  # TLS 1.3: accepted and, as in Go, not configurable
                    "TLS_ECDHE_RSA_WITH_AES_256_CBC_SHA",
                )
            )
            + "  min_version: TLS12\n  max_version: TLS12\n  prefer_server_cipher_suites: false\n"
        ).encode(),
        BASE,
    )
    assert all_ciphers.tls == TLSServerConfig(
        cert_file=BASE / "server.crt",
        key_file=BASE / "server.key",
        client_auth_type="VerifyClientCertIfGiven",
        client_ca_file=BASE / "ca.pem",
        min_version="TLS12",
        max_version="TLS12",
        cipher_suites=[
            "TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256",
            "TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256",
            "TLS_AES_128_GCM_SHA256",
            "TLS_ECDHE_RSA_WITH_AES_256_CBC_SHA",
        ],
        prefer_server_cipher_suites=False,
    )
    assert all_ciphers.tls.pem("cert") == BASE / "server.crt"
    assert all_ciphers.notes == ()
    curves = parse((TLS + "  cert_file: /abs/server.crt\n").encode().replace(b"  cert_file: server.crt\n", b""), BASE)
    assert curves.tls is not None and curves.tls.pem("cert") == Path("/abs/server.crt")
    curves = parse((TLS + "  curve_preferences: [CurveP384, CurveP256, CurveP521, X25519]\n").encode(), BASE)
    assert curves.tls is not None and curves.tls.curve_preferences[0] == "CurveP384"
    assert curves.notes == (
        "tls_server_config.curve_preferences: Python's ssl offers one curve, CurveP384, the first listed",
    )
    headers = parse(
        b"http_server_config:\n  headers:\n    X-Frame-Options: deny\n"
        b"    Strict-Transport-Security: max-age=31536000; includeSubDomains\n"
        b"    X-Content-Type-Options: nosniff\n    X-XSS-Protection: 1\n"
        b"    Content-Security-Policy: \"default-src 'self' *.test.example.net\"\n",
        BASE,
    )
    assert headers.headers == {
        "X-Frame-Options": "deny",
        "Strict-Transport-Security": "max-age=31536000; includeSubDomains",
        "X-Content-Type-Options": "nosniff",
        "X-XSS-Protection": "1",
        "Content-Security-Policy": "default-src 'self' *.test.example.net",
    }
    users = parse(f"{TLS}basic_auth_users:\n  alice: {HASH}\n  42: {HASH}\n".encode(), BASE)
    assert users.users == {"alice": HASH.encode(), "42": HASH.encode()}
    # burst 0 lets nothing through, as the toolkit's own test expects; interval 0 turns it off.
    for text, limit in [
        (b'interval: "1s"\n  burst: 0', (1.0, 0)),
        (b"interval: 1m30.5s\n  burst: 3", (90.5, 3)),
        (b"interval: 500000000\n  burst: 3", (0.5, 3)),
    ]:
        rate_limit = parse(b"rate_limit:\n  " + text + b"\n", BASE).rate_limit
        assert rate_limit is not None and (rate_limit.interval, rate_limit.burst) == limit
    assert parse(b"rate_limit:\n  interval: 0\n  burst: 0\n", BASE).rate_limit is None
    no_http2 = parse((TLS + "http_server_config:\n  http2: false\n").encode(), BASE)
    assert (no_http2.http_server_config.http2, no_http2.notes) == (False, ())
    http2 = parse((TLS + "http_server_config:\n  http2: true\n").encode(), BASE)
    assert http2.notes == (
        "http_server_config.http2: aiohttp serves HTTP/1.1 only; clients that offer HTTP/2 fall back",
    )
    old = parse((TLS + "  min_version: TLS10\n").encode(), BASE)
    assert old.tls is not None and old.tls.min_version == "TLS10"
    assert old.notes == (
        "tls_server_config.min_version: OpenSSL 3 offers no TLS 1.0 or 1.1 cipher at its default level",
    )
    request = parse((TLS + "  client_auth_type: RequestClientCert\n").encode(), BASE)
    assert request.tls is not None and request.tls.client_auth_type == "RequestClientCert"
    assert request.notes == (
        "tls_server_config.client_auth_type RequestClientCert: no certificate is requested (none is used)",
    )
    inline = parse(b"tls_server_config:\n  cert: |\n    CERT\n  key: |\n    KEY\n", BASE)
    assert inline.tls is not None and inline.tls.pem("cert") == Inline(b"CERT\n")
    assert inline.tls.pem("key") == Inline(b"KEY\n")
    assert "KEY" not in repr(inline)


BAD = [
    ("hWkNKCp3fvIx3jKnsaBI\nTuEjdwNS8A2vYdFbiKqr\n", "web config: Input should be a mapping"),
    ("- a\n", "web config: Input should be a mapping"),
    ("tls_server_config: [\n", "not valid YAML: did not find expected node content (line 2, column 1)"),
    ("a: " + "[" * 33 + "]" * 33, "nested more than 32 deep (line 1, column 35)"),
    # Found by tests/fuzz/fuzz_web_config.py: PyYAML's text for these had a second line.
    ("a: \x17\n", "not valid YAML: unacceptable character #x0017: control characters are not allowed (position 4)"),
    (
        "basic_auth_users: {}\nbasic_auth_users: {}\n",
        "not valid YAML: key 'basic_auth_users' given twice (line 2, column 1)",
    ),
    ("rate_limit: {}\nextra: 1\n", "extra: Extra inputs are not permitted"),
    ('"a\\nb": 1\n', "'a\\nb': Extra inputs are not permitted"),
    ("tls_server_config:\n  cert_filse: server.crt\n", "tls_server_config.cert_filse: Extra inputs are not permitted"),
    (
        "tls_server_config:\n  cert_file: ''\n  key_file: server.key\n",
        "tls_server_config: missing one of cert or cert_file",
    ),
    ("tls_server_config:\n  cert_file: server.crt\n  key: ''\n", "tls_server_config: missing one of key or key_file"),
    (TLS + "  cert: PEM\n", "tls_server_config: sets both cert and cert_file: give one"),
    ("tls_server_config:\n  min_version: TLS13\n", "tls_server_config: sets min_version but no certificate"),
    (TLS + "  cert_file: [a]\n", "not valid YAML: key 'cert_file' given twice (line 4, column 3)"),
    (
        "tls_server_config:\n  cert_file: [a]\n  key_file: k\n",
        "tls_server_config.cert_file: Input should be a valid string",
    ),
    (
        TLS + "  client_auth_type: x\n",
        "tls_server_config.client_auth_type: Input should be 'NoClientCert', 'RequestClientCert', "
        "'RequireAnyClientCert', 'VerifyClientCertIfGiven' or 'RequireAndVerifyClientCert'",
    ),
    (
        TLS + "  client_auth_type: RequireAnyClientCert\n",
        "tls_server_config: client_auth_type RequireAnyClientCert (a certificate, never verified) "
        "cannot be served by Python's ssl; use RequireAndVerifyClientCert with client_ca_file",
    ),
    (
        TLS + "  client_auth_type: RequireClientCert\n",
        "tls_server_config: client_auth_type RequireAnyClientCert (a certificate, never verified) "
        "cannot be served by Python's ssl; use RequireAndVerifyClientCert with client_ca_file",
    ),
    (TLS + "  client_ca_file: /dev/null\n", "tls_server_config: client CAs are configured without a client_auth_type"),
    (
        TLS + "  client_auth_type: RequireAndVerifyClientCert\n",
        "tls_server_config: client_auth_type RequireAndVerifyClientCert needs client_ca_file (or client_ca)",
    ),
    (
        TLS + "  client_allowed_sans: [a]\n",
        "tls_server_config: client_allowed_sans needs client_auth_type VerifyClientCertIfGiven or "
        "RequireAndVerifyClientCert (with client_ca_file)",
    ),
    (
        TLS + "  min_version: TLS111\n",
        "tls_server_config.min_version: unknown TLS version 'TLS111'; expected TLS10, TLS11, TLS12 or TLS13",
    ),
    (
        TLS + "  max_version: 1.3\n",
        "tls_server_config.max_version: unknown TLS version '1.3'; expected TLS10, TLS11, TLS12 or TLS13",
    ),
    (
        TLS + "  min_version: TLS13\n  max_version: TLS12\n",
        "tls_server_config: min_version is above max_version: no connection could be made",
    ),
    (
        TLS + "  cipher_suites: [TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA2048]\n",
        "tls_server_config.cipher_suites.0: unknown cipher "
        "'TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA2048'; expected Go's tls.CipherSuites() names",
    ),
    (
        TLS + "  cipher_suites: [TLS_RSA_WITH_AES_128_CBC_SHA]\n",
        "tls_server_config.cipher_suites.0: unknown cipher 'TLS_RSA_WITH_AES_128_CBC_SHA'; expected "
        "Go's tls.CipherSuites() names",
    ),
    (
        TLS + "  cipher_suites: TLS_AES_128_GCM_SHA256\n",
        "tls_server_config.cipher_suites: Input should be a valid list",
    ),
    (
        TLS + "  curve_preferences: [CurveP257]\n",
        "tls_server_config.curve_preferences.0: unknown curve 'CurveP257'; expected CurveP256, "
        "CurveP384, CurveP521 or X25519",
    ),
    (
        TLS + "  prefer_server_cipher_suites: maybe\n",
        "tls_server_config.prefer_server_cipher_suites: Input should be a valid boolean",
    ),
    (
        "basic_auth_users:\n  john: doe\n",
        "basic_auth_users.john: not a bcrypt hash ($2y$10$ and 53 characters; htpasswd -nB)",
    ),
    (
        f"basic_auth_users:\n  john: {HASH[:-1]}\n",
        "basic_auth_users.john: not a bcrypt hash ($2y$10$ and 53 characters; htpasswd -nB)",
    ),
    (
        f"basic_auth_users:\n  john: {HASH.replace('$10$', '$03$')}\n",
        "basic_auth_users.john: not a bcrypt hash ($2y$10$ and 53 characters; htpasswd -nB)",
    ),
    ("basic_auth_users: [a]\n", "basic_auth_users: Input should be a valid dictionary"),
    ("basic_auth_users:\n  true: x\n", "basic_auth_users key: Input should be a valid string"),
    (
        "http_server_config:\n  headers:\n    Content-Type: foo\n",
        "http_server_config.headers: HTTP header 'Content-Type' cannot be configured; expected "
        "Strict-Transport-Security, X-Content-Type-Options, X-Frame-Options, X-XSS-Protection, "
        "Content-Security-Policy",
    ),
    (
        "http_server_config:\n  headers:\n    x-frame-options: deny\n",
        "http_server_config.headers: HTTP header 'x-frame-options' cannot be configured; expected "
        "Strict-Transport-Security, X-Content-Type-Options, X-Frame-Options, X-XSS-Protection, "
        "Content-Security-Policy",
    ),
    (
        "http_server_config:\n  headers:\n    X-Frame-Options: foo\n",
        "http_server_config.headers: X-Frame-Options: invalid value 'foo'; expected deny or sameorigin",
    ),
    (
        "http_server_config:\n  headers:\n    X-Content-Type-Options: sniff\n",
        "http_server_config.headers: X-Content-Type-Options: invalid value 'sniff'; expected nosniff",
    ),
    (
        'http_server_config:\n  headers:\n    Content-Security-Policy: "a\\r\\nSet-Cookie: x"\n',
        "http_server_config.headers: Content-Security-Policy: only printable ASCII can go in a header",
    ),
    ("http_server_config:\n  http2: 1\n", "http_server_config.http2: Input should be a valid boolean"),
    ("http_server_config:\n  http3: true\n", "http_server_config.http3: Extra inputs are not permitted"),
    ("rate_limit:\n  interval: 1 second\n", "rate_limit.interval: not a duration: '1 second' (e.g. 1s, 500ms, 1m30s)"),
    ("rate_limit:\n  interval: 1x\n", "rate_limit.interval: not a duration: '1x' (e.g. 1s, 500ms, 1m30s)"),
    ("rate_limit:\n  interval: -1\n", "rate_limit.interval: must not be negative"),
    ("rate_limit:\n  interval: 1s\n  burst: -1\n", "rate_limit.burst: Input should be greater than or equal to 0"),
    ("rate_limit:\n  interval: 1s\n  burst: 1.5\n", "rate_limit.burst: Input should be a valid integer"),
    ("rate_limit:\n  every: 1s\n", "rate_limit.every: Extra inputs are not permitted"),
    # Huge and endless numbers: an OverflowError traceback, a 500 on /healthz, infinity accepted.
    (
        f"rate_limit:\n  interval: {10**400}\n",
        "rate_limit.interval: out of range: at most 2562047h (Go's time.Duration)",
    ),
    (
        f"rate_limit:\n  interval: {'9' * 400}h\n",
        "rate_limit.interval: out of range: at most 2562047h (Go's time.Duration)",
    ),
    ("rate_limit:\n  interval: 2562048h\n", "rate_limit.interval: out of range: at most 2562047h (Go's time.Duration)"),
    (
        f"rate_limit:\n  interval: 1s\n  burst: {10**400}\n",
        "rate_limit.burst: Input should be less than or equal to 1000000000",
    ),
    # One user in Go's map[string]string: the second silently won.
    (f'basic_auth_users:\n  1: {HASH}\n  "1": {HASH}\n', "not valid YAML: key '1' given twice (line 3, column 3)"),
    (
        f'basic_auth_users:\n  "pr:om": {HASH}\n',
        "basic_auth_users key: user name 'pr:om' contains ':', so it could never log in (RFC 7617)",
    ),
]


@pytest.mark.parametrize(("text", "problem"), BAD)
def test_each_bad_field_is_one_line(text: str, problem: str) -> None:
    with pytest.raises(WebConfigError) as caught:
        parse(text.encode(), BASE)
    assert str(caught.value) == problem
    assert HASH not in problem and "\n" not in problem


def test_bytes_that_are_not_utf_8_are_one_line() -> None:
    """Found by tests/fuzz/fuzz_web_config.py: PyYAML's reader error had a second line."""
    with pytest.raises(WebConfigError) as caught:
        parse(b"a: \xff\xfe\n", BASE)
    problem = "not valid YAML: unacceptable character #x00ff: invalid leading UTF-8 octet (position 4)"
    assert str(caught.value) == problem


def test_deep_nesting_is_refused_before_it_is_composed() -> None:
    """100,000 nested lists crashed PyYAML 6.0.1 (our floor) with SIGSEGV while composing them."""
    for text in (
        b"a: " + b"[" * 100_000 + b"]" * 100_000,
        b"[" * 100_000,
        b"".join(b" " * i + b"- \n" for i in range(5000)),
    ):
        with pytest.raises(WebConfigError) as caught:
            parse(text, BASE)
        # Newer libyaml (PyYAML 6.0.4's wheels) stops a deep flow first, while scanning ahead for keys.
        problem = str(caught.value).split(" (line ")[0]
        assert problem in ("nested more than 32 deep", "not valid YAML: exceeded maximum nesting depth")


# -- through the CLI: the files it names, conflicts, aliases --------------------------------------


@pytest.fixture
def certs(tmp_path: Path) -> trustme.LeafCert:
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1")
    cert.private_key_and_cert_chain_pem.write_to_path(str(tmp_path / "server.crt"))
    cert.private_key_pem.write_to_path(str(tmp_path / "server.key"))
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    return cert


def run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    """main(argv) exits 2 with one line on stderr and nothing on stdout; the line."""
    assert main(argv) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1, (out, err)
    return err.rstrip("\n")


def assert_passes(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    """Every setting in `argv` and every file it names passes: serve gets as far as listening, on a
    port taken here."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        line = run([*argv, "--host", "127.0.0.1", "--port", str(taken.getsockname()[1])], capsys)
    assert line.startswith("pool-exporter: invalid setting port ") and "cannot listen on" in line, line


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for key in ("PROMETHEUS_MULTIPROC_DIR", "POOL_EXPORTER_DATABASE_URL", "POOL_EXPORTER_AUTH_TOKEN"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("POOL_EXPORTER_MULTIPROC_DIR", str(tmp_path))


def test_files_the_config_names(tmp_path: Path, certs: trustme.LeafCert, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "web.yml"
    serve = ["serve", "--web-config-file", str(config)]

    def line_for(text: str) -> str:
        config.write_text(text)
        return run(serve, capsys)

    assert line_for(TLS.replace("server.crt", "missing.crt")) == (
        f"{PREFIX}tls_server_config.cert_file: cannot read {tmp_path}/missing.crt: No such file or directory"
    )
    assert line_for(TLS.replace("server.key", "/dev/zero")) == (
        f"{PREFIX}tls_server_config.key_file: /dev/zero is not a regular file"
    )
    other = trustme.CA().issue_cert("127.0.0.1")
    other.private_key_pem.write_to_path(str(tmp_path / "other.key"))
    assert line_for(TLS.replace("server.key", "other.key")) == (
        f"{PREFIX}tls_server_config: cannot load cert_file {tmp_path}/server.crt with key_file {tmp_path}/other.key: "
        "KEY_VALUES_MISMATCH"
    )
    key = serialization.load_pem_private_key(certs.private_key_pem.bytes(), password=None)
    encrypted = key.private_bytes(  # type: ignore[union-attr]
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"pass phrase"),
    )
    (tmp_path / "encrypted.key").write_bytes(encrypted)
    assert line_for(TLS.replace("server.key", "encrypted.key")) == (
        f"{PREFIX}tls_server_config.key_file {tmp_path}/encrypted.key is encrypted: give an unencrypted key"
    )
    (tmp_path / "junk-ca.pem").write_text("not a certificate\n")
    mtls = TLS + "  client_auth_type: RequireAndVerifyClientCert\n  client_ca_file: junk-ca.pem\n"
    assert line_for(mtls) == f"{PREFIX}tls_server_config.client_ca_file {tmp_path}/junk-ca.pem: no PEM certificate"
    assert line_for("tls_server_config:\n  min_version: TLS13\n") == (
        f"{PREFIX}{config}: tls_server_config: sets min_version but no certificate"
    )
    assert run(["serve", "--web-config-file", str(tmp_path)], capsys) == f"{PREFIX}{tmp_path} is not a regular file"
    assert run(["serve", "--web.config.file", "/nope.yml"], capsys) == (
        f"{PREFIX}cannot read /nope.yml: No such file or directory"
    )
    config.write_text(mtls.replace("junk-ca.pem", "ca.pem"))
    assert_passes(serve, capsys)


def test_a_password_in_place_of_a_hash_is_never_printed(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "web.yml").write_text("basic_auth_users:\n  prom: Sup3r-Secr3t\n")
    line = run(["serve", "--web-config-file", str(tmp_path / "web.yml")], capsys)
    assert (
        line == f"{PREFIX}{tmp_path}/web.yml: basic_auth_users.prom: not a bcrypt hash ($2y$10$ and 53 characters; "
        "htpasswd -nB)"
    )
    assert "Secr3t" not in line


def test_tls_or_auth_in_two_places(
    tmp_path: Path, certs: trustme.LeafCert, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    config = tmp_path / "web.yml"
    config.write_text(f"{TLS}basic_auth_users:\n  prom: {HASH}\n")
    serve = ["serve", "--web-config-file", str(config)]
    tls = ["--tls-cert", str(tmp_path / "server.crt"), "--tls-key", str(tmp_path / "server.key")]
    assert run([*serve, *tls], capsys) == f"{PREFIX}{config} sets tls_server_config, and tls_cert is set too: use one"
    monkeypatch.setenv("POOL_EXPORTER_AUTH_TOKEN", "t0ken")
    assert run(serve, capsys) == f"{PREFIX}{config} sets basic_auth_users, and auth_token is set too: use one"
    monkeypatch.delenv("POOL_EXPORTER_AUTH_TOKEN")
    assert run([*serve, "--basic-auth-user", "u", "--basic-auth-password", "p"], capsys) == (
        f"{PREFIX}{config} sets basic_auth_users, and basic_auth_user is set too: use one"
    )
    # The file for TLS, a token of our own for auth: no conflict.
    config.write_text(TLS)
    monkeypatch.setenv("POOL_EXPORTER_AUTH_TOKEN", "t0ken")
    assert_passes(serve, capsys)
    assert run(["demo", "--web-config-file", str(config)], capsys) == (
        f"{PREFIX}is for serve only: the demo's own load generator could not pass its certificates or users"
    )


def test_listen_address() -> None:
    assert listen_address(["127.0.0.1:9717"], None, None) == {"host": "127.0.0.1", "port": "9717"}
    assert listen_address([":9717"], None, None) == {"host": "", "port": "9717"}
    assert listen_address(["[::]:9717"], None, None) == {"host": "::", "port": "9717"}
    assert listen_address(["[::1]:0"], None, None) == {"host": "::1", "port": "0"}
    assert listen_address(["localhost:80"], None, None) == {"host": "localhost", "port": "80"}
    for bad in ("9717", "::1:9717", "vsock://:9717", "[::1]9717"):
        with pytest.raises(SettingError) as caught:
            listen_address([bad], None, None)
        assert caught.value.line() == (
            "invalid setting host (POOL_EXPORTER_HOST / --host): --web.listen-address must be HOST:PORT, "
            f"[IPv6]:PORT or :PORT, got {bad!r}"
        )
    with pytest.raises(SettingError) as caught:
        listen_address([":9717"], None, "9718")
    assert caught.value.problem == "--web.listen-address stands for --host and --port: give one or the other"
    with pytest.raises(SettingError) as caught:
        listen_address([":9717", ":9718"], None, None)
    assert caught.value.problem == "--web.listen-address given more than once: this exporter listens on one address"


def test_aliases_through_the_cli(capsys: pytest.CaptureFixture[str]) -> None:
    assert run(["serve", "--web.listen-address", "127.0.0.1:http"], capsys) == (
        "pool-exporter: invalid setting port (POOL_EXPORTER_PORT / --port): Input should be a valid integer, "
        "unable to parse string as an integer"
    )
    assert run(["serve", "--web.listen-address", ":9717", "--host", "::"], capsys) == (
        "pool-exporter: invalid setting host (POOL_EXPORTER_HOST / --host): --web.listen-address stands for --host "
        "and --port: give one or the other"
    )
    assert run(["serve", "--web.telemetry-path", "/healthz"], capsys) == (
        "pool-exporter: invalid setting metrics_path (POOL_EXPORTER_METRICS_PATH / --metrics-path): metrics_path "
        "must not be /, /healthz, /readyz or /pools, got '/healthz'"
    )
