"""The ``postlane`` command: serve, and everything an operator administers.

Errors are one line on stderr and a non-zero exit, never a traceback: the
person at the terminal needs to know what was wrong with what they typed.
Secrets (generated passwords) are printed exactly once, by the command that
created them.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NoReturn

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from postlane import config, crypto
from postlane.errors import InvalidInput, PostlaneError
from postlane.store import Database, migrate
from postlane.store.accounts import Account
from postlane.store.smtp_users import SmtpUser
from postlane.store.suppressions import OPTIONAL_LISTS, REASONS
from postlane.tenants import admin

if TYPE_CHECKING:
    from sqlalchemy.engine import Connection

    from postlane.store.templates import Template as StoredTemplate

# No emoji codes: a stored ":warning:" in a subject is text, not a picture.
out = Console(highlight=False, soft_wrap=True, emoji=False)
err = Console(stderr=True, highlight=False, soft_wrap=True, emoji=False)


@dataclass
class _State:
    config_file: Path | None = None
    _settings: config.Settings | None = None
    _db: Database | None = None
    _box: crypto.SecretBox | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def settings(self) -> config.Settings:
        if self._settings is None:
            self._settings = config.load_settings(self.config_file)
        return self._settings

    @property
    def db(self) -> Database:
        """The database, with its schema current: SQLite (embedded, one owner) is
        migrated on the spot; a shared PostgreSQL is only migrated by `db upgrade`."""
        if self._db is None:
            db = Database.from_url(self.settings.effective_database_url)
            if db.dialect_name == "sqlite":
                migrate.upgrade(db)
            else:
                migrate.ensure_current(db)
            self._db = db
        return self._db

    @property
    def raw_db(self) -> Database:
        """The database as it is, for `db upgrade` itself."""
        if self._db is None:
            self._db = Database.from_url(self.settings.effective_database_url)
        return self._db

    @property
    def master_key(self) -> bytes:
        s = self.settings
        secret = s.secret_key.get_secret_value() if s.secret_key else None
        return crypto.load_or_create_master_key(secret, s.data_dir)

    @property
    def box(self) -> crypto.SecretBox:
        if self._box is None:
            self._box = crypto.SecretBox(self.master_key)
        return self._box


_state = _State()

app = typer.Typer(
    name="postlane",
    help="Postlane: self-hosted email sending platform.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
db_app = typer.Typer(help="Database schema.", no_args_is_help=True)
config_app = typer.Typer(help="Settings.", no_args_is_help=True)
account_app = typer.Typer(help="Customer accounts.", no_args_is_help=True)
user_app = typer.Typer(help="SMTP users (submission credentials).", no_args_is_help=True)
domain_app = typer.Typer(help="Sending domains and their DNS records.", no_args_is_help=True)
message_app = typer.Typer(help="Accepted messages.", no_args_is_help=True)
app.add_typer(db_app, name="db")
app.add_typer(config_app, name="config")
app.add_typer(account_app, name="account")
app.add_typer(user_app, name="smtp-user")
app.add_typer(domain_app, name="domain")
app.add_typer(message_app, name="message")


@app.callback()
def _main(
    config_file: Annotated[
        Path | None,
        typer.Option(
            "--config", "-c", help="Settings file (default: $POSTLANE_CONFIG or ./postlane.toml)"
        ),
    ] = None,
) -> None:
    global _state
    _state = _State(config_file=config_file)  # a fresh state per invocation


# -- serve, init, db, config ------------------------------------------------------


@app.command()
def serve(
    role: Annotated[
        list[str] | None,
        typer.Option(
            help="Run only this role (repeatable): smtp, delivery, commit. Default: smtp and "
            "delivery, delivery in a child process unless delivery.own_process is false; "
            "intake starts the commit process itself unless smtp.commit_process is false",
        ),
    ] = None,
    metrics: Annotated[
        bool,
        typer.Option(
            "--metrics/--no-metrics",
            help="Serve /metrics on the HTTP port. --no-metrics is how serve starts its own "
            "helper processes: they start none of their own",
        ),
    ] = True,
) -> None:
    """Run Postlane until SIGINT or SIGTERM.

    Example: postlane serve --role smtp --role delivery
    """
    from postlane import runtime
    from postlane.child_role import ChildRole

    roles = runtime.parse_roles(role)
    settings = _state.settings
    first: list[runtime.Role] = []
    children: list[runtime.Role] = []
    base = [sys.executable, "-m", "postlane"]
    if _state.config_file is not None:
        base += ["--config", str(_state.config_file.resolve())]
    if metrics and "smtp" in roles:  # the first process: more intake processes if asked
        if settings.smtp.commit_process:  # and the process that commits for all of them
            commit = [*base, "serve", "--role", "commit", "--no-metrics"]
            first.append(ChildRole("commit", commit))
        for number in range(2, settings.smtp.processes + 1):
            command = [*base, "serve", "--role", "smtp", "--no-metrics"]
            children.append(ChildRole(f"smtp {number}", command))
    if not role and settings.delivery.own_process:
        delivery = [*base, "serve", "--role", "delivery", "--no-metrics"]
        children.append(ChildRole("delivery", delivery))
        roles = tuple(r for r in roles if r != "delivery")
    try:
        runtime.run(
            settings,
            _state.db,
            _state.master_key,
            roles,
            metrics=metrics,
            first=first,
            children=children,
        )
    except OSError as exc:
        _fail(_os_problem(exc))


@app.command()
def init(
    force: Annotated[bool, typer.Option(help="Overwrite an existing settings file")] = False,
) -> None:
    """Write a commented postlane.toml and create the database.

    Example: postlane init && postlane serve
    """
    target = _state.config_file or Path(config.DEFAULT_CONFIG_FILE)
    if target.exists() and not force:
        _fail(f"{target} exists already (use --force to overwrite)")
    try:
        target.write_text(config.example_toml())
    except OSError as exc:
        _fail(f"cannot write {target}: {_os_reason(exc)}")
    out.print(f"wrote {target}", markup=False)
    _state.config_file = target
    _state.box  # noqa: B018 - creates data_dir/secret.key when no secret_key is set
    migrate.upgrade(_state.raw_db)
    out.print(f"database ready: {_state.raw_db.url}", markup=False)


@db_app.command("upgrade")
def db_upgrade() -> None:
    """Apply every pending schema migration.

    Example: postlane db upgrade   (with POSTLANE_DATABASE_URL=postgresql://... for PostgreSQL)
    """
    db = _state.raw_db
    migrate.upgrade(db)
    out.print(f"database at revision {migrate.current_revision(db)}", markup=False)


@config_app.command("show")
def config_show() -> None:
    """Print the effective settings (file, environment and defaults), secrets masked.

    Example: postlane --config /etc/postlane/postlane.toml config show
    """
    out.print(config.to_toml(config.effective_settings(_state.settings)), markup=False)


# -- accounts -------------------------------------------------------------------


@account_app.command("create")
def account_create(name: Annotated[str, typer.Argument(help="Account name")]) -> None:
    """Create a customer account.

    Example: postlane account create acme
    """
    account = admin.create_account(_state.db, name)
    out.print(f"account {account.name!r} created (id {account.id})", markup=False)


@account_app.command("list")
def account_list() -> None:
    """List accounts.

    Example: postlane account list
    """
    table = Table("id", "name", "smtp", "sender policy", "attachments", "created")
    for a in admin.list_accounts(_state.db):
        _add_row(
            table,
            str(a.id),
            a.name,
            "enabled" if a.smtp_enabled else "disabled",
            a.unauthorised_sender_policy,
            a.attachment_policy,
            f"{a.created_at:%Y-%m-%d %H:%M}",
        )
    out.print(table)


@account_app.command("show")
def account_show(name: Annotated[str, typer.Argument(help="Account name")]) -> None:
    """Show an account's settings.

    Example: postlane account show acme
    """
    _print_account(admin.get_account(_state.db, name))


def _print_account(a: Account) -> None:
    table = Table("setting", "value", show_header=False)
    rows = {
        "id": str(a.id),
        "name": a.name,
        "smtp": "enabled" if a.smtp_enabled else "disabled",
        "login with email address": _yes(a.allow_email_login),
        "unauthorised sender": a.unauthorised_sender_policy,
        "attachments": a.attachment_policy,
        "archive name": a.attachment_archive_name,
        "archive password": "set" if a.attachment_password_enc else "none",
        "track opens": _yes(a.track_opens),
        "track clicks": _yes(a.track_clicks),
        "time zone": a.timezone,
        "trusted networks": ", ".join(a.trusted_networks) or "none",
        "default options": _json(a.default_options),
    }
    for key, value in rows.items():
        _add_row(table, key, value)
    out.print(table)


@account_app.command("update")
def account_update(
    name: Annotated[str, typer.Argument(help="Account name")],
    smtp: Annotated[
        bool | None, typer.Option("--smtp-enabled/--smtp-disabled", help="SMTP sending switch")
    ] = None,
    email_login: Annotated[
        bool | None,
        typer.Option("--allow-email-login/--no-email-login", help="Accept the address as login"),
    ] = None,
    unauthorised_sender: Annotated[
        str | None, typer.Option(help="What an unauthorised sender gets: alert or block")
    ] = None,
    attachments: Annotated[
        str | None, typer.Option(help="Attachment policy: off, zip or unzip")
    ] = None,
    archive_name: Annotated[
        str | None, typer.Option(help="File name of the zip archive (policy zip)")
    ] = None,
    archive_password: Annotated[
        str | None, typer.Option(help="Password of the zip archive; '' for none")
    ] = None,
    track_opens: Annotated[bool | None, typer.Option("--track-opens/--no-track-opens")] = None,
    track_clicks: Annotated[bool | None, typer.Option("--track-clicks/--no-track-clicks")] = None,
    timezone: Annotated[
        str | None, typer.Option(help="IANA zone for zone-less times, e.g. Asia/Taipei")
    ] = None,
    trusted_networks: Annotated[
        str | None,
        typer.Option(help="IPs/CIDRs that send as this account without AUTH; '' for none"),
    ] = None,
    default_options: Annotated[
        str | None, typer.Option(help='Default send options as JSON, e.g. {"track_opens": true}')
    ] = None,
) -> None:
    """Change an account's settings.

    Example: postlane account update acme --unauthorised-sender block --trusted-networks 10.1.0.0/16
    """
    changes = admin.AccountChanges(
        smtp_enabled=smtp,
        allow_email_login=email_login,
        unauthorised_sender_policy=unauthorised_sender,
        attachment_policy=attachments,
        attachment_archive_name=archive_name,
        attachment_password=archive_password,
        track_opens=track_opens,
        track_clicks=track_clicks,
        timezone=timezone,
        trusted_networks=trusted_networks,
        default_options=default_options,
    )
    _print_account(admin.update_account(_state.db, _state.box, name, changes))


# -- SMTP users ---------------------------------------------------------------------

_PriorityOpt = Annotated[str | None, typer.Option(help="1 (highest) to 5 (lowest); 3 is normal")]
_DomainsOpt = Annotated[
    str | None, typer.Option(help="Authorised sender domains, ';'-separated; empty: any")
]
_SendersOpt = Annotated[
    str | None, typer.Option(help="Authorised sender addresses, ';'-separated; empty: any")
]
_OptionsOpt = Annotated[str | None, typer.Option(help="Default send options as a JSON object")]


@user_app.command("create")
def user_create(
    username: Annotated[str, typer.Argument(help="Login name (may be an email address)")],
    account: Annotated[str, typer.Option(help="Account the user sends for")],
    priority: _PriorityOpt = None,
    note: Annotated[str, typer.Option(help="Note for internal use")] = "",
    authorised_domains: _DomainsOpt = None,
    authorised_senders: _SendersOpt = None,
    default_options: _OptionsOpt = None,
    inactive: Annotated[bool, typer.Option(help="Create the user disabled")] = False,
) -> None:
    """Create an SMTP user and print its password (shown this once only).

    Example: postlane smtp-user create --account acme --authorised-domains acme.com app1
    """
    creds = admin.create_smtp_user(
        _state.db,
        account,
        username,
        priority=priority or 3,
        note=note,
        authorised_domains=authorised_domains or "",
        authorised_senders=authorised_senders or "",
        default_options=default_options,
        active=not inactive,
    )
    _print_credentials(creds, "created")


@user_app.command("list")
def user_list(
    account: Annotated[str | None, typer.Option(help="Only this account's users")] = None,
) -> None:
    """List SMTP users (never their passwords).

    Example: postlane smtp-user list --account acme
    """
    table = Table("username", "account", "active", "priority", "domains", "senders", "note")
    names = {a.id: a.name for a in admin.list_accounts(_state.db)}
    for u in admin.list_smtp_users(_state.db, account):
        _add_row(
            table,
            u.username,
            names.get(u.account_id, str(u.account_id)),
            _yes(u.active),
            str(u.priority),
            ";".join(u.authorised_domains) or "any",
            ";".join(u.authorised_senders) or "any",
            u.note,
        )
    out.print(table)


@user_app.command("reset-password")
def user_reset_password(username: Annotated[str, typer.Argument(help="Login name")]) -> None:
    """Replace a user's password with a new generated one, printed this once only.

    Example: postlane smtp-user reset-password app1
    """
    _print_credentials(admin.reset_password(_state.db, username), "password reset")


@user_app.command("disable")
def user_disable(username: Annotated[str, typer.Argument(help="Login name")]) -> None:
    """Stop a user from authenticating.

    Example: postlane smtp-user disable app1
    """
    user = admin.update_smtp_user(_state.db, username, admin.SmtpUserChanges(active=False))
    out.print(f"SMTP user {user.username!r} disabled", markup=False)


@user_app.command("enable")
def user_enable(username: Annotated[str, typer.Argument(help="Login name")]) -> None:
    """Allow a disabled user to authenticate again.

    Example: postlane smtp-user enable app1
    """
    user = admin.update_smtp_user(_state.db, username, admin.SmtpUserChanges(active=True))
    out.print(f"SMTP user {user.username!r} enabled", markup=False)


@user_app.command("update")
def user_update(
    username: Annotated[str, typer.Argument(help="Login name")],
    priority: _PriorityOpt = None,
    note: Annotated[str | None, typer.Option(help="Note for internal use")] = None,
    authorised_domains: _DomainsOpt = None,
    authorised_senders: _SendersOpt = None,
    default_options: _OptionsOpt = None,
) -> None:
    """Change an SMTP user's settings.

    Example: postlane smtp-user update app1 --priority 1 --authorised-senders "info@acme.com"
    """
    changes = admin.SmtpUserChanges(
        priority=priority,
        note=note,
        authorised_domains=authorised_domains,
        authorised_senders=authorised_senders,
        default_options=default_options,
    )
    u = admin.update_smtp_user(_state.db, username, changes)
    out.print(
        f"SMTP user {u.username!r}: active={_yes(u.active)} priority={u.priority} "
        f"domains={';'.join(u.authorised_domains) or 'any'} "
        f"senders={';'.join(u.authorised_senders) or 'any'}",
        markup=False,
    )


def _print_credentials(creds: admin.NewCredentials, what: str) -> None:
    user: SmtpUser = creds.user
    out.print(f"SMTP user {user.username!r} {what}.", markup=False)
    out.print(f"password: {creds.password}", markup=False)
    out.print("Store it now: it is not stored and cannot be shown again.")


# -- domains ---------------------------------------------------------------------------


@domain_app.command("add")
def domain_add(
    domain: Annotated[str, typer.Argument(help="Domain name, e.g. acme.com")],
    account: Annotated[str, typer.Option(help="Account that sends from it")],
    selector: Annotated[str | None, typer.Option(help="DKIM selector (default: plYYYYMM)")] = None,
    ed25519: Annotated[bool, typer.Option(help="Also sign with an Ed25519 key")] = False,
    return_path: Annotated[
        str, typer.Option(help="Subdomain for the return path (bounces)")
    ] = "bounce",
) -> None:
    """Add a sending domain with a new DKIM key and print the DNS records to publish.

    Example: postlane domain add --account acme acme.com
    """
    row = admin.add_domain(
        _state.db,
        _state.box,
        account,
        domain,
        selector=selector,
        ed25519=ed25519,
        return_path_subdomain=return_path,
    )
    out.print(f"domain {row.name!r} added; publish these DNS records:", markup=False)
    _print_records(row.name)


@domain_app.command("list")
def domain_list(
    account: Annotated[str | None, typer.Option(help="Only this account's domains")] = None,
) -> None:
    """List sending domains.

    Example: postlane domain list --account acme
    """
    table = Table("domain", "account", "selector", "return path", "spf", "dkim", "dmarc")
    names = {a.id: a.name for a in admin.list_accounts(_state.db)}
    for d in admin.list_domains(_state.db, account):
        _add_row(
            table,
            d.name,
            names.get(d.account_id, str(d.account_id)),
            d.dkim_selector + (f", {d.ed25519_selector}" if d.ed25519_selector else ""),
            f"{d.return_path_subdomain}.{d.name}",
            _yes(d.spf_verified),
            _yes(d.dkim_verified),
            _yes(d.dmarc_verified),
        )
    out.print(table)


@domain_app.command("dns")
def domain_dns(domain: Annotated[str, typer.Argument(help="Domain name")]) -> None:
    """Print the SPF, DKIM, DMARC and return-path records to publish for a domain.

    Example: postlane domain dns acme.com
    """
    _print_records(domain)


def _print_records(domain: str) -> None:
    for record in admin.domain_records(_state.db, domain, _state.settings.hostname):
        out.print(f"; {record.purpose}", markup=False)
        out.print(record.zone_line(), markup=False)


# -- messages ----------------------------------------------------------------------------


@message_app.command("show")
def message_show(
    message_id: Annotated[str, typer.Argument(help="Queue id (the id in '250 ... queued as')")],
) -> None:
    """Show a message: envelope, options (including those Postlane does not act on),
    recipients and the timeline of its events.

    Example: postlane message show 06H0T9T0KVCEJH8W
    """
    from postlane.options import SendOptions
    from postlane.store import messages as message_store

    with _state.db.connect() as conn:
        m = message_store.get_message(conn, message_id.strip().upper())
        rcpts = message_store.recipients_of(conn, m.id)
        timeline = message_store.events_of(conn, m.id)
    table = Table("field", "value", show_header=False)
    for key, value in (
        ("queue id", m.id),
        ("received", f"{m.received_at:%Y-%m-%d %H:%M:%S} UTC"),
        ("envelope from", m.mail_from or "<>"),
        ("header from", m.header_from),
        ("subject", m.subject or ""),
        ("message-id", m.message_id_header or ""),
        ("size", f"{m.size} bytes"),
        ("client", f"{m.client_ip or '-'} ({m.tls or 'no TLS'})"),
    ):
        _add_row(table, key, value)
    out.print(table)
    options = SendOptions.from_json(m.options) if m.options else SendOptions()
    asked = {
        k: v
        for k, v in options.to_json().items()
        if v != SendOptions().to_json().get(k) and k not in ("unhandled", "raw_masks")
    }
    out.print("options: " + (_json(asked) if asked else "defaults"), markup=False)
    if options.raw_masks:
        out.print("option masks as given: " + _json(dict(options.raw_masks)), markup=False)
    if options.unhandled:
        out.print("not acted on by Postlane:", markup=False)
        for entry in options.unhandled:
            out.print(f"  - {entry}", markup=False)
    rtable = Table("recipient", "status", "priority", "next attempt", "expires", "attempts")
    for r in rcpts:
        _add_row(
            rtable,
            r.address,
            r.status,
            str(r.priority),
            f"{r.next_attempt_at:%Y-%m-%d %H:%M:%S}",
            f"{r.expires_at:%Y-%m-%d %H:%M:%S}",
            str(r.attempts),
        )
    out.print(rtable)
    etable = Table("time (UTC)", "event", "details")
    for e in timeline:
        _add_row(etable, f"{e.created_at:%Y-%m-%d %H:%M:%S}", e.type, _json(e.data))
    out.print(etable)


@message_app.command("archive")
def message_archive(
    message_id: Annotated[str, typer.Argument(help="Queue id (the id in '250 ... queued as')")],
    recipient: Annotated[
        str | None,
        typer.Option("--recipient", help="Write this recipient's copy (raw bytes) to stdout"),
    ] = None,
    output: Annotated[
        Path | None, typer.Option("--output", help="With --recipient: write the copy to FILE")
    ] = None,
) -> None:
    """List the copies kept of a message sent with X-JobOption 128 (archive), or write one.

    Each is the copy as it left for that recipient: rendered and DKIM-signed.

    Example: postlane message archive 06H0T9T0KVCEJH8W --recipient bob@example.org > bob.eml
    """
    from postlane.store import archive as archive_store

    queue_id = message_id.strip().upper()
    if output is not None and recipient is None:
        _fail("--output needs --recipient: which recipient's copy to write")
    with _state.db.connect() as conn:
        copies = archive_store.archived_copies_of(conn, queue_id, address=recipient)
    if recipient is not None:
        if not copies:
            _fail(f"no archived copy of message {queue_id} for {recipient}")
        data = copies[0].data
        if output is not None:
            try:
                output.write_bytes(data)
            except OSError as exc:
                _fail(f"cannot write {output}: {exc.strerror or exc}")
            out.print(f"{len(data)} bytes written to {output}", markup=False)
        else:
            sys.stdout.buffer.write(data)
            sys.stdout.flush()
        return
    if not copies:
        _fail(f"no archived copies of message {queue_id} (sent without X-JobOption 128?)")
    table = Table("recipient id", "recipient", "bytes", "archived (UTC)")
    for copy in copies:
        _add_row(
            table,
            str(copy.recipient_id),
            copy.address,
            str(len(copy.data)),
            f"{copy.created_at:%Y-%m-%d %H:%M:%S}",
        )
    out.print(table)


# -- queue ---------------------------------------------------------------------------------

queue_app = typer.Typer(
    help="The delivery queue: one row per recipient, by recipient id.", no_args_is_help=True
)
app.add_typer(queue_app, name="queue")

_QueueIds = Annotated[
    list[str] | None, typer.Argument(help="Recipient ids (the 'id' column of 'queue list')")
]
_QueueAccount = Annotated[str | None, typer.Option("--account", help="Only this account's rows")]
_QueueDomain = Annotated[
    str | None, typer.Option("--domain", help="Only rows for this recipient domain")
]
_QueueAll = Annotated[
    bool, typer.Option("--all", help="Every row the action applies to, when no filter is named")
]


@queue_app.command("list")
def queue_list(
    account: _QueueAccount = None,
    domain: _QueueDomain = None,
    status: Annotated[
        str | None, typer.Option("--status", help="queued, deferred, sending, held, ...")
    ] = None,
    limit: Annotated[str, typer.Option("--limit", help="At most this many rows")] = "100",
) -> None:
    """List queue rows, newest first.

    Example: postlane queue list --account acme --status deferred
    """
    from postlane.store import accounts as account_store
    from postlane.store import queue as queue_store

    with _state.db.connect() as conn:
        account_id = None if account is None else account_store.get_account(conn, account).id
        rows = queue_store.list_queue(
            conn,
            account_id=account_id,
            domain=domain,
            status=status,
            limit=_number("limit", limit),
        )
        names = {a.id: a.name for a in account_store.list_accounts(conn)}
    table = Table(
        "id", "queue id", "account", "recipient", "status", "prio", "tries", "next attempt",
        "from", "subject", "last reply",
    )  # fmt: skip
    for r in rows:
        _add_row(
            table,
            str(r.id),
            r.message_id,
            names.get(r.account_id, str(r.account_id)),
            r.address,
            r.status,
            str(r.priority),
            str(r.attempts),
            f"{r.next_attempt_at:%Y-%m-%d %H:%M:%S}",
            r.mail_from or "<>",
            r.subject or "",
            r.last_reply or "",
        )
    out.print(table)


@queue_app.command("show")
def queue_show(recipient_id: Annotated[str, typer.Argument(help="Recipient id")]) -> None:
    """Show one queue row and the events of its message that concern it.

    Example: postlane queue show 12
    """
    from postlane.store import messages as message_store
    from postlane.store import queue as queue_store

    with _state.db.connect() as conn:
        r = queue_store.get_recipient(conn, _number("recipient id", recipient_id))
        timeline = [
            e for e in message_store.events_of(conn, r.message_id) if e.recipient_id in (None, r.id)
        ]
    table = Table("field", "value", show_header=False)
    lease = "none"
    if r.lease_owner is not None and r.lease_expires_at is not None:
        lease = f"{r.lease_owner} until {r.lease_expires_at:%Y-%m-%d %H:%M:%S} UTC"
    for key, value in (
        ("id", str(r.id)),
        ("queue id", r.message_id),
        ("recipient", r.address),
        ("status", r.status),
        ("priority", str(r.priority)),
        ("attempts", str(r.attempts)),
        ("next attempt", f"{r.next_attempt_at:%Y-%m-%d %H:%M:%S} UTC"),
        ("expires", f"{r.expires_at:%Y-%m-%d %H:%M:%S} UTC"),
        ("lease", lease),
        ("last reply", r.last_reply or ""),
        ("envelope from", r.mail_from or "<>"),
        ("subject", r.subject or ""),
    ):
        _add_row(table, key, value)
    out.print(table)
    etable = Table("time (UTC)", "event", "details")
    for e in timeline:
        _add_row(etable, f"{e.created_at:%Y-%m-%d %H:%M:%S}", e.type, _json(e.data))
    out.print(etable)


@queue_app.command("retry")
def queue_retry(
    ids: _QueueIds = None,
    account: _QueueAccount = None,
    domain: _QueueDomain = None,
    all_: _QueueAll = False,
) -> None:
    """Make queued and deferred rows due now (held rows stay held).

    Example: postlane queue retry --domain example.org
    """
    _queue_action("retry", "due now", ids, account, domain, all_)


@queue_app.command("hold")
def queue_hold(
    ids: _QueueIds = None,
    account: _QueueAccount = None,
    domain: _QueueDomain = None,
    all_: _QueueAll = False,
) -> None:
    """Keep queued and deferred rows from being sent until released.

    Example: postlane queue hold 12 13
    """
    _queue_action("hold", "held", ids, account, domain, all_)


@queue_app.command("release")
def queue_release(
    ids: _QueueIds = None,
    account: _QueueAccount = None,
    domain: _QueueDomain = None,
    all_: _QueueAll = False,
) -> None:
    """Put held rows back in the queue, due when they were due before the hold.

    Example: postlane queue release --account acme
    """
    _queue_action("release", "released", ids, account, domain, all_)


@queue_app.command("cancel")
def queue_cancel(
    ids: _QueueIds = None,
    account: _QueueAccount = None,
    domain: _QueueDomain = None,
    all_: _QueueAll = False,
) -> None:
    """Never send these queued, deferred or held rows.

    Example: postlane queue cancel --account acme --domain example.org
    """
    _queue_action("cancel", "cancelled", ids, account, domain, all_)


def _queue_action(
    action: str,
    done: str,
    ids: list[str] | None,
    account: str | None,
    domain: str | None,
    all_: bool,
) -> None:
    from postlane.store import accounts as account_store
    from postlane.store import queue as queue_store
    from postlane.store.schema import utc_now

    act = {
        "retry": queue_store.retry,
        "hold": queue_store.hold,
        "release": queue_store.release,
        "cancel": queue_store.cancel,
    }[action]
    numbers = [_number("recipient id", i) for i in ids] if ids else None
    with _state.db.begin() as conn:
        account_id = None if account is None else account_store.get_account(conn, account).id
        changed = act(
            conn, now=utc_now(), ids=numbers, account_id=account_id, domain=domain, all_=all_
        )
    out.print(f"{changed} recipient(s) {done}")


def _number(what: str, text: str) -> int:
    if not (text.isascii() and text.isdigit()) or int(text) > 2**63 - 1:
        raise InvalidInput(f"{what} {text!r} is not a number")
    return int(text)


# -- templates -----------------------------------------------------------------------------

template_app = typer.Typer(
    help="Stored templates, which messages name in X-OV-Template or X-Mailgun-Template-Name.",
    no_args_is_help=True,
)
app.add_typer(template_app, name="template")

_TemplateAccount = Annotated[str, typer.Argument(help="Account name")]
_TemplateName = Annotated[
    str, typer.Argument(help="Template name as messages give it, e.g. welcome-email")
]
_TEMPLATE_PARTS = ("subject", "html", "text")


@template_app.command("put")
def template_put(
    account: _TemplateAccount,
    name: _TemplateName,
    html: Annotated[
        str | None,
        typer.Option(metavar="FILE", help="Jinja2 source of the HTML part; '-' reads stdin"),
    ] = None,
    text: Annotated[
        str | None,
        typer.Option(metavar="FILE", help="Jinja2 source of the text part; '-' reads stdin"),
    ] = None,
    subject: Annotated[
        str | None, typer.Option(help="Jinja2 source of the Subject (default: the message's)")
    ] = None,
) -> None:
    """Store a template, replacing one of the same name. Its Jinja2 sources are
    checked now: a syntax error is refused with its line.

    Example: postlane template put acme welcome --html welcome.html --subject "Hi {{ name }}"
    """
    from postlane.store import templates as template_store

    if html is None and text is None:
        _fail("give --html FILE, --text FILE or both")
    if html == "-" and text == "-":
        _fail("only one of --html and --text can read standard input")
    html_source = None if html is None else _read_source("--html", html)
    text_source = None if text is None else _read_source("--text", text)
    with _state.db.begin() as conn:
        account_id = _account_id(conn, account)
        stored = template_store.put_template(
            conn, account_id, name, html=html_source, text=text_source, subject=subject
        )
    done = "created" if stored.created_at == stored.updated_at else "replaced"
    out.print(
        f"template {stored.name!r} {done} for account {account!r} ({_parts(stored)})",
        markup=False,
    )


@template_app.command("list")
def template_list(account: _TemplateAccount) -> None:
    """List an account's templates.

    Example: postlane template list acme
    """
    from postlane.store import templates as template_store

    with _state.db.connect() as conn:
        found = template_store.list_templates(conn, _account_id(conn, account))
    table = Table("name", "parts", "subject", "updated")
    for t in found:
        _add_row(table, t.name, _parts(t), t.subject or "", f"{t.updated_at:%Y-%m-%d %H:%M}")
    out.print(table)


@template_app.command("show")
def template_show(account: _TemplateAccount, name: _TemplateName) -> None:
    """Print a template's sources as stored.

    Example: postlane template show acme welcome
    """
    from postlane.store import templates as template_store

    with _state.db.connect() as conn:
        account_id = _account_id(conn, account)
        found = template_store.find_template(conn, account_id, name)
    if found is None:
        _fail(f"account {account!r} has no template {name!r}")
    out.print(
        f"template {found.name!r} of account {account!r}, "
        f"created {found.created_at:%Y-%m-%d %H:%M:%S} UTC, "
        f"updated {found.updated_at:%Y-%m-%d %H:%M:%S} UTC",
        markup=False,
    )
    for part in _TEMPLATE_PARTS:
        source = getattr(found, part)
        if source is not None:
            # Written as stored, byte for byte: no markup, emoji codes or tab expansion.
            sys.stdout.write(f"--- {part} ---\n{source}")
            sys.stdout.write("" if source.endswith("\n") else "\n")
    sys.stdout.flush()


@template_app.command("delete")
def template_delete(account: _TemplateAccount, name: _TemplateName) -> None:
    """Delete a template. Queued messages that name it fail when they are sent.

    Example: postlane template delete acme welcome
    """
    from postlane.errors import NotFound
    from postlane.store import templates as template_store

    with _state.db.begin() as conn:
        account_id = _account_id(conn, account)
        try:
            template_store.delete_template(conn, account_id, name)
        except NotFound:
            _fail(f"account {account!r} has no template {name!r}")
    out.print(f"template {name.lower()!r} deleted from account {account!r}", markup=False)


def _account_id(conn: Connection, account: str) -> int:
    from postlane.store import accounts as account_store

    return account_store.get_account(conn, account).id


def _read_source(option: str, path: str) -> str:
    """A template source from a file or stdin ('-'), which must be UTF-8 text."""
    where = "standard input" if path == "-" else path
    try:
        data = sys.stdin.buffer.read() if path == "-" else Path(path).read_bytes()
    except OSError as exc:
        raise InvalidInput(f"{option}: cannot read {where}: {exc.strerror}") from None
    try:
        # utf-8-sig: editors on Windows start UTF-8 files with a byte order mark.
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise InvalidInput(
            f"{option}: {where} is not UTF-8 text (byte {exc.start + 1} is not valid)"
        ) from None


def _parts(template: StoredTemplate) -> str:
    return ", ".join(part for part in _TEMPLATE_PARTS if getattr(template, part) is not None)


# -- suppression and filter lists ----------------------------------------------------------

suppression_app = typer.Typer(
    help=(
        "An account's address lists. The suppression list (hard_bounce, complaint, manual)"
        " keeps every message from an address unless X-ListOption 65536 bypasses it; the"
        " unsubscribe (32), blocklist (128) and returned (512) lists apply only to messages"
        " whose X-ListOption asks."
    ),
    no_args_is_help=True,
)
app.add_typer(suppression_app, name="suppression")

_ListAccount = Annotated[str, typer.Argument(help="Account name (or id)")]
_ListAddresses = Annotated[list[str], typer.Argument(help="One or more addresses")]
_REASON_HELP = f"Which list: {', '.join(REASONS)}"


@suppression_app.command("add")
def suppression_add(
    account: _ListAccount,
    addresses: _ListAddresses,
    reason: Annotated[str, typer.Option("--reason", help=_REASON_HELP)] = "manual",
    detail: Annotated[
        str | None, typer.Option("--detail", help="Note kept with each entry")
    ] = None,
) -> None:
    """Put addresses on one of the account's lists (all or none: a bad address adds nothing).

    An address already listed keeps its entry, except that an always-applied
    reason (hard_bounce, complaint, manual) replaces an optional one.

    Example: postlane suppression add acme bob@example.org --reason unsubscribe
    """
    from postlane.tenants import suppression_lists

    for change in suppression_lists.add(_state.db, account, addresses, reason, detail):
        if change.outcome == "added":
            line = f"{change.address}: added to the {reason} list"
        elif change.outcome == "replaced":
            line = f"{change.address}: moved from the {change.before} list to {reason}"
        else:
            line = f"{change.address}: already on the {change.before} list, kept"
        out.print(line, markup=False)


@suppression_app.command("list")
def suppression_list(
    account: _ListAccount,
    reason: Annotated[str | None, typer.Option("--reason", help="Only this list")] = None,
    limit: Annotated[str, typer.Option("--limit", help="At most this many entries")] = "100",
) -> None:
    """List an account's listed addresses, newest first.

    Example: postlane suppression list acme --reason hard_bounce --limit 20
    """
    from postlane.tenants import suppression_lists

    found = suppression_lists.list_entries(
        _state.db, account, reason=reason, limit=_number("limit", limit)
    )
    table = Table("address", "list", "applies", "detail", "added (UTC)")
    for entry in found:
        bit = OPTIONAL_LISTS.get(entry.reason)
        _add_row(
            table,
            entry.address,
            entry.reason,
            "always" if bit is None else f"X-ListOption {bit}",
            entry.detail or "",
            f"{entry.created_at:%Y-%m-%d %H:%M:%S}",
        )
    out.print(table)
    out.print(f"{len(found)} entr{'y' if len(found) == 1 else 'ies'}")


@suppression_app.command("remove")
def suppression_remove(account: _ListAccount, addresses: _ListAddresses) -> None:
    """Take addresses off whatever list they are on, so they can be mailed again.

    Example: postlane suppression remove acme bob@example.org ann@example.org
    """
    from postlane.tenants import suppression_lists

    for address, was in suppression_lists.remove(_state.db, account, addresses):
        line = f"{address}: not on any list" if was is None else f"{address}: removed ({was})"
        out.print(line, markup=False)


@suppression_app.command("import")
def suppression_import(
    account: _ListAccount,
    file: Annotated[
        str, typer.Argument(help="One address per line, or CSV with the address first; - for stdin")
    ],
    reason: Annotated[str, typer.Option("--reason", help=_REASON_HELP)],
    detail: Annotated[
        str | None, typer.Option("--detail", help="Note kept with each entry (default: the file)")
    ] = None,
) -> None:
    """Add every address of a file to one list; bad lines are reported and skipped.

    Blank lines and lines starting with # are ignored. Skipped lines are
    named on stderr and the exit status stays 0. Running an import again
    adds nothing twice.

    Example: postlane suppression import acme unsubscribed.csv --reason unsubscribe
    """
    from postlane.tenants import suppression_lists

    if file == "-":
        source = "stdin"
        summary = suppression_lists.import_lines(
            _state.db, account, sys.stdin.buffer, reason, detail or "imported from stdin"
        )
    else:
        path = Path(file)
        source = path.name
        try:
            with path.open("rb") as lines:
                summary = suppression_lists.import_lines(
                    _state.db, account, lines, reason, detail or f"imported from {path.name}"
                )
        except OSError as exc:
            raise InvalidInput(f"cannot read {file}: {exc.strerror or exc}") from None
    for bad in summary.bad:
        err.print(f"{source} line {bad.number}: {bad.problem} (skipped)", markup=False)
    out.print(
        f"{summary.added} added, {summary.replaced} moved to {reason}, {summary.kept} already"
        f" listed (kept), {len(summary.bad)} bad line(s) skipped",
        markup=False,
    )


# -- helpers -----------------------------------------------------------------------------


def _add_row(table: Table, *values: str) -> None:
    """Add a row whose cells are plain text, never Rich markup.

    Why: cells hold what customers and remote servers wrote (subjects,
    addresses, replies, notes). Read as markup, ``[/hide]`` crashes the
    command and ``[link=...]`` hides a hyperlink in the operator's terminal.
    """
    table.add_row(*(Text(value) for value in values))


def _yes(value: bool) -> str:
    return "yes" if value else "no"


def _json(value: object) -> str:
    import json

    return json.dumps(value, sort_keys=True) if value else "none"


def _os_reason(exc: OSError) -> str:
    """The system's reason for ``exc`` in lower case, without the errno noise."""
    import os

    reason = os.strerror(exc.errno) if exc.errno is not None else str(exc.strerror or exc)
    return reason[:1].lower() + reason[1:]


def _os_problem(exc: OSError) -> str:
    """One line for an OSError from serving: which address could not be bound, and why.

    Why: asyncio reports a busy port as ``[Errno 98] error while attempting to
    bind on address ('127.0.0.1', 2525): ...``; the operator needs the address
    and the reason, not the tuple or a traceback.
    """
    import re

    found = re.search(r"address \('([^']*)', (\d+)", str(exc))
    if found:
        host, port = found.groups()
        where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        return f"cannot listen on {where}: {_os_reason(exc)}"
    if exc.filename is not None:
        return f"{exc.filename}: {_os_reason(exc)}"
    return f"cannot serve: {_os_reason(exc)}"


def _fail(message: str) -> NoReturn:
    err.print(f"error: {message}", markup=False)
    raise typer.Exit(1)


def main() -> None:
    """Entry point: run the CLI, turning every Postlane error into one line and exit 1."""
    try:
        app()
    except PostlaneError as exc:
        err.print(f"error: {exc}", markup=False)
        sys.exit(1)
    except RecursionError:
        # A last guard: input nested past what the checks above foresee.
        err.print("error: input nested too deep", markup=False)
        sys.exit(1)
    except OSError as exc:
        # A file or socket problem no command caught itself: still one line.
        where = f"{exc.filename}: " if exc.filename is not None else ""
        err.print(f"error: {where}{_os_reason(exc)}", markup=False)
        sys.exit(1)
