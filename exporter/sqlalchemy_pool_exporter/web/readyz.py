"""/readyz: named checks run together with a timeout, and the database check of an instrumented pool.

The pool check never borrows from the pool it observes: under load that would make the probe wait
for (and be counted in) the pool, answer 503, and pull busy pods out of service. It opens a
connection of its own through the pool's connection factory (so `do_connect` hooks such as IAM
tokens still apply), in a thread of its own, runs nothing but the connect, and closes it.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .. import compat
from ..errors import Unavailable as Unavailable
from ..instrumentation import dialect

if TYPE_CHECKING:
    from ..instrumentation.handle import PoolHandle

Check = Callable[[], Awaitable[None]]


@dataclass
class Readiness:
    """Named async checks run together with a timeout; one run at a time, its result reused briefly.

    Concurrent /readyz requests share the run in flight, so probes never pile up on the database.
    `details` adds fields of its own to the /readyz JSON.
    """

    checks: Callable[[], dict[str, Check]]
    timeout: float = 2.0
    cache_for: float = 1.0
    details: Callable[[], dict[str, Any]] | None = None
    _task: asyncio.Task[tuple[bool, dict[str, Any]]] | None = field(default=None, init=False)
    _result: tuple[bool, dict[str, Any]] | None = field(default=None, init=False)
    _at: float = field(default=0.0, init=False)

    async def check(self) -> tuple[bool, dict[str, Any]]:
        if self._result is not None and time.monotonic() - self._at < self.cache_for:
            return self._result
        if self._task is None or self._task.done():
            self._task = asyncio.ensure_future(self._run())
        return await asyncio.shield(self._task)

    async def _run(self) -> tuple[bool, dict[str, Any]]:
        checks = self.checks()
        names = list(checks)
        results = await asyncio.gather(
            *(asyncio.wait_for(checks[n](), self.timeout) for n in names), return_exceptions=True
        )
        detail: dict[str, Any] = {}
        for name, result in zip(names, results, strict=True):
            if isinstance(result, Unavailable):
                detail[name] = f"failing: {result}"
            elif isinstance(result, BaseException):
                kind = "timeout" if isinstance(result, TimeoutError) else type(result).__name__
                detail[name] = f"failing: {kind}"
            else:
                detail[name] = "ok"
        ok = all(v == "ok" for v in detail.values())
        self._result, self._at = (ok, detail), time.monotonic()
        return ok, detail


async def check_pool(handle: PoolHandle) -> None:
    """Open and close one connection to the pool's database, outside the pool; raise if that fails."""
    engine = handle.engine
    if engine is None:
        raise RuntimeError("engine is gone")
    creator = compat.pool_creator(engine.pool)
    if creator is None:
        raise RuntimeError("cannot open a connection outside the pool with this SQLAlchemy version")
    is_async = engine.dialect.is_async
    # A thread of its own: the probe's connection is not counted in create_seconds (dialect.uncounted
    # is per thread), and an async driver gets an event loop of its own for one connect and close.
    await asyncio.to_thread(_open_and_close, creator, is_async)


def _open_and_close(creator: Callable[[], Any], is_async: bool) -> None:
    dialect.uncounted.on = True
    try:
        if is_async:
            from sqlalchemy.util import greenlet_spawn

            async def run() -> None:
                await greenlet_spawn(_connect_close, creator)

            asyncio.run(run())
        else:
            _connect_close(creator)
    finally:
        dialect.uncounted.on = False


def _connect_close(creator: Callable[[], Any]) -> None:
    connection = creator()
    connection.close()
