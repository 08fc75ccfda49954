"""The tables of Postlane, as SQLAlchemy Core objects.

This module is the description the rest of ``store/`` builds queries from and
the target the migrations must reproduce: a test compares a migrated database
with :data:`metadata`, so a column added here without a migration fails CI.

Constraints carry fixed names (through the naming convention) so that later
migrations can drop or alter them by name on both databases, and so that a
violated CHECK can be explained to the user (:data:`CHECK_RULES`).
"""

from __future__ import annotations

from datetime import UTC, datetime

import sqlalchemy as sa
from sqlalchemy.engine import Dialect
from sqlalchemy.types import TypeEngine

NAMING_CONVENTION: dict[str, str] = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

metadata = sa.MetaData(naming_convention=NAMING_CONVENTION)

UNAUTHORISED_SENDER_POLICIES = ("alert", "block")
ATTACHMENT_POLICIES = ("off", "zip", "unzip")
RECIPIENT_STATUSES = (
    "queued",
    "deferred",
    "sending",
    "delivered",
    "failed",
    "bounced",
    "expired",
    "suppressed",
    "held",
    "cancelled",
)
PRIORITY_HIGHEST = 1
PRIORITY_NORMAL = 3
PRIORITY_LOWEST = 5

#: SQLite only turns ``INTEGER PRIMARY KEY`` into an autoincrementing rowid
#: alias; PostgreSQL gets a real 64-bit identity.
ID: TypeEngine[int] = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def utc_now() -> datetime:
    """The current instant as an aware UTC datetime, the only kind stored."""
    return datetime.now(UTC)


class UTCDateTime(sa.TypeDecorator[datetime]):
    """An instant, always an aware UTC ``datetime`` in Python.

    PostgreSQL stores ``timestamptz``. SQLite has no time type, so the value is
    converted to UTC and stored naive; reading attaches UTC again. Naive
    datetimes are refused on the way in: their meaning depends on the clock of
    whoever made them, and a queue ordered by mixed local times is wrong.
    """

    impl = sa.DateTime(timezone=True)
    cache_ok = True

    def load_dialect_impl(self, dialect: Dialect) -> TypeEngine[datetime]:
        if dialect.name == "sqlite":
            return dialect.type_descriptor(sa.DateTime(timezone=False))
        return dialect.type_descriptor(sa.DateTime(timezone=True))

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None or value.utcoffset() is None:
            raise ValueError(f"naive datetime {value.isoformat()} given; use an aware UTC datetime")
        value = value.astimezone(UTC)
        if dialect.name == "sqlite":
            return value.replace(tzinfo=None)
        return value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value.astimezone(UTC)


#: Explanations of each CHECK constraint by its full name, so a violation
#: becomes "priority 9 is invalid: must be ..." instead of a driver message.
CHECK_RULES: dict[str, tuple[str, str]] = {}


def _one_of(table: str, column: str, values: tuple[str, ...]) -> sa.CheckConstraint:
    allowed = ", ".join(f"'{v}'" for v in values)
    CHECK_RULES[f"ck_{table}_{column}"] = (column, f"must be one of {allowed}")
    return sa.CheckConstraint(f"{column} IN ({allowed})", name=column)


def _priority(table: str) -> sa.CheckConstraint:
    CHECK_RULES[f"ck_{table}_priority"] = (
        "priority",
        f"must be between {PRIORITY_HIGHEST} (highest) and {PRIORITY_LOWEST} (lowest)",
    )
    return sa.CheckConstraint(
        f"priority BETWEEN {PRIORITY_HIGHEST} AND {PRIORITY_LOWEST}", name="priority"
    )


def _created_at() -> sa.Column[datetime]:
    return sa.Column("created_at", UTCDateTime(), nullable=False, server_default=sa.func.now())


def _updated_at() -> sa.Column[datetime]:
    return sa.Column("updated_at", UTCDateTime(), nullable=False, server_default=sa.func.now())


def _account_fk() -> sa.Column[int]:
    return sa.Column(
        "account_id", ID, sa.ForeignKey("accounts.id", ondelete="CASCADE"), nullable=False
    )


