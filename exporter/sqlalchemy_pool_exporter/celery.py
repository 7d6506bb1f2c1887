"""Celery: `instrument_celery(app)` names each task's connections after the task, `celery: tasks.send_invoice`.

Set in `task_prerun` and put back in `task_postrun`, Celery's own signals, which a worker sends around
every task in the thread or greenlet that runs it (prefork children, `--pool threads`, `gevent`,
`eventlet`, `solo`, and eager calls alike). A task's name is chosen by the code, not by a client, and
a pool keeps at most `max_holders` names like any others.

Prefork: instrument the engine at import as usual, before the worker forks its children; each child's
multiprocess writer restarts after the fork (exposition/writer.py), so every child writes
PROMETHEUS_MULTIPROC_DIR under its own pid for `pool-exporter serve`. Imports celery only here.
"""

from __future__ import annotations

from typing import Any

from celery import Celery, signals  # type: ignore[import-untyped]

from .instrumentation.holders import holder

PREFIX = "celery: "
_PRERUN = "sqlalchemy_pool_exporter.celery.prerun"
_POSTRUN = "sqlalchemy_pool_exporter.celery.postrun"

# The holder of each running task, by task id: set in task_prerun, taken back in task_postrun.
_held: dict[str, holder] = {}
_apps: list[Celery | None] = []


def task_holder(task: Any) -> str:
    """A task's holder name: `celery: <task name>`."""
    return f"{PREFIX}{getattr(task, 'name', None) or type(task).__name__}"


def instrument_celery(app: Celery | None = None) -> None:
    """Name the connections of every task (of `app` only, when given) after the task; idempotent."""
    if app not in _apps:
        _apps.append(app)
    signals.task_prerun.connect(_prerun, weak=False, dispatch_uid=_PRERUN)
    signals.task_postrun.connect(_postrun, weak=False, dispatch_uid=_POSTRUN)


def uninstrument_celery(app: Celery | None = None) -> None:
    """Undo instrument_celery(app); the signals are let go when no app is left; idempotent."""
    if app in _apps:
        _apps.remove(app)
    if not _apps:
        signals.task_prerun.disconnect(_prerun, dispatch_uid=_PRERUN)
        signals.task_postrun.disconnect(_postrun, dispatch_uid=_POSTRUN)


def _ours(task: Any) -> bool:
    return None in _apps or getattr(task, "app", None) in _apps


def _prerun(sender: Any = None, task_id: str | None = None, task: Any = None, **_: Any) -> None:
    task = task if task is not None else sender
    if task_id is None or not _ours(task):
        return
    held = holder(task_holder(task))
    held.__enter__()
    _held[task_id] = held


def _postrun(sender: Any = None, task_id: str | None = None, **_: Any) -> None:
    held = _held.pop(task_id, None) if task_id is not None else None
    if held is not None:
        held.__exit__(None, None, None)
