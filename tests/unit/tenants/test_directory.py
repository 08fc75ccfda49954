"""The in-memory tenant directory, and the fingerprint that says when to reload it."""

from __future__ import annotations

import asyncio
import threading
import time
from datetime import timedelta
from typing import Any

import pytest

from postlane.store import (
    Account,
    Database,
    SendingDomain,
    SmtpUser,
    add_domain,
    create_account,
    create_smtp_user,
    set_password_hash,
    update_account,
    update_smtp_user,
)
from postlane.store import smtp_users as smtp_user_store
from postlane.store.schema import utc_now
from postlane.store.tenant_changes import tenants_fingerprint
from postlane.tenants.directory import TenantDirectory, TenantSnapshot

HASH = "$argon2id$v=19$m=65536,t=3,p=4$c2FsdA$aGFzaA"


def fingerprint(db: Database) -> tuple[Any, ...]:
    with db.connect() as conn:
        return tenants_fingerprint(conn)


def new_account(db: Database, name: str, **settings: Any) -> Account:
    with db.begin() as conn:
        account = create_account(conn, name)
        if settings:
            account = update_account(conn, account.id, **settings)
        return account


def new_user(db: Database, account: Account, username: str, **fields: Any) -> SmtpUser:
    with db.begin() as conn:
        return create_smtp_user(conn, account.id, username, HASH, **fields)


def new_domain(
    db: Database, account: Account, name: str, return_path: str = "bounce"
) -> SendingDomain:
    with db.begin() as conn:
        return add_domain(
            conn,
            account.id,
            name,
            dkim_selector="pl1",
            dkim_private_key_enc=b"encrypted",
            dkim_public_key="MIIBIjANBg",
            return_path_subdomain=return_path,
        )


def snapshot(db: Database) -> TenantSnapshot:
    directory = TenantDirectory(db)
    assert directory.reload()
    return directory.snapshot


# -- tenants_fingerprint -------------------------------------------------------------------


def test_fingerprint_is_stable_while_nothing_changes(db: Database, account: Account) -> None:
    assert fingerprint(db) == fingerprint(db)


def test_fingerprint_of_an_empty_store(database_url: str) -> None:
    from postlane.store import upgrade

    database = Database.from_url(database_url)
    try:
        upgrade(database)
        assert fingerprint(database) == (0, None, 0, None, 0, None)
    finally:
        database.dispose()


def test_fingerprint_changes_when_an_account_is_created(db: Database, account: Account) -> None:
    before = fingerprint(db)
    new_account(db, "other")
    assert fingerprint(db) != before


def test_fingerprint_changes_when_an_account_is_updated(db: Database, account: Account) -> None:
    before = fingerprint(db)
    with db.begin() as conn:
        update_account(conn, account.id, smtp_enabled=False)
    assert fingerprint(db) != before


def test_fingerprint_changes_when_a_user_is_created(db: Database, account: Account) -> None:
    before = fingerprint(db)
    new_user(db, account, "mailer")
    assert fingerprint(db) != before


def test_fingerprint_changes_when_a_user_is_updated(db: Database, account: Account) -> None:
    user = new_user(db, account, "mailer")
    before = fingerprint(db)
    with db.begin() as conn:
        update_smtp_user(conn, user.id, active=False)
    after = fingerprint(db)
    assert after != before
    with db.begin() as conn:
        update_smtp_user(conn, user.id, active=True)
    assert fingerprint(db) not in (before, after)


def test_fingerprint_changes_when_a_password_is_reset(db: Database, account: Account) -> None:
    user = new_user(db, account, "mailer")
    before = fingerprint(db)
    with db.begin() as conn:
        set_password_hash(conn, user.id, HASH + "x")
    assert fingerprint(db) != before


def test_fingerprint_changes_when_a_domain_is_added(db: Database, account: Account) -> None:
    before = fingerprint(db)
    new_domain(db, account, "acme.com")
    assert fingerprint(db) != before


def test_fingerprint_changes_when_an_older_user_is_updated(db: Database, account: Account) -> None:
    old = new_user(db, account, "old")
    new_user(db, account, "newer")
    before = fingerprint(db)
    with db.begin() as conn:
        update_smtp_user(conn, old.id, note="changed")
    assert fingerprint(db) != before


def test_fingerprint_changes_when_a_node_with_a_slower_clock_resets_a_password(
    db: Database, account: Account, monkeypatch: pytest.MonkeyPatch
) -> None:
    user = new_user(db, account, "mailer")
    new_user(db, account, "other")  # the newest updated_at, made by a node ahead in time
    before = fingerprint(db)
    monkeypatch.setattr(smtp_user_store, "utc_now", lambda: utc_now() - timedelta(seconds=5))
    with db.begin() as conn:
        set_password_hash(conn, user.id, HASH + "reset")
    assert fingerprint(db) != before


