"""Exporter: one registry and namespace, the engines it instruments, its collector and multiprocess writer.

Nothing here is process state: an Exporter owns what it registers and close() takes all of it
back. The module-level instrument()/uninstrument() use a default Exporter bound to
prometheus_client.REGISTRY, made at first use (the 95% case stays one line).
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import os
import threading
import weakref
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from prometheus_client import REGISTRY, CollectorRegistry
from sqlalchemy.engine import Engine
from sqlalchemy.engine.default import DefaultDialect
from sqlalchemy.ext.asyncio import AsyncEngine

from . import catalog, validation
from .errors import AlreadyInstrumented
from .exposition.collector import PoolCollector
from .exposition.writer import MultiprocessWriter, environment_dir
from .instrumentation import appname
from .instrumentation.advice import DEFAULT_WAIT_PROBABILITY, DEFAULT_WINDOW, MAX_WINDOW
from .instrumentation.handle import PoolHandle, handle_of
from .instrumentation.holders import DEFAULT_MAX_HOLDERS
from .labels import pool_name, safe_url
from .metricnames import Names, view

log = logging.getLogger("sqlalchemy_pool_exporter")


def sync_engine(engine: Engine | AsyncEngine) -> Engine:
    if isinstance(engine, AsyncEngine):
        return engine.sync_engine
    if isinstance(engine, Engine):
        return engine
    raise TypeError(f"instrument() takes a SQLAlchemy Engine or AsyncEngine, not {type(engine).__name__}")


class Exporter:
    """Exports the pools of the engines it instruments into one registry, under one namespace.

    `names="semconv"` names the metrics OpenTelemetry's semantic conventions define as the
    OpenTelemetry→Prometheus translation spells them (`db_client_connection_count{
    db_client_connection_pool_name, db_client_connection_state}`…; metricnames.py), without the
    namespace; the others keep our names. `multiprocess_dir` (default: none) also writes their
    numbers into prometheus_client's multiprocess directory for a sidecar; prometheus_client must be
    in multiprocess mode for that same directory (PROMETHEUS_MULTIPROC_DIR set before it was
    imported). `buckets` are the histogram bounds by set (`wait`, `use`, `create`, `statement`) for
    every engine; with names="semconv", `statement` defaults to the conventions' bounds.
    `advice_window` (seconds) and `advice_wait_probability` set the pool size advice
    (`pool_offered_load`, `pool_advised_size`): the window the load is measured over, and the
    probability of waiting for a connection the advised size keeps under (Erlang C).
    `server_view` (off by default) polls the server every `server_view_interval` seconds about what
    each checked-out connection is doing (PostgreSQL, MySQL/MariaDB; README "My pool is exhausted: why?");
    `server_view_queries` also shows each checkout's statement text, truncated, on /pools and / only.
    """

    def __init__(
        self,
        registry: CollectorRegistry | None = None,
        *,
        namespace: str = catalog.DEFAULT_NAMESPACE,
        names: Names = "default",
        multiprocess_dir: str | os.PathLike[str] | None = None,
        buckets: Mapping[str, Sequence[float]] | None = None,
        max_holders: int = DEFAULT_MAX_HOLDERS,
        multiprocess_interval: float = 1.0,
        advice_window: float = DEFAULT_WINDOW,
        advice_wait_probability: float = DEFAULT_WAIT_PROBABILITY,
        server_view: bool = False,
        server_view_interval: float = 5.0,
        server_view_queries: bool = False,
    ) -> None:
        self.registry = REGISTRY if registry is None else registry
        self.namespace = validation.namespace(namespace)
        self.names: Names = validation.names(names)
        self.view = view(self.namespace, self.names)
        self.buckets = validation.buckets(buckets, catalog.default_buckets(self.names))
        self.max_holders = validation.max_holders(max_holders)
        self.multiprocess_dir = Path(multiprocess_dir) if multiprocess_dir else None
        self._interval = validation.seconds("multiprocess_interval", multiprocess_interval)
        self.advice_window = validation.seconds("advice_window", advice_window, upper=MAX_WINDOW)
        self.advice_wait_probability = validation.probability("advice_wait_probability", advice_wait_probability)
        # What the database sees of each engine's checkouts (instrumentation/serverview.py): the default
        # of every instrument() call of this Exporter.
        self.server_view = bool(server_view)
        self.server_view_interval = validation.seconds("server_view_interval", server_view_interval)
        self.server_view_queries = bool(server_view_queries)
        self._lock = threading.RLock()
        # Held weakly by engine: a dropped engine takes its handle (and its series) with it.
        self._handles: weakref.WeakKeyDictionary[Engine, PoolHandle] = weakref.WeakKeyDictionary()
        self._by_name: weakref.WeakValueDictionary[str, PoolHandle] = weakref.WeakValueDictionary()
        self.collector = PoolCollector(self.view, self.handles)
        self._writer: MultiprocessWriter | None = None
        # instrument_all(): the options for engines created from now on, the hook's undo, the handles it made.
        self._every: dict[str, Any] = {}
        self._every_undo: Callable[[], None] | None = None
        self._automatic: weakref.WeakSet[PoolHandle] = weakref.WeakSet()
        self.closed = False
        try:
            self.registry.register(self.collector)
        except ValueError as exc:
            # All or nothing: nothing is kept of an Exporter whose metrics the registry refused.
            hint = (
                "one Exporter with names='semconv' per registry: those names take no namespace"
                if self.names == "semconv"
                else "pass namespace='...' to use other names"
            )
            raise ValueError(
                f"cannot export namespace {self.namespace!r} (names={self.names!r}) into this registry: {exc} "
                f"(another Exporter, or metrics of your own, already use these names); {hint}"
            ) from None

    def __repr__(self) -> str:
        names = f", names={self.names!r}" if self.names != "default" else ""
        return f"Exporter(namespace={self.namespace!r}{names}, pools={[h.name for h in self.handles()]!r})"

    # -- instrumenting --------------------------------------------------------------------------

    def instrument(
        self,
        engine: Engine | AsyncEngine,
        *,
        name: str | None = None,
        buckets: Mapping[str, Sequence[float]] | None = None,
        leak_threshold: float | None = None,
        statements: bool = True,
        transactions: bool = True,
        server_view: bool | None = None,
        server_view_interval: float | None = None,
        server_view_queries: bool | None = None,
    ) -> PoolHandle:
        """Export one engine's pool, connections and transactions; a second call returns the same handle.

        `name` becomes the `pool` label (default `host:port/database`; a name a live engine already
        uses gets `#2`, `#3`…, with a WARNING when it was explicit). `leak_threshold` (seconds) warns,
        with the checkout's stack, about connections held longer. `server_view*` default to the Exporter's.
        """
        sync = sync_engine(engine)
        leak_threshold = validation.leak_threshold(leak_threshold)
        server: dict[str, Any] = {
            "server_view": self.server_view if server_view is None else bool(server_view),
            "server_view_interval": self.server_view_interval
            if server_view_interval is None
            else validation.seconds("server_view_interval", server_view_interval),
            "server_view_queries": self.server_view_queries
            if server_view_queries is None
            else bool(server_view_queries),
        }
        taken = handle_of(sync)
        if taken is not None and isinstance(taken.owner, Exporter) and taken in taken.owner._automatic:
            # instrument_all() took it with its defaults (at create_engine()): the explicit call wins.
            taken.uninstrument()
        bounds = validation.buckets({**self.buckets, **(buckets or {})}) if buckets else self.buckets
        explicit = validation.pool_name(name) if name is not None else None
        with self._lock:
            if self.closed:
                raise RuntimeError("this Exporter is closed")
            existing = handle_of(sync)
            if existing is not None:
                return self._same(existing, explicit, leak_threshold, statements, transactions, server)
            if self.multiprocess_dir is not None and bounds != self.buckets:
                raise ValueError(
                    "in multiprocess mode every engine of an Exporter uses its buckets: pass buckets= to the Exporter"
                )
            handle = PoolHandle(
                sync,
                name=self._claim(explicit, validation.pool_name(pool_name(sync.url))),
                owner=self,
                buckets=bounds,
                max_holders=self.max_holders,
                leak_threshold=leak_threshold,
                statements=statements,
                transactions=transactions,
                detach=self._detach,
                application_name=appname.default(explicit),
                advice_window=self.advice_window,
                advice_wait_probability=self.advice_wait_probability,
                **server,
            )
            self._handles[sync] = handle
            self._by_name[handle.name] = handle
            writer = self._writer_for_new_handle()
        if writer is not None:
            writer.flush()
        return handle

    def instrument_all(
        self, *, leak_threshold: float | None = None, statements: bool = True, transactions: bool = True
    ) -> None:
        """Instrument every Engine and AsyncEngine created from now on, until close(); call again to change options.

        Engines already instrumented are left as they are; an explicit instrument() of an engine this
        took replaces it (its name and options win). Nothing runs per checkout: only create_engine()
        (and create_async_engine(), which calls it) calls the hook, once per engine.
        """
        options = {
            "leak_threshold": validation.leak_threshold(leak_threshold),
            "statements": statements,
            "transactions": transactions,
        }
        with self._lock:
            if self.closed:
                raise RuntimeError("this Exporter is closed")
            self._every = options
            if self._every_undo is None:
                self._every_undo = on_engine_created(self._engine_created)

    def _engine_created(self, engine: Engine) -> None:
        """create_engine() built `engine`: instrument it unless something already did; never raise into it."""
        try:
            if handle_of(engine) is not None:
                return
            with self._lock:
                if self.closed:
                    return
                options = self._every
            self._automatic.add(self.instrument(engine, **options))
        except Exception as exc:
            log.error("engine %s is not instrumented: %s: %s", safe_url(engine.url), type(exc).__name__, exc)

    def _same(
        self,
        existing: PoolHandle,
        name: str | None,
        leak_threshold: float | None,
        statements: bool,
        transactions: bool,
        server: Mapping[str, object] | None = None,
    ) -> PoolHandle:
        """instrument() on an engine already instrumented: the same handle, or an error saying why not."""
        if existing.owner is not self:
            raise AlreadyInstrumented(
                f"engine is already instrumented as pool {existing.name!r} by {existing.owner!r}; "
                "uninstrument() it there first"
            )
        asked: dict[str, object] = {
            "leak_threshold": leak_threshold,
            "statements": statements,
            "transactions": transactions,
            **(server or {}),
        }
        differs = {k: v for k, v in asked.items() if existing.options[k] != v}
        if name is not None and name != existing.name:
            differs["name"] = name
        if differs:
            raise AlreadyInstrumented(
                f"engine is already instrumented as pool {existing.name!r} with other options "
                f"({', '.join(f'{k}={v!r}' for k, v in differs.items())}); uninstrument() it first"
            )
        return existing

    def _claim(self, explicit: str | None, default: str) -> str:
        """A free `pool` label: the one asked for, unless a live engine uses it (then `#2`, `#3`…)."""
        wanted = explicit if explicit is not None else default
        name, n = wanted, 1
        while True:
            handle = self._by_name.get(name)
            if handle is None or not handle.active or handle.engine is None:
                break
            if handle.tap.disposed_idle:
                # dispose() ran and the engine was not used since: its name is free again.
                log.info("pool %s: name taken over by a new engine; the disposed one is no longer exported", name)
                handle.uninstrument()
                break
            n += 1
            name = f"{wanted}#{n}"
        if explicit is not None and name != explicit:
            log.warning(
                "pool name %r is used by another live engine of this Exporter; exporting this one as %r",
                explicit,
                name,
                extra={"pool": name},
            )
        return name

    def _writer_for_new_handle(self) -> MultiprocessWriter | None:
        if self.multiprocess_dir is None:
            return None
        if self._writer is None:
            self._writer = MultiprocessWriter(
                self.view, self.multiprocess_dir, self.buckets, self.handles, self._interval
            )
            self._writer.start()
        return self._writer

    def _detach(self, handle: PoolHandle) -> None:
        with self._lock:
            engine = handle.engine
            if engine is not None and self._handles.get(engine) is handle:
                del self._handles[engine]
            if self._by_name.get(handle.name) is handle:
                del self._by_name[handle.name]
            writer = self._writer
        if writer is not None:
            writer.forget(handle.name)

    def uninstrument(self, engine: Engine | AsyncEngine) -> None:
        """Undo instrument() on this engine if this Exporter instrumented it; a no-op otherwise."""
        with self._lock:
            handle = self._handles.get(sync_engine(engine))
        if handle is not None:
            handle.uninstrument()

    # -- reading --------------------------------------------------------------------------------

    def handle_for(self, engine: Engine | AsyncEngine) -> PoolHandle | None:
        """This Exporter's active handle of an engine, if it instruments it."""
        with self._lock:
            handle = self._handles.get(sync_engine(engine))
        return handle if handle is not None and handle.active else None

    def handles(self) -> list[PoolHandle]:
        """Every active handle whose engine is still alive."""
        with self._lock:
            return [h for h in self._handles.values() if h.active]

    def flush(self) -> None:
        """Write every pending number to the multiprocess directory now (tests, shutdown hooks)."""
        writer = self._writer
        if writer is not None:
            writer.flush()

    # -- teardown -------------------------------------------------------------------------------

    def close(self) -> None:
        """Uninstrument every engine, stop the writer, remove every hook and the collector; idempotent."""
        with self._lock:
            if self.closed:
                return
            self.closed = True
            handles = list(self._handles.values())
            every_undo, self._every_undo = self._every_undo, None
        if every_undo is not None:
            every_undo()
        for handle in handles:
            handle.uninstrument()
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        with contextlib.suppress(KeyError):
            self.registry.unregister(self.collector)

    def __enter__(self) -> Exporter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


