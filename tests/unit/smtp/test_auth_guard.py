from __future__ import annotations

from typing import Any

from postlane.smtp.auth_guard import CredentialCache, FailureThrottle


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_cache_remembers_only_the_same_credential_and_hash() -> None:
    clock = FakeClock()
    cache = CredentialCache(60, clock=clock)
    assert not cache.verified("app1", "pw", "$h1")
    cache.remember("app1", "pw", "$h1")
    assert cache.verified("APP1", "pw", "$h1")
    assert not cache.verified("app1", "pw2", "$h1")
    assert not cache.verified("app1", "pw", "$h2")  # password was reset: hash changed
    assert not cache.verified("app1", "pw", "$h1")  # and the entry is gone


def test_cache_entries_expire_and_are_forgotten() -> None:
    clock = FakeClock()
    cache = CredentialCache(60, clock=clock)
    cache.remember("app1", "pw", "$h")
    clock.now += 61
    assert not cache.verified("app1", "pw", "$h")
    cache.remember("app1", "pw", "$h")
    cache.remember("other", "pw", "$h")
    cache.forget_user("App1")
    assert not cache.verified("app1", "pw", "$h")
    assert cache.verified("other", "pw", "$h")


def test_cache_never_holds_the_password() -> None:
    cache = CredentialCache(60)
    cache.remember("app1", "correct horse", "$h")
    assert b"correct horse" not in repr(vars(cache)).encode()


def test_cache_off_with_zero_ttl() -> None:
    cache = CredentialCache(0)
    cache.remember("a", "b", "c")
    assert not cache.verified("a", "b", "c")
    assert len(cache) == 0


class Unwalkable(dict[bytes, Any]):
    """The cache's entries, refusing to be walked as a whole."""

    def _walk(self, *args: Any) -> Any:
        raise AssertionError("forgetting one user walked every cache entry")

    __iter__ = items = keys = values = _walk  # type: ignore[assignment]


def test_forgetting_a_user_touches_only_that_users_entries() -> None:
    """Disabling an account forgets each of its users: a walk of the cache for each
    was users x entries (2,000 users and 20,000 entries took 0.8 s on the loop)."""
    cache = CredentialCache(60)
    for number in range(1000):
        cache.remember(f"user{number}", "pw", "$h")
    cache.remember("app1", "pw1", "$h")
    cache.remember("news@acme.com", "pw2", "$h", owner="App1")  # an alias login
    cache._entries = Unwalkable(cache._entries)
    cache.forget_user("APP1")
    cache.forget_user("nobody")
    assert len(cache) == 1000
    assert not cache.verified("app1", "pw1", "$h")
    assert not cache.verified("news@acme.com", "pw2", "$h")
    assert cache.verified("user7", "pw", "$h")


def test_the_index_by_user_follows_every_way_an_entry_goes() -> None:
    clock = FakeClock()
    cache = CredentialCache(60, clock=clock)
    cache.remember("app1", "pw", "$h")
    assert not cache.verified("app1", "pw", "$other")  # dropped: the hash changed
    cache.remember("app2", "pw", "$h")
    clock.now += 61
    cache._sweep()  # expired
    cache.remember("news@acme.com", "pw", "$h", owner="app3")
    cache.remember("news@acme.com", "pw", "$h", owner="app4")  # the alias moved
    assert cache._by_user == {"app4": {cache._digest("news@acme.com", "pw")}}
    cache.forget_user("app3")
    assert cache.verified("news@acme.com", "pw", "$h")
    cache.forget_user("app4")
    assert len(cache) == 0 and cache._by_user == {}


def test_throttle_per_ip_and_per_username_in_window() -> None:
    clock = FakeClock()
    throttle = FailureThrottle(3, 60, clock=clock)
    for _ in range(3):
        assert not throttle.blocked("192.0.2.1", "app1")
        throttle.record_failure("192.0.2.1", "app1")
    assert throttle.blocked("192.0.2.1")
    assert throttle.blocked("198.51.100.9", "APP1")  # same user from elsewhere
    assert not throttle.blocked("198.51.100.9", "app2")
    clock.now += 61
    assert not throttle.blocked("192.0.2.1", "app1")


def test_verifications_under_way_count_against_the_limit() -> None:
    """Failures are known only after Argon2: attempts still running must count too."""
    clock = FakeClock()
    throttle = FailureThrottle(3, 60, clock=clock)
    throttle.record_failure("192.0.2.1", "app1")
    assert throttle.reserve("192.0.2.1", "app1")
    assert throttle.reserve("192.0.2.1", "app2")
    assert not throttle.reserve("192.0.2.1", "app3")  # 1 failed + 2 running from the IP
    # The user name too, from anywhere: 1 failed + 1 running, + 1 more is the limit.
    assert throttle.reserve("198.51.100.9", "APP1")
    assert not throttle.reserve("198.51.100.10", "app1")
    throttle.release("198.51.100.9", "APP1")
    assert throttle.in_progress("192.0.2.1") == 2
    assert not throttle.blocked("192.0.2.1")  # a remembered credential is still fine
    throttle.release("192.0.2.1", "app2")  # that one verified
    throttle.record_failure("192.0.2.1", "app1", reserved=True)  # that one failed
    assert throttle.in_progress("192.0.2.1") == 0
    assert throttle.in_progress("192.0.2.1", "app1") == 0
    assert throttle.reserve("192.0.2.1", "app4")  # 2 failed, none running
    assert not throttle.reserve("192.0.2.1", "app5")
    clock.now += 61
    throttle.release("192.0.2.1", "app4")
    assert throttle.reserve("192.0.2.1", "app1")  # the failures have aged out