def test_a_change_committed_after_a_later_one_still_changes_the_fingerprint(
    db: Database, account: Account, database_url: str
) -> None:
    """A disable stamped first but committed last once went unseen by running servers.

    The first writer stamps and holds its transaction; the second writer, on
    another connection, stamps and commits meanwhile and a reader takes the
    fingerprint. When the first commits, the fingerprint must change again.
    """
    first_user = new_user(db, account, "first")
    second_user = new_user(db, account, "second")
    other = Database.from_url(database_url)
    stamped = threading.Event()
    seen: list[tuple[tuple[Any, ...], bool]] = []

    def second_writer() -> None:
        stamped.wait(5)
        with other.begin() as conn:
            update_smtp_user(conn, second_user.id, note="edited")
        # A server refreshes here: the fingerprint, and what it would load.
        current = fingerprint(db)
        loaded = snapshot(db).login("first")
        seen.append((current, loaded is not None and loaded.active))

    thread = threading.Thread(target=second_writer)
    thread.start()
    try:
        with db.begin() as conn:
            update_smtp_user(conn, first_user.id, active=False)
            stamped.set()
            time.sleep(0.3)  # the second writer commits now, or waits its turn
        thread.join(10)
    finally:
        other.dispose()
    ((seen_print, first_could_log_in),) = seen
    # A server that loaded the first user active must see the fingerprint move
    # when the disable commits; otherwise it keeps that user forever.
    assert fingerprint(db) != seen_print or not first_could_log_in


# -- TenantSnapshot: logins ----------------------------------------------------------------


def test_login_by_username_in_any_case(db: Database, account: Account) -> None:
    user = new_user(db, account, "Mailer@Example.com")
    found = snapshot(db)
    assert found.login("Mailer@Example.com") == user
    assert found.login("mailer@example.COM") == user
    assert found.login("MAILER@EXAMPLE.COM") == user
    assert found.login("mailer") is None
    assert found.login("") is None


def test_login_by_authorised_sender_when_the_account_allows_it(db: Database) -> None:
    account = new_account(db, "acme", allow_email_login=True)
    user = new_user(db, account, "wordpress", authorised_senders=["News@acme.com"])
    found = snapshot(db)
    assert found.login("news@acme.com") == user
    assert found.login("NEWS@ACME.COM") == user
    assert found.login("wordpress") == user


def test_no_login_by_authorised_sender_when_the_account_does_not_allow_it(
    db: Database, account: Account
) -> None:
    assert account.allow_email_login is False
    new_user(db, account, "wordpress", authorised_senders=["news@acme.com"])
    assert snapshot(db).login("news@acme.com") is None


def test_no_login_by_an_address_that_names_two_users(db: Database) -> None:
    account = new_account(db, "acme", allow_email_login=True)
    new_user(db, account, "shop", authorised_senders=["news@acme.com", "shop@acme.com"])
    blog = new_user(db, account, "blog", authorised_senders=["News@acme.com", "blog@acme.com"])
    found = snapshot(db)
    assert found.login("news@acme.com") is None
    assert found.login("blog@acme.com") == blog


def test_address_of_two_users_in_different_accounts_is_ambiguous(db: Database) -> None:
    one = new_account(db, "one", allow_email_login=True)
    two = new_account(db, "two", allow_email_login=True)
    new_user(db, one, "u1", authorised_senders=["info@shared.example"])
    new_user(db, two, "u2", authorised_senders=["info@shared.example"])
    assert snapshot(db).login("info@shared.example") is None


def test_address_that_is_a_username_logs_in_as_that_user(db: Database) -> None:
    account = new_account(db, "acme", allow_email_login=True)
    owner = new_user(db, account, "news@acme.com")
    new_user(db, account, "wordpress", authorised_senders=["NEWS@acme.com"])
    assert snapshot(db).login("news@acme.com") == owner


def test_address_in_another_account_without_email_login_does_not_count(db: Database) -> None:
    allowing = new_account(db, "allowing", allow_email_login=True)
    other = new_account(db, "other")
    user = new_user(db, allowing, "u1", authorised_senders=["info@shared.example"])
    new_user(db, other, "u2", authorised_senders=["info@shared.example"])
    assert snapshot(db).login("info@shared.example") == user


def test_address_listed_twice_by_one_user_still_logs_in(db: Database) -> None:
    account = new_account(db, "acme", allow_email_login=True)
    user = new_user(db, account, "wordpress", authorised_senders=["Info@acme.com", "info@acme.com"])
    assert snapshot(db).login("info@acme.com") == user


