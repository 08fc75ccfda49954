"""The `postlane suppression` commands, run in-process against both databases."""

from __future__ import annotations

import io
import re
import sys
from pathlib import Path

import pytest

from postlane.store import Database
from postlane.store import accounts as account_store
from postlane.store.suppressions import list_suppressions
from unit.cli_runner import Run, fails, ok


def entries(database_url: str, account: str) -> dict[str, tuple[str, str | None]]:
    """The account's entries as stored: address -> (reason, detail)."""
    db = Database.from_url(database_url)
    try:
        with db.connect() as conn:
            account_id = account_store.get_account(conn, account).id
            found = list_suppressions(conn, account_id, 10_000)
    finally:
        db.dispose()
    return {s.address: (s.reason, s.detail) for s in found}


def test_add_list_remove(run: Run, database_url: str) -> None:
    ok(run("account", "create", "acme"))
    ok(run("account", "create", "globex"))
    out = ok(run("suppression", "add", "acme", "Bob@Example.org", "ann@example.org"))
    assert "bob@example.org: added to the manual list" in out
    assert "ann@example.org: added to the manual list" in out
    out = ok(
        run(
            "suppression", "add", "acme", "cy@example.org", "--reason", "unsubscribe",
            "--detail", "web form 2024-05-01",
        )
    )  # fmt: skip
    assert "cy@example.org: added to the unsubscribe list" in out
    ok(run("suppression", "add", "globex", "zed@example.org", "--reason", "blocklist"))

    # precedence: an optional list never weakens, an always-applied reason replaces
    out = ok(run("suppression", "add", "acme", "bob@example.org", "--reason", "returned"))
    assert "bob@example.org: already on the manual list, kept" in out
    out = ok(run("suppression", "add", "acme", "cy@example.org", "--reason", "complaint"))
    assert "cy@example.org: moved from the unsubscribe list to complaint" in out
    assert entries(database_url, "acme") == {
        "bob@example.org": ("manual", None),
        "ann@example.org": ("manual", None),
        "cy@example.org": ("complaint", None),
    }

    out = ok(run("suppression", "list", "acme"))
    assert "3 entries" in out
    assert "zed@" not in out
    assert re.search(r"cy@example\.org\s+│ complaint\s+│ always", out)
    out = ok(run("suppression", "list", "globex"))
    assert re.search(r"zed@example\.org\s+│ blocklist\s+│ X-ListOption 128", out)
    assert "1 entry" in out
    out = ok(run("suppression", "list", "acme", "--reason", "complaint"))
    assert "cy@example.org" in out and "bob@" not in out
    out = ok(run("suppression", "list", "acme", "--limit", "1"))
    assert "cy@example.org" in out and "1 entry" in out

    out = ok(run("suppression", "remove", "acme", "BOB@example.org", "nobody@example.org"))
    assert "bob@example.org: removed (manual)" in out
    assert "nobody@example.org: not on any list" in out
    assert set(entries(database_url, "acme")) == {"ann@example.org", "cy@example.org"}


def test_bad_input_is_one_line_and_changes_nothing(run: Run, database_url: str) -> None:
    ok(run("account", "create", "acme"))
    fails(run("suppression", "add", "ghost", "a@example.org"), "error: account 'ghost' not found")
    fails(
        run("suppression", "add", "acme", "a@example.org", "--reason", "bounced"),
        "error: reason 'bounced' is invalid: must be one of hard_bounce, complaint, manual,"
        " unsubscribe, blocklist, returned",
    )
    fails(
        run("suppression", "add", "acme", "good@example.org", "a@example.org; b@example.org"),
        "error: invalid address 'a@example.org; b@example.org': one address without spaces",
    )
    fails(
        run("suppression", "add", "acme", "Bob <bob@example.org>"),
        "error: invalid address 'Bob <bob@example.org>'",
    )
    fails(run("suppression", "add", "acme", "bob"), "error: invalid address 'bob'")
    assert entries(database_url, "acme") == {}  # the good address was not added either
    fails(run("suppression", "list", "acme", "--reason", "spam"), "error: reason 'spam' is invalid")
    fails(run("suppression", "list", "acme", "--limit", "many"), "error: limit 'many' is not")
    fails(run("suppression", "list", "ghost"), "error: account 'ghost' not found")
    fails(run("suppression", "remove", "acme", "@example.org"), "error: invalid address")


