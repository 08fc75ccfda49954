"""SMTP AUTH decisions against a real tenant directory on a real database.

The users' hashes are real Argon2id hashes verified by ``postlane.crypto``, made
with small cost parameters so the suite stays fast (verification reads the
parameters from the hash). One test uses ``crypto.hash_password`` itself. An
unknown or unusable user is checked against the module's dummy hash at full
cost, so those tests are the slow ones.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import pytest
from argon2 import PasswordHasher

from postlane import crypto
from postlane.smtp.auth_guard import CredentialCache, FailureThrottle
from postlane.smtp.authenticator import Authenticator, AuthResult
from postlane.store import (
    Account,
    Database,
    SmtpUser,
    create_account,
    create_smtp_user,
    set_password_hash,
    update_account,
    update_smtp_user,
)
from postlane.tenants.directory import TenantDirectory

_CHEAP = PasswordHasher(time_cost=1, memory_cost=1024, parallelism=1)
PASSWORD = "correct horse battery"
NEW_PASSWORD = "staple of the month"
IP = "192.0.2.10"
MAX_FAILURES = 3


@pytest.fixture(scope="module")
def hashes() -> dict[str, str]:
    return {PASSWORD: _CHEAP.hash(PASSWORD), NEW_PASSWORD: _CHEAP.hash(NEW_PASSWORD)}


@dataclass
class World:
    db: Database
    account: Account
    alice: SmtpUser
    directory: TenantDirectory
    cache: CredentialCache
    throttle: FailureThrottle
    auth: Authenticator

    def change(self, fn: Callable[..., object], *args: object, **kwargs: object) -> None:
        """Apply a store change in its own transaction, then reload the directory."""
        with self.db.begin() as conn:
            fn(conn, *args, **kwargs)
        assert self.directory.reload()

    def verify(self, username: str, password: str, ip: str = IP) -> AuthResult:
        return asyncio.run(self.auth.verify(ip, username, password))


@pytest.fixture
def world(db: Database, hashes: dict[str, str]) -> World:
    with db.begin() as conn:
        account = create_account(conn, "acme")
        alice = create_smtp_user(
            conn, account.id, "Alice", hashes[PASSWORD], authorised_senders=["news@acme.com"]
        )
    directory = TenantDirectory(db)
    cache = CredentialCache(300)
    throttle = FailureThrottle(MAX_FAILURES, 60)
    auth = Authenticator(directory, cache, throttle)
    directory.on_change = auth.on_tenants_changed
    directory.reload()
    return World(db, account, alice, directory, cache, throttle, auth)


def watch_verifications(
    monkeypatch: pytest.MonkeyPatch, *, record: str, seconds: float = 0.0
) -> list[str]:
    """Each verification from now on, as its ``record`` ("password_hash" or "password").

    ``seconds`` makes each take a while, as Argon2 does at full cost.
    """
    seen: list[str] = []
    real = crypto.verify_password

    def watched(password_hash: str, password: str) -> bool:
        seen.append(password_hash if record == "password_hash" else password)
        if seconds:
            time.sleep(seconds)
        return real(password_hash, password)

    monkeypatch.setattr(crypto, "verify_password", watched)
    return seen


@pytest.fixture
def hashing(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every password hash verified from now on (the hashes, in order)."""
    return watch_verifications(monkeypatch, record="password_hash")


# -- the right password --------------------------------------------------------------------


def test_right_password_then_quick_answers_without_hashing(
    world: World, hashing: list[str]
) -> None:
    assert world.auth.quick(IP, "Alice", PASSWORD) is None  # nothing remembered yet
    result = world.verify("Alice", PASSWORD)
    assert result.verdict == "ok"
    assert result.user is not None
    assert result.user.id == world.alice.id
    assert len(hashing) == 1
    quick = world.auth.quick(IP, "Alice", PASSWORD)
    assert quick == AuthResult("ok", result.user)
    assert world.auth.quick("198.51.100.7", "alice", PASSWORD) == AuthResult("ok", result.user)
    assert len(hashing) == 1  # answered from the cache


def test_username_is_case_insensitive(world: World) -> None:
    result = world.verify("ALICE", PASSWORD)
    assert result.verdict == "ok"
    assert result.user is not None
    assert result.user.username == "Alice"


