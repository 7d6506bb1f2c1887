"""Who holds the pool: the name of whoever acquires a connection (a route, a task, a job), per checkout.

`holder("checkout-flow")` names the connections acquired inside it, through a ContextVar: asyncio
tasks created inside inherit it, and the innermost name wins. The first time any holder is set,
attribution switches on for the process (`ATTRIBUTING`); until then the checkout path pays one list
lookup and nothing else (benchmarks, "holders").

A pool keeps one `Slot` per holder name, at most `max_holders` of them; further names are counted
under `other` (and in `folded`), checkouts with no holder under `none`. The checkout path looks up
the slot once and stores it with the checkout, so the return path needs no lookup at all.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any, TypeVar

from .. import validation

F = TypeVar("F", bound=Callable[..., Any])

NONE = "none"
OTHER = "other"
# The server view's name for the connections the pool holds idle (serverview.py): an app's holder of
# that name is counted under `other`, so the two never mix.
POOL = "(pool)"
DEFAULT_MAX_HOLDERS = 50

# The current holder: a name, or a lazy one (an ASGI scope's route, known only after routing).
CURRENT: ContextVar[str | LazyHolder | None] = ContextVar("sqlalchemy_pool_exporter_holder", default=None)
# Set once a holder was ever set in this process: the checkout path reads it first, so code that never
# names a holder pays one list lookup per checkout.
ATTRIBUTING: list[bool] = [False]


class LazyHolder:
    """A holder name known only later (after routing): resolved at each checkout until found, then kept.

    Before it can be resolved (a checkout made before the app routed the request) it reads `fallback`.
    """

    __slots__ = ("_fallback", "_name", "_resolve")

    def __init__(self, resolve: Callable[[], str | None], fallback: str) -> None:
        self._resolve = resolve
        self._fallback = fallback
        self._name: str | None = None

    def name(self) -> str:
        if self._name is None:
            found = self._resolve()
            if found is None:
                return self._fallback
            self._name = validation.holder_name(found)
        return self._name


def current_name() -> str | None:
    """The innermost holder's name now, or None."""
    value = CURRENT.get()
    if value is None or isinstance(value, str):
        return value
    return value.name()


@contextmanager
def _holding(value: str | LazyHolder) -> Iterator[None]:
    ATTRIBUTING[0] = True
    token = CURRENT.set(value)
    try:
        yield
    finally:
        _restore(token)


def _restore(token: Any) -> None:
    try:
        CURRENT.reset(token)
    except ValueError:
        # Left in another context than it was entered in (a framework that resumes a dependency's
        # generator elsewhere): put back what was there before, in this context.
        CURRENT.set(token.old_value if token.old_value is not token.MISSING else None)


class holder:  # lower case: used like contextlib's context managers
    """Name whoever acquires connections inside: `with holder("nightly-report"):`, or as a decorator
    of a function or coroutine function."""

    def __init__(self, name: str) -> None:
        self.name = validation.holder_name(name)
        self._tokens: list[Any] = []

    def __enter__(self) -> holder:
        ATTRIBUTING[0] = True
        self._tokens.append(CURRENT.set(self.name))
        return self

    def __exit__(self, *exc: object) -> None:
        _restore(self._tokens.pop())

    def __call__(self, fn: F) -> F:
        name = self.name
        if inspect.iscoroutinefunction(fn):

            @functools.wraps(fn)
            async def run_async(*args: Any, **kwargs: Any) -> Any:
                with _holding(name):
                    return await fn(*args, **kwargs)

            return run_async  # type: ignore[return-value]

        @functools.wraps(fn)
        def run(*args: Any, **kwargs: Any) -> Any:
            with _holding(name):
                return fn(*args, **kwargs)

        return run  # type: ignore[return-value]


@contextmanager
def lazy_holder(resolve: Callable[[], str | None], fallback: str) -> Iterator[None]:
    """Name connections acquired inside by `resolve()`, called at checkouts until it answers (middleware)."""
    with _holding(LazyHolder(resolve, validation.holder_name(fallback))):
        yield


# -- per pool -------------------------------------------------------------------------------------


class Slot:
    """One holder's counters in one pool, updated in place by the checkout and return paths."""

    __slots__ = ("checkouts", "held_too_long", "hold", "name", "timeouts", "wait")

    def __init__(self, name: str) -> None:
        self.name = name
        self.checkouts = 0
        self.wait = 0.0
        self.hold = 0.0
        self.timeouts = 0
        self.held_too_long = 0


class Holders:
    """A pool's slots by holder name, bounded by `max_holders` (plus `none` and `other`)."""

    def __init__(self, max_holders: int = DEFAULT_MAX_HOLDERS) -> None:
        self.max_holders = max_holders
        self.none = Slot(NONE)
        self.other = Slot(OTHER)
        self.slots: dict[str | None, Slot] = {None: self.none}
        self.folded = 0  # checkouts counted under `other` because max_holders was reached

    def slot(self, name: str | None) -> Slot:
        """The slot of `name` (the checkout path calls this only when `slots.get()` missed)."""
        found = self.slots.get(name)
        if found is not None:
            return found
        if name is None or name == NONE:
            return self.none
        if name in (OTHER, POOL):
            return self.other
        if len(self.slots) - 1 >= self.max_holders:
            self.folded += 1
            return self.other
        found = self.slots[name] = Slot(name)
        return found

    def all(self) -> list[Slot]:
        """Every slot with something to show: `none` and named ones always, `other` once used."""
        slots = list(self.slots.values())
        if self.other.checkouts or self.other.timeouts or self.folded:
            slots.append(self.other)
        return slots
