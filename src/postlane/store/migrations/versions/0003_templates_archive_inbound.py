"""Stored templates, archived copies, and an index for the bounce processor.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-24

- ``templates``: an account's named templates (X-OV-Template,
  X-Mailgun-Template-Name), Jinja2 sources for the HTML and/or text part and
  an optional subject.
- ``archived_copies``: the copy that left for one recipient, kept when the
  message asked for it (X-JobOption 128, the OMICard "backup a copy of EML").
  No foreign key to messages or recipients: an archive outlives the message's
  retention, as the event log does.
- ``ix_events_inbound``: a partial index on ``events (id) WHERE type =
  'inbound'``, so the bounce processor's "inbound mail not yet processed"
  reads only inbound events instead of scanning the event log from its cursor.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | Sequence[str] | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
TIMESTAMP = sa.DateTime(timezone=True)


def _account_fk(table: str) -> sa.ForeignKeyConstraint:
    return sa.ForeignKeyConstraint(
        ["account_id"],
        ["accounts.id"],
        name=op.f(f"fk_{table}_account_id_accounts"),
        ondelete="CASCADE",
    )


def upgrade() -> None:
    op.create_table(
        "templates",
        sa.Column("id", ID, nullable=False, autoincrement=True),
        sa.Column("account_id", ID, nullable=False),
        sa.Column("name", sa.Text(), nullable=False),
        sa.Column("subject", sa.Text(), nullable=True),
        sa.Column("html", sa.Text(), nullable=True),
        sa.Column("text", sa.Text(), nullable=True),
        sa.Column("created_at", TIMESTAMP, nullable=False, server_default=sa.func.now()),
        sa.Column("updated_at", TIMESTAMP, nullable=False, server_default=sa.func.now()),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_templates")),
        _account_fk("templates"),
        sa.UniqueConstraint("account_id", "name", name=op.f("uq_templates_account_id_name")),
        sa.CheckConstraint(
            "html IS NOT NULL OR text IS NOT NULL", name=op.f("ck_templates_has_body")
        ),
    )
    op.create_table(
        "archived_copies",
        sa.Column("id", ID, nullable=False, autoincrement=True),
        sa.Column("account_id", ID, nullable=False),
        sa.Column("message_id", sa.Text(), nullable=False),
        sa.Column("recipient_id", ID, nullable=False),
        sa.Column("address", sa.Text(), nullable=False),
        sa.Column("data", sa.LargeBinary(), nullable=False),
        sa.Column("created_at", TIMESTAMP, nullable=False, server_default=sa.func.now()),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_archived_copies")),
        _account_fk("archived_copies"),
    )
    op.create_index(
        "ix_archived_copies_message_id", "archived_copies", ["message_id", "recipient_id"]
    )
    op.create_index(
        "ix_archived_copies_account_created", "archived_copies", ["account_id", "created_at"]
    )
    op.create_index(
        "ix_events_inbound",
        "events",
        ["id"],
        postgresql_where=sa.text("type = 'inbound'"),
        sqlite_where=sa.text("type = 'inbound'"),
    )


def downgrade() -> None:
    op.drop_index("ix_events_inbound", table_name="events")
    op.drop_index("ix_archived_copies_account_created", table_name="archived_copies")
    op.drop_index("ix_archived_copies_message_id", table_name="archived_copies")
    op.drop_table("archived_copies")
    op.drop_table("templates")
