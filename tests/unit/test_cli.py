"""The postlane command, run in-process against both databases."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import sqlalchemy as sa

from postlane import cli, crypto
from postlane.store import Database
from postlane.store.schema import smtp_users
from unit.cli_runner import Run, fails, ok


def _password(out: str) -> str:
    match = re.search(r"^password: (\S+)$", out, re.M)
    assert match, out
    return match.group(1)


def test_accounts(run: Run) -> None:
    assert "account 'acme' created" in ok(run("account", "create", "acme"))
    fails(run("account", "create", "acme"), "error: account 'acme' exists")
    assert "acme" in ok(run("account", "list"))
    out = ok(
        run(
            "account",
            "update",
            "acme",
            "--smtp-disabled",
            "--allow-email-login",
            "--unauthorised-sender",
            "alert",
            "--attachments",
            "zip",
            "--archive-name",
            "files",
            "--archive-password",
            "pw",
            "--timezone",
            "Asia/Taipei",
            "--trusted-networks",
            "10.1.0.0/16,192.0.2.7",
            "--default-options",
            '{"track_opens": true, "tags": ["news"]}',
        )
    )
    for text in ("disabled", "alert", "zip", "files.zip", "Asia/Taipei", "192.0.2.7/32", "news"):
        assert text in out
    fails(run("account", "show", "nobody"), "error: account 'nobody' not found")
    fails(run("account", "update", "acme", "--unauthorised-sender", "warn"), "choose one of")
    fails(run("account", "update", "acme", "--timezone", "Mars/Base"), "invalid time zone")
    fails(run("account", "update", "acme", "--trusted-networks", "10.0.0.0/40"), "invalid network")
    fails(run("account", "update", "acme", "--default-options", "{bad"), "not JSON")
    fails(run("account", "update", "acme", "--default-options", '{"colour": 1}'), "colour")


def test_smtp_users(run: Run, database_url: str) -> None:
    ok(run("account", "create", "acme"))
    out = ok(
        run(
            "smtp-user",
            "create",
            "--account",
            "acme",
            "--priority",
            "2",
            "--authorised-domains",
            "acme.com;mkt.acme.com",
            "--authorised-senders",
            "info@acme.com",
            "app1",
        )
    )
    password = _password(out)
    assert "cannot be shown again" in out
    listing = ok(run("smtp-user", "list"))
    assert "app1" in listing and password not in listing and "acme.com;mkt.acme.com" in listing
    fails(run("smtp-user", "create", "--account", "acme", "APP1"), "SMTP user 'APP1' exists")
    fails(run("smtp-user", "create", "--account", "nope", "x"), "account 'nope' not found")
    fails(run("smtp-user", "create", "--account", "acme", "--priority", "7", "b"), "priority")
    fails(
        run("smtp-user", "create", "--account", "acme", "--authorised-domains", "a..b", "c"),
        "invalid domain",
    )

    new_password = _password(ok(run("smtp-user", "reset-password", "app1")))
    assert new_password != password
    db = Database.from_url(database_url)
    with db.connect() as conn:
        stored = conn.execute(sa.select(smtp_users.c.password_hash)).scalar_one()
    db.dispose()
    assert stored.startswith("$argon2id$")
    assert new_password not in stored
    assert crypto.verify_password(stored, new_password)
    assert not crypto.verify_password(stored, password)

    assert "disabled" in ok(run("smtp-user", "disable", "app1"))
    assert re.search(r"app1 .* no ", ok(run("smtp-user", "list", "--account", "acme")))
    assert "enabled" in ok(run("smtp-user", "enable", "app1"))
    out = ok(run("smtp-user", "update", "app1", "--priority", "1", "--authorised-senders", ""))
    assert "priority=1" in out and "senders=any" in out
    fails(run("smtp-user", "update", "app1", "--priority", "0"), "invalid priority")
    fails(run("smtp-user", "disable", "ghost"), "not found")


def test_domains_and_dns(run: Run) -> None:
    ok(run("account", "create", "acme"))
    out = ok(run("domain", "add", "--account", "acme", "--ed25519", "Acme.COM"))
    assert "domain 'acme.com' added" in out
    assert re.search(r'^pl\d{6}\._domainkey\.acme\.com\. IN TXT "v=DKIM1; k=rsa; p=MII', out, re.M)
    assert re.search(r"^pl\d{6}e\._domainkey\.acme\.com\. IN TXT \"v=DKIM1; k=ed25519", out, re.M)
    assert "bounce.acme.com. IN MX 10 mail.postlane.test." in out
    assert '_dmarc.acme.com. IN TXT "v=DMARC1;' in out
    assert ok(run("domain", "dns", "acme.com")) == out.split("\n", 1)[1]
    assert "bounce.acme.com" in ok(run("domain", "list", "--account", "acme"))
    fails(run("domain", "add", "--account", "acme", "acme.com"), "exists")
    fails(run("domain", "add", "--account", "acme", "not_a domain"), "invalid domain")
    fails(run("domain", "add", "--account", "ghost", "x.com"), "account 'ghost' not found")
    fails(run("domain", "dns", "unknown.com"), "not found")


def test_init_and_config_show(run: Run, tmp_path: Path) -> None:
    out = ok(run("init"))
    assert "wrote postlane.toml" in out and (tmp_path / "postlane.toml").exists()
    fails(run("init"), "exists already")
    assert ok(run("init", "--force"))
    shown = ok(run("config", "show"))
    assert 'hostname = "mail.postlane.test"' in shown and "[[smtp.listeners]]" in shown
    bad = tmp_path / "bad.toml"
    bad.write_text("[smtp]\nmax_recipients = -1\n")
    fails(run("--config", str(bad), "config", "show"), "'smtp.max_recipients' = -1")


def test_config_show_masks_relay_passwords(run: Run, tmp_path: Path) -> None:
    relay = tmp_path / "relay.toml"
    relay.write_text(
        "[delivery.smarthost]\nhost = 'relay.test'\nport = 587\n"
        "username = 'postlane'\npassword = 'hunter2'\n"
    )
    shown = ok(run("--config", str(relay), "config", "show"))
    assert "hunter2" not in shown
    assert 'username = "postlane"\npassword = "***"' in shown
    half = tmp_path / "half.toml"
    half.write_text("[delivery.smarthost]\nhost = 'relay.test'\npassword = 'hunter2'\n")
    fails(
        run("--config", str(half), "config", "show"),
        "setting 'delivery.smarthost.username' is required "
        "when 'delivery.smarthost.password' is set",
    )


def test_db_upgrade_reports_revision(run: Run) -> None:
    assert "database at revision 0004" in ok(run("db", "upgrade"))


def test_every_command_has_help_with_example(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    commands = [
        ["serve"], ["init"], ["db", "upgrade"], ["config", "show"],
        ["account", "create"], ["account", "list"], ["account", "show"], ["account", "update"],
        ["smtp-user", "create"], ["smtp-user", "list"], ["smtp-user", "reset-password"],
        ["smtp-user", "disable"], ["smtp-user", "enable"], ["smtp-user", "update"],
        ["domain", "add"], ["domain", "list"], ["domain", "dns"], ["message", "show"],
    ]  # fmt: skip
    monkeypatch.setenv("COLUMNS", "200")
    for command in commands:
        monkeypatch.setattr(sys, "argv", ["postlane", *command, "--help"])
        with pytest.raises(SystemExit) as info:
            cli.main()
        assert info.value.code in (0, None)
        assert "Example: postlane" in capsys.readouterr().out, command


def test_console_script_errors_are_one_line(tmp_path: Path) -> None:
    env = {
        **os.environ,
        "POSTLANE_DATABASE_URL": f"sqlite:///{tmp_path / 'x.db'}",
        "POSTLANE_DATA_DIR": str(tmp_path),
    }
    result = subprocess.run(
        [sys.executable, "-m", "postlane", "account", "show", "ghost"],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    assert result.returncode == 1
    assert result.stderr == "error: account 'ghost' not found\n"


def test_pg_schema_must_be_current(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    base = os.environ.get("POSTLANE_TEST_DATABASE_URL")
    if not base:
        pytest.skip("needs POSTLANE_TEST_DATABASE_URL")
    import uuid

    import psycopg

    schema = f"t_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(base, autocommit=True) as conn:
        conn.execute(f'CREATE SCHEMA "{schema}"')
    try:
        url = f"{base}{'&' if '?' in base else '?'}options=-csearch_path%3D{schema}"
        env = {**os.environ, "POSTLANE_DATABASE_URL": url, "POSTLANE_DATA_DIR": str(tmp_path)}
        result = subprocess.run(
            [sys.executable, "-m", "postlane", "account", "list"],
            capture_output=True,
            text=True,
            env=env,
            check=False,
        )
        assert result.returncode == 1
        assert "run 'postlane db upgrade'" in result.stderr
        assert "Traceback" not in result.stderr
    finally:
        with psycopg.connect(base, autocommit=True) as conn:
            conn.execute(f'DROP SCHEMA "{schema}" CASCADE')


def test_message_show_lists_options_and_unhandled_bits(run: Run, database_url: str) -> None:
    from datetime import UTC, datetime, timedelta

    from postlane.options import SendOptions, from_headers
    from postlane.store import accounts as account_store
    from postlane.store.intake import NewMessage, NewRecipient, insert_messages

    ok(run("account", "create", "acme"))
    parsed = from_headers([("X-JobOption", "16"), ("X-ListOption", "65")], tz=UTC)
    options = SendOptions().layer(parsed.partial)
    now = datetime.now(UTC)
    db = Database.from_url(database_url)
    with db.begin() as conn:
        account = account_store.get_account(conn, "acme")
        insert_messages(
            conn,
            [
                NewMessage(
                    id="06H0TAD9G7NWMJKB",
                    account_id=account.id,
                    smtp_user_id=None,
                    mail_from="info@acme.com",
                    header_from="info@acme.com",
                    message_id_header="<x@acme.com>",
                    subject="Hello",
                    raw=b"From: info@acme.com\r\n\r\nhi\r\n",
                    options=options.to_json(),
                    client_ip="192.0.2.1",
                    tls=None,
                    received_at=now,
                    dedupe_key=None,
                    recipients=(
                        NewRecipient("a@example.org", "example.org", 2, now, now + timedelta(1)),
                    ),
                )
            ],
        )
    db.dispose()
    out = ok(run("message", "show", "06h0tad9g7nwmjkb"))
    assert "info@acme.com" in out and "a@example.org" in out and "queued" in out
    assert '"keep_to": true' in out and '"remove_duplicates": true' in out
    assert "not acted on by Postlane:" in out and "cJBDynaMergeMask" in out
    assert "accepted" in out
    fails(run("message", "show", "NOPE"), "message 'NOPE' not found")


def test_serve_refuses_an_unknown_role(run: Run) -> None:
    fails(run("serve", "--role", "web"), "unknown role 'web': choose from smtp, delivery")