accounts = sa.Table(
    "accounts",
    metadata,
    sa.Column("id", ID, primary_key=True, autoincrement=True),
    sa.Column("name", sa.Text(), nullable=False, unique=True),
    sa.Column("smtp_enabled", sa.Boolean(), nullable=False, server_default=sa.true()),
    sa.Column("allow_email_login", sa.Boolean(), nullable=False, server_default=sa.false()),
    sa.Column(
        "unauthorised_sender_policy", sa.Text(), nullable=False, server_default=sa.text("'block'")
    ),
    sa.Column("attachment_policy", sa.Text(), nullable=False, server_default=sa.text("'off'")),
    sa.Column(
        "attachment_archive_name",
        sa.Text(),
        nullable=False,
        server_default=sa.text("'attachments.zip'"),
    ),
    sa.Column("attachment_password_enc", sa.LargeBinary(), nullable=True),
    sa.Column("track_opens", sa.Boolean(), nullable=False, server_default=sa.false()),
    sa.Column("track_clicks", sa.Boolean(), nullable=False, server_default=sa.false()),
    sa.Column("timezone", sa.Text(), nullable=False, server_default=sa.text("'UTC'")),
    sa.Column("trusted_networks", sa.JSON(), nullable=False, server_default=sa.text("'[]'")),
    sa.Column("default_options", sa.JSON(), nullable=False, server_default=sa.text("'{}'")),
    _created_at(),
    _updated_at(),
    _one_of("accounts", "unauthorised_sender_policy", UNAUTHORISED_SENDER_POLICIES),
    _one_of("accounts", "attachment_policy", ATTACHMENT_POLICIES),
)

smtp_users = sa.Table(
    "smtp_users",
    metadata,
    sa.Column("id", ID, primary_key=True, autoincrement=True),
    _account_fk(),
    sa.Column("username", sa.Text(), nullable=False),
    sa.Column("password_hash", sa.Text(), nullable=False),
    sa.Column("active", sa.Boolean(), nullable=False, server_default=sa.true()),
    sa.Column(
        "priority", sa.Integer(), nullable=False, server_default=sa.text(str(PRIORITY_NORMAL))
    ),
    sa.Column("note", sa.Text(), nullable=False, server_default=sa.text("''")),
    sa.Column("authorised_domains", sa.JSON(), nullable=False, server_default=sa.text("'[]'")),
    sa.Column("authorised_senders", sa.JSON(), nullable=False, server_default=sa.text("'[]'")),
    sa.Column("default_options", sa.JSON(), nullable=False, server_default=sa.text("'{}'")),
    _created_at(),
    _updated_at(),
    sa.Column("password_changed_at", UTCDateTime(), nullable=False, server_default=sa.func.now()),
    _priority("smtp_users"),
)
# AUTH gives only a username, so it must name one user across all accounts,
# whatever case the client types it in.
sa.Index("uq_smtp_users_username", sa.func.lower(smtp_users.c.username), unique=True)
sa.Index("ix_smtp_users_account_id", smtp_users.c.account_id)

api_keys = sa.Table(
    "api_keys",
    metadata,
    sa.Column("id", ID, primary_key=True, autoincrement=True),
    _account_fk(),
    sa.Column("name", sa.Text(), nullable=False),
    sa.Column("prefix", sa.Text(), nullable=False, unique=True),
    sa.Column("key_hash", sa.Text(), nullable=False),
    _created_at(),
    sa.Column("last_used_at", UTCDateTime(), nullable=True),
    sa.Column("revoked_at", UTCDateTime(), nullable=True),
)
sa.Index("ix_api_keys_account_id", api_keys.c.account_id)

