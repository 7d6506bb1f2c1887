"""Settings fuzzed with hypothesis: always a clean one-line exit-2 message, never a traceback."""

from __future__ import annotations

import contextlib
import io
import os
import subprocess
import sys
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from sqlalchemy_pool_exporter.service import cli
from sqlalchemy_pool_exporter.service.settings import ENV_PREFIX, SettingError, load

pytestmark = pytest.mark.reliability

SECRET = "Hunter2-XyZZy-91c5"
NAMES = [name for name, _, _ in cli.FLAGS]

odd_text = st.one_of(
    st.text(max_size=40),
    st.text(alphabet=st.characters(codec="utf-8", exclude_characters="\x00"), max_size=20),
    st.sampled_from(
        [
            "",
            " ",
            "-1",
            "0",
            "1e309",
            "nan",
            "inf",
            "-inf",
            "65536",
            "99999999999999999999",
            "0x10",
            "1_000",
            "true",
            "null",
            "{}",
            "[]",
            '{"wait": [1, "x"]}',
            '{"wait": []}',
            "wait=",
            "wait=3,2,1",
            "nope=1",
            "wait=0.1;;use=",
            "/",
            "/healthz",
            "metrics",
            "/a b",
            "é",
            "DEBUG\n",
            "json ",
            "/nonexistent/dir",
            "/etc/passwd",
            "/dev/null",
            "\\",
            "'\"",
            "\n\n",
            f"postgresql://u:{SECRET}@host:notaport/db",
            f"postgresql+asyncpg://u:{SECRET}@[::1/db",
            f"mysql://u:{SECRET}@h/db",
            f"postgresql://u:{SECRET}@h:99999/db",
            "postgresql://",
            "sqlite:///:memory:?x=%",
        ]
    ),
)
settings_values = st.dictionaries(st.sampled_from(NAMES), odd_text, min_size=1, max_size=4)


@contextlib.contextmanager
def environment(values: dict[str, str]) -> Iterator[None]:
    saved = dict(os.environ)
    for key in list(os.environ):
        if key.startswith(ENV_PREFIX) or key == "PROMETHEUS_MULTIPROC_DIR":
            del os.environ[key]
    os.environ.update({ENV_PREFIX + k.upper(): v for k, v in values.items()})
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


def _one_clean_line(message: str) -> None:
    assert message.endswith("\n") and message.count("\n") == 1, repr(message)
    assert "Traceback" not in message and 'File "' not in message
    assert SECRET not in message


@settings(max_examples=300, database=None, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(flags=settings_values, env=settings_values)
def test_fuzzed_settings_in_process(flags: dict[str, str], env: dict[str, str]) -> None:
    """Fault: random flags and POOL_EXPORTER_* values (types, ranges, odd and non-ASCII strings, secrets).

    The settings loader the CLI uses either accepts them or raises SettingError whose message is one
    line, names a setting and never repeats the database password; nothing else ever escapes.
    """
    assume(all("\x00" not in v for v in env.values()))
    with environment(env):
        try:
            loaded = load(**flags)
        except SettingError as exc:
            line = exc.line()
            _one_clean_line(line + "\n")
            assert exc.setting in NAMES or exc.setting == "settings", exc.setting
            return
    assert loaded.database_url is None or SECRET not in str(loaded.database_url)


@settings(max_examples=300, database=None, deadline=None)
@given(flags=settings_values)
def test_fuzzed_cli_flags_exit_2(flags: dict[str, str]) -> None:
    """Fault: the same values as real `pool-exporter serve` flags, through the CLI's own main().

    Whatever the loader rejects makes main() return 2 after printing exactly one line to stderr and
    nothing to stdout (values it accepts would start a server, so they are skipped here).
    """
    with environment({}):
        try:
            load(**flags)
            assume(False)
        except SettingError:
            pass
        argv = ["serve"]
        for name, value in flags.items():
            argv.append(f"--{name.replace('_', '-')}={value}")
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = cli.main(argv)
            except SystemExit as exc:  # argparse rejections
                code = exc.code  # type: ignore[assignment]
    assert code == 2
    assert out.getvalue() == ""
    _one_clean_line(err.getvalue())


@settings(max_examples=8, database=None, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(env=settings_values)
def test_fuzzed_environment_real_process(env: dict[str, str]) -> None:
    """Fault: bad POOL_EXPORTER_* values given to a real `python -m sqlalchemy_pool_exporter serve` process.

    The process exits 2 with one line on stderr, no traceback, no password (eight examples: each
    is a fresh interpreter).
    """
    assume(all("\x00" not in v for v in env.values()))
    with environment(env):
        try:
            load()
            assume(False)
        except SettingError:
            pass
        child_env = dict(os.environ)
    result = subprocess.run(
        [sys.executable, "-m", "sqlalchemy_pool_exporter", "serve"],
        env=child_env,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 2, result.stderr
    assert result.stdout == ""
    _one_clean_line(result.stderr)
