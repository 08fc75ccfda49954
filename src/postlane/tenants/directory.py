"""An in-memory copy of the tenant tables, for the checks every SMTP session makes.

AUTH, trusted-network lookups and sender policy happen for every message; a
database round trip for each would cost more than the rest of intake. The
tenant tables are small and change rarely, so the SMTP server keeps a snapshot
and reloads it when the store's fingerprint changes (see
``store.tenant_changes``), which bounds how long a reset password or a
disabled user keeps working to one refresh interval.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from postlane.store import Database
from postlane.store.accounts import Account, list_accounts
from postlane.store.domains import SendingDomain, list_domains
from postlane.store.smtp_users import SmtpUser, list_smtp_users
from postlane.store.tenant_changes import tenants_fingerprint

log = logging.getLogger("postlane.tenants")

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

FAILURE_LOG_INTERVAL = 60.0  # seconds between log lines while refreshes keep failing


@dataclass(frozen=True, slots=True)
class TenantSnapshot:
    """Tenants as of one moment, indexed for the lookups a session makes."""

    accounts: dict[int, Account] = field(default_factory=dict)
    users: dict[str, SmtpUser] = field(default_factory=dict)  # lower-cased login -> user
    domains: dict[int, tuple[SendingDomain, ...]] = field(default_factory=dict)
    networks: tuple[tuple[IPNetwork, int], ...] = ()  # most specific first
    bounce_domains: frozenset[str] = frozenset()
    # Values derived from this snapshot (e.g. a sender's option defaults), made
    # once and dropped with the snapshot; never shared across snapshots.
    memo: dict[Any, Any] = field(default_factory=dict, compare=False)

    @classmethod
    def build(
        cls,
        accounts: list[Account],
        users: list[SmtpUser],
        domains: list[SendingDomain],
    ) -> TenantSnapshot:
        by_id = {a.id: a for a in accounts}
        logins: dict[str, SmtpUser] = {u.username.lower(): u for u in users}
        # "Allow login with email address": an authorised sender address logs
        # in as its user, unless it is somebody's username or names two users.
        aliases: dict[str, dict[int, SmtpUser]] = {}
        for user in users:
            account = by_id.get(user.account_id)
            if account is None or not account.allow_email_login:
                continue
            for address in user.authorised_senders:
                aliases.setdefault(address.lower(), {})[user.id] = user
        for address, owners in aliases.items():
            if len(owners) == 1 and address not in logins:
                logins[address] = next(iter(owners.values()))
        per_account: dict[int, list[SendingDomain]] = {}
        for domain in domains:
            per_account.setdefault(domain.account_id, []).append(domain)
        networks: list[tuple[IPNetwork, int]] = []
        for account in accounts:
            for text in account.trusted_networks:
                networks.append((ipaddress.ip_network(text, strict=False), account.id))
        networks.sort(key=lambda item: item[0].prefixlen, reverse=True)
        return cls(
            accounts=by_id,
            users=logins,
            domains={k: tuple(v) for k, v in per_account.items()},
            networks=tuple(networks),
            bounce_domains=frozenset(f"{d.return_path_subdomain}.{d.name}" for d in domains),
        )

    def login(self, name: str) -> SmtpUser | None:
        return self.users.get(name.lower())

    def trusted_account(self, ip: str) -> Account | None:
        """The account whose trusted networks contain ip (most specific wins)."""
        if not self.networks:
            return None
        key = ("trusted", ip)
        if key in self.memo:
            account: Account | None = self.memo[key]
            return account
        if len(self.memo) > 50_000:  # many distinct clients: start over rather than grow
            self.memo.clear()
        account = self._trusted_account(ip)
        self.memo[key] = account
        return account

    def _trusted_account(self, ip: str) -> Account | None:
        try:
            address = ipaddress.ip_address(ip)
        except ValueError:
            return None
        for network, account_id in self.networks:
            if address.version == network.version and address in network:
                return self.accounts.get(account_id)
        return None

    def sending_domains(self, account_id: int) -> tuple[str, ...]:
        return tuple(d.name for d in self.domains.get(account_id, ()))


class TenantDirectory:
    """Holds the current snapshot and refreshes it when the tables change.

    The tables are read in a worker thread, but the snapshot is replaced and
    ``on_change`` runs on the event loop: the change handler forgets cached
    credentials, and the credential cache is only ever touched from the loop.
    """

    def __init__(
        self,
        db: Database,
        *,
        refresh_interval: float = 1.0,
        on_change: Callable[[TenantSnapshot, TenantSnapshot], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._db = db
        self._interval = refresh_interval
        self._clock = clock
        self.on_change = on_change
        self._fingerprint: tuple[Any, ...] | None = None
        self.snapshot = TenantSnapshot()

    def reload(self) -> bool:
        """Load the tables again if they changed; True when the snapshot was replaced.

        Loads and installs in the calling thread, which suits startup and
        tests; run() loads in a worker thread and installs on the loop.
        """
        loaded = self.load()
        if loaded is None:
            return False
        self.install(*loaded)
        return True

    def load(self) -> tuple[tuple[Any, ...], TenantSnapshot] | None:
        """The tables' fingerprint and a snapshot of them, or None when unchanged.

        Touches nothing the event loop uses, so it may run in a worker thread.
        """
        known = self._fingerprint
        with self._db.connect() as conn:
            fingerprint = tenants_fingerprint(conn)
            if fingerprint == known:
                return None
            fresh = TenantSnapshot.build(
                list_accounts(conn), list_smtp_users(conn), list_domains(conn)
            )
        return fingerprint, fresh

    def install(self, fingerprint: tuple[Any, ...], fresh: TenantSnapshot) -> None:
        """Make ``fresh`` current and tell ``on_change``; in the thread that serves sessions."""
        old, self.snapshot, self._fingerprint = self.snapshot, fresh, fingerprint
        if self.on_change is not None:
            self.on_change(old, fresh)

    async def run(self) -> None:
        """Refresh forever (cancel to stop); a failed refresh keeps the last snapshot.

        While the database is away every refresh fails: the first failure is
        logged, then one line a minute at most (FAILURE_LOG_INTERVAL), and one
        when refreshing works again, saying how stale the snapshot became.
        """
        clock = self._clock
        current_at = clock()  # when the snapshot was last known to match the tables
        failing_since: float | None = None
        failures = 0
        logged_at = 0.0
        while True:
            await asyncio.sleep(self._interval)
            try:
                loaded = await asyncio.to_thread(self.load)
            except Exception as exc:  # the database may be briefly away: keep serving
                now = clock()
                failures += 1
                if failing_since is None:
                    failing_since = logged_at = now
                    log.warning("tenant refresh failed, keeping the previous snapshot: %s", exc)
                elif now - logged_at >= FAILURE_LOG_INTERVAL:
                    logged_at = now
                    log.warning(
                        "tenant refresh still failing after %.0f s (%d attempts); the snapshot "
                        "is %.0f s old: %s",
                        now - failing_since,
                        failures,
                        now - current_at,
                        exc,
                    )
                continue
            now = clock()
            if failing_since is not None:
                log.warning(
                    "tenant refresh works again after %.0f s (%d failed attempts); the snapshot "
                    "was up to %.0f s stale",
                    now - failing_since,
                    failures,
                    now - current_at,
                )
                failing_since, failures = None, 0
            current_at = now
            if loaded is not None:
                try:
                    self.install(*loaded)
                except Exception:  # the snapshot is in place; only the handler failed
                    log.exception("handling a tenant change failed (the new snapshot is in use)")
