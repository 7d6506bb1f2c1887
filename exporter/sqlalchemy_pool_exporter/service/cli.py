"""`pool-exporter serve|demo|run`: flags override POOL_EXPORTER_* settings; a bad one exits 2 with one line."""

from __future__ import annotations

import argparse
import asyncio
import sys
import urllib.parse
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn

from .. import logs, validation
from .._version import __version__
from ..errors import MissingExtra, require
from . import startup
from .settings import DEFAULT_PORT, SettingError, Settings, load

PROG = "pool-exporter"

# (setting, metavar, help); every flag is read as text and validated by Settings, so a bad value
# gives the same one-line message whether it came from a flag or from the environment.
FLAGS: tuple[tuple[str, str, str], ...] = (
    ("host", "ADDR", "address to listen on (default 0.0.0.0)"),
    ("port", "PORT", f"port to listen on (default {DEFAULT_PORT}; 0 = any free port)"),
    ("metrics_path", "PATH", "path of the metrics endpoint (default /metrics)"),
    ("request_head_timeout", "SECONDS", "close connections that send no complete request head in time (default 5)"),
    ("max_http_connections", "N", "open client connections at most; idle ones are closed first (default 200)"),
    ("database_url", "URL", "serve: PostgreSQL for the server view; demo: database (prefer the env var)"),
    ("multiproc_dir", "DIR", "multiprocess directory (default $PROMETHEUS_MULTIPROC_DIR)"),
    ("namespace", "NAME", "metric name prefix (default sqlalchemy)"),
    ("names", "NAMES", "default, or semconv: OpenTelemetry's semantic-convention names (demo; serve reads either)"),
    ("buckets", "SPEC", "histogram bounds, e.g. 'wait=0.001,0.01,0.1;use=0.1,1'"),
    ("leak_threshold", "SECONDS", "warn about connections held longer (demo)"),
    ("max_holders", "N", "holder names a pool keeps apart, 1-1000 (demo; default 50)"),
    ("probe_interval", "SECONDS", "seconds between server-view polls (default 15)"),
    ("server_view_databases", "NAMES", "databases the server view watches, a,b or * (default: the URL's)"),
    ("advice_window", "SECONDS", "seconds of traffic the pool size advice is measured over (default 300)"),
    ("advice_wait_probability", "P", "probability of waiting the advised pool size keeps under (default 0.01; demo)"),
    ("log_level", "LEVEL", "DEBUG, INFO, WARNING, ERROR, CRITICAL (default INFO)"),
    ("log_format", "FORMAT", "text or json (default text)"),
    ("auth_token", "TOKEN", "require this bearer token, except on /healthz (prefer the env var)"),
    ("basic_auth_user", "USER", "require basic auth with this user, except on /healthz"),
    ("basic_auth_password", "PASSWORD", "password for --basic-auth-user (prefer the env var)"),
    ("tls_cert", "FILE", "PEM certificate: serve HTTPS"),
    ("tls_key", "FILE", "PEM private key for --tls-cert"),
    (
        "web_config_file",
        "FILE",
        "exporter-toolkit web config: TLS and mTLS, bcrypt users, headers; re-read live (serve)",
    ),
)
# The exporter-toolkit's flag names, for fleets that configure every exporter alike.
ALIASES: dict[str, str] = {"web_config_file": "--web.config.file", "metrics_path": "--web.telemetry-path"}


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        # One line, like every other bad input; `--help` still shows the usage.
        self.exit(2, f"{PROG}: {message} (see {PROG} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    common = _Parser(add_help=False)
    group = common.add_argument_group("settings (each also POOL_EXPORTER_<NAME>; flags win)")
    for name, metavar, help_text in FLAGS:
        flags = ["--" + name.replace("_", "-"), *([ALIASES[name]] if name in ALIASES else [])]
        group.add_argument(*flags, dest=name, metavar=metavar, help=help_text)
    group.add_argument(
        "--web.listen-address",
        dest="listen_address",
        action="append",
        metavar="[HOST]:PORT",
        help="--host and --port in one, as the Go exporters take them (':9717' is every address, IPv4 and IPv6)",
    )

    parser = _Parser(prog=PROG, description="Prometheus metrics for SQLAlchemy connection pools.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    sub.add_parser(
        "serve",
        parents=[common],
        help="sidecar: serve a multiprocess directory's merged metrics (+ PostgreSQL's view)",
        description="Serve the merged metrics of a prometheus_client multiprocess directory written by "
        "instrumented workers; with --database-url, also PostgreSQL's own view of its connections.",
    )
    demo = sub.add_parser(
        "demo",
        parents=[common],
        help="run an instrumented demo app with built-in load and the exporter",
        description="Run a small instrumented aiohttp app on SQLite (or POOL_EXPORTER_DATABASE_URL), "
        "a load generator, and the exporter endpoint.",
    )
    demo.add_argument("--duration", metavar="SECONDS", help="stop by itself after this many seconds")
    demo.add_argument("--workers", metavar="N", default="1", help="app processes (N > 1: multiprocess mode)")
    demo.add_argument("--worker-process", action="store_true", help=argparse.SUPPRESS)
    demo.add_argument("--app-port", help=argparse.SUPPRESS)
    run = sub.add_parser(
        "run",
        parents=[common],
        help="run a program with every SQLAlchemy engine it and its workers create instrumented",
        description="Run CMD (after --) so that every Python process it starts instruments every engine it "
        "creates. With --multiproc-dir (several workers), each writes that directory for `pool-exporter serve`. "
        "Uses --multiproc-dir, --namespace, --names and --leak-threshold.",
        usage=f"{PROG} run [settings] -- CMD [ARGS...]",
    )
    run.add_argument("program", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    advise = sub.add_parser(
        "advise",
        help="pool_size and max_overflow per pool, and the fleet's connection budget, from Prometheus' history",
        description="Read a Prometheus server's history of the pool exporter's metrics and print, per pool and "
        "instance, the pool_size and max_overflow for the busiest window in the range (Erlang C), and every "
        "server's connection budget.",
    )
    advise.add_argument("--prometheus", metavar="URL", required=True, help="Prometheus' base URL (http or https)")
    advise.add_argument("--range", metavar="DURATION", default="7d", help="history to read (default 7d)")
    advise.add_argument(
        "--wait-probability", metavar="P", default="0.01", help="probability of waiting to size for (default 0.01)"
    )
    advise.add_argument(
        "--until", metavar="UNIX_TIME", help="end of the range, in seconds since the epoch (default now)"
    )
    advise.add_argument("--json", action="store_true", help="JSON instead of a table, for scripts")
    return parser


# `demo --duration`: long enough for any demo, short enough for asyncio's timers.
MAX_DURATION = 366 * 24 * 3600.0


def _demo_options(args: argparse.Namespace) -> tuple[float | None, int]:
    """`--duration` and `--workers`, through the same validators as every other setting."""
    try:
        duration = None if args.duration is None else validation.seconds("duration", args.duration, upper=MAX_DURATION)
    except ValueError as exc:
        raise SettingError("duration", str(exc)) from None
    try:
        workers = validation.workers(args.workers)
    except ValueError as exc:
        raise SettingError("workers", str(exc)) from None
    return duration, workers


def listen_address(values: list[str], host: str | None, port: str | None) -> dict[str, str]:
    """`--web.listen-address` as host and port; it stands for both, so neither flag may come with it."""
    if host is not None or port is not None:
        raise SettingError("host", "--web.listen-address stands for --host and --port: give one or the other")
    if len(values) > 1:
        raise SettingError("host", "--web.listen-address given more than once: this exporter listens on one address")
    value = values[0]
    address, sep, port_text = value.rpartition(":")
    if address.startswith("[") and address.endswith("]"):
        address = address[1:-1]
    elif ":" in address or "/" in address or "[" in address:
        sep = ""  # an IPv6 address without brackets, a vsock:// URL
    if not sep:
        raise SettingError("host", f"--web.listen-address must be HOST:PORT, [IPv6]:PORT or :PORT, got {value!r}")
    # ':PORT' is every address, IPv4 and IPv6, as in Go; asyncio binds both for an empty host.
    return {"host": address, "port": port_text}


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "advise":  # reads no POOL_EXPORTER_* setting: everything is on its command line
        return _advise(args)
    try:
        overrides = {name: getattr(args, name) for name, _, _ in FLAGS}
        if args.listen_address is not None:
            overrides.update(listen_address(args.listen_address, args.host, args.port))
        settings = load(**overrides)
        logs.setup(settings.log_level, settings.log_format, settings.secrets())
        if args.command == "serve":
            return _serve(settings, startup.check(settings))
        if args.command == "run":
            return _run(settings, args.program)
        if settings.web_config_file is not None:
            raise SettingError(
                "web_config_file",
                "is for serve only: the demo's own load generator could not pass its certificates or users",
            )
        duration, workers = _demo_options(args)
        return _demo(settings, startup.check(settings), duration, workers, args)
    except SettingError as exc:
        print(f"{PROG}: {exc.line()}", file=sys.stderr)
        return 2
    except MissingExtra as exc:  # a setting or command that needs an extra not installed: one line naming it
        print(f"{PROG}: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


def _serve(settings: Settings, files: startup.Startup) -> int:
    if settings.database_url is not None:
        require("asyncpg", "sidecar", "the server view (--database-url)")
    from .commands import StartupError, run_serve

    try:
        return asyncio.run(run_serve(settings, files))
    except StartupError as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return 1


def _run(settings: Settings, program: list[str]) -> int:
    from .run import ProgramError, exec_program

    try:
        exec_program(settings, program)
    except ProgramError as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return 2


def _demo(
    settings: Settings, files: startup.Startup, duration: float | None, workers: int, args: argparse.Namespace
) -> int:
    from .commands import StartupError, run_demo, run_demo_worker
    from .demo import async_url, require_driver

    require_driver(async_url(settings.url(), Path(".")))
    try:
        if args.worker_process:
            return asyncio.run(run_demo_worker(settings, int(args.app_port)))
        return asyncio.run(run_demo(settings, files, duration=duration, workers=workers))
    except StartupError as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())


def _advise(args: argparse.Namespace) -> int:
    from .advise import AdviseError, advise, as_json, as_table, prometheus_query

    try:
        base, shown = _prometheus_url(args.prometheus)
        range_ = validation.prometheus_duration("range", args.range)
        p = validation.probability("wait_probability", args.wait_probability)
        until = None if args.until is None else validation.seconds("until", args.until)
    except ValueError as exc:
        print(f"{PROG} advise: {exc}", file=sys.stderr)
        return 2
    try:
        result = advise(prometheus_query(base, until), shown, range_, p)
    except AdviseError as exc:
        print(f"{PROG} advise: {exc}", file=sys.stderr)
        return 1
    sys.stdout.write(as_json(result) + "\n" if args.json else as_table(result))
    return 0


def _prometheus_url(value: str) -> tuple[str, str]:
    """The URL to query, and how to show it: credentials in it are never printed."""
    parts = urllib.parse.urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"--prometheus must be an http:// or https:// URL, got {value[:80]!r}")
    if parts.query or parts.fragment:
        raise ValueError("--prometheus takes Prometheus' base URL, without a query or fragment")
    shown = parts._replace(netloc=parts.netloc.rpartition("@")[2]).geturl()
    return value, shown
