"""Idle outbound connections kept for the next batch to the same hosts.

Measured under ``bench/relay``: the worker leases rows as intake commits
them, a few at a time, and opened a new connection for every small group —
975 connections (TCP, EHLO, STARTTLS, QUIT) for 20,000 messages, where Postfix
used three. Postfix keeps a finished session open for a short while
(``smtp_connection_cache_time_limit``, 2 s) for the next message to the same
next hop; this is the same idea.

The cache only holds connections; the caller decides what may be reused:
the key names everything that made the connection what it is (the route's
hosts, the port, the TLS policy, the credentials), so a connection made under
one policy is never handed to a job that needs another. An entry older than
``idle_seconds`` is closed, not reused: remote servers time idle sessions
out (RFC 5321 §4.5.3.2 asks for 5 minutes, many use less), and a session
that died while idle would turn the next job into a needless deferral. The
caller still checks a taken connection with RSET before trusting it.

Pure bookkeeping with an injected clock; closing is the caller's (it is I/O).
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Generic, TypeVar

__all__ = ["ConnectionCache"]

_C = TypeVar("_C")


@dataclass(slots=True)
class _Idle(Generic[_C]):
    connection: _C
    since: float


class ConnectionCache(Generic[_C]):
    """Idle connections by key, newest first, each for at most ``idle_seconds``.

    ``limit`` bounds the idle connections per key: more than a destination's
    concurrent sessions is never useful, and each idle one holds a socket
    open at the receiver.
    """

    def __init__(self, idle_seconds: float, clock: Callable[[], float], limit: int = 20) -> None:
        if idle_seconds < 0:
            raise ValueError(f"idle_seconds must be >= 0, got {idle_seconds}")
        if limit < 1:
            raise ValueError(f"limit must be >= 1, got {limit}")
        self._idle_seconds = idle_seconds
        self._clock = clock
        self._limit = limit
        self._idle: dict[Hashable, list[_Idle[_C]]] = {}

    @property
    def enabled(self) -> bool:
        return self._idle_seconds > 0

    def __len__(self) -> int:
        return sum(len(entries) for entries in self._idle.values())

    def take(self, key: Hashable) -> tuple[_C | None, list[_C]]:
        """The most recently returned fresh connection for ``key`` (or None), and stale ones.

        The stale connections (idle too long) are removed and handed back for
        the caller to close.
        """
        entries = self._idle.get(key)
        if not entries:
            return None, []
        now = self._clock()
        stale = [e.connection for e in entries if now - e.since >= self._idle_seconds]
        fresh = [e for e in entries if now - e.since < self._idle_seconds]
        found = fresh.pop().connection if fresh else None
        if fresh:
            self._idle[key] = fresh
        else:
            del self._idle[key]
        return found, stale

    def give(self, key: Hashable, connection: _C) -> list[_C]:
        """Keep ``connection`` for ``key``; returns connections to close now.

        With the cache disabled that is ``connection`` itself; past the
        per-key limit, the oldest idle one.
        """
        if not self.enabled:
            return [connection]
        entries = self._idle.setdefault(key, [])
        entries.append(_Idle(connection, self._clock()))
        surplus: list[_C] = []
        while len(entries) > self._limit:
            surplus.append(entries.pop(0).connection)
        return surplus

    def expired(self) -> list[_C]:
        """Remove and return every connection idle for ``idle_seconds`` or more."""
        now = self._clock()
        out: list[_C] = []
        for key in list(self._idle):
            keep = []
            for entry in self._idle[key]:
                if now - entry.since >= self._idle_seconds:
                    out.append(entry.connection)
                else:
                    keep.append(entry)
            if keep:
                self._idle[key] = keep
            else:
                del self._idle[key]
        return out

    def drain(self) -> list[_C]:
        """Remove and return every idle connection (shutting down)."""
        out = [entry.connection for entries in self._idle.values() for entry in entries]
        self._idle.clear()
        return out