def test_import_a_file_with_bad_lines(run: Run, database_url: str, tmp_path: Path) -> None:
    ok(run("account", "create", "acme"))
    ok(run("suppression", "add", "acme", "kept@example.org", "--reason", "hard_bounce"))
    listing = tmp_path / "unsubscribed.csv"
    listing.write_bytes(
        b"\xef\xbb\xbfemail,name\r\n"  # a header row is a bad line like any other
        b"ann@example.org,Ann\r\n"
        b'"Bob@Example.org","Bob, Jr."\r\n'
        b"\r\n"
        b"# exported 2024-05-01\r\n"
        b"not-an-address\r\n"
        b"kept@example.org\r\n"
        b"caf\xe9@example.org\r\n"  # Latin-1, not UTF-8
        b"  dora@example.org  \r\n"
        b"ann@example.org\r\n"
        b"a@example.org; b@example.org"  # no newline at the end
    )
    code, out, err = run("suppression", "import", "acme", str(listing), "--reason", "unsubscribe")
    assert code == 0, err
    assert "3 added, 0 moved to unsubscribe, 2 already listed (kept), 4 bad line(s) skipped" in out
    assert err.splitlines() == [
        "unsubscribed.csv line 1: invalid address 'email': must look like local@domain (skipped)",
        "unsubscribed.csv line 6: invalid address 'not-an-address': must look like local@domain"
        " (skipped)",
        "unsubscribed.csv line 8: not UTF-8 text (skipped)",
        "unsubscribed.csv line 11: invalid address 'a@example.org; b@example.org': one address"
        " without spaces, commas, semicolons, parentheses or angle brackets (skipped)",
    ]
    assert entries(database_url, "acme") == {
        "ann@example.org": ("unsubscribe", "imported from unsubscribed.csv"),
        "bob@example.org": ("unsubscribe", "imported from unsubscribed.csv"),
        "dora@example.org": ("unsubscribe", "imported from unsubscribed.csv"),
        "kept@example.org": ("hard_bounce", None),
    }
    # again, as an always-applied list: the optional entries move, nothing is added twice
    code, out, _ = run("suppression", "import", "acme", str(listing), "--reason", "manual")
    assert code == 0
    assert "0 added, 3 moved to manual, 2 already listed (kept), 4 bad line(s) skipped" in out


def test_import_from_stdin(run: Run, database_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    ok(run("account", "create", "acme"))
    text = "".join(f"user{i}@example.org\n" for i in range(2500))
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(text.encode())))
    out = ok(
        run(
            "suppression", "import", "acme", "-", "--reason", "blocklist",
            "--detail", "list from the CRM",
        )
    )  # fmt: skip
    assert "2500 added, 0 moved to blocklist, 0 already listed (kept), 0 bad line(s)" in out
    stored = entries(database_url, "acme")
    assert len(stored) == 2500
    assert stored["user1999@example.org"] == ("blocklist", "list from the CRM")


def test_import_refusals(run: Run, tmp_path: Path) -> None:
    ok(run("account", "create", "acme"))
    listing = tmp_path / "list.txt"
    listing.write_text("a@example.org\n")
    fails(
        run("suppression", "import", "acme", str(tmp_path / "missing.txt"), "--reason", "manual"),
        "error: cannot read",
    )
    fails(
        run("suppression", "import", "acme", str(listing), "--reason", "nope"),
        "error: reason 'nope' is invalid",
    )
    fails(
        run("suppression", "import", "ghost", str(listing), "--reason", "manual"),
        "error: account 'ghost' not found",
    )
    code, _, err = run("suppression", "import", "acme", str(listing))
    assert code != 0 and "--reason" in err


def test_help_has_an_example_for_each_command(run: Run) -> None:
    for command in ("add", "list", "remove", "import"):
        out = ok(run("suppression", command, "--help"))
        assert f"Example: postlane suppression {command} " in out
    out = ok(run("suppression", "--help"))
    assert "65536" in out