_ABSENT = object()
# on_engine_created(): the callbacks, oldest first, and the one hook they share while there are any.
_created: list[Callable[[Engine], None]] = []
_created_lock = threading.Lock()
_created_hook: list[Any] = []  # [our classmethod, what DefaultDialect had before] while installed


def on_engine_created(callback: Callable[[Engine], None]) -> Callable[[], None]:
    """Call `callback(engine)` for every Engine create_engine() builds from now on; returns the undo.

    The hook is SQLAlchemy's public `Dialect.engine_created(engine)` classmethod, which create_engine()
    calls on the dialect class of every engine it builds, before returning it. We set it on DefaultDialect,
    which every dialect inherits from and none of SQLAlchemy's own overrides (2.0.38, 2.1.9); a third-party
    dialect that overrides it without calling its base is not seen. It catches engines of applications
    that imported create_engine before we were called, where wrapping sqlalchemy.create_engine would not.
    One hook serves every callback, oldest first; the last undo takes it off the class (unless another
    layer set its own on top since: then ours stays in that chain and passes through).
    """
    with _created_lock:
        if not _created_hook:
            _install_created_hook()
        _created.append(callback)

    def undo() -> None:
        with _created_lock:
            for i, known in enumerate(_created):
                if known is callback:
                    del _created[i]
                    break
            if _created or not _created_hook:
                return
            ours, previous = _created_hook
            _created_hook.clear()
            if vars(DefaultDialect).get("engine_created") is not ours:
                return
            if previous is _ABSENT:
                del DefaultDialect.engine_created
            else:
                DefaultDialect.engine_created = previous  # type: ignore[method-assign]

    return undo


