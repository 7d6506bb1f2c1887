"""Settings keep the "one line, exit 2" promise: each value found to slip through, as a real process."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import trustme
from cryptography.hazmat.primitives import serialization

from .cli_process import assert_exit_2_one_line, cli_env, run_cli

pytestmark = pytest.mark.reliability

SERVE = ["serve", "--host", "127.0.0.1", "--port", "0"]
# Never reached by the rejected values below; were a value accepted, the demo fails here first
# (before `--workers` could start a single process) instead of running.
NO_DATABASE = ["--database-url", "sqlite:////nonexistent-pool-exporter-dir/demo.db"]
DEMO = ["demo", "--host", "127.0.0.1", "--port", "0"]


@pytest.fixture
def mp(tmp_path: Path) -> str:
    directory = tmp_path / "mp"
    directory.mkdir()
    return str(directory)


@pytest.mark.parametrize(
    ("flags", "setting"),
    [
        # used to be stripped to /healthz, then a duplicate route: a traceback
        (["--metrics-path", "/healthz/"], "metrics_path"),
        # used to be stripped to /pools, /readyz and "" and silently take their place
        (["--metrics-path", "/pools/"], "metrics_path"),
        (["--metrics-path", "/readyz//"], "metrics_path"),
        (["--metrics-path", "//"], "metrics_path"),
        (["--metrics-path", "/metrics/"], "metrics_path"),
        (["--metrics-path", "/a//b"], "metrics_path"),
        (["--metrics-path", "/metrics?x=1"], "metrics_path"),
        (["--metrics-path", "/metrics#top"], "metrics_path"),
        (["--metrics-path", "/m%65trics"], "metrics_path"),
        (["--metrics-path", "/métriques"], "metrics_path"),
        (["--metrics-path", "/a/../metrics"], "metrics_path"),
        (["--request-head-timeout", "nan"], "request_head_timeout"),
        (["--request-head-timeout", "0"], "request_head_timeout"),
        (["--request-head-timeout", "1e9"], "request_head_timeout"),
        (["--max-http-connections", "0"], "max_http_connections"),
        (["--max-http-connections", "1e3"], "max_http_connections"),
        (["--max-http-connections", "100001"], "max_http_connections"),
        (["--probe-interval", "inf"], "probe_interval"),
        (["--buckets", "wait=0.1,nan"], "buckets"),
        (["--buckets", "wait=1,inf"], "buckets"),
        (["--namespace", "métriques"], "namespace"),
    ],
)
def test_bad_serve_values_exit_2(mp: str, flags: list[str], setting: str) -> None:
    """Fault: metrics paths that shadowed other routes or could never match as given, and out-of-range
    numbers, to a real `serve` process. Each exits 2 with one line naming the setting."""
    assert_exit_2_one_line(run_cli([*SERVE, "--multiproc-dir", mp, *flags]), setting)


@pytest.mark.parametrize(
    ("flags", "setting"),
    [
        (["--duration", "nan"], "duration"),  # used to exit 0 at once
        (["--duration", "inf"], "duration"),  # used to run for ever
        (["--duration", "1e300"], "duration"),
        (["--duration", "-5"], "duration"),
        (["--workers", "100000000000000000000"], "workers"),  # used to start spawning
        (["--workers", "65"], "workers"),
        (["--workers", "1e20"], "workers"),
        (["--workers", "٣"], "workers"),  # a digit, but not an ASCII one
        (["--leak-threshold", "inf"], "leak_threshold"),  # used to be a traceback from instrument()
    ],
)
def test_bad_demo_values_exit_2(flags: list[str], setting: str) -> None:
    """Fault: `demo --duration nan|inf`, `--workers` far too many, `--leak-threshold inf`, as a real
    process. Each exits 2 with one line; none starts a worker."""
    assert_exit_2_one_line(run_cli([*DEMO, *NO_DATABASE, *flags]), setting)


@pytest.fixture
def certificate(tmp_path: Path) -> tuple[Path, Path]:
    cert = trustme.CA().issue_cert("127.0.0.1")
    cert_path, key_path = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert.cert_chain_pems[0].write_to_path(str(cert_path))
    cert.private_key_pem.write_to_path(str(key_path))
    return cert_path, key_path


def test_encrypted_tls_key_is_one_line_not_a_prompt(mp: str, tmp_path: Path, certificate: tuple[Path, Path]) -> None:
    """Fault: a pass-phrase-protected key. OpenSSL used to prompt for the pass phrase (on a service!)
    and then fail with a traceback; now it is one line saying the key is encrypted."""
    cert_path, key_path = certificate
    key = serialization.load_pem_private_key(key_path.read_bytes(), None)
    encrypted = tmp_path / "encrypted.pem"
    encrypted.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"pass phrase"),
        )
    )
    result = run_cli([*SERVE, "--multiproc-dir", mp, "--tls-cert", str(cert_path), "--tls-key", str(encrypted)])
    assert_exit_2_one_line(result, "tls_key")
    assert "encrypted" in result.stderr


def test_tls_files_that_are_not_small_regular_files(mp: str, tmp_path: Path, certificate: tuple[Path, Path]) -> None:
    """Fault: /dev/zero as the key (it used to be read until memory ran out), a FIFO nobody writes
    (read for ever), and a 2 MiB file. Each is one line, before anything is read."""
    cert_path, key_path = certificate
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    big = tmp_path / "big.pem"
    big.write_bytes(key_path.read_bytes() + b"\n" * (2 << 20))
    for cert, key, setting in [
        (cert_path, Path("/dev/zero"), "tls_key"),
        (Path("/dev/zero"), key_path, "tls_cert"),
        (cert_path, fifo, "tls_key"),
        (cert_path, big, "tls_key"),
    ]:
        result = run_cli([*SERVE, "--multiproc-dir", mp, "--tls-cert", str(cert), "--tls-key", str(key)])
        assert_exit_2_one_line(result, setting)


@pytest.fixture
def read_only_dir(tmp_path: Path) -> Iterator[tuple[Path, list[str]]]:
    """A multiprocess directory serve cannot write (mode 555), and how to run serve so that the mode
    binds: root bypasses it, so as root serve runs without CAP_DAC_OVERRIDE (setpriv)."""
    directory = tmp_path / "read-only"
    directory.mkdir()
    directory.chmod(0o555)
    wrapper: list[str] = []
    if os.geteuid() == 0:
        setpriv = shutil.which("setpriv")
        if setpriv is None:
            pytest.skip("running as root without setpriv: nothing makes a directory read-only for us")
        wrapper = [setpriv, "--bounding-set=-dac_override,-dac_read_search", "--"]
    try:
        yield directory, wrapper
    finally:
        directory.chmod(0o700)


def test_read_only_multiprocess_dir_is_one_line(read_only_dir: tuple[Path, list[str]]) -> None:
    """Fault: a multiprocess directory `serve` cannot write (the sidecar compacts and quarantines in
    it). It used to be a traceback at start; now it is one line."""
    directory, wrapper = read_only_dir
    result = run_cli([*SERVE, "--multiproc-dir", str(directory)], cli_env(), wrapper=wrapper)
    assert_exit_2_one_line(result, "multiproc_dir")
    assert "cannot create files" in result.stderr


LONG_HOST = "a" * 5000


def _listen_rest(command: str, mp: str) -> list[str]:
    """What else serve or demo needs to get as far as listening: the demo binds after its database
    is ready, so it gets a real one (and stops by itself, were a bad host ever accepted)."""
    if command == "serve":
        return ["--multiproc-dir", mp]
    return ["--database-url", f"sqlite:///{mp}/demo.db", "--duration", "5"]


@pytest.mark.parametrize(
    "listen",
    [
        # each used to be a UnicodeError traceback from asyncio's lookup (IDNA), exit 1
        ["--host", LONG_HOST, "--port", "0"],
        ["--web.listen-address", f"{LONG_HOST}:0"],
        ["--host", "a" * 64, "--port", "0"],  # one label over 63 characters
        ["--host", "a..b", "--port", "0"],  # an empty label
        ["--web.listen-address", "a..b:0"],
        ["--host", "exa mple", "--port", "0"],
        ["--host", "[::1]", "--port", "0"],
        ["--web.listen-address", "[not-an-address]:0"],
        ["--host", "nonexistent.invalid", "--port", "0"],  # well-formed, but resolves to nothing
    ],
)
@pytest.mark.parametrize("command", ["serve", "demo"])
def test_bad_listen_addresses_exit_2(mp: str, command: str, listen: list[str]) -> None:
    """Fault: listen hosts IDNA cannot encode (5,000 characters, a 64-character or empty label), that
    are no host name at all, or that resolve to nothing, as `--host`, `--web.listen-address` and, for
    the long one, `POOL_EXPORTER_HOST`; to a real `serve` and `demo`. Each exits 2 with one line
    naming the host, never quoting 5,000 characters."""
    result = run_cli([command, *listen, *_listen_rest(command, mp)])
    assert_exit_2_one_line(result, "host")
    assert len(result.stderr) < 400


@pytest.mark.parametrize("command", ["serve", "demo"])
def test_a_long_host_from_the_environment_exits_2(mp: str, command: str) -> None:
    """Fault: POOL_EXPORTER_HOST of 5,000 characters: one line, exit 2, like the flag."""
    result = run_cli(
        [command, "--port", "0", *_listen_rest(command, mp)], {**cli_env(), "POOL_EXPORTER_HOST": LONG_HOST}
    )
    assert_exit_2_one_line(result, "host")
    assert len(result.stderr) < 400
