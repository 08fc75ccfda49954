"""Initial schema: tenants, credentials, domains, messages, queue, events.

Revision ID: 0001
Revises:
Create Date: 2024-11-24

Spelled out table by table (not ``metadata.create_all``) so that this
revision keeps creating the same schema after ``postlane.store.schema`` has
moved on, and later revisions build on a known starting point.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: str | Sequence[str] | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# SQLite autoincrements only an INTEGER PRIMARY KEY.
ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
TIMESTAMP = sa.DateTime(timezone=True)
STATUSES = (
    "'queued', 'deferred', 'sending', 'delivered', 'failed', "
    "'bounced', 'expired', 'suppressed', 'held', 'cancelled'"
)


def _account_fk(table: str) -> sa.ForeignKeyConstraint:
    return sa.ForeignKeyConstraint(
        ["account_id"],
        ["accounts.id"],
        name=op.f(f"fk_{table}_account_id_accounts"),
        ondelete="CASCADE",
    )


def upgrade() -> None:
    op.create_table(
        "accounts",
        sa.Column("id", ID, nullable=False, autoincrement=True),
        sa.Column("name", sa.Text(), nullable=False),
        sa.Column("smtp_enabled", sa.Boolean(), nullable=False, server_default=sa.true()),
        sa.Column("allow_email_login", sa.Boolean(), nullable=False, server_default=sa.false()),
        sa.Column(
            "unauthorised_sender_policy",
            sa.Text(),
            nullable=False,
            server_default=sa.text("'block'"),
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
        sa.Column("created_at", TIMESTAMP, nullable=False, server_default=sa.func.now()),
        sa.Column("updated_at", TIMESTAMP, nullable=False, server_default=sa.func.now()),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_accounts")),
        sa.UniqueConstraint("name", name=op.f("uq_accounts_name")),
        sa.CheckConstraint(
            "unauthorised_sender_policy IN ('alert', 'block')",
            name=op.f("ck_accounts_unauthorised_sender_policy"),
        ),
        sa.CheckConstraint(
            "attachment_policy IN ('off', 'zip', 'unzip')",
            name=op.f("ck_accounts_attachment_policy"),
        ),
    )

    op.create_table(
        "smtp_users",
        sa.Column("id", ID, nullable=False, autoincrement=True),
        sa.Column("account_id", ID, nullable=False),
        sa.Column("username", sa.Text(), nullable=False),
        sa.Column("password_hash", sa.Text(), nullable=False),
        sa.Column("active", sa.Boolean(), nullable=False, server_default=sa.true()),
        sa.Column("priority", sa.Integer(), nullable=False, server_default=sa.text("3")),
        sa.Column("note", sa.Text(), nullable=False, server_default=sa.text("''")),
        sa.Column("authorised_domains", sa.JSON(), nullable=False, server_default=sa.text("'[]'")),
        sa.Column("authorised_senders", sa.JSON(), nullable=False, server_default=sa.text("'[]'")),
        sa.Column("default_options", sa.JSON(), nullable=False, server_default=sa.text("'{}'")),
        sa.Column("created_at", TIMESTAMP, nullable=False, server_default=sa.func.now()),
        sa.Column("updated_at", TIMESTAMP, nullable=False, server_default=sa.func.now()),
        sa.Column("password_changed_at", TIMESTAMP, nullable=False, server_default=sa.func.now()),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_smtp_users")),
        _account_fk("smtp_users"),
        sa.CheckConstraint("priority BETWEEN 1 AND 5", name=op.f("ck_smtp_users_priority")),
    )
    op.create_index(
        "uq_smtp_users_username", "smtp_users", [sa.text("lower(username)")], unique=True
    )
    op.create_index("ix_smtp_users_account_id", "smtp_users", ["account_id"])

    op.create_table(
        "api_keys",
        sa.Column("id", ID, nullable=False, autoincrement=True),
        sa.Column("account_id", ID, nullable=False),
        sa.Column("name", sa.Text(), nullable=False),
        sa.Column("prefix", sa.Text(), nullable=False),
        sa.Column("key_hash", sa.Text(), nullable=False),
        sa.Column("created_at", TIMESTAMP, nullable=False, server_default=sa.func.now()),
        sa.Column("last_used_at", TIMESTAMP, nullable=True),
        sa.Column("revoked_at", TIMESTAMP, nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_api_keys")),
        _account_fk("api_keys"),
        sa.UniqueConstraint("prefix", name=op.f("uq_api_keys_prefix")),
    )
    op.create_index("ix_api_keys_account_id", "api_keys", ["account_id"])

    op.create_table(
        "sending_domains",
        sa.Column("id", ID, nullable=False, autoincrement=True),
        sa.Column("account_id", ID, nullable=False),
        sa.Column("name", sa.Text(), nullable=False),
        sa.Column("dkim_selector", sa.Text(), nullable=False),
        sa.Column(
            "dkim_algorithm", sa.Text(), nullable=False, server_default=sa.text("'rsa-sha256'")
        ),
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
        sa.Column("verified_at", TIMESTAMP, nullable=True),
        sa.Column("created_at", TIMESTAMP, nullable=False, server_default=sa.func.now()),
        sa.Column("updated_at", TIMESTAMP, nullable=False, server_default=sa.func.now()),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_sending_domains")),
        _account_fk("sending_domains"),
        sa.UniqueConstraint("name", name=op.f("uq_sending_domains_name")),
    )
    op.create_index("ix_sending_domains_account_id", "sending_domains", ["account_id"])

    op.create_table(
        "messages",
        sa.Column("id", sa.Text(), nullable=False),
        sa.Column("account_id", ID, nullable=False),
        sa.Column("smtp_user_id", ID, nullable=True),
        sa.Column("mail_from", sa.Text(), nullable=False),
        sa.Column("header_from", sa.Text(), nullable=False),
        sa.Column("message_id_header", sa.Text(), nullable=True),
        sa.Column("subject", sa.Text(), nullable=True),
        sa.Column("size", sa.Integer(), nullable=False),
        sa.Column("raw", sa.LargeBinary(), nullable=False),
        sa.Column("options", sa.JSON(), nullable=False, server_default=sa.text("'{}'")),
        sa.Column("client_ip", sa.Text(), nullable=True),
        sa.Column("tls", sa.Text(), nullable=True),
        sa.Column("received_at", TIMESTAMP, nullable=False, server_default=sa.func.now()),
        sa.Column("dedupe_key", sa.Text(), nullable=True),
        sa.Column("duplicate_of", sa.Text(), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_messages")),
        _account_fk("messages"),
        sa.ForeignKeyConstraint(
            ["smtp_user_id"],
            ["smtp_users.id"],
            name=op.f("fk_messages_smtp_user_id_smtp_users"),
            ondelete="SET NULL",
        ),
    )
    op.create_index("ix_messages_account_received", "messages", ["account_id", "received_at"])
    op.create_index("ix_messages_dedupe", "messages", ["dedupe_key", "received_at"])
    op.create_index("ix_messages_smtp_user_id", "messages", ["smtp_user_id"])

    op.create_table(
        "recipients",
        sa.Column("id", ID, nullable=False, autoincrement=True),
        sa.Column("message_id", sa.Text(), nullable=False),
        sa.Column("account_id", ID, nullable=False),
        sa.Column("address", sa.Text(), nullable=False),
        sa.Column("domain", sa.Text(), nullable=False),
        sa.Column("status", sa.Text(), nullable=False, server_default=sa.text("'queued'")),
        sa.Column("priority", sa.Integer(), nullable=False, server_default=sa.text("3")),
        sa.Column("next_attempt_at", TIMESTAMP, nullable=False, server_default=sa.func.now()),
        sa.Column("expires_at", TIMESTAMP, nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False, server_default=sa.text("0")),
        sa.Column("lease_owner", sa.Text(), nullable=True),
        sa.Column("lease_expires_at", TIMESTAMP, nullable=True),
        sa.Column("last_reply", sa.Text(), nullable=True),
        sa.Column("created_at", TIMESTAMP, nullable=False, server_default=sa.func.now()),
        sa.Column("updated_at", TIMESTAMP, nullable=False, server_default=sa.func.now()),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_recipients")),
        sa.ForeignKeyConstraint(
            ["message_id"],
            ["messages.id"],
            name=op.f("fk_recipients_message_id_messages"),
            ondelete="CASCADE",
        ),
        sa.CheckConstraint(f"status IN ({STATUSES})", name=op.f("ck_recipients_status")),
        sa.CheckConstraint("priority BETWEEN 1 AND 5", name=op.f("ck_recipients_priority")),
    )
    op.create_index("ix_recipients_due", "recipients", ["status", "priority", "next_attempt_at"])
    op.create_index("ix_recipients_message_id", "recipients", ["message_id"])
    op.create_index("ix_recipients_domain_status", "recipients", ["domain", "status"])
    op.create_index("ix_recipients_lease_expires_at", "recipients", ["lease_expires_at"])

    op.create_table(
        "events",
        sa.Column("id", ID, nullable=False, autoincrement=True),
        sa.Column("account_id", ID, nullable=False),
        sa.Column("message_id", sa.Text(), nullable=True),
        sa.Column("recipient_id", ID, nullable=True),
        sa.Column("type", sa.Text(), nullable=False),
        sa.Column("created_at", TIMESTAMP, nullable=False, server_default=sa.func.now()),
        sa.Column("data", sa.JSON(), nullable=False, server_default=sa.text("'{}'")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_events")),
        _account_fk("events"),
    )
    op.create_index("ix_events_message", "events", ["message_id", "id"])
    op.create_index("ix_events_account_created", "events", ["account_id", "created_at"])

    op.create_table(
        "suppressions",
        sa.Column("id", ID, nullable=False, autoincrement=True),
        sa.Column("account_id", ID, nullable=False),
        sa.Column("address", sa.Text(), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("detail", sa.Text(), nullable=True),
        sa.Column("created_at", TIMESTAMP, nullable=False, server_default=sa.func.now()),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_suppressions")),
        _account_fk("suppressions"),
        sa.UniqueConstraint(
            "account_id", "address", name=op.f("uq_suppressions_account_id_address")
        ),
    )

    op.create_table(
        "alerts",
        sa.Column("id", ID, nullable=False, autoincrement=True),
        sa.Column("account_id", ID, nullable=False),
        sa.Column("smtp_user_id", ID, nullable=True),
        sa.Column("kind", sa.Text(), nullable=False),
        sa.Column("message", sa.Text(), nullable=False),
        sa.Column("message_id", sa.Text(), nullable=True),
        sa.Column("created_at", TIMESTAMP, nullable=False, server_default=sa.func.now()),
        sa.Column("acknowledged_at", TIMESTAMP, nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_alerts")),
        _account_fk("alerts"),
        sa.ForeignKeyConstraint(
            ["smtp_user_id"],
            ["smtp_users.id"],
            name=op.f("fk_alerts_smtp_user_id_smtp_users"),
            ondelete="SET NULL",
        ),
    )
    op.create_index("ix_alerts_account_created", "alerts", ["account_id", "created_at"])
    op.create_index("ix_alerts_smtp_user_id", "alerts", ["smtp_user_id"])


def downgrade() -> None:
    # Children before parents; dropping a table drops its indexes.
    for table in (
        "alerts",
        "suppressions",
        "events",
        "recipients",
        "messages",
        "sending_domains",
        "api_keys",
        "smtp_users",
        "accounts",
    ):
        op.drop_table(table)
