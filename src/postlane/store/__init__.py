"""Postlane's storage: schema, migrations and repositories.

Only this package speaks SQL. Repository functions take an open
``sqlalchemy.Connection`` first, so a caller can compose several in one
transaction (``with db.begin() as conn: ...``) and have them commit together.
"""

from postlane.store.accounts import (
    Account,
    create_account,
    get_account,
    list_accounts,
    update_account,
)
from postlane.store.alerts import Alert, add_alert, list_alerts
from postlane.store.db import Database, mask_url
from postlane.store.domains import (
    SendingDomain,
    add_domain,
    domains_for_account,
    get_domain,
    list_domains,
)
from postlane.store.migrate import current_revision, upgrade
from postlane.store.smtp_users import (
    SmtpUser,
    create_smtp_user,
    find_smtp_user_by_username,
    get_smtp_user,
    list_smtp_users,
    set_password_hash,
    update_smtp_user,
)

__all__ = [
    "Account",
    "Alert",
    "Database",
    "SendingDomain",
    "SmtpUser",
    "add_alert",
    "add_domain",
    "create_account",
    "create_smtp_user",
    "current_revision",
    "domains_for_account",
    "find_smtp_user_by_username",
    "get_account",
    "get_domain",
    "get_smtp_user",
    "list_accounts",
    "list_alerts",
    "list_domains",
    "list_smtp_users",
    "mask_url",
    "set_password_hash",
    "update_account",
    "update_smtp_user",
    "upgrade",
]