def test_quick_does_not_accept_another_password_from_the_cache(world: World) -> None:
    assert world.verify("Alice", PASSWORD).verdict == "ok"
    assert world.auth.quick(IP, "Alice", PASSWORD + "!") is None


def test_a_hash_made_by_crypto_hash_password_verifies(world: World) -> None:
    world.change(set_password_hash, world.alice.id, crypto.hash_password(NEW_PASSWORD))
    assert world.verify("Alice", NEW_PASSWORD).verdict == "ok"


def test_authorised_sender_logs_in_when_the_account_allows_it(world: World) -> None:
    assert world.verify("news@acme.com", PASSWORD).verdict == "invalid"
    world.change(update_account, world.account.id, allow_email_login=True)
    result = world.verify("news@acme.com", PASSWORD)
    assert result.verdict == "ok"
    assert result.user is not None
    assert result.user.id == world.alice.id
    assert world.auth.quick(IP, "NEWS@acme.com", PASSWORD) == AuthResult("ok", result.user)


# -- wrong passwords and throttling --------------------------------------------------------


def test_wrong_password_is_invalid_and_counts(world: World) -> None:
    for attempt in range(MAX_FAILURES):
        assert world.auth.quick(IP, "Alice", "guess") is None, attempt
        assert world.verify("Alice", f"guess {attempt}") == AuthResult("invalid")
    throttled = AuthResult("throttled")
    assert world.auth.quick(IP, "Alice", "guess") == throttled
    # The right password does not help once throttled, from that IP ...
    assert world.auth.quick(IP, "Alice", PASSWORD) == throttled
    # ... nor for that username from anywhere (it is the target being guessed) ...
    assert world.auth.quick("198.51.100.7", "alice", PASSWORD) == throttled
    # ... and the guessing IP is throttled for every username.
    assert world.auth.quick(IP, "someone-else", "x") == throttled


def test_failures_below_the_limit_do_not_throttle(world: World) -> None:
    for attempt in range(MAX_FAILURES - 1):
        assert world.verify("Alice", f"guess {attempt}").verdict == "invalid"
    assert world.auth.quick(IP, "Alice", PASSWORD) is None
    assert world.verify("Alice", PASSWORD).verdict == "ok"


def test_throttled_even_with_remembered_credentials(world: World) -> None:
    assert world.verify("Alice", PASSWORD).verdict == "ok"
    for attempt in range(MAX_FAILURES):
        world.verify("Alice", f"guess {attempt}", ip="198.51.100.7")
    assert world.auth.quick(IP, "Alice", PASSWORD) == AuthResult("throttled")


# -- users who may not send: one verdict for all -------------------------------------------


@pytest.mark.parametrize("case", ["unknown", "inactive", "smtp_disabled"])
def test_users_who_may_not_send_get_the_same_verdict(
    world: World, hashing: list[str], case: str
) -> None:
    username = "Alice"
    if case == "unknown":
        username = "mallory"
    elif case == "inactive":
        world.change(update_smtp_user, world.alice.id, active=False)
    else:
        world.change(update_account, world.account.id, smtp_enabled=False)
    assert world.verify(username, PASSWORD) == AuthResult("invalid")
    # Costs one verification like a real user would, so timing does not tell either.
    assert len(hashing) == 1
    assert hashing[0] != world.alice.password_hash
    assert world.auth.quick(IP, username, PASSWORD) is None
    # The failed attempt counted: a few more and the name is throttled.
    for _ in range(MAX_FAILURES - 1):
        world.throttle.record_failure("198.51.100.7", username)
    assert world.auth.quick(IP, username, PASSWORD) == AuthResult("throttled")


# -- password resets and tenant changes ----------------------------------------------------


def test_password_reset_ends_a_remembered_password(world: World, hashes: dict[str, str]) -> None:
    assert world.verify("Alice", PASSWORD).verdict == "ok"
    world.change(set_password_hash, world.alice.id, hashes[NEW_PASSWORD])
    assert world.auth.quick(IP, "Alice", PASSWORD) is None
    assert world.verify("Alice", PASSWORD) == AuthResult("invalid")
    assert world.verify("Alice", NEW_PASSWORD).verdict == "ok"