def _install_created_hook() -> None:
    previous = vars(DefaultDialect).get("engine_created", _ABSENT)
    base: Any = inspect.getattr_static(DefaultDialect, "engine_created")  # the classmethod we chain to

    def engine_created(cls: type[DefaultDialect], engine: Engine) -> None:
        base.__func__(cls, engine)
        for callback in tuple(_created):
            callback(engine)

    ours = classmethod(engine_created)
    DefaultDialect.engine_created = ours  # type: ignore[assignment,method-assign]
    _created_hook[:] = [ours, previous]


# -- the default Exporter, for the module-level one-liners --------------------------------------------

_defaults: dict[tuple[str, str], Exporter] = {}
_defaults_lock = threading.Lock()


def default_exporter(namespace: str = catalog.DEFAULT_NAMESPACE, names: Names = "default") -> Exporter:
    """The Exporter of `namespace` and `names` bound to prometheus_client.REGISTRY, made at first use.

    Its multiprocess directory is PROMETHEUS_MULTIPROC_DIR, read when it is made. If its
    registration fails (a name clash), nothing is kept and the next call tries again.
    """
    with _defaults_lock:
        exporter = _defaults.get((namespace, names))
        if exporter is None or exporter.closed:
            exporter = _defaults[(namespace, names)] = Exporter(
                REGISTRY, namespace=namespace, names=names, multiprocess_dir=environment_dir()
            )
        return exporter