sending_domains = sa.Table(
    "sending_domains",
    metadata,
    sa.Column("id", ID, primary_key=True, autoincrement=True),
    _account_fk(),
    sa.Column("name", sa.Text(), nullable=False, unique=True),
    sa.Column("dkim_selector", sa.Text(), nullable=False),
    sa.Column("dkim_algorithm", sa.Text(), nullable=False, server_default=sa.text("'rsa-sha256'")),
    sa.Column("dkim_private_key_enc", sa.LargeBinary(), nullable=False),
    sa.Column("dkim_public_key", sa.Text(), nullable=False),
    sa.Column("ed25519_selector", sa.Text(), nullable=True),
    sa.Column("ed25519_private_key_enc", sa.LargeBinary(), nullable=True),
    sa.Column("ed25519_public_key", sa.Text(), nullable=True),
    sa.Column(
        "return_path_subdomain", sa.Text(), nullable=False, server_default=sa.text("'bounce'")
    ),
    sa.Column("spf_verified", sa.Boolean(), nullable=False, server_default=sa.false()),
    sa.Column("dkim_verified", sa.Boolean(), nullable=False, server_default=sa.false()),
    sa.Column("dmarc_verified", sa.Boolean(), nullable=False, server_default=sa.false()),
    sa.Column("return_path_verified", sa.Boolean(), nullable=False, server_default=sa.false()),
    sa.Column("verified_at", UTCDateTime(), nullable=True),
    _created_at(),
    _updated_at(),
)
sa.Index("ix_sending_domains_account_id", sending_domains.c.account_id)

messages = sa.Table(
    "messages",
    metadata,
    # The queue id is made by intake before the commit, so it can be quoted
    # in the 250 reply; it is not a database sequence.
    sa.Column("id", sa.Text(), primary_key=True),
    _account_fk(),
    sa.Column(
        "smtp_user_id",
        ID,
        sa.ForeignKey("smtp_users.id", ondelete="SET NULL"),
        nullable=True,
    ),
    sa.Column("mail_from", sa.Text(), nullable=False),
    sa.Column("header_from", sa.Text(), nullable=False),
    sa.Column("message_id_header", sa.Text(), nullable=True),
    sa.Column("subject", sa.Text(), nullable=True),
    sa.Column("size", sa.Integer(), nullable=False),
    sa.Column("raw", sa.LargeBinary(), nullable=False),
    sa.Column("options", sa.JSON(), nullable=False, server_default=sa.text("'{}'")),
    sa.Column("client_ip", sa.Text(), nullable=True),
    sa.Column("tls", sa.Text(), nullable=True),
    sa.Column("received_at", UTCDateTime(), nullable=False, server_default=sa.func.now()),
    sa.Column("dedupe_key", sa.Text(), nullable=True),
    # No foreign key: the original may be purged by retention before the copy.
    sa.Column("duplicate_of", sa.Text(), nullable=True),
)
sa.Index("ix_messages_account_received", messages.c.account_id, messages.c.received_at)
sa.Index("ix_messages_dedupe", messages.c.dedupe_key, messages.c.received_at)
sa.Index("ix_messages_smtp_user_id", messages.c.smtp_user_id)

recipients = sa.Table(
    "recipients",
    metadata,
    sa.Column("id", ID, primary_key=True, autoincrement=True),
    sa.Column(
        "message_id",
        sa.Text(),
        sa.ForeignKey("messages.id", ondelete="CASCADE"),
        nullable=False,
    ),
    # A copy of messages.account_id (no foreign key: the message's own cascade
    # removes the row) so per-account queue views need no join.
    sa.Column("account_id", ID, nullable=False),
    sa.Column("address", sa.Text(), nullable=False),
    sa.Column("domain", sa.Text(), nullable=False),
    sa.Column("status", sa.Text(), nullable=False, server_default=sa.text("'queued'")),
    sa.Column(
        "priority", sa.Integer(), nullable=False, server_default=sa.text(str(PRIORITY_NORMAL))
    ),
    sa.Column("next_attempt_at", UTCDateTime(), nullable=False, server_default=sa.func.now()),
    sa.Column("expires_at", UTCDateTime(), nullable=False),
    sa.Column("attempts", sa.Integer(), nullable=False, server_default=sa.text("0")),
    sa.Column("lease_owner", sa.Text(), nullable=True),
    sa.Column("lease_expires_at", UTCDateTime(), nullable=True),
    sa.Column("last_reply", sa.Text(), nullable=True),
    _created_at(),
    _updated_at(),
    _one_of("recipients", "status", RECIPIENT_STATUSES),
    _priority("recipients"),
)
# The due query: status IN ('queued', 'deferred') AND next_attempt_at <= now
# ORDER BY priority, next_attempt_at, id (the id makes ties cheap: migration 0002).
sa.Index(
    "ix_recipients_due",
    recipients.c.status,
    recipients.c.priority,
    recipients.c.next_attempt_at,
    recipients.c.id,
)
sa.Index("ix_recipients_status_expires", recipients.c.status, recipients.c.expires_at)
sa.Index("ix_recipients_account_id", recipients.c.account_id, recipients.c.id)
sa.Index("ix_recipients_message_id", recipients.c.message_id)
sa.Index("ix_recipients_domain_status", recipients.c.domain, recipients.c.status)
sa.Index("ix_recipients_lease_expires_at", recipients.c.lease_expires_at)