def test_password_reset_ends_a_remembered_password_without_on_change(
    world: World, hashes: dict[str, str]
) -> None:
    world.directory.on_change = None
    assert world.verify("Alice", PASSWORD).verdict == "ok"
    world.change(set_password_hash, world.alice.id, hashes[NEW_PASSWORD])
    assert len(world.cache) == 1  # still held, but bound to the old hash
    assert world.auth.quick(IP, "Alice", PASSWORD) is None
    assert world.verify("Alice", PASSWORD).verdict == "invalid"


def test_on_tenants_changed_forgets_a_reset_user(world: World, hashes: dict[str, str]) -> None:
    assert world.verify("Alice", PASSWORD).verdict == "ok"
    assert len(world.cache) == 1
    world.change(set_password_hash, world.alice.id, hashes[NEW_PASSWORD])
    assert len(world.cache) == 0


def test_on_tenants_changed_forgets_a_disabled_user(world: World) -> None:
    assert world.verify("Alice", PASSWORD).verdict == "ok"
    world.change(update_smtp_user, world.alice.id, active=False)
    assert len(world.cache) == 0
    assert world.auth.quick(IP, "Alice", PASSWORD) is None
    world.change(update_smtp_user, world.alice.id, active=True)
    # Enabled again, but the credential must be verified afresh.
    assert world.auth.quick(IP, "Alice", PASSWORD) is None
    assert world.verify("Alice", PASSWORD).verdict == "ok"


def test_on_tenants_changed_forgets_users_of_a_disabled_account(world: World) -> None:
    assert world.verify("Alice", PASSWORD).verdict == "ok"
    world.change(update_account, world.account.id, smtp_enabled=False)
    assert len(world.cache) == 0
    world.change(update_account, world.account.id, smtp_enabled=True)
    assert world.auth.quick(IP, "Alice", PASSWORD) is None


def test_on_tenants_changed_forgets_a_renamed_user(world: World) -> None:
    assert world.verify("Alice", PASSWORD).verdict == "ok"
    world.change(update_smtp_user, world.alice.id, username="alice2")
    assert len(world.cache) == 0
    assert world.auth.quick(IP, "Alice", PASSWORD) is None


def test_on_tenants_changed_forgets_alias_logins_of_a_reset_user(
    world: World, hashes: dict[str, str]
) -> None:
    world.change(update_account, world.account.id, allow_email_login=True)
    assert world.verify("news@acme.com", PASSWORD).verdict == "ok"
    assert len(world.cache) == 1
    world.change(set_password_hash, world.alice.id, hashes[NEW_PASSWORD])
    assert len(world.cache) == 0


def test_on_tenants_changed_keeps_users_who_did_not_change(
    world: World, hashes: dict[str, str]
) -> None:
    assert world.verify("Alice", PASSWORD).verdict == "ok"
    with world.db.begin() as conn:
        create_smtp_user(conn, world.account.id, "bob", hashes[NEW_PASSWORD])
    assert world.directory.reload()
    world.change(update_smtp_user, world.alice.id, note="a note")
    assert len(world.cache) == 1
    assert world.auth.quick(IP, "Alice", PASSWORD) is not None


def test_simultaneous_logins_share_one_verification(world: World, hashing: list[str]) -> None:
    async def ten_at_once() -> list[AuthResult]:
        return await asyncio.gather(*(world.auth.verify(IP, "Alice", PASSWORD) for _ in range(10)))

    results = asyncio.run(ten_at_once())
    assert all(r.verdict == "ok" for r in results)
    assert len(hashing) == 1
    assert not world.auth._in_flight  # nothing left behind


def test_simultaneous_wrong_passwords_each_count(world: World, hashing: list[str]) -> None:
    async def three_at_once() -> list[AuthResult]:
        return await asyncio.gather(*(world.auth.verify(IP, "Alice", "nope") for _ in range(3)))

    results = asyncio.run(three_at_once())
    assert [r.verdict for r in results] == ["invalid"] * 3
    assert len(hashing) == 1  # one Argon2 run for the three
    assert world.throttle.blocked(IP)  # yet each attempt counted (MAX_FAILURES is 3)


# -- many attempts at once --------------------------------------------------------------------


