"""Stored templates: put and replace, lookups, names, compile checks, the body CHECK."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
import sqlalchemy as sa

from postlane.errors import InvalidInput, NotFound
from postlane.store import Account, Database, create_account
from postlane.store._constraints import explained
from postlane.store.schema import accounts, templates
from postlane.store.templates import (
    MAX_NAME_LENGTH,
    MAX_SOURCE_CHARS,
    Template,
    delete_template,
    find_template,
    get_template,
    list_templates,
    put_template,
)

T0 = datetime(2026, 11, 1, 8, 0, tzinfo=UTC)


def test_put_then_get_returns_what_was_stored(db: Database, account: Account) -> None:
    with db.begin() as conn:
        put = put_template(
            conn,
            account.id,
            "Welcome-Email",
            html="<p>Hi {{ name }}</p>",
            text="Hi {{ name }}",
            subject="Welcome, {{ name }}",
            now=T0,
        )
    assert put == Template(
        id=put.id,
        account_id=account.id,
        name="welcome-email",
        subject="Welcome, {{ name }}",
        html="<p>Hi {{ name }}</p>",
        text="Hi {{ name }}",
        created_at=T0,
        updated_at=T0,
    )
    with db.connect() as conn:
        assert get_template(conn, account.id, "welcome-email") == put
        assert get_template(conn, account.id, "WELCOME-email") == put  # names ignore case
        assert find_template(conn, account.id, "welcome-email") == put


def test_put_replaces_by_name_and_bumps_updated_at(db: Database, account: Account) -> None:
    with db.begin() as conn:
        first = put_template(conn, account.id, "news", html="<p>old</p>", subject="Old", now=T0)
    later = T0 + timedelta(hours=2)
    with db.begin() as conn:
        second = put_template(conn, account.id, "NEWS", text="new", now=later)
    assert second.id == first.id
    assert (second.html, second.text, second.subject) == (None, "new", None)
    assert second.created_at == T0 and second.updated_at == later
    with db.connect() as conn:
        assert list_templates(conn, account.id) == [second]


def test_put_without_now_uses_the_clock(db: Database, account: Account) -> None:
    before = datetime.now(UTC)
    with db.begin() as conn:
        stored = put_template(conn, account.id, "clock", text="x")
    assert before - timedelta(seconds=1) <= stored.updated_at <= datetime.now(UTC)
    assert stored.created_at == stored.updated_at


def test_list_is_by_name_and_per_account(db: Database, account: Account) -> None:
    with db.begin() as conn:
        other = create_account(conn, "other")
        for name in ("newsletter/2026-11", "alpha", "b.2"):
            put_template(conn, account.id, name, text=name)
        put_template(conn, other.id, "alpha", html="<b>other</b>")
    with db.connect() as conn:
        assert [t.name for t in list_templates(conn, account.id)] == [
            "alpha",
            "b.2",
            "newsletter/2026-11",
        ]
        assert [t.html for t in list_templates(conn, other.id)] == ["<b>other</b>"]
        assert get_template(conn, account.id, "alpha").text == "alpha"
        assert list_templates(conn, 987654) == []


def test_delete_removes_only_that_template(db: Database, account: Account) -> None:
    with db.begin() as conn:
        other = create_account(conn, "other")
        put_template(conn, account.id, "gone", text="x")
        put_template(conn, account.id, "kept", text="y")
        put_template(conn, other.id, "gone", text="z")
    with db.begin() as conn:
        delete_template(conn, account.id, "GONE")
    with db.connect() as conn:
        assert [t.name for t in list_templates(conn, account.id)] == ["kept"]
        assert get_template(conn, other.id, "gone").text == "z"
    with db.begin() as conn, pytest.raises(NotFound, match="template 'gone' not found"):
        delete_template(conn, account.id, "gone")


def test_missing_templates_are_not_found(db: Database, account: Account) -> None:
    with db.begin() as conn:
        put_template(conn, account.id, "welcome", text="x")
        other = create_account(conn, "other")
    with db.connect() as conn:
        with pytest.raises(
            NotFound, match=rf"^template 'nope' not found for account {account.id}$"
        ):
            get_template(conn, account.id, "nope")
        with pytest.raises(NotFound, match="template 'welcome' not found"):
            get_template(conn, other.id, "welcome")  # another account's is not its own
        assert find_template(conn, account.id, "nope") is None
        assert find_template(conn, account.id, "not a valid name!") is None


def test_unknown_account_is_not_found(db: Database) -> None:
    with db.begin() as conn, pytest.raises(NotFound, match="account 987654 not found"):
        put_template(conn, 987654, "welcome", text="x")


@pytest.mark.parametrize(
    "name",
    ["", " welcome", "welcome ", "-welcome", "/news", "two words", "a:b", "wélcome",
     "\u212aelvin", "x" * (MAX_NAME_LENGTH + 1), "line\nbreak"],
)  # fmt: skip
def test_bad_names_are_refused_saying_what_is_allowed(
    db: Database, account: Account, name: str
) -> None:
    with db.begin() as conn, pytest.raises(InvalidInput) as info:
        put_template(conn, account.id, name, text="x")
    message = str(info.value)
    assert message.startswith(f"template name {name!r} is invalid: use 1 to {MAX_NAME_LENGTH}")
    assert "ASCII letters, digits, '.', '_', '-' and '/'" in message


def test_longest_name_and_every_allowed_character(db: Database, account: Account) -> None:
    longest = "a" * MAX_NAME_LENGTH
    with db.begin() as conn:
        assert put_template(conn, account.id, longest, text="x").name == longest
        assert put_template(conn, account.id, "0_a.b-c/D", text="x").name == "0_a.b-c/d"


def test_name_must_be_text(db: Database, account: Account) -> None:
    with db.begin() as conn, pytest.raises(InvalidInput, match="template name must be text"):
        put_template(conn, account.id, 12, text="x")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("parts", "message"),
    [
        ({"html": "<p>\n\n{% endif %}"}, r"^template 'w' \(html\): line 3: .*tag 'endif'"),
        ({"text": "ok\n{{ name "}, r"^template 'w' \(text\): line 2: "),
        ({"text": "x", "subject": "Hi {{ }}"}, r"^template 'w' \(subject\): line 1: "),
        ({"text": "x", "subject": "two\nlines"}, r"^template 'w': subject must be one line$"),
        ({"html": "  \n"}, r"^template 'w': html is empty; leave the part out instead$"),
        ({"text": b"bytes"}, r"^template 'w': text must be text, got bytes$"),
        ({"text": "x" * (MAX_SOURCE_CHARS + 1)}, rf"text is longer than {MAX_SOURCE_CHARS}"),
    ],
)
def test_bad_sources_are_refused_and_nothing_is_stored(
    db: Database, account: Account, parts: dict[str, object], message: str
) -> None:
    with db.begin() as conn, pytest.raises(InvalidInput, match=message):
        put_template(conn, account.id, "w", **parts)  # type: ignore[arg-type]
    with db.connect() as conn:
        assert list_templates(conn, account.id) == []


def test_a_template_needs_html_or_text(db: Database, account: Account) -> None:
    with db.begin() as conn:
        with pytest.raises(InvalidInput, match="a template needs an HTML or a text part"):
            put_template(conn, account.id, "empty", subject="Only a subject")
        put_template(conn, account.id, "kept", text="x")
        # Replacing with nothing is refused too, and leaves the stored one as it was.
        with pytest.raises(InvalidInput, match="a template needs an HTML or a text part"):
            put_template(conn, account.id, "kept")
        assert get_template(conn, account.id, "kept").text == "x"


def test_the_database_itself_refuses_a_template_without_body(
    db: Database, account: Account
) -> None:
    refused = pytest.raises(InvalidInput, match="needs an HTML or a text part")
    with db.begin() as conn, refused, explained(conn):
        conn.execute(
            sa.insert(templates).values(
                account_id=account.id, name="raw", subject="s", created_at=T0, updated_at=T0
            )
        )


def test_deleting_the_account_deletes_its_templates(db: Database, account: Account) -> None:
    with db.begin() as conn:
        other = create_account(conn, "other")
        put_template(conn, account.id, "welcome", text="x")
        put_template(conn, other.id, "welcome", text="y")
    with db.begin() as conn:
        conn.execute(sa.delete(accounts).where(accounts.c.id == account.id))
    with db.connect() as conn:
        remaining = conn.execute(sa.select(templates.c.account_id)).scalars().all()
    assert remaining == [other.id]
