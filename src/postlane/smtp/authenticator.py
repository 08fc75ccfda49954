"""Deciding an SMTP AUTH: who is this, may they send, and how fast can we say so.

The answer never says which part was wrong (unknown user, wrong password,
inactive user, SMTP disabled for the account): all are ``535 5.7.8``, so the
reply cannot be used to discover user names. For the same reason an unknown
user still costs one Argon2 verification against a dummy hash.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from dataclasses import dataclass
from typing import Literal

from postlane import crypto, metrics
from postlane.smtp.auth_guard import CredentialCache, FailureThrottle
from postlane.store.smtp_users import SmtpUser
from postlane.tenants.directory import TenantDirectory, TenantSnapshot

log = logging.getLogger("postlane.smtp.auth")


@functools.cache
def _dummy_hash() -> str:
    """Made on first need, not at import: hashing costs Argon2's memory and time."""
    return crypto.hash_password("postlane: a password nobody has")


Verdict = Literal["ok", "invalid", "throttled"]


@dataclass(frozen=True, slots=True)
class AuthResult:
    verdict: Verdict
    user: SmtpUser | None = None


class Authenticator:
    def __init__(
        self, directory: TenantDirectory, cache: CredentialCache, throttle: FailureThrottle
    ) -> None:
        self._directory = directory
        self._cache = cache
        self._throttle = throttle
        # Clients that open many connections at once log in with the same
        # credentials together; they share one Argon2 run instead of each
        # paying for one (CPU and 64 MiB apiece).
        self._in_flight: dict[tuple[str, str, str], asyncio.Future[bool]] = {}

    def on_tenants_changed(self, old: TenantSnapshot, new: TenantSnapshot) -> None:
        """Forget remembered credentials of users who were reset, disabled or removed.

        Called on the event loop (the cache is not shared with threads). One
        pass over the users, whatever the number of accounts disabled, and
        each forget costs only that user's cache entries.
        """
        for login, user in old.users.items():
            fresh = new.users.get(login)
            if fresh is None or not fresh.active or fresh.password_hash != user.password_hash:
                self._cache.forget_user(user.username)
        disabled = {
            account_id
            for account_id, account in new.accounts.items()
            if not account.smtp_enabled and old.accounts.get(account_id, account).smtp_enabled
        }
        if disabled:
            for user in new.users.values():
                if user.account_id in disabled:
                    self._cache.forget_user(user.username)

    def quick(self, ip: str, username: str, password: str) -> AuthResult | None:
        """The answer without hashing when there is one (throttled, or remembered)."""
        if self._throttle.blocked(ip, username):
            metrics.SMTP_AUTH_FAILURES.labels("throttled").inc()
            log.warning("auth throttled ip=%s user=%r", ip, username)
            return AuthResult("throttled")
        user = self._usable(username)
        if user is not None and self._cache.verified(username, password, user.password_hash):
            return AuthResult("ok", user)
        return None

    async def verify(self, ip: str, username: str, password: str) -> AuthResult:
        """The full check, Argon2 in a worker thread so other sessions keep going.

        A new Argon2 run first reserves room under the failure limit (per IP
        and per username): failures are only known when it ends, and without
        the reservation many connections guessing at once would all be
        verified (CPU and 64 MiB apiece) before the first failure counted.
        Joining a run already under way for the same credential costs nothing
        more, so it needs no reservation; its failure still counts.
        """
        user = self._usable(username)
        password_hash = user.password_hash if user is not None else _dummy_hash()
        reserved = (username.lower(), password, password_hash) not in self._in_flight
        if reserved and not self._throttle.reserve(ip, username):
            metrics.SMTP_AUTH_FAILURES.labels("throttled").inc()
            log.warning("auth throttled ip=%s user=%r: too many attempts at once", ip, username)
            return AuthResult("throttled")
        try:
            matched = await self._verify_once(username, password, password_hash)
        except BaseException:
            if reserved:
                self._throttle.release(ip, username)
            raise
        user = self._usable(username)  # the snapshot may have been refreshed meanwhile
        if matched and user is not None and user.password_hash == password_hash:
            if reserved:
                self._throttle.release(ip, username)
            self._cache.remember(username, password, password_hash, owner=user.username)
            return AuthResult("ok", user)
        self._throttle.record_failure(ip, username, reserved=reserved)
        metrics.SMTP_AUTH_FAILURES.labels("invalid").inc()
        log.warning("auth failed ip=%s user=%r", ip, username)
        return AuthResult("invalid")

    async def _verify_once(self, username: str, password: str, password_hash: str) -> bool:
        key = (username.lower(), password, password_hash)
        running = self._in_flight.get(key)
        if running is not None:
            return await asyncio.shield(running)
        future = asyncio.ensure_future(
            asyncio.to_thread(crypto.verify_password, password_hash, password)
        )
        self._in_flight[key] = future
        try:
            return await asyncio.shield(future)
        finally:
            if future.done():
                self._in_flight.pop(key, None)
            else:
                future.add_done_callback(lambda _: self._in_flight.pop(key, None))

    def _usable(self, username: str) -> SmtpUser | None:
        snapshot = self._directory.snapshot
        user = snapshot.login(username)
        if user is None or not user.active:
            return None
        account = snapshot.accounts.get(user.account_id)
        if account is None or not account.smtp_enabled:
            return None
        return user