@pytest.fixture
def slow_hashing(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The passwords verified from now on, each verification taking 0.05 s."""
    return watch_verifications(monkeypatch, record="password", seconds=0.05)


def _at_once(world: World, attempts: list[tuple[str, str, str]]) -> list[AuthResult]:
    """verify() for each (ip, username, password), all started together."""

    async def together() -> list[AuthResult]:
        return await asyncio.gather(*(world.auth.verify(*attempt) for attempt in attempts))

    return asyncio.run(together())


def test_parallel_guesses_from_one_address_are_verified_at_most_the_limit(
    world: World, slow_hashing: list[str]
) -> None:
    """400 connections guessing at once were all verified (64 MiB apiece): the limit
    counted failures only, and a failure is known only once its verification ends."""
    results = _at_once(world, [(IP, f"user{n}", f"guess {n}") for n in range(40)])
    assert len(slow_hashing) == MAX_FAILURES
    verdicts = [r.verdict for r in results]
    assert verdicts.count("invalid") == MAX_FAILURES
    assert verdicts.count("throttled") == 40 - MAX_FAILURES
    assert world.throttle.in_progress(IP) == 0  # every reservation became a failure
    assert world.auth.quick(IP, "Alice", PASSWORD) == AuthResult("throttled")


def test_parallel_guesses_at_one_user_are_verified_at_most_the_limit(
    world: World, slow_hashing: list[str]
) -> None:
    results = _at_once(world, [(f"198.51.100.{n}", "alice", f"guess {n}") for n in range(40)])
    assert len(slow_hashing) == MAX_FAILURES
    assert [r.verdict for r in results].count("invalid") == MAX_FAILURES
    assert world.throttle.in_progress(IP, "alice") == 0


def test_the_right_password_under_the_limit_works_while_guesses_run(
    world: World, slow_hashing: list[str]
) -> None:
    guesses = [(IP, "Alice", f"guess {n}") for n in range(MAX_FAILURES - 1)]
    *failed, ok = _at_once(world, [*guesses, (IP, "Alice", PASSWORD)])
    assert [r.verdict for r in failed] == ["invalid"] * (MAX_FAILURES - 1)
    assert ok.verdict == "ok"
    assert world.throttle.in_progress(IP) == 0  # the success gave its reservation back
    assert not world.throttle.blocked(IP)


def test_remembered_credentials_are_not_held_up_by_guesses_under_way(
    world: World, slow_hashing: list[str]
) -> None:
    assert world.verify("Alice", PASSWORD).verdict == "ok"

    async def guessing_meanwhile() -> AuthResult | None:
        guesses = [
            asyncio.ensure_future(world.auth.verify(IP, "Alice", f"guess {n}"))
            for n in range(MAX_FAILURES)
        ]
        await asyncio.sleep(0)
        assert world.throttle.in_progress(IP) == MAX_FAILURES
        remembered = world.auth.quick(IP, "Alice", PASSWORD)
        await asyncio.gather(*guesses)
        return remembered

    assert asyncio.run(guessing_meanwhile()) == AuthResult("ok", world.alice)
    assert slow_hashing[0] == PASSWORD  # and no verification of it since
    assert sorted(slow_hashing[1:]) == [f"guess {n}" for n in range(MAX_FAILURES)]


def test_credentials_are_forgotten_on_the_event_loop_thread(
    world: World, hashes: dict[str, str]
) -> None:
    """The cache is used unlocked by sessions on the loop: a refresh thread must not touch it."""
    assert world.verify("Alice", PASSWORD).verdict == "ok"
    forgotten: list[tuple[str, int]] = []
    real_forget = world.cache.forget_user

    def forget_user(username: str) -> None:
        forgotten.append((username, threading.get_ident()))
        real_forget(username)

    world.cache.forget_user = forget_user  # type: ignore[method-assign]
    directory = TenantDirectory(world.db, refresh_interval=0.01)
    directory.on_change = world.auth.on_tenants_changed
    directory.reload()
    world.auth._directory = directory

    async def scenario() -> int:
        task = asyncio.ensure_future(directory.run())
        try:
            with world.db.begin() as conn:
                set_password_hash(conn, world.alice.id, hashes[NEW_PASSWORD])
            for _ in range(500):
                if forgotten:
                    break
                await asyncio.sleep(0.01)
            return threading.get_ident()
        finally:
            task.cancel()

    loop_thread = asyncio.run(scenario())
    assert forgotten == [("Alice", loop_thread)]
    assert len(world.cache) == 0