def instrument(
    engine: Engine | AsyncEngine,
    *,
    name: str | None = None,
    buckets: Mapping[str, Sequence[float]] | None = None,
    leak_threshold: float | None = None,
    statements: bool = True,
    transactions: bool = True,
    names: Names = "default",
    server_view: bool | None = None,
    server_view_interval: float | None = None,
    server_view_queries: bool | None = None,
) -> PoolHandle:
    """Instrument `engine` with the default Exporter of `names` (in prometheus_client.REGISTRY): see Exporter."""
    return default_exporter(names=validation.names(names)).instrument(
        engine,
        name=name,
        buckets=buckets,
        leak_threshold=leak_threshold,
        statements=statements,
        transactions=transactions,
        server_view=server_view,
        server_view_interval=server_view_interval,
        server_view_queries=server_view_queries,
    )


def instrument_all(
    exporter: Exporter | None = None,
    *,
    leak_threshold: float | None = None,
    statements: bool = True,
    transactions: bool = True,
) -> Exporter:
    """Instrument every Engine and AsyncEngine created from now on with `exporter` (default: the default
    Exporter); `exporter.close()` stops it. Returns the Exporter. See Exporter.instrument_all."""
    exporter = default_exporter() if exporter is None else exporter
    exporter.instrument_all(leak_threshold=leak_threshold, statements=statements, transactions=transactions)
    return exporter


def uninstrument(engine: Engine | AsyncEngine) -> None:
    """Undo instrument() on this engine, whichever Exporter instrumented it; a no-op if none did."""
    handle = handle_of(sync_engine(engine))
    if handle is not None:
        handle.uninstrument()


def handle_for(engine: Engine | AsyncEngine) -> PoolHandle | None:
    """The active handle of an engine, whichever Exporter instrumented it."""
    return handle_of(sync_engine(engine))


def default_exporters() -> list[Exporter]:
    """The default Exporters made so far (one per namespace and names), open or closed."""
    with _defaults_lock:
        return list(_defaults.values())


def handles() -> list[PoolHandle]:
    """The default Exporters' active handles."""
    return [h for exporter in default_exporters() for h in exporter.handles()]
