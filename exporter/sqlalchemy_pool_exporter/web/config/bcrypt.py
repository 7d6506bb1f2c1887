"""The web config file's basic_auth_users: bcrypt hashes, each credential checked at most once while cached.

bcrypt is slow on purpose (cost 10: ~85 ms of CPU here), so checking it on every request would let
anyone burn a core per request. What the toolkit does (web/handler.go, web/cache.go), we do: an
outcome is cached by user, stored hash and password, so a scraper pays the cost once; one hash is
computed at a time; a user that does not exist is checked against a dummy hash, so that the time
taken does not tell which users exist. Beyond the toolkit:

- successes and failures are cached apart, so a flood of wrong passwords cannot evict Prometheus's
  own credential (the toolkit evicts at random from one cache of 100 for both);
- concurrent requests with the same credential share one computation;
- at most MAX_PENDING distinct checks are in flight; a request beyond that gets None (a 429) at once
  rather than queueing (the toolkit queues every one behind its mutex, without bound);
- the hash runs in a worker thread, never on the event loop;
- the cache is keyed by an HMAC under a per-process random key, so no password stays in memory.

The cached keys include the stored hash: a changed or removed user takes effect at the next request.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import os
import re
from collections import OrderedDict
from collections.abc import Mapping

import bcrypt

from ..auth import basic_credentials

CACHE_SIZE = 100
MAX_PENDING = 4
# bcrypt uses the first 72 bytes of a password (Go's bcrypt compares those; bcrypt 5 raises beyond).
BCRYPT_BYTES = 72
_COST = re.compile(rb"\$2[aby]?\$(\d\d)\$")


class BcryptUsers:
    """Checks credentials against bcrypt hashes; `computed` counts the hashes actually computed."""

    def __init__(self, *, cache_size: int = CACHE_SIZE, max_pending: int = MAX_PENDING) -> None:
        self.cache_size = cache_size
        self.max_pending = max_pending
        self.computed = 0
        self._secret = os.urandom(32)
        self._ok: OrderedDict[bytes, None] = OrderedDict()
        self._bad: OrderedDict[bytes, None] = OrderedDict()
        self._pending: dict[bytes, asyncio.Task[bool]] = {}
        self._lock = asyncio.Lock()
        self._dummies: dict[int, bytes] = {}

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
        key = self._key(user, hashed or b"", password)
        if key in self._ok:
            self._ok.move_to_end(key)
            return True
        if key in self._bad:
            self._bad.move_to_end(key)
            return False
        task = self._pending.get(key)
        if task is None:
            if len(self._pending) >= self.max_pending:
                return None
            cost = hashed if hashed is not None else self._costliest(users)
            task = asyncio.get_running_loop().create_task(self._compute(key, password, cost, hashed is not None))
            self._pending[key] = task
            task.add_done_callback(lambda _: self._pending.pop(key, None))
        # Shielded: a client that hangs up does not cancel what others with the same credential await.
        return await asyncio.shield(task)

    def _key(self, *parts: bytes) -> bytes:
        message = b"".join(len(part).to_bytes(4, "big") + part for part in parts)
        return hmac.digest(self._secret, message, hashlib.sha256)

    @staticmethod
    def _costliest(users: Mapping[str, bytes]) -> bytes:
        # The dummy hash of an unknown user costs what the dearest real one does.
        return max(users.values(), key=lambda h: int(m[1]) if (m := _COST.match(h)) else 0)

    async def _compute(self, key: bytes, password: bytes, hashed: bytes, known: bool) -> bool:
        async with self._lock:  # one hash at a time: at most one core, whatever the clients send
            ok = await asyncio.to_thread(self._bcrypt, password, hashed, known)
        cache = self._ok if ok else self._bad
        cache[key] = None
        while len(cache) > self.cache_size:
            cache.popitem(last=False)
        return ok

    def _bcrypt(self, password: bytes, hashed: bytes, known: bool) -> bool:
        if not known:
            hashed = self._dummy(hashed)
        self.computed += 1
        try:
            return bcrypt.checkpw(password, hashed) and known
        except ValueError:  # a NUL in the password, or a hash this bcrypt does not take
            return False

    def _dummy(self, like: bytes) -> bytes:
        match = _COST.match(like)
        cost = int(match[1]) if match else 10
        if cost not in self._dummies:
            self._dummies[cost] = bcrypt.hashpw(os.urandom(16), bcrypt.gensalt(cost))
        return self._dummies[cost]
