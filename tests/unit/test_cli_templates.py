"""postlane template put|list|show|delete, run in-process against both databases."""

from __future__ import annotations

import io
import re
import sys
from pathlib import Path

import pytest

from postlane import cli
from postlane.store import Database
from postlane.store import accounts as account_store
from postlane.store import templates as template_store
from unit.cli_runner import Run, fails, ok


def stdin(monkeypatch: pytest.MonkeyPatch, data: bytes) -> None:
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(data), encoding="utf-8"))


def stored(database_url: str, name: str) -> template_store.Template | None:
    db = Database.from_url(database_url)
    try:
        with db.connect() as conn:
            account = account_store.get_account(conn, "acme")
            return template_store.find_template(conn, account.id, name)
    finally:
        db.dispose()


def test_put_creates_then_replaces(run: Run, database_url: str, tmp_path: Path) -> None:
    ok(run("account", "create", "acme"))
    (tmp_path / "w.html").write_text("<p>Hi {{ name }}</p>\n", encoding="utf-8")
    (tmp_path / "w.txt").write_bytes("\ufeffHi {{ name }}, schön\n".encode())  # with a BOM
    out = ok(
        run(
            "template", "put", "acme", "Welcome", "--html", "w.html", "--text", "w.txt",
            "--subject", "Hi {{ name }}",
        )
    )  # fmt: skip
    assert out == "template 'welcome' created for account 'acme' (subject, html, text)\n"
    template = stored(database_url, "welcome")
    assert template is not None
    assert template.html == "<p>Hi {{ name }}</p>\n"
    assert template.text == "Hi {{ name }}, schön\n"  # the byte order mark is not content
    assert template.subject == "Hi {{ name }}"

    out = ok(run("template", "put", "acme", "welcome", "--text", "w.txt"))
    assert out == "template 'welcome' replaced for account 'acme' (text)\n"
    template = stored(database_url, "welcome")
    assert template is not None and (template.html, template.subject) == (None, None)


def test_put_reads_standard_input(
    run: Run, database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    ok(run("account", "create", "acme"))
    stdin(monkeypatch, "<p>Grüße {{ name }}</p>".encode())
    ok(run("template", "put", "acme", "news/2026-11", "--html", "-"))
    template = stored(database_url, "news/2026-11")
    assert template is not None and template.html == "<p>Grüße {{ name }}</p>"


def test_put_errors(
    run: Run, database_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ok(run("account", "create", "acme"))
    (tmp_path / "bad.html").write_text("<p>\n\n{% endif %}\n", encoding="utf-8")
    (tmp_path / "latin1.txt").write_bytes("Grüße".encode("latin-1"))
    (tmp_path / "ok.txt").write_text("fine", encoding="utf-8")
    fails(run("template", "put", "acme", "w"), "error: give --html FILE, --text FILE or both")
    fails(
        run("template", "put", "acme", "w", "--html", "-", "--text", "-"),
        "error: only one of --html and --text can read standard input",
    )
    fails(
        run("template", "put", "acme", "w", "--html", "missing.html"),
        "error: --html: cannot read missing.html: No such file or directory",
    )
    fails(
        run("template", "put", "acme", "w", "--text", "latin1.txt"),
        "error: --text: latin1.txt is not UTF-8 text (byte 3 is not valid)",
    )
    fails(
        run("template", "put", "acme", "w", "--html", "bad.html"),
        "error: template 'w' (html): line 3: Encountered unknown tag 'endif'",
    )
    fails(
        run("template", "put", "acme", "w", "--text", "ok.txt", "--subject", "{{ x"),
        "error: template 'w' (subject): line 1: ",
    )
    fails(
        run("template", "put", "acme", "two words", "--text", "ok.txt"),
        "error: template name 'two words' is invalid: use 1 to 128 characters",
    )
    fails(
        run("template", "put", "ghost", "w", "--text", "ok.txt"), "error: account 'ghost' not found"
    )
    stdin(monkeypatch, b"")
    fails(
        run("template", "put", "acme", "w", "--text", "-"),
        "error: template 'w': text is empty; leave the part out instead",
    )
    assert stored(database_url, "w") is None  # nothing was stored


def test_list_show_and_delete(run: Run, tmp_path: Path) -> None:
    ok(run("account", "create", "acme"))
    ok(run("account", "create", "other"))
    source = "Hi {{ name }} :smile: [b]not markup[/b]\tend"
    (tmp_path / "t.txt").write_text(source, encoding="utf-8")
    (tmp_path / "h.html").write_text("<p>{{ name }}</p>\n", encoding="utf-8")
    ok(run("template", "put", "acme", "welcome", "--text", "t.txt", "--subject", "Hello"))
    ok(run("template", "put", "acme", "alpha", "--html", "h.html"))
    ok(run("template", "put", "other", "theirs", "--html", "h.html"))

    listing = ok(run("template", "list", "acme"))
    rows = [line for line in listing.splitlines() if "alpha" in line or "welcome" in line]
    assert len(rows) == 2 and "alpha" in rows[0] and "welcome" in rows[1]
    assert re.search(r"welcome .* subject, text .* Hello ", rows[1])
    assert "theirs" not in listing

    shown = ok(run("template", "show", "acme", "WELCOME"))
    header, rest = shown.split("\n", 1)
    assert header.startswith("template 'welcome' of account 'acme', created ")
    assert rest == f"--- subject ---\nHello\n--- text ---\n{source}\n"  # as stored
    assert ok(run("template", "show", "acme", "alpha")).endswith(
        "--- html ---\n<p>{{ name }}</p>\n"
    )
    fails(
        run("template", "show", "acme", "theirs"), "error: account 'acme' has no template 'theirs'"
    )
    fails(run("template", "show", "ghost", "welcome"), "error: account 'ghost' not found")

    assert ok(run("template", "delete", "acme", "Welcome")) == (
        "template 'welcome' deleted from account 'acme'\n"
    )
    fails(run("template", "delete", "acme", "welcome"), "error: account 'acme' has no template")
    fails(run("template", "show", "acme", "welcome"), "has no template 'welcome'")
    assert "alpha" in ok(run("template", "list", "acme"))
    assert "theirs" in ok(run("template", "list", "other"))


def test_every_template_command_has_help_with_example(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("COLUMNS", "200")
    for command in ("put", "list", "show", "delete"):
        monkeypatch.setattr(sys, "argv", ["postlane", "template", command, "--help"])
        with pytest.raises(SystemExit) as info:
            cli.main()
        assert info.value.code in (0, None)
        assert f"Example: postlane template {command} " in capsys.readouterr().out, command
