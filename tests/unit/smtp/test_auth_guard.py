from __future__ import annotations

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
