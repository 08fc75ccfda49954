"""The idle-connection cache: freshness, order, limits, and what it hands back to close."""

from __future__ import annotations

import pytest

from postlane.delivery.connection_cache import ConnectionCache


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_take_returns_the_newest_fresh_connection() -> None:
    clock = Clock()
    cache: ConnectionCache[str] = ConnectionCache(2.0, clock)
    assert cache.give("mx", "old") == []
    clock.now += 1
    assert cache.give("mx", "new") == []
    assert cache.take("mx") == ("new", [])
    assert cache.take("mx") == ("old", [])
    assert cache.take("mx") == (None, [])


def test_keys_do_not_mix() -> None:
    cache: ConnectionCache[str] = ConnectionCache(2.0, Clock())
    cache.give(("mx", 25, "opportunistic"), "plain")
    assert cache.take(("mx", 25, "required")) == (None, [])
    assert cache.take(("mx", 25, "opportunistic")) == ("plain", [])


def test_stale_connections_are_handed_back_to_close() -> None:
    clock = Clock()
    cache: ConnectionCache[str] = ConnectionCache(2.0, clock)
    cache.give("mx", "a")
    clock.now += 1.5
    cache.give("mx", "b")
    clock.now += 1.0  # a idle 2.5 s, b 1.0 s
    assert cache.take("mx") == ("b", ["a"])
    assert len(cache) == 0


def test_expired_removes_only_the_old() -> None:
    clock = Clock()
    cache: ConnectionCache[str] = ConnectionCache(2.0, clock)
    cache.give("x", "a")
    cache.give("y", "b")
    clock.now += 1.0
    cache.give("y", "c")
    clock.now += 1.0
    assert sorted(cache.expired()) == ["a", "b"]
    assert len(cache) == 1
    assert cache.take("y") == ("c", [])


def test_limit_closes_the_oldest_surplus() -> None:
    cache: ConnectionCache[str] = ConnectionCache(5.0, Clock(), limit=2)
    assert cache.give("mx", "a") == []
    assert cache.give("mx", "b") == []
    assert cache.give("mx", "c") == ["a"]
    assert len(cache) == 2


def test_disabled_cache_keeps_nothing() -> None:
    cache: ConnectionCache[str] = ConnectionCache(0.0, Clock())
    assert not cache.enabled
    assert cache.give("mx", "a") == ["a"]
    assert cache.take("mx") == (None, [])


def test_drain_returns_everything() -> None:
    cache: ConnectionCache[str] = ConnectionCache(5.0, Clock())
    cache.give("x", "a")
    cache.give("y", "b")
    assert sorted(cache.drain()) == ["a", "b"]
    assert len(cache) == 0


@pytest.mark.parametrize(("idle", "limit"), [(-1.0, 1), (1.0, 0)])
def test_bad_arguments_are_refused(idle: float, limit: int) -> None:
    with pytest.raises(ValueError, match="must be >="):
        ConnectionCache(idle, Clock(), limit=limit)
