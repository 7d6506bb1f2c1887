"""The workers' checkouts files (exposition/checkouts.py), read as untrusted input for the server join.

Each live worker writes `pool_exporter_<pid>.checkouts`: its checkouts now, with their backend ids.
Whoever can write the directory can write these files, so each is read like every other file there
(mpfile.read_small: a regular file only, no symlink, no FIFO, at most MAX_BYTES) and parsed strictly:
at most MAX_ENTRIES lines, each exactly `[pool, pid, holder, age, transaction open]` with a pool and
holder name that are valid label values, a pid a positive 32-bit int, an age finite and >= 0. A file
that breaks any rule is quarantined whole; a file whose worker is not live (no fresh `.alive` mark) is
not read. Across files, at most MAX_POOLS pools and `max_holders` holder names per pool (further
names fold into `other`); a backend pid claimed by two entries counts for neither (one worker's file
cannot take another's backend). What remains can only lie about which of the server's backends its
worker holds and for whom; pids the server does not list in the watched database count for nothing.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .. import validation
from ..exposition.checkouts import MAX_BYTES, MAX_ENTRIES, SUFFIX, checkouts_path
from ..instrumentation import holders
from . import mpfile

# The holder series a join of these files with the server makes (service/pgview.py): when it runs, the
# sidecar exports them from the join and drops the workers' own copies from its merge.
JOINED_KEYS = ("holder_server_connections", "holder_lock_waiting", "holder_blocking", "holder_oldest_transaction",
               "holder_idle_in_transaction")  # fmt: skip
FILE = re.compile(r"pool_exporter_(?P<pid>\d{1,10})" + re.escape(SUFFIX), re.ASCII)
MAX_POOLS = 100
_MAX_PID = 2**31 - 1
_ALWAYS = frozenset((holders.NONE, holders.OTHER))  # beside the max_holders names, as in-process


def path(directory: Path, pid: int) -> Path:
    """Where worker `pid` writes its checkouts."""
    return checkouts_path(directory, pid)


@dataclass(frozen=True, slots=True)
class Held:
    """One checkout a worker says it has now."""

    worker: int
    pool: str
    pid: int
    holder: str
    age: float
    transaction: bool


def parse(data: bytes) -> list[tuple[str, int, str, float, bool]]:
    """A checkouts file's entries, or mpfile.Rejected saying why the file is bad."""
    try:
        text = data.decode("ascii")
    except UnicodeDecodeError:
        raise mpfile.Rejected("is not ASCII") from None
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    if len(lines) > MAX_ENTRIES:
        raise mpfile.Rejected(f"holds more than {MAX_ENTRIES} checkouts")
    out = []
    for n, line in enumerate(lines, 1):
        try:
            entry = json.loads(line, parse_constant=_no_constant)
        except (ValueError, RecursionError):  # RecursionError: arrays nested too deep for the decoder
            raise mpfile.Rejected(f"line {n} is not JSON") from None
        if not (isinstance(entry, list) and len(entry) == 5):
            raise mpfile.Rejected(f"line {n} is not [pool, pid, holder, age, transaction]")
        pool, pid, holder, age, transaction = entry
        if not _name(pool, validation.pool_name) or not _name(holder, validation.holder_name):
            raise mpfile.Rejected(f"line {n} has a pool or holder name that is not a valid label value")
        if isinstance(pid, bool) or not isinstance(pid, int) or not 0 < pid <= _MAX_PID:
            raise mpfile.Rejected(f"line {n} has a pid that is not a positive 32-bit integer")
        seconds = _age(age)
        if seconds is None:
            raise mpfile.Rejected(f"line {n} has an age that is not a finite number >= 0")
        if not isinstance(transaction, bool):
            raise mpfile.Rejected(f"line {n} has a transaction flag that is not true or false")
        out.append((pool, pid, holder, seconds, transaction))
    return out


def _age(value: object) -> float | None:
    """An age as a finite float >= 0, or None (an integer too large for a float is not one)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    try:
        seconds = float(value)
    except OverflowError:
        return None
    return seconds if math.isfinite(seconds) and seconds >= 0 else None


def _no_constant(name: str) -> None:
    raise ValueError(name)


def _name(value: object, check: Callable[[object], str]) -> bool:
    try:
        return isinstance(value, str) and check(value) == value and value.isprintable()
    except ValueError:
        return False


def read(
    directory: Path,
    live: Callable[[int], bool],
    reject: Callable[[str, str], None],
    max_holders: int = holders.DEFAULT_MAX_HOLDERS,
) -> list[Held]:
    """Every live worker's checkouts, bounded; a bad file goes to `reject(name, reason)`."""
    found: list[Held] = []
    with os.scandir(directory) as listing:
        names = sorted(entry.name for entry in listing if FILE.fullmatch(entry.name))
    for name in names:
        worker = int(FILE.fullmatch(name)["pid"])  # type: ignore[index]
        if not live(worker):
            continue
        try:
            entries = parse(mpfile.read_small(directory / name, MAX_BYTES))
        except FileNotFoundError:
            continue
        except mpfile.Rejected as exc:
            reject(name, str(exc))
            continue
        found.extend(Held(worker, *entry) for entry in entries)
    return bound(found, max_holders)


def bound(found: list[Held], max_holders: int) -> list[Held]:
    """At most MAX_POOLS pools and max_holders names a pool (the rest as `other`); a pid claimed twice, dropped."""
    claims: dict[int, int] = {}
    for held in found:
        claims[held.pid] = claims.get(held.pid, 0) + 1
    pools: dict[str, set[str]] = {}
    out: list[Held] = []
    for held in found:
        if claims[held.pid] > 1:
            continue
        names = pools.get(held.pool)
        if names is None:
            if len(pools) >= MAX_POOLS:
                continue
            names = pools[held.pool] = set()
        holder = held.holder
        if holder == holders.POOL:  # the pool's idle connections: no checkout's name
            holder = holders.OTHER
        elif holder not in names and holder not in _ALWAYS:
            if len(names) >= max_holders:
                holder = holders.OTHER
            else:
                names.add(holder)
        out.append(Held(held.worker, held.pool, held.pid, holder, held.age, held.transaction))
    return out
