"""Settings are values: the files they name are read by startup.check, each problem one SettingError."""

from __future__ import annotations

from pathlib import Path

import pytest

from sqlalchemy_pool_exporter import validation
from sqlalchemy_pool_exporter.service import startup
from sqlalchemy_pool_exporter.service.settings import SettingError, load


def test_settings_read_no_file_and_startup_reads_each(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR", raising=False)
    missing = str(tmp_path / "missing")
    files = {"multiproc_dir": missing, "tls_cert": missing, "tls_key": missing, "web_config_file": missing}
    for drop, setting, problem in [
        ((), "multiproc_dir", f"{missing} is not a directory"),
        (("multiproc_dir",), "tls_cert", f"cannot read {missing}: No such file or directory"),
        (("tls_cert", "tls_key"), "web_config_file", f"cannot read {missing}: No such file or directory"),
    ]:
        for name in drop:
            del files[name]
        settings = load(**files)  # no error: nothing is read yet
        with pytest.raises(SettingError) as caught:
            startup.check(settings)
        assert (caught.value.setting, caught.value.problem) == (setting, problem)
    assert startup.check(load()) == startup.Startup()


def test_a_path_holding_an_at_sign_is_not_repeated_in_the_error(tmp_path: Path) -> None:
    """Found by fuzz_settings: a URL given as a file name was repeated, password and all."""
    with pytest.raises(ValueError) as caught:
        validation.small_file(tmp_path / "postgresql:" / "u:Hunter2-XyZZy@db" / "app")
    assert str(caught.value) == "cannot read (a path holding '@', not repeated): No such file or directory"
