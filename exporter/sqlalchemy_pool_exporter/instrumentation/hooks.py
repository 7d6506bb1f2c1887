"""Everything instrument() installs on an engine, recorded as it is installed and undone in reverse.

Undo takes off only what is still ours. When another layer (a tracer, a retry wrapper, a test's
patch) wrapped one of our wrappers after us, tearing ours out would tear theirs off too: ours stays
in their chain and turns into a pass-through, through the `on` flag every wrapper checks first.
"""

from __future__ import annotations

import contextlib
import logging
import weakref
from collections.abc import Callable
from typing import Any

from sqlalchemy import event
from sqlalchemy import exc as sa_exc

log = logging.getLogger("sqlalchemy_pool_exporter")

_ABSENT = object()


class Hooks:
    """The undo list of one instrumented engine."""

    def __init__(self) -> None:
        # Shared with every wrapper: on[0] False makes it call straight through.
        self.on: list[bool] = [True]
        self._undo: list[Callable[[], None]] = []
        self.listeners: list[tuple[str, Callable[..., Any]]] = []

    def listen(self, target: Any, name: str, fn: Callable[..., Any]) -> None:
        event.listen(target, name, fn)
        self.listeners.append((name, fn))
        # Weakly: the undo list must not keep the engine (or a replaced pool) alive.
        ref = weakref.ref(target)

        def remove() -> None:
            target = ref()
            if target is not None:
                with contextlib.suppress(sa_exc.InvalidRequestError):
                    event.remove(target, name, fn)

        self._undo.append(remove)

    def patch(self, obj: Any, attr: str, wrapper: Any) -> None:
        """Set `obj.attr = wrapper` (an instance attribute); undo puts back what was there, if still ours."""
        previous = vars(obj).get(attr, _ABSENT)
        setattr(obj, attr, wrapper)
        # Both weakly: a wrapper holds its pool, and a pool holds its engine (first_connect).
        ref = weakref.ref(obj)
        ours = _weak(wrapper)

        def unpatch() -> None:
            obj = ref()
            if obj is None:
                return
            if vars(obj).get(attr, _ABSENT) is not ours():
                return  # someone stacked on us or replaced us: leave their layer, ours passes through
            if previous is _ABSENT:
                vars(obj).pop(attr, None)
            else:
                setattr(obj, attr, previous)

        self._undo.append(unpatch)

    def undo(self) -> None:
        """Undo everything, newest first; idempotent. A failure to undo one hook does not stop the rest."""
        self.on[0] = False
        while self._undo:
            step = self._undo.pop()
            try:
                step()
            except Exception:
                log.warning("could not undo an exporter hook (left as a pass-through)", exc_info=True)
        self.listeners.clear()


def _weak(value: Any) -> Callable[[], Any]:
    try:
        return weakref.ref(value)
    except TypeError:  # a weakref itself (the handle marker): holding it keeps nothing alive
        return lambda: value
