"""Address lists: reasons, precedence, lookups in any spelling, removal, listing."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given
from hypothesis import strategies as st

from postlane.errors import InvalidInput, NotFound
from postlane.store import Account, Database, create_account
from postlane.store.schema import suppressions
from postlane.store.suppressions import (
    OPTIONAL_LISTS,
    REASONS,
    SUPPRESSION_LIST,
    NewSuppression,
    Suppression,
    add_suppression,
    add_suppressions,
    fold,
    is_address,
    is_suppressed,
    list_suppressions,
    listed,
    remove_suppression,
    replaces,
)

T0 = datetime(2024, 5, 1, 8, 0, tzinfo=UTC)


def test_add_is_idempotent_and_keeps_the_first_reason(db: Database, account: Account) -> None:
    with db.begin() as conn:
        assert add_suppression(
            conn, account.id, "Bob@Example.ORG", "hard_bounce", "550 5.1.1", now=T0
        )
        assert not add_suppression(
            conn, account.id, "bob@example.org", "unsubscribe", now=T0 + timedelta(hours=1)
        )
        assert not add_suppression(conn, account.id, "BOB@EXAMPLE.ORG", "complaint", now=T0)
    with db.connect() as conn:
        (only,) = list_suppressions(conn, account.id)
    assert only == Suppression(
        id=only.id,
        account_id=account.id,
        address="bob@example.org",
        reason="hard_bounce",
        detail="550 5.1.1",
        created_at=T0,
    )


def test_lookups_ignore_case_of_local_part_and_domain(db: Database, account: Account) -> None:
    with db.begin() as conn:
        add_suppression(conn, account.id, "Bob@Example.org", "hard_bounce", now=T0)
        add_suppression(conn, account.id, "ÉLODIE@Exemple.FR", "complaint", now=T0)
        other = create_account(conn, "other")
        add_suppression(conn, other.id, "carol@example.org", "manual", now=T0)
    given = [
        "bob@example.org",
        "BOB@EXAMPLE.ORG",
        "élodie@exemple.fr",
        "carol@example.org",
        "x@y.z",
    ]
    with db.connect() as conn:
        found = is_suppressed(conn, account.id, given)
        assert is_suppressed(conn, account.id, []) == set()
        assert is_suppressed(conn, other.id, given) == {"carol@example.org"}
    assert found == {"bob@example.org", "BOB@EXAMPLE.ORG", "élodie@exemple.fr"}


def test_lookup_of_many_addresses(db: Database, account: Account) -> None:
    with db.begin() as conn:
        for i in range(0, 1200, 100):
            add_suppression(conn, account.id, f"user{i}@example.org", "manual", now=T0)
    with db.connect() as conn:
        found = is_suppressed(conn, account.id, [f"USER{i}@example.org" for i in range(1200)])
        with pytest.raises(InvalidInput, match="not one string"):
            is_suppressed(conn, account.id, "user0@example.org")
    assert found == {f"USER{i}@example.org" for i in range(0, 1200, 100)}


def test_remove_suppression(db: Database, account: Account) -> None:
    with db.begin() as conn:
        add_suppression(conn, account.id, "bob@example.org", "hard_bounce", now=T0)
    with db.begin() as conn:
        assert remove_suppression(conn, account.id, "BOB@example.org")
        assert not remove_suppression(conn, account.id, "bob@example.org")
    with db.connect() as conn:
        assert is_suppressed(conn, account.id, ["bob@example.org"]) == set()
    with db.begin() as conn:  # removed, it can be added again with a new reason
        assert add_suppression(conn, account.id, "bob@example.org", "manual", now=T0)


def test_list_newest_first_with_a_limit(db: Database, account: Account) -> None:
    with db.begin() as conn:
        for i in range(5):
            add_suppression(conn, account.id, f"u{i}@x.org", "manual", now=T0 + timedelta(i))
        other = create_account(conn, "other")
        add_suppression(conn, other.id, "z@x.org", "manual", now=T0)
    with db.connect() as conn:
        assert [s.address for s in list_suppressions(conn, account.id, 3)] == [
            "u4@x.org",
            "u3@x.org",
            "u2@x.org",
        ]
        assert len(list_suppressions(conn, account.id)) == 5
        assert list_suppressions(conn, 999) == []
        with pytest.raises(InvalidInput, match="limit"):
            list_suppressions(conn, account.id, -1)


def test_bad_input_is_refused(db: Database, account: Account) -> None:
    with pytest.raises(NotFound, match="account 999 not found"), db.begin() as conn:
        add_suppression(conn, 999, "bob@example.org", "manual", now=T0)
    for address in ("", "bob", "@example.org", "bob@", " bob@example.org", "bob@ex\r\nample"):
        with pytest.raises(InvalidInput, match="address"), db.begin() as conn:
            add_suppression(conn, account.id, address, "manual", now=T0)
    with pytest.raises(InvalidInput, match="reason"), db.begin() as conn:
        add_suppression(conn, account.id, "bob@example.org", "", now=T0)
    allowed = "hard_bounce, complaint, manual, unsubscribe, blocklist, returned"
    with (
        pytest.raises(InvalidInput, match=f"reason 'bounced' is invalid: must be one of {allowed}"),
        db.begin() as conn,
    ):
        add_suppression(conn, account.id, "bob@example.org", "bounced", now=T0)
    with pytest.raises(InvalidInput, match="aware"), db.begin() as conn:
        add_suppression(conn, account.id, "bob@example.org", "manual", now=datetime(2024, 5, 1))
    with db.connect() as conn:
        assert list_suppressions(conn, account.id) == []


def test_a_failed_add_leaves_the_transaction_usable(db: Database, account: Account) -> None:
    with db.begin() as conn:
        with pytest.raises(NotFound):
            add_suppression(conn, 999, "bob@example.org", "manual", now=T0)
        assert add_suppression(conn, account.id, "bob@example.org", "manual", now=T0)
    with db.connect() as conn:
        assert is_suppressed(conn, account.id, ["bob@example.org"]) == {"bob@example.org"}


# -- reasons and precedence --------------------------------------------------------------------


def test_the_reason_groups() -> None:
    assert SUPPRESSION_LIST == ("hard_bounce", "complaint", "manual")
    assert OPTIONAL_LISTS == {"unsubscribe": 32, "blocklist": 128, "returned": 512}
    assert set(REASONS) == set(SUPPRESSION_LIST) | set(OPTIONAL_LISTS)


@pytest.mark.parametrize(
    ("first", "second", "kept"),
    [
        # an always-applied reason replaces an optional one
        ("unsubscribe", "hard_bounce", "hard_bounce"),
        ("returned", "complaint", "complaint"),
        ("blocklist", "manual", "manual"),
        # an optional reason never replaces an always-applied one
        ("hard_bounce", "unsubscribe", "hard_bounce"),
        ("manual", "returned", "manual"),
        # otherwise the first stays
        ("hard_bounce", "complaint", "hard_bounce"),
        ("complaint", "manual", "complaint"),
        ("unsubscribe", "returned", "unsubscribe"),
        ("returned", "blocklist", "returned"),
        ("manual", "manual", "manual"),
    ],
)
def test_adding_never_weakens_an_address(
    db: Database, account: Account, first: str, second: str, kept: str
) -> None:
    later = T0 + timedelta(hours=1)
    with db.begin() as conn:
        assert add_suppression(conn, account.id, "bob@example.org", first, "first", now=T0)
        written = add_suppression(conn, account.id, "BOB@example.org", second, "second", now=later)
    assert written == (kept != first)
    assert replaces(second, first) == written
    with db.connect() as conn:
        (only,) = list_suppressions(conn, account.id)
    assert only.reason == kept
    assert only.detail == ("first" if kept == first else "second")
    assert only.created_at == (T0 if kept == first else later)


def test_a_stored_unknown_reason_counts_as_the_suppression_list(
    db: Database, account: Account
) -> None:
    """Rows written before reasons were checked must still stop mail, and not be weakened."""
    with db.begin() as conn:
        conn.execute(
            suppressions.insert().values(
                account_id=account.id, address="old@example.org", reason="bounce", created_at=T0
            )
        )
        assert not add_suppression(conn, account.id, "old@example.org", "unsubscribe", now=T0)
        assert is_suppressed(conn, account.id, ["old@example.org"]) == {"old@example.org"}
        assert listed(conn, account.id, ["old@example.org"]) == {"old@example.org": "bounce"}


def test_many_entries_at_once_follow_the_same_precedence(db: Database, account: Account) -> None:
    with db.begin() as conn:
        other = create_account(conn, "other")
        add_suppression(conn, account.id, "held@example.org", "unsubscribe", now=T0)
        add_suppression(conn, account.id, "firm@example.org", "complaint", now=T0)
        written = add_suppressions(
            conn,
            [
                NewSuppression(account.id, "new@example.org", "returned", "550 5.7.1"),
                NewSuppression(account.id, "NEW@example.org", "hard_bounce", "550 5.1.1"),
                NewSuppression(account.id, "new@example.org", "blocklist"),
                NewSuppression(account.id, "held@example.org", "manual"),
                NewSuppression(account.id, "firm@example.org", "returned"),
                NewSuppression(other.id, "new@example.org", "blocklist"),
            ],
            now=T0,
        )
        assert add_suppressions(conn, [], now=T0) == 0
    assert written == 3  # new (once), held (strengthened), other's new; firm stays
    with db.connect() as conn:
        mine = {s.address: (s.reason, s.detail) for s in list_suppressions(conn, account.id)}
        theirs = {s.address: s.reason for s in list_suppressions(conn, other.id)}
    assert mine == {
        "new@example.org": ("hard_bounce", "550 5.1.1"),
        "held@example.org": ("manual", None),
        "firm@example.org": ("complaint", None),
    }
    assert theirs == {"new@example.org": "blocklist"}


def test_a_malformed_entry_writes_nothing(db: Database, account: Account) -> None:
    with pytest.raises(InvalidInput, match="address"), db.begin() as conn:
        add_suppressions(
            conn,
            [
                NewSuppression(account.id, "good@example.org", "manual"),
                NewSuppression(account.id, "not an address", "manual"),
            ],
            now=T0,
        )
    with pytest.raises(InvalidInput, match="not one entry"), db.begin() as conn:
        add_suppressions(conn, NewSuppression(account.id, "a@b.c", "manual"), now=T0)  # type: ignore[arg-type]
    with pytest.raises(NotFound, match="account 998 or 999 not found"), db.begin() as conn:
        add_suppressions(
            conn,
            [NewSuppression(999, "a@b.c", "manual"), NewSuppression(998, "a@b.c", "manual")],
            now=T0,
        )
    with db.connect() as conn:
        assert list_suppressions(conn, account.id) == []


def test_listed_gives_each_address_its_list_and_is_suppressed_only_the_always_ones(
    db: Database, account: Account
) -> None:
    with db.begin() as conn:
        for reason in REASONS:
            add_suppression(conn, account.id, f"{reason}@example.org", reason, now=T0)
    given = [f"{reason.upper()}@Example.org" for reason in REASONS] + ["none@example.org"]
    with db.connect() as conn:
        found = listed(conn, account.id, given)
        always = is_suppressed(conn, account.id, given)
        with pytest.raises(InvalidInput, match="not one string"):
            listed(conn, account.id, "x@example.org")
    assert found == {f"{reason.upper()}@Example.org": reason for reason in REASONS}
    assert always == {f"{reason.upper()}@Example.org" for reason in SUPPRESSION_LIST}


def test_list_one_reason(db: Database, account: Account) -> None:
    with db.begin() as conn:
        add_suppression(conn, account.id, "a@x.org", "unsubscribe", now=T0)
        add_suppression(conn, account.id, "b@x.org", "manual", now=T0)
        add_suppression(conn, account.id, "c@x.org", "unsubscribe", now=T0)
    with db.connect() as conn:
        only = list_suppressions(conn, account.id, reason="unsubscribe")
        assert [s.address for s in only] == ["c@x.org", "a@x.org"]
        assert list_suppressions(conn, account.id, reason="complaint") == []
        with pytest.raises(InvalidInput, match="must be one of"):
            list_suppressions(conn, account.id, reason="spam")


# -- one mailbox, several spellings ------------------------------------------------------------


@pytest.mark.parametrize(
    ("stored", "asked"),
    [
        ("user@bücher.example", "user@xn--bcher-kva.example"),
        ("user@xn--bcher-kva.example", "user@bücher.example"),
        ("user@BÜCHER.Example", "user@XN--BCHER-KVA.EXAMPLE"),
        ("user@example.com.", "user@example.com"),
        ("user@example.com", "user@Example.COM."),
        ("user@bücher.example.", "user@xn--bcher-kva.example"),
        ("user@bücher。example", "user@bücher.example"),  # U+3002, an IDNA label separator
    ],
)
def test_every_spelling_of_a_domain_finds_the_entry(
    db: Database, account: Account, stored: str, asked: str
) -> None:
    with db.begin() as conn:
        assert add_suppression(conn, account.id, stored, "hard_bounce", now=T0)
        assert not add_suppression(conn, account.id, asked, "manual", now=T0)
    with db.connect() as conn:
        assert is_suppressed(conn, account.id, [asked]) == {asked}
        assert listed(conn, account.id, [asked, stored]) == {
            asked: "hard_bounce",
            stored: "hard_bounce",
        }
        (only,) = list_suppressions(conn, account.id)
    assert only.address == fold(asked) == fold(stored)
    with db.begin() as conn:
        assert remove_suppression(conn, account.id, asked)
    with db.connect() as conn:
        assert list_suppressions(conn, account.id) == []


@pytest.mark.parametrize(
    ("address", "folded"),
    [
        ("Bob@Example.ORG", "bob@example.org"),
        ("ÉLODIE@bücher.example", "élodie@xn--bcher-kva.example"),
        ("user@example.com.", "user@example.com"),
        ("user@example.com..", "user@example.com"),
        ("user@Straße.de", "user@strasse.de"),  # IDNA 2003, as the resolver converts it
        ("no-at-sign", "no-at-sign"),
        ('"a@b"@Example.org', '"a@b"@example.org'),
    ],
)
def test_fold(address: str, folded: str) -> None:
    assert fold(address) == folded


@pytest.mark.parametrize(
    "domain",
    [
        "ü" + "a" * 70 + ".example",  # a label too long
        "ü..example",  # an empty label
        "\u05d0ü1.example",  # breaks the bidi rule
        "\ud800.example",  # a lone surrogate
    ],
)
def test_a_domain_idna_cannot_convert_is_only_lower_cased(domain: str) -> None:
    assert fold(f"User@{domain.upper()}.") == f"user@{domain}"


def test_an_unconvertible_domain_is_still_listed_and_found(db: Database, account: Account) -> None:
    address = "user@ü..example"
    with db.begin() as conn:
        assert add_suppression(conn, account.id, address, "manual", now=T0)
    with db.connect() as conn:
        assert is_suppressed(conn, account.id, ["USER@Ü..EXAMPLE."]) == {"USER@Ü..EXAMPLE."}


@given(st.text())
def test_fold_never_raises_and_folding_twice_changes_nothing(text: str) -> None:
    once = fold(text)
    assert fold(once) == once


def test_a_domain_of_dots_only_is_no_address(db: Database, account: Account) -> None:
    assert not is_address("user@.")
    assert not is_address("user@..")
    assert is_address("user@example.com.")
    with pytest.raises(InvalidInput, match="address"), db.begin() as conn:
        add_suppression(conn, account.id, "user@.", "manual", now=T0)