events = sa.Table(
    "events",
    metadata,
    sa.Column("id", ID, primary_key=True, autoincrement=True),
    _account_fk(),
    # No foreign keys to messages or recipients: the event log outlives
    # message retention, and statistics are computed from it.
    sa.Column("message_id", sa.Text(), nullable=True),
    sa.Column("recipient_id", ID, nullable=True),
    sa.Column("type", sa.Text(), nullable=False),
    _created_at(),
    sa.Column("data", sa.JSON(), nullable=False, server_default=sa.text("'{}'")),
)
sa.Index("ix_events_message", events.c.message_id, events.c.id)
sa.Index("ix_events_account_created", events.c.account_id, events.c.created_at)

sa.Index(
    "ix_events_inbound",
    events.c.id,
    postgresql_where=events.c.type == "inbound",
    sqlite_where=events.c.type == "inbound",
)

suppressions = sa.Table(
    "suppressions",
    metadata,
    sa.Column("id", ID, primary_key=True, autoincrement=True),
    _account_fk(),
    sa.Column("address", sa.Text(), nullable=False),
    sa.Column("reason", sa.Text(), nullable=False),
    sa.Column("detail", sa.Text(), nullable=True),
    _created_at(),
    sa.UniqueConstraint("account_id", "address"),
)

alerts = sa.Table(
    "alerts",
    metadata,
    sa.Column("id", ID, primary_key=True, autoincrement=True),
    _account_fk(),
    sa.Column(
        "smtp_user_id",
        ID,
        sa.ForeignKey("smtp_users.id", ondelete="SET NULL"),
        nullable=True,
    ),
    sa.Column("kind", sa.Text(), nullable=False),
    sa.Column("message", sa.Text(), nullable=False),
    # No foreign key: an alert stays readable after its message is purged.
    sa.Column("message_id", sa.Text(), nullable=True),
    _created_at(),
    sa.Column("acknowledged_at", UTCDateTime(), nullable=True),
)
sa.Index("ix_alerts_account_created", alerts.c.account_id, alerts.c.created_at)
sa.Index("ix_alerts_smtp_user_id", alerts.c.smtp_user_id)

templates = sa.Table(
    "templates",
    metadata,
    sa.Column("id", ID, primary_key=True, autoincrement=True),
    _account_fk(),
    sa.Column("name", sa.Text(), nullable=False),
    # Jinja2 sources (render/templates.py); at least one body part.
    sa.Column("subject", sa.Text(), nullable=True),
    sa.Column("html", sa.Text(), nullable=True),
    sa.Column("text", sa.Text(), nullable=True),
    _created_at(),
    _updated_at(),
    sa.UniqueConstraint("account_id", "name"),
    sa.CheckConstraint("html IS NOT NULL OR text IS NOT NULL", name="has_body"),
)
CHECK_RULES["ck_templates_has_body"] = ("html", "a template needs an HTML or a text part")

archived_copies = sa.Table(
    "archived_copies",
    metadata,
    sa.Column("id", ID, primary_key=True, autoincrement=True),
    _account_fk(),
    # No foreign keys: an archive outlives message retention, as events do.
    sa.Column("message_id", sa.Text(), nullable=False),
    sa.Column("recipient_id", ID, nullable=False),
    sa.Column("address", sa.Text(), nullable=False),
    sa.Column("data", sa.LargeBinary(), nullable=False),
    _created_at(),
)
sa.Index(
    "ix_archived_copies_message_id", archived_copies.c.message_id, archived_copies.c.recipient_id
)
sa.Index(
    "ix_archived_copies_account_created", archived_copies.c.account_id, archived_copies.c.created_at
)