# -- TenantSnapshot: trusted networks, domains ---------------------------------------------


@pytest.fixture
def networks(db: Database) -> dict[str, Account]:
    return {
        "wide": new_account(db, "wide", trusted_networks=["10.0.0.0/8"]),
        "office": new_account(db, "office", trusted_networks=["10.1.0.0/16"]),
        "host": new_account(db, "host", trusted_networks=["10.1.2.3", "2001:db8::/32"]),
        "v6": new_account(db, "v6", trusted_networks=["2001:db8:1::/48"]),
        "none": new_account(db, "none"),
    }


@pytest.mark.parametrize(
    ("ip", "owner"),
    [
        ("10.1.2.3", "host"),
        ("10.1.2.4", "office"),
        ("10.1.255.255", "office"),
        ("10.200.0.1", "wide"),
        ("11.0.0.1", None),
        ("192.168.1.1", None),
        ("2001:db8:1::5", "v6"),
        ("2001:db8:1:ffff::1", "v6"),
        ("2001:db8:2::1", "host"),
        ("2001:db9::1", None),
        ("::1", None),
        ("not an ip", None),
        ("", None),
        ("10.1.2.3.4", None),
        ("unknown", None),
    ],
)
def test_trusted_account_picks_the_most_specific_network(
    db: Database, networks: dict[str, Account], ip: str, owner: str | None
) -> None:
    found = snapshot(db).trusted_account(ip)
    assert (found.name if found else None) == owner


def test_ipv6_catch_all_does_not_trust_ipv4(db: Database) -> None:
    new_account(db, "v6all", trusted_networks=["::/0"])
    v4 = new_account(db, "v4", trusted_networks=["192.0.2.0/24"])
    found = snapshot(db)
    assert found.trusted_account("192.0.2.7") == v4
    assert found.trusted_account("198.51.100.1") is None
    trusted = found.trusted_account("2001:db8::1")
    assert trusted is not None
    assert trusted.name == "v6all"


def test_no_trusted_networks_trusts_nobody(db: Database, account: Account) -> None:
    assert snapshot(db).trusted_account("127.0.0.1") is None
    assert TenantSnapshot().trusted_account("127.0.0.1") is None


def test_bounce_domains_and_sending_domains(db: Database, account: Account) -> None:
    other = new_account(db, "other")
    new_domain(db, account, "acme.com")
    new_domain(db, account, "shop.acme.com", return_path="rp")
    new_domain(db, other, "other.example")
    found = snapshot(db)
    assert found.bounce_domains == {"bounce.acme.com", "rp.shop.acme.com", "bounce.other.example"}
    assert sorted(found.sending_domains(account.id)) == ["acme.com", "shop.acme.com"]
    assert found.sending_domains(other.id) == ("other.example",)
    assert found.sending_domains(999) == ()


def test_snapshot_holds_every_account(db: Database, account: Account) -> None:
    other = new_account(db, "other", smtp_enabled=False)
    found = snapshot(db)
    assert found.accounts == {account.id: account, other.id: other}


# -- TenantDirectory.reload ----------------------------------------------------------------


def test_reload_replaces_the_snapshot_only_when_something_changed(
    db: Database, account: Account
) -> None:
    calls: list[tuple[TenantSnapshot, TenantSnapshot]] = []
    directory = TenantDirectory(db, on_change=lambda old, new: calls.append((old, new)))
    empty = directory.snapshot
    assert directory.snapshot.login("mailer") is None

    assert directory.reload() is True
    first = directory.snapshot
    assert calls == [(empty, first)]
    assert first.accounts == {account.id: account}

    assert directory.reload() is False
    assert directory.snapshot is first
    assert len(calls) == 1

    user = new_user(db, account, "mailer")
    assert directory.reload() is True
    second = directory.snapshot
    assert second is not first
    assert calls[-1] == (first, second)
    assert second.login("mailer") == user
    assert first.login("mailer") is None  # the old snapshot is left as it was

    assert directory.reload() is False
    assert len(calls) == 2


def test_reload_sees_a_password_reset(db: Database, account: Account) -> None:
    user = new_user(db, account, "mailer")
    directory = TenantDirectory(db)
    directory.reload()
    with db.begin() as conn:
        set_password_hash(conn, user.id, HASH + "new")
    assert directory.reload() is True
    found = directory.snapshot.login("mailer")
    assert found is not None
    assert found.password_hash == HASH + "new"


def test_reload_without_on_change(db: Database, account: Account) -> None:
    directory = TenantDirectory(db)
    assert directory.reload() is True
    assert directory.reload() is False


