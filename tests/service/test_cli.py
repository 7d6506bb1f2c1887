"""Bad settings exit 2 with one line naming the setting; secrets never printed; serve end to end."""

from __future__ import annotations

import signal
import subprocess
from pathlib import Path

import pytest

from sqlalchemy_pool_exporter.service.cli import main

from ..conftest import PG_URL, PYTHON, scrape, wait_for_line
from ..conftest import clean_env as cli_env
from ..conftest import metric as sample

BAD = [
    (["serve", "--port", "70000"], {}, "port"),
    (["serve", "--port", "http"], {}, "port"),
    (["serve", "--multiproc-dir", "/does/not/exist"], {}, "multiproc_dir"),
    (["serve"], {"POOL_EXPORTER_LOG_LEVEL": "chatty"}, "log_level"),
    (["serve", "--log-format", "xml"], {}, "log_format"),
    (["serve", "--database-url", "not a url:Secr3t@"], {}, "database_url"),
    (["serve", "--database-url", "mysql://u:Secr3t@h/db"], {}, "database_url"),
    (["serve", "--tls-cert", "/nope/cert.pem", "--tls-key", "/nope/key.pem"], {}, "tls_cert"),
    (["serve", "--tls-cert", "/etc/hostname"], {}, "tls_key"),
    (["serve", "--basic-auth-user", "prom"], {}, "basic_auth_password"),
    (["serve", "--buckets", "wait=1,0.5"], {}, "buckets"),
    (["serve", "--namespace", "9lives"], {}, "namespace"),
    (["demo", "--names", "otel"], {}, "names"),
    (["serve"], {"POOL_EXPORTER_NAMES": "prometheus"}, "names"),
    (["serve", "--metrics-path", "healthz"], {}, "metrics_path"),
    (["serve", "--probe-interval", "0"], {}, "probe_interval"),
    (["serve", "--server-view-databases", "app,*"], {}, "server_view_databases"),
    (["serve"], {"POOL_EXPORTER_SERVER_VIEW_DATABASES": "app,,orders"}, "server_view_databases"),
    (["demo", "--duration", "soon"], {}, "duration"),
    (["demo", "--workers", "0"], {}, "workers"),
    (["serve"], {}, "multiproc_dir"),
]


@pytest.mark.parametrize(("argv", "env", "setting"), BAD)
def test_bad_setting_exits_2_with_one_line(
    argv: list[str],
    env: dict[str, str],
    setting: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    for key in ("PROMETHEUS_MULTIPROC_DIR", "POOL_EXPORTER_DATABASE_URL", "POOL_EXPORTER_MULTIPROC_DIR"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert main(argv) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.count("\n") == 1
    assert err.startswith(f"pool-exporter: invalid setting {setting} (POOL_EXPORTER_{setting.upper()} / --")
    assert "Secr3t" not in err


def test_tls_key_that_does_not_match(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import trustme

    ca = trustme.CA()
    cert, other = ca.issue_cert("127.0.0.1"), ca.issue_cert("127.0.0.1")
    cert.cert_chain_pems[0].write_to_path(str(tmp_path / "cert.pem"))
    other.private_key_pem.write_to_path(str(tmp_path / "key.pem"))
    monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR", raising=False)
    assert main(["serve", "--tls-cert", str(tmp_path / "cert.pem"), "--tls-key", str(tmp_path / "key.pem")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("pool-exporter: invalid setting tls_cert ") and "KEY_VALUES_MISMATCH" in err


def test_real_process_bad_setting_no_traceback() -> None:
    result = subprocess.run(
        [PYTHON, "-m", "sqlalchemy_pool_exporter", "serve", "--port", "-1"],
        env=cli_env(POOL_EXPORTER_DATABASE_URL="postgresql://u:Secr3t@127.0.0.1/db"),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr == (
        "pool-exporter: invalid setting port (POOL_EXPORTER_PORT / --port): "
        "Input should be greater than or equal to 0\n"
    )
    unknown = subprocess.run(
        [PYTHON, "-m", "sqlalchemy_pool_exporter", "serve", "--colour"], capture_output=True, text=True, env=cli_env()
    )
    assert unknown.returncode == 2
    assert unknown.stderr.count("\n") == 1 and "Traceback" not in unknown.stderr


@pytest.mark.postgres
async def test_serve_multiproc_dir_and_server_view_then_sigterm(tmp_path: Path) -> None:
    directory = tmp_path / "mp"
    directory.mkdir()
    url = PG_URL.replace("postgres@", "postgres:Secr3tPw@")
    proc = subprocess.Popen(
        [
            PYTHON,
            "-m",
            "sqlalchemy_pool_exporter",
            "serve",
            "--host",
            "127.0.0.1",
            "--port",
            "0",
            "--log-format",
            "json",
        ],
        env=cli_env(POOL_EXPORTER_DATABASE_URL=url, PROMETHEUS_MULTIPROC_DIR=str(directory)),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    lines: list[str] = []
    try:
        proc.stdout = proc.stderr  # wait_for_line reads .stdout
        m = wait_for_line(proc, r"pool-exporter serve: (http://127\.0\.0\.1:\d+/metrics)", lines)
        samples = await scrape(m[1])
        assert sample(samples, "sqlalchemy_server_up") == 1.0
        assert sample(samples, "sqlalchemy_exporter_sidecar_workers") == 0.0
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    rest = proc.stderr.read() if proc.stderr else ""
    output = "".join(lines) + rest
    assert "Secr3tPw" not in output
    assert '"message": "pool-exporter serve: stopping"' in output
    assert "Traceback" not in output
