"""The web config file's basic_auth_users: bcrypt hashes, checked off the event loop, outcomes cached.

Measured: one bcrypt check at cost 10 takes 85-170 ms of CPU. Decided, as the toolkit's web/cache.go:
each credential's outcome is cached (keyed by user, stored hash and password), and an unknown user
is checked against a real hash, so timing does not reveal users. Beyond it, for a password flood: the
hash runs in a thread, one at a time; checks wait in lanes served in turn (see `lane`), at most
`max_pending` distinct checks in a lane and `max_total` in all (beyond: None, a 429); failures cannot
evict successes. Cache keys are HMACs, so no password stays in memory.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import os
from collections import OrderedDict
from collections.abc import Mapping

from ..auth import basic_credentials

CACHE_SIZE = 100
MAX_PENDING = 4
MAX_TOTAL = 64
# bcrypt uses the first 72 bytes of a password (Go's bcrypt compares those; bcrypt 5 raises beyond).
BCRYPT_BYTES = 72

Lane = tuple[str | None, str]


class BcryptUsers:
    """Checks credentials against bcrypt hashes; `computed` counts the hashes actually computed."""

    def __init__(self, *, max_pending: int = MAX_PENDING, max_total: int = MAX_TOTAL) -> None:
        self.max_pending = max_pending
        self.max_total = max_total
        self.computed = 0
        self._secret = os.urandom(32)
        self._cached: dict[bool, OrderedDict[bytes, None]] = {True: OrderedDict(), False: OrderedDict()}
        self._pending: dict[bytes, asyncio.Task[bool]] = {}
        # Per lane: its checks in flight, and the lock its checks take before the shared one.
        self._lanes: dict[Lane, tuple[asyncio.Lock, list[bytes]]] = {}
        self._lock = asyncio.Lock()  # one hash at a time: at most one core, whatever the clients send

    @property
    def pending(self) -> int:
        """Distinct checks in flight (computing, or waiting for the one computing)."""
        return len(self._pending)

    def _key(self, authorization: str, users: Mapping[str, bytes]) -> tuple[bytes, str | None, bytes, bytes] | None:
        """The cache key, the user if the file has it, its hash (or b"") and the password checked."""
        credentials = basic_credentials(authorization)
        if credentials is None or not users:
            return None
        user, password = credentials[0], credentials[1][:BCRYPT_BYTES]
        try:
            name: str | None = user.decode("utf-8")
        except UnicodeDecodeError:
            name = None
        hashed = users.get(name) if name is not None else None
        parts = (user, hashed or b"", password)
        key = hmac.digest(self._secret, b"".join(len(p).to_bytes(4, "big") + p for p in parts), hashlib.sha256)
        return key, name if hashed is not None else None, hashed or b"", password

    def cached(self, authorization: str, users: Mapping[str, bytes]) -> bool:
        """Whether the header carries a credential already checked and right: an HMAC, no bcrypt."""
        found = self._key(authorization, users)
        return found is not None and found[0] in self._cached[True]

    async def check(self, authorization: str, users: Mapping[str, bytes], client: str = "") -> bool | None:
        """Whether the header carries a user of `users` and its password; None: too many checks in flight.

        `client` is the peer's address: checks wait in a lane per (user of the file or unknown, client).
        """
        found = self._key(authorization, users)
        if found is None:
            return False
        key, known, hashed, password = found
        for ok, cache in self._cached.items():
            if key in cache:
                cache.move_to_end(key)
                return ok
        task = self._pending.get(key)
        if task is None:
            # Lanes, so that CPU protection is no lockout: with one queue, 50 clients sending wrong
            # passwords kept the 4 slots full, and a correct credential not yet cached (Prometheus after
            # a restart or a password change) got 429 on every try. Before hashing, a right and a wrong
            # password for one user look alike, so the user alone cannot keep a flood of guesses for the
            # real user name apart from Prometheus; the client's address can. So a lane is (the user if
            # the file has it, else "unknown"; the client), each holds `max_pending` checks, and lanes
            # take the hash in turn (asyncio.Lock is FIFO, and only a lane's first check waits for it):
            # a new credential is checked after at most one hash of each other lane.
            lane: Lane = (known, client)
            lock, keys = self._lanes.setdefault(lane, (asyncio.Lock(), []))
            if len(keys) >= self.max_pending or len(self._pending) >= self.max_total:
                if not keys:
                    del self._lanes[lane]
                return None
            # An unknown user costs what the dearest real hash does (file.py checked each is $2?$<cost>$...).
            against = hashed if known is not None else max(users.values(), key=lambda h: h.split(b"$")[2])
            task = asyncio.get_running_loop().create_task(
                self._compute(key, password, against, known is not None, lock)
            )
            keys.append(key)
            self._pending[key] = task
            task.add_done_callback(lambda _: self._done(key, lane))
        # Shielded: a client that hangs up does not cancel what others with the same credential await.
        return await asyncio.shield(task)

    def _done(self, key: bytes, lane: Lane) -> None:
        self._pending.pop(key, None)
        _, keys = self._lanes[lane]
        keys.remove(key)
        if not keys:
            del self._lanes[lane]

    async def _compute(self, key: bytes, password: bytes, hashed: bytes, known: bool, lane: asyncio.Lock) -> bool:
        async with lane, self._lock:
            self.computed += 1
            ok = await asyncio.to_thread(_checkpw, password, hashed) and known
        cache = self._cached[ok]
        cache[key] = None
        if len(cache) > CACHE_SIZE:
            cache.popitem(last=False)
        return ok


def _checkpw(password: bytes, hashed: bytes) -> bool:
    # The `sidecar` extra's; WebPolicy.current() refuses a file with users before a check gets here without it.
    import bcrypt

    try:
        return bcrypt.checkpw(password, hashed)
    except ValueError:  # a NUL in the password, or a hash this bcrypt does not take
        return False