def test_run_refreshes_in_the_background(db: Database, account: Account) -> None:
    directory = TenantDirectory(db, refresh_interval=0.01)
    directory.reload()

    async def scenario() -> None:
        task = asyncio.ensure_future(directory.run())
        try:
            new_user(db, account, "mailer")
            for _ in range(500):
                if directory.snapshot.login("mailer") is not None:
                    return
                await asyncio.sleep(0.01)
            raise AssertionError("the directory never picked up the new user")
        finally:
            task.cancel()

    asyncio.run(scenario())


def test_run_keeps_the_last_snapshot_when_a_refresh_fails(db: Database, account: Account) -> None:
    directory = TenantDirectory(db, refresh_interval=0.01)
    directory.reload()
    kept = directory.snapshot
    attempts = 0

    def broken() -> None:
        nonlocal attempts
        attempts += 1
        raise RuntimeError("database away")

    directory.load = broken  # type: ignore[method-assign]

    async def scenario() -> None:
        task = asyncio.ensure_future(directory.run())
        for _ in range(500):
            if attempts >= 3:
                break
            await asyncio.sleep(0.01)
        assert not task.done()  # still refreshing after failures
        task.cancel()

    asyncio.run(scenario())
    assert attempts >= 3
    assert directory.snapshot is kept


def test_run_installs_changes_on_the_event_loop_thread(db: Database, account: Account) -> None:
    """The change handler forgets cached credentials, which the event loop uses unlocked."""
    threads: list[int] = []
    directory = TenantDirectory(
        db, refresh_interval=0.01, on_change=lambda old, new: threads.append(threading.get_ident())
    )
    directory.reload()
    threads.clear()

    async def scenario() -> int:
        task = asyncio.ensure_future(directory.run())
        try:
            new_user(db, account, "mailer")
            for _ in range(500):
                if threads:
                    break
                await asyncio.sleep(0.01)
            return threading.get_ident()
        finally:
            task.cancel()

    loop_thread = asyncio.run(scenario())
    assert threads == [loop_thread]
    assert directory.snapshot.login("mailer") is not None


def test_run_reports_a_failing_handler_without_blaming_the_refresh(
    db: Database, account: Account, caplog: pytest.LogCaptureFixture
) -> None:
    def handler(old: TenantSnapshot, new: TenantSnapshot) -> None:
        raise RuntimeError("handler broke")

    directory = TenantDirectory(db, refresh_interval=0.01)
    directory.reload()
    directory.on_change = handler

    async def scenario() -> None:
        task = asyncio.ensure_future(directory.run())
        try:
            new_user(db, account, "mailer")
            for _ in range(500):
                if directory.snapshot.login("mailer") is not None:
                    break
                await asyncio.sleep(0.01)
            await asyncio.sleep(0.05)
        finally:
            task.cancel()

    asyncio.run(scenario())
    assert directory.snapshot.login("mailer") is not None
    assert "handling a tenant change failed" in caplog.text
    assert "keeping the previous snapshot" not in caplog.text


def test_refresh_failures_are_logged_at_most_once_a_minute(
    db: Database, account: Account, caplog: pytest.LogCaptureFixture
) -> None:
    """With the database down every refresh (each second) fails: not a line for each."""
    now = [1000.0]
    directory = TenantDirectory(db, refresh_interval=0.001, clock=lambda: now[0])
    directory.reload()
    real_load = directory.load
    attempts = 0

    def database_down_for_a_while() -> tuple[tuple[Any, ...], TenantSnapshot] | None:
        nonlocal attempts
        attempts += 1
        if attempts > 25:  # back after 250 s
            return real_load()
        now[0] += 10.0  # each attempt as if ten seconds after the one before
        raise RuntimeError("database away")

    directory.load = database_down_for_a_while  # type: ignore[method-assign]

    async def scenario() -> None:
        task = asyncio.ensure_future(directory.run())
        try:
            for _ in range(1000):
                if "works again" in caplog.text:
                    break
                await asyncio.sleep(0.01)
        finally:
            task.cancel()

    asyncio.run(scenario())
    warnings = [r.getMessage() for r in caplog.records if r.name == "postlane.tenants"]
    assert warnings[0].startswith("tenant refresh failed, keeping the previous snapshot")
    still = [m for m in warnings if m.startswith("tenant refresh still failing")]
    assert len(still) == 4  # one a minute over 240 s of failures, not one an attempt
    assert "after 240 s (25 attempts)" in still[-1]
    assert len(warnings) == 6
    assert warnings[-1] == (
        "tenant refresh works again after 240 s (25 failed attempts); "
        "the snapshot was up to 250 s stale"
    )
