"""The web config file's basic_auth_users: bcrypt hashes, checked off the event loop, outcomes cached.

Measured: one bcrypt check at cost 10 takes 85-170 ms of CPU. Decided, as the toolkit's web/cache.go:
each credential's outcome is cached (keyed by user, stored hash and password), and an unknown user
is checked against a real hash, so timing does not reveal users. Beyond it, for a password flood: the
hash runs in a thread, one at a time; at most `max_pending` distinct checks wait (then None: a 429);
failures cannot evict successes. Cache keys are HMACs, so no password stays in memory.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import os
from collections import OrderedDict
from collections.abc import Mapping

import bcrypt

from ..auth import basic_credentials

CACHE_SIZE = 100
MAX_PENDING = 4
# bcrypt uses the first 72 bytes of a password (Go's bcrypt compares those; bcrypt 5 raises beyond).
BCRYPT_BYTES = 72


class BcryptUsers:
    """Checks credentials against bcrypt hashes; `computed` counts the hashes actually computed."""

    def __init__(self, *, max_pending: int = MAX_PENDING) -> None:
        self.max_pending = max_pending
        self.computed = 0
        self._secret = os.urandom(32)
        self._cached: dict[bool, OrderedDict[bytes, None]] = {True: OrderedDict(), False: OrderedDict()}
        self._pending: dict[bytes, asyncio.Task[bool]] = {}
        self._lock = asyncio.Lock()  # one hash at a time: at most one core, whatever the clients send

    @property
    def pending(self) -> int:
        """Distinct checks in flight (computing, or waiting for the one computing)."""
        return len(self._pending)

    async def check(self, authorization: str, users: Mapping[str, bytes]) -> bool | None:
        """Whether the header carries a user of `users` and its password; None: too many checks in flight."""
        credentials = basic_credentials(authorization)
        if credentials is None or not users:
            return False
        user, password = credentials[0], credentials[1][:BCRYPT_BYTES]
        try:
            hashed = users.get(user.decode("utf-8"))
        except UnicodeDecodeError:
            hashed = None
        parts = (user, hashed or b"", password)
        key = hmac.digest(self._secret, b"".join(len(p).to_bytes(4, "big") + p for p in parts), hashlib.sha256)
        for ok, cache in self._cached.items():
            if key in cache:
                cache.move_to_end(key)
                return ok
        task = self._pending.get(key)
        if task is None:
            if len(self._pending) >= self.max_pending:
                return None
            # An unknown user costs what the dearest real hash does (file.py checked each is $2?$<cost>$...).
            against = hashed if hashed is not None else max(users.values(), key=lambda h: h.split(b"$")[2])
            task = asyncio.get_running_loop().create_task(self._compute(key, password, against, hashed is not None))
            self._pending[key] = task
            task.add_done_callback(lambda _: self._pending.pop(key, None))
        # Shielded: a client that hangs up does not cancel what others with the same credential await.
        return await asyncio.shield(task)

    async def _compute(self, key: bytes, password: bytes, hashed: bytes, known: bool) -> bool:
        async with self._lock:
            self.computed += 1
            ok = await asyncio.to_thread(_checkpw, password, hashed) and known
        cache = self._cached[ok]
        cache[key] = None
        if len(cache) > CACHE_SIZE:
            cache.popitem(last=False)
        return ok


def _checkpw(password: bytes, hashed: bytes) -> bool:
    try:
        return bcrypt.checkpw(password, hashed)
    except ValueError:  # a NUL in the password, or a hash this bcrypt does not take
        return False
