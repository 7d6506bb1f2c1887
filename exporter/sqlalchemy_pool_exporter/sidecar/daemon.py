"""An executor whose one thread never holds up the process's exit.

The sidecar merges in a worker thread. A merge is bounded by construction (no blocking open, bounded
reads, a deadline checked between steps), but a thread stuck in the kernel (a hung network filesystem)
cannot be interrupted, and ThreadPoolExecutor joins its threads at interpreter exit
(`threading._register_atexit`): a sidecar told to stop would then never exit. A daemon thread is
abandoned at exit instead.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from concurrent.futures import Executor, Future
from typing import Any, ParamSpec, TypeVar

P = ParamSpec("P")
T = TypeVar("T")

_Job = tuple[Future[Any], Callable[..., Any], tuple[Any, ...], dict[str, Any]]


class DaemonExecutor(Executor):
    """Runs submitted calls one at a time, in order, on one daemon thread started on first use."""

    def __init__(self, name: str) -> None:
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._shutdown = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def submit(self, fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> Future[T]:
        future: Future[T] = Future()
        with self._lock:
            if self._shutdown:
                raise RuntimeError("cannot schedule new futures after shutdown")
            self._jobs.put((future, fn, args, kwargs))
            if self._thread.ident is None:
                self._thread.start()
        return future

    def _run(self) -> None:
        while (job := self._jobs.get()) is not None:
            future, fn, args, kwargs = job
            if not future.set_running_or_notify_cancel():
                continue
            try:
                result = fn(*args, **kwargs)
            except BaseException as exc:
                future.set_exception(exc)
            else:
                future.set_result(result)

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """No new calls; with `cancel_futures`, queued ones are cancelled; `wait` joins the thread."""
        with self._lock:
            if not self._shutdown:
                self._shutdown = True
                if cancel_futures:
                    while True:
                        try:
                            job = self._jobs.get_nowait()
                        except queue.Empty:
                            break
                        if job is not None:
                            job[0].cancel()
                self._jobs.put(None)
        if wait and self._thread.is_alive():
            self._thread.join()
