"""pg_terminate_backend on pooled connections, with and without pool_pre_ping."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry
from sqlalchemy import exc as sa_exc
from sqlalchemy import text

from sqlalchemy_pool_exporter import Exporter

pytestmark = pytest.mark.reliability


@pytest.mark.parametrize("pre_ping", [False, True], ids=["no-pre-ping", "pre-ping"])
async def test_terminate_pooled_connections(
    make_engine, registry: CollectorRegistry, exporter: Exporter, witness, at_rest, live_cluster, pre_ping: bool
) -> None:
    """Fault: the server kills every idle pooled backend, then one that is checked out mid-transaction.

    Without pre-ping the app sees exactly one disconnect error for the idle ones (SQLAlchemy then
    recycles the rest) and one for the held one; with pre-ping it sees none for the idle ones.
    Disconnects, invalidations, opens and closes equal SQLAlchemy's own events; gauges equal the
    server's count afterwards.
    """
    engine, app = make_engine(pool_size=3, max_overflow=0, pool_pre_ping=pre_ping)
    handle = exporter.instrument(engine, name="terminated")
    seen = witness(engine)

    async def hold_all() -> None:
        conns = [await engine.connect() for _ in range(3)]
        for c in conns:
            await c.execute(text("SELECT 1"))
        for c in conns:
            await c.close()

    await hold_all()
    pids = await live_cluster.backends(app)
    assert len(pids) == 3
    await live_cluster.terminate(pids)

    errors = 0
    for _ in range(5):
        async with engine.connect() as conn:
            try:
                await conn.execute(text("SELECT 1"))
            except sa_exc.DBAPIError as exc:
                assert exc.connection_invalidated
                errors += 1
    assert errors == (0 if pre_ping else 1)

    # A backend killed while the app holds it inside a transaction.
    conn = await engine.connect()
    await conn.execute(text("SELECT 1"))
    held = await conn.get_raw_connection()
    pid = held.driver_connection.get_server_pid()
    await live_cluster.terminate([pid])
    with pytest.raises(sa_exc.DBAPIError) as info:
        await conn.execute(text("SELECT 1"))
    assert info.value.connection_invalidated
    await conn.close()
    async with engine.connect() as conn:  # the pool serves a healthy connection again
        assert (await conn.execute(text("SELECT 1"))).scalar() == 1

    p = {"pool": "terminated"}
    s = registry.get_sample_value
    pre_ping_disconnects = seen.events["disconnect_pre_ping"]
    assert (pre_ping_disconnects > 0) is pre_ping
    assert s("sqlalchemy_pool_disconnects_total", p) == errors + 1 + pre_ping_disconnects
    assert s("sqlalchemy_pool_disconnects_total", p) == seen.events["disconnect"] + pre_ping_disconnects
    assert s("sqlalchemy_pool_invalidations_total", {**p, "kind": "hard"}) == seen.events["invalidate"]
    assert s("sqlalchemy_pool_checkouts_total", p) == seen.events["checkout"] == 3 + 5 + 1 + 1
    assert s("sqlalchemy_pool_connections_created_total", p) == seen.events["connect"]
    assert s("sqlalchemy_pool_connections_closed_total", p) == seen.events["close"] + seen.events["close_detached"]
    assert s("sqlalchemy_statement_errors_total", {**p, "error": "InterfaceError"}) == errors + 1
    assert s("sqlalchemy_exporter_errors_total", p) == 0
    await at_rest(handle, registry, live_cluster, app)
