"""Making SMTP AUTH cheap for honest clients and expensive for guessers.

Argon2 is slow on purpose (tens of milliseconds of CPU), and most applications
open a new connection and authenticate for every message they send. Verifying
each time would cap a two-core server at a few dozen messages a second. So a
credential that verified once is remembered for a short while, keyed by an
HMAC of username and password under a per-process key: the password itself is
never kept, and the remembered entry is bound to the stored hash, so a reset
invalidates it even before it is dropped.

Guessing is throttled per client IP and per username: past the limit the
session is closed with ``421 4.7.0`` before any verification work is done.
Verifications still running count against the limit too (``reserve``): failures
are only known once Argon2 has finished, so otherwise hundreds of connections
guessing at once would all be verified before the first failure was counted.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

Clock = Callable[[], float]


@dataclass(slots=True)
class _Remembered:
    username: str
    password_hash: str
    expires: float


class CredentialCache:
    """Verified credentials, remembered as keyed digests for ``ttl`` seconds.

    Entries are also indexed by user, so that forgetting a user (a reset,
    or every user of a disabled account) costs that user's entries rather
    than a walk of the whole cache per user. Not thread-safe: the SMTP event
    loop is its only user (the tenant directory calls ``forget_user`` there).
    """

    def __init__(self, ttl: float, *, key: bytes | None = None, clock: Clock = time.monotonic):
        self._key = key or os.urandom(32)
        self._ttl = ttl
        self._clock = clock
        self._entries: dict[bytes, _Remembered] = {}
        self._by_user: dict[str, set[bytes]] = {}  # lower-cased owner -> keys of its entries
        self._max_entries = 100_000

    def _digest(self, username: str, password: str) -> bytes:
        message = username.lower().encode() + b"\0" + password.encode("utf-8", "surrogatepass")
        return hmac.digest(self._key, message, hashlib.sha256)

    def verified(self, username: str, password: str, password_hash: str) -> bool:
        """True when this exact credential verified against this exact hash recently."""
        if self._ttl <= 0:
            return False
        key = self._digest(username, password)
        entry = self._entries.get(key)
        if entry is None:
            return False
        if entry.expires < self._clock() or not hmac.compare_digest(
            entry.password_hash, password_hash
        ):
            self._drop(key)
            return False
        return True

    def remember(
        self, username: str, password: str, password_hash: str, *, owner: str | None = None
    ) -> None:
        """Remember a verified credential; ``owner`` is the user's own name when the
        login was an alias (an email address), so forget_user() finds it."""
        if self._ttl <= 0:
            return
        if len(self._entries) >= self._max_entries:
            self._sweep()
        key = self._digest(username, password)
        name = (owner or username).lower()
        self._drop(key)  # an alias login may have changed owner since
        self._entries[key] = _Remembered(name, password_hash, self._clock() + self._ttl)
        self._by_user.setdefault(name, set()).add(key)

    def forget_user(self, username: str) -> None:
        """Drop every remembered credential of a user (password reset, user disabled)."""
        for key in self._by_user.pop(username.lower(), ()):
            self._entries.pop(key, None)

    def _drop(self, key: bytes) -> None:
        entry = self._entries.pop(key, None)
        if entry is None:
            return
        keys = self._by_user.get(entry.username)
        if keys is not None:
            keys.discard(key)
            if not keys:
                del self._by_user[entry.username]

    def _sweep(self) -> None:
        now = self._clock()
        for key in [k for k, e in self._entries.items() if e.expires < now]:
            self._drop(key)
        if len(self._entries) >= self._max_entries:  # all fresh: drop the oldest half
            for key in list(self._entries)[: self._max_entries // 2]:
                self._drop(key)

    def __len__(self) -> int:
        return len(self._entries)


class FailureThrottle:
    """Counts failed AUTH attempts per client IP and per username in a sliding window,
    and the verifications under way, so that together they stay within the limit."""

    def __init__(self, max_failures: int, window: float, *, clock: Clock = time.monotonic):
        self._max = max_failures
        self._window = window
        self._clock = clock
        self._failures: dict[str, deque[float]] = {}
        self._pending: dict[str, int] = {}  # verifications under way, by key

    @staticmethod
    def _keys(ip: str, username: str | None) -> list[str]:
        return [f"ip:{ip}"] + ([f"user:{username.lower()}"] if username else [])

    def _recent(self, key: str) -> int:
        times = self._failures.get(key)
        if not times:
            return 0
        horizon = self._clock() - self._window
        while times and times[0] < horizon:
            times.popleft()
        if not times:
            del self._failures[key]
            return 0
        return len(times)

    def blocked(self, ip: str, username: str | None = None) -> bool:
        """True when the IP, or the username, has failed too often recently.

        Verifications under way do not count here: this is also asked before
        a remembered credential is accepted, which costs nothing to check.
        """
        if self._recent(f"ip:{ip}") >= self._max:
            return True
        return username is not None and self._recent(f"user:{username.lower()}") >= self._max

    def reserve(self, ip: str, username: str | None) -> bool:
        """Claim room for one slow verification; False when recent failures and
        verifications under way already reach the limit for the IP or the username.

        Every True must be followed by exactly one ``release`` (or one
        ``record_failure(..., reserved=True)``), whatever the outcome.
        """
        keys = self._keys(ip, username)
        if any(self._recent(key) + self._pending.get(key, 0) >= self._max for key in keys):
            return False
        for key in keys:
            self._pending[key] = self._pending.get(key, 0) + 1
        return True

    def release(self, ip: str, username: str | None) -> None:
        """Give back a reservation (the verification ended, whatever it found)."""
        for key in self._keys(ip, username):
            left = self._pending.get(key, 0) - 1
            if left > 0:
                self._pending[key] = left
            else:
                self._pending.pop(key, None)

    def in_progress(self, ip: str, username: str | None = None) -> int:
        """Reservations held for the IP (or the username when given): for tests and metrics."""
        key = f"user:{username.lower()}" if username else f"ip:{ip}"
        return self._pending.get(key, 0)

    def record_failure(self, ip: str, username: str | None, *, reserved: bool = False) -> None:
        """Count a failure; ``reserved`` turns the attempt's reservation into it."""
        if reserved:
            self.release(ip, username)
        now = self._clock()
        for key in self._keys(ip, username):
            times = self._failures.setdefault(key, deque(maxlen=self._max))
            times.append(now)
        if len(self._failures) > 100_000:
            for key in list(self._failures):
                self._recent(key)
