"""The async session scope users copy everywhere, done right: commit, rollback, close, count, log."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from .core import handle_for
from .instrumentation import holders
from .instrumentation.stats import bump

log = logging.getLogger("sqlalchemy_pool_exporter.session")


@asynccontextmanager
async def session_scope(
    sessionmaker: async_sessionmaker[AsyncSession], *, holder: str | None = None
) -> AsyncIterator[AsyncSession]:
    """Yield a session; commit if the block succeeds, roll back on any exception, always close.

    `holder` names whoever holds its connection (instrumentation/holders.py), for the block's duration.
    """
    if holder is None:
        async with _scope(sessionmaker) as session:
            yield session
        return
    with holders.holder(holder):
        async with _scope(sessionmaker) as session:
            yield session


@asynccontextmanager
async def _scope(sessionmaker: async_sessionmaker[AsyncSession]) -> AsyncIterator[AsyncSession]:
    session = sessionmaker()
    outcome = "commit"
    try:
        yield session
        await session.commit()
    except asyncio.CancelledError:
        outcome = "cancelled"
        await _rollback_quietly(session)
        raise
    except BaseException:
        outcome = "rollback"
        await _rollback_quietly(session)
        raise
    finally:
        try:
            await session.close()
        finally:
            _record(session, outcome)


def session_dependency(
    sessionmaker: async_sessionmaker[AsyncSession], *, holder: str | None = None
) -> Callable[[], AsyncIterator[AsyncSession]]:
    """A FastAPI-style dependency (`Depends(get_session)`) built on session_scope()."""

    async def get_session() -> AsyncIterator[AsyncSession]:
        async with session_scope(sessionmaker, holder=holder) as session:
            yield session

    return get_session


async def _rollback_quietly(session: AsyncSession) -> None:
    # The original exception matters more than a failed rollback; close() still runs after.
    try:
        await session.rollback()
    except Exception:
        log.warning("rollback after a failed session scope raised", exc_info=True)


def _record(session: AsyncSession, outcome: str) -> None:
    try:
        bind: Any = session.bind
        handle = handle_for(bind) if bind is not None else None
        if handle is None:
            if log.isEnabledFor(logging.DEBUG):
                log.debug("session %s", outcome, extra={"outcome": outcome})
            return
        bump(handle.stats.sessions, outcome)
        if log.isEnabledFor(logging.DEBUG):
            fields = handle.status_fields()
            log.debug(
                "session %s; pool %s size=%s used=%s idle=%s overflow=%s pending=%s",
                outcome,
                fields["pool"],
                fields.get("size"),
                fields.get("used"),
                fields.get("idle"),
                fields.get("overflow"),
                fields.get("pending"),
                extra={"outcome": outcome, **fields},
            )
    except Exception:
        log.debug("could not record the session outcome", exc_info=True)
