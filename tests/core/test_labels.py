"""Pool names and printable URLs: never a password, in labels, handles or logs."""

from __future__ import annotations

import json
import logging

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from sqlalchemy import exc as sa_exc
from sqlalchemy import text
from sqlalchemy.engine import make_url

from sqlalchemy_pool_exporter import Exporter, labels, pool_name, safe_url

from ..conftest import PG_NAME, PG_URL, PgEngineFactory, poll

SECRET = "core-s3cret-pw"


@pytest.mark.parametrize(
    ("url", "name"),
    [
        ("postgresql+asyncpg://postgres@127.0.0.1:5432/test", "127.0.0.1:5432/test"),
        ("postgresql+asyncpg://u:p@db.internal/app", "db.internal:5432/app"),
        ("postgresql://u@db:6543/app?sslmode=require", "db:6543/app"),
        # No database (the server's default, the user's name): no trailing '/'.
        ("postgresql+asyncpg://u:p@127.0.0.1", "127.0.0.1:5432"),
        ("postgresql+asyncpg://u:p@127.0.0.1:5432/", "127.0.0.1:5432"),
        ("mysql+pymysql://root@[::1]:3307", "[::1]:3307"),
        ("postgresql://u@[fd00::2]/app", "[fd00::2]:5432/app"),
        ("mysql+aiomysql://root:pw@mysql/shop", "mysql:3306/shop"),
        ("sqlite+aiosqlite:///tmp/x.db", "sqlite:tmp/x.db"),
        ("sqlite://", "sqlite:memory"),
    ],
)
def test_pool_name(url: str, name: str) -> None:
    assert pool_name(url) == name
    assert pool_name(make_url(url)) == name


@pytest.mark.parametrize(
    ("url", "name", "shown"),
    [
        (f"postgresql://us/er:{SECRET}@db/app", "db:5432/app", "postgresql://db/app"),
        (f"postgresql://:{SECRET}@db/app", "db:5432/app", "postgresql://:***@db/app"),
        (f"mysql://q/:{SECRET}@", "mysql:memory", "mysql://"),
        # No credentials, an '@' in a file name: as SQLAlchemy renders it (2.0.38 keeps '@', later quote it).
        ("sqlite:///tmp/a@b.db", "sqlite:tmp/a@b.db", None),
    ],
)
def test_a_user_holding_a_slash_shows_no_password(url: str, name: str, shown: str | None) -> None:
    """Found by tests/fuzz/fuzz_names.py: SQLAlchemy reads `us/er:secret@db/app` as host `us` and
    database `er:secret@db/app`, no credentials; the name and the printable URL showed the password."""
    if shown is None:
        shown = make_url(url).render_as_string(hide_password=True)
    for given in (url, make_url(url)):
        assert (pool_name(given), safe_url(given)) == (name, shown)


def test_safe_url_masks_passwords_and_secret_query_values() -> None:
    url = f"postgresql+asyncpg://user:{SECRET}@h:5432/db?sslpassword={SECRET}&api_token={SECRET}&sslmode=require"
    shown = safe_url(url)
    assert SECRET not in shown
    assert "user:***@h:5432/db" in shown
    assert "sslmode=require" in shown
    masked = make_url(shown).query
    assert (masked["sslpassword"], masked["api_token"]) == ("***", "***")


async def test_a_password_never_shows_in_label_handle_or_logs(
    pg_engine: PgEngineFactory, registry: CollectorRegistry, exporter: Exporter, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    url = PG_URL.replace("postgres@", f"postgres:{SECRET}@")  # trust auth: the password is ignored
    engine, _ = pg_engine(url, pool_size=1, max_overflow=0, pool_timeout=0.1)
    handle = exporter.instrument(engine, leak_threshold=0.1)
    assert handle.name == PG_NAME
    assert handle.url == f"postgresql+asyncpg://postgres:***@{PG_NAME}"

    async with engine.connect() as conn:
        await conn.execute(text("SELECT 1"))
        # A timeout and a leak warning, both with the pool's details.
        with pytest.raises(sa_exc.TimeoutError):
            async with engine.connect():
                pass
        await poll(lambda: any("leak threshold" in r.getMessage() for r in caplog.records))

    texts = [r.getMessage() for r in caplog.records if r.name.startswith("sqlalchemy_pool_exporter")]
    assert any("timed out" in t for t in texts)
    for record in caplog.records:
        assert SECRET not in record.getMessage()
        assert SECRET not in json.dumps({k: str(v) for k, v in record.__dict__.items()})
    assert SECRET not in generate_latest(registry).decode()
    assert SECRET not in json.dumps(handle.snapshot())
    assert SECRET not in repr(handle.status_fields())


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("postgresql+asyncpg://app:s3cret@db.example:6432/orders", ("db.example:6432", "orders", "postgresql+asyncpg")),
        ("postgresql://app:s3cret@db.example/orders", ("db.example:5432", "orders", "postgresql")),
        ("mysql+pymysql://root:pw@127.0.0.1/test", ("127.0.0.1:3306", "test", "mysql+pymysql")),
        ("postgresql://u:p@ss@host:5432/db", ("host:5432", "db", "postgresql")),  # an unescaped @ in the password
        ("postgresql://u:secret@[::1]:5432/db", ("[::1]:5432", "db", "postgresql")),
        ("sqlite:///tmp/app.db", None),
        ("sqlite://", None),
    ],
)
def test_server_labels_name_the_server_never_the_credentials(url: str, expected: tuple[str, str, str] | None) -> None:
    found = labels.server_labels(url)
    assert found == expected
    assert found is None or not any(secret in "".join(found) for secret in ("s3cret", "pw", "ss@", "secret"))
