"""The session scope users copy everywhere, done right: commit, rollback, close, count, log.

`session_scope(maker)` is an `async with` scope for an `async_sessionmaker` and a `with` scope for a sync
`sessionmaker` (or any callable that returns a Session: a `scoped_session`, Flask-SQLAlchemy's
`db.session`); both count their outcome in `session_scopes_total` the same way. A greenlet killed
inside a sync scope (gevent's `kill()`, GreenletExit) is `cancelled`, as a cancelled task is in asyncio.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import AbstractAsyncContextManager, AbstractContextManager, asynccontextmanager, contextmanager
from typing import Any, overload

from greenlet import GreenletExit  # type: ignore[import-untyped]
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from sqlalchemy.orm import Session

from .core import handle_for
from .instrumentation import holders
from .instrumentation.stats import bump

log = logging.getLogger("sqlalchemy_pool_exporter.session")


SessionFactory = Callable[[], Session]


@overload
def session_scope(
    sessionmaker: async_sessionmaker[AsyncSession], *, holder: str | None = None
) -> AbstractAsyncContextManager[AsyncSession]: ...


@overload
def session_scope(sessionmaker: SessionFactory, *, holder: str | None = None) -> AbstractContextManager[Session]: ...


def session_scope(
    sessionmaker: async_sessionmaker[AsyncSession] | SessionFactory, *, holder: str | None = None
) -> AbstractAsyncContextManager[AsyncSession] | AbstractContextManager[Session]:
    """Yield a session; commit if the block succeeds, roll back on any exception, always close.

    `async with` for an `async_sessionmaker`, `with` for a sync `sessionmaker` (or `scoped_session`).
    `holder` names whoever holds its connection (instrumentation/holders.py), for the block's duration.
    """
    if isinstance(sessionmaker, async_sessionmaker):
        return _async_session_scope(sessionmaker, holder)
    return _sync_session_scope(sessionmaker, holder)


@asynccontextmanager
async def _async_session_scope(
    sessionmaker: async_sessionmaker[AsyncSession], holder: str | None
) -> AsyncIterator[AsyncSession]:
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


@contextmanager
def _sync_session_scope(sessionmaker: SessionFactory, holder: str | None) -> Iterator[Session]:
    if holder is None:
        with _sync_scope(sessionmaker) as session:
            yield session
        return
    with holders.holder(holder), _sync_scope(sessionmaker) as session:
        yield session


@contextmanager
def _sync_scope(sessionmaker: SessionFactory) -> Iterator[Session]:
    session = sessionmaker()
    outcome = "commit"
    try:
        yield session
        session.commit()
    except GreenletExit:
        outcome = "cancelled"
        _rollback_sync_quietly(session)
        raise
    except BaseException:
        outcome = "rollback"
        _rollback_sync_quietly(session)
        raise
    finally:
        try:
            session.close()
        finally:
            _record(session, outcome)


@overload
def session_dependency(
    sessionmaker: async_sessionmaker[AsyncSession], *, holder: str | None = None
) -> Callable[[], AsyncIterator[AsyncSession]]: ...


@overload
def session_dependency(
    sessionmaker: SessionFactory, *, holder: str | None = None
) -> Callable[[], Iterator[Session]]: ...


def session_dependency(
    sessionmaker: async_sessionmaker[AsyncSession] | SessionFactory, *, holder: str | None = None
) -> Callable[[], AsyncIterator[AsyncSession]] | Callable[[], Iterator[Session]]:
    """A dependency-style generator (FastAPI's `Depends(get_session)`) built on session_scope(): async or
    sync, as the sessionmaker is."""
    if isinstance(sessionmaker, async_sessionmaker):
        makes_async = sessionmaker

        async def get_session() -> AsyncIterator[AsyncSession]:
            async with session_scope(makes_async, holder=holder) as session:
                yield session

        return get_session
    makes_sync = sessionmaker

    def get_sync_session() -> Iterator[Session]:
        with session_scope(makes_sync, holder=holder) as session:
            yield session

    return get_sync_session


async def _rollback_quietly(session: AsyncSession) -> None:
    # The original exception matters more than a failed rollback; close() still runs after.
    try:
        await session.rollback()
    except Exception:
        log.warning("rollback after a failed session scope raised", exc_info=True)


def _rollback_sync_quietly(session: Session) -> None:
    try:
        session.rollback()
    except Exception:
        log.warning("rollback after a failed session scope raised", exc_info=True)


def _record(session: AsyncSession | Session, outcome: str) -> None:
    try:
        bind: Any = session.bind
        if bind is None and isinstance(session, Session):
            # Flask-SQLAlchemy's sessions have no bind of their own: they resolve the default engine.
            bind = session.get_bind()
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
