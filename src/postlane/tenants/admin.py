"""What an operator does to tenants, independent of whether it came from the CLI or the API.

Each function validates its input (raising InvalidInput that names the bad
value), does its work in one transaction, and returns plain records. Secrets
follow one rule: a password is returned exactly once, by the call that made
it, and only its Argon2 hash is stored.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy.engine import Connection

from postlane import crypto
from postlane.errors import InvalidInput
from postlane.options import SendOptions
from postlane.options._values import MAX_JSON_DEPTH
from postlane.options.model import validate_partial
from postlane.store import Database
from postlane.store import accounts as account_store
from postlane.store import domains as domain_store
from postlane.store import smtp_users as user_store
from postlane.store.accounts import Account
from postlane.store.domains import SendingDomain
from postlane.store.smtp_users import SmtpUser
from postlane.tenants import dkim_keys, validate
from postlane.tenants.dns_records import DnsRecord, sending_domain_records

_POLICIES = ("alert", "block")
_ATTACHMENT_POLICIES = ("off", "zip", "unzip")


def parse_default_options(text: str) -> dict[str, Any]:
    """Default send options given as a JSON object of SendOptions fields."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        msg = f"invalid default options: not JSON ({exc.msg} at column {exc.colno})"
        raise InvalidInput(msg) from None
    except RecursionError:
        # The parser recurses per level: "[[[[..." deep enough ends here. Less
        # deep, it parses and validate_partial refuses it by MAX_JSON_DEPTH.
        raise InvalidInput(
            f"invalid default options: JSON nested too deep (more than {MAX_JSON_DEPTH} levels)"
        ) from None
    if not isinstance(data, dict):
        raise InvalidInput("invalid default options: must be a JSON object")
    partial = validate_partial(data)
    SendOptions().layer(partial)  # proves the partial applies cleanly
    return partial


# -- accounts -----------------------------------------------------------------


def create_account(db: Database, name: str) -> Account:
    with db.begin() as conn:
        return account_store.create_account(conn, validate.account_name(name))


def get_account(db: Database, name: str) -> Account:
    with db.connect() as conn:
        return account_store.get_account(conn, name)


def list_accounts(db: Database) -> list[Account]:
    with db.connect() as conn:
        return account_store.list_accounts(conn)


@dataclass(frozen=True, slots=True)
class AccountChanges:
    """Fields of an account to change; None leaves a field as it is."""

    smtp_enabled: bool | None = None
    allow_email_login: bool | None = None
    unauthorised_sender_policy: str | None = None
    attachment_policy: str | None = None
    attachment_archive_name: str | None = None
    attachment_password: str | None = None  # "" clears it
    track_opens: bool | None = None
    track_clicks: bool | None = None
    timezone: str | None = None
    trusted_networks: str | None = None  # "" clears them
    default_options: str | None = None  # JSON object


def update_account(
    db: Database, box: crypto.SecretBox, name: str, changes: AccountChanges
) -> Account:
    values: dict[str, Any] = {}
    for key in ("smtp_enabled", "allow_email_login", "track_opens", "track_clicks"):
        if getattr(changes, key) is not None:
            values[key] = getattr(changes, key)
    if changes.unauthorised_sender_policy is not None:
        values["unauthorised_sender_policy"] = _choice(
            "unauthorised-sender policy", changes.unauthorised_sender_policy, _POLICIES
        )
    if changes.attachment_policy is not None:
        values["attachment_policy"] = _choice(
            "attachment policy", changes.attachment_policy, _ATTACHMENT_POLICIES
        )
    if changes.attachment_archive_name is not None:
        values["attachment_archive_name"] = _archive_name(changes.attachment_archive_name)
    if changes.attachment_password is not None:
        password = changes.attachment_password
        values["attachment_password_enc"] = box.encrypt(password.encode()) if password else None
    if changes.timezone is not None:
        values["timezone"] = validate.timezone(changes.timezone)
    if changes.trusted_networks is not None:
        values["trusted_networks"] = list(validate.networks(changes.trusted_networks))
    if changes.default_options is not None:
        values["default_options"] = parse_default_options(changes.default_options)
    with db.begin() as conn:
        account = account_store.get_account(conn, name)
        if not values:
            return account
        return account_store.update_account(conn, account.id, **values)


def _choice(what: str, value: str, allowed: tuple[str, ...]) -> str:
    if value not in allowed:
        raise InvalidInput(f"invalid {what} {value!r}: choose one of {', '.join(allowed)}")
    return value


def _archive_name(value: str) -> str:
    name = value.strip()
    if not name or "/" in name or "\\" in name or len(name) > 200:
        raise InvalidInput(f"invalid archive name {value!r}: a plain file name like files.zip")
    return name if name.lower().endswith(".zip") else f"{name}.zip"


# -- SMTP users -----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class NewCredentials:
    """A user and the password that was just set: the only time it is ever visible."""

    user: SmtpUser
    password: str


def create_smtp_user(
    db: Database,
    account_name: str,
    username: str,
    *,
    priority: int | str = 3,
    note: str = "",
    authorised_domains: str = "",
    authorised_senders: str = "",
    default_options: str | None = None,
    active: bool = True,
) -> NewCredentials:
    name = validate.username(username)
    level = validate.priority(priority)
    domains = validate.authorised_domains(authorised_domains)
    senders = validate.authorised_senders(authorised_senders)
    defaults = parse_default_options(default_options) if default_options else {}
    password = crypto.generate_password()
    password_hash = crypto.hash_password(password)
    with db.begin() as conn:
        account = account_store.get_account(conn, account_name)
        _refuse_a_login_clash(conn, name)
        user = user_store.create_smtp_user(
            conn,
            account.id,
            name,
            password_hash,
            priority=level,
            note=note,
            authorised_domains=domains,
            authorised_senders=senders,
            default_options=defaults,
        )
        if not active:
            user = user_store.update_smtp_user(conn, user.id, active=False)
    return NewCredentials(user, password)


def _refuse_a_login_clash(conn: Connection, name: str) -> None:
    """Refuse a username that differs from an existing one only in letter case.

    Logins ignore case (the server looks names up lower-cased), but the
    database's unique index folds only ASCII: "Émile" and "émile" could both
    be created, and one of them could then never log in.
    """
    folded = name.lower()
    for user in user_store.list_smtp_users(conn, None):
        if user.username.lower() == folded:
            raise InvalidInput(
                f"SMTP user {name!r} exists (as {user.username!r}; usernames ignore case)"
            )


def list_smtp_users(db: Database, account_name: str | None = None) -> list[SmtpUser]:
    with db.connect() as conn:
        account_id = account_store.get_account(conn, account_name).id if account_name else None
        return user_store.list_smtp_users(conn, account_id)


def reset_password(db: Database, username: str) -> NewCredentials:
    password = crypto.generate_password()
    password_hash = crypto.hash_password(password)
    with db.begin() as conn:
        user = user_store.get_smtp_user(conn, username)
        user_store.set_password_hash(conn, user.id, password_hash)
        user = user_store.get_smtp_user(conn, username)
    return NewCredentials(user, password)


@dataclass(frozen=True, slots=True)
class SmtpUserChanges:
    """Fields of an SMTP user to change; None leaves a field as it is."""

    active: bool | None = None
    priority: int | str | None = None
    note: str | None = None
    authorised_domains: str | None = None  # "" clears: every domain allowed
    authorised_senders: str | None = None
    default_options: str | None = None


def update_smtp_user(db: Database, username: str, changes: SmtpUserChanges) -> SmtpUser:
    values: dict[str, Any] = {}
    if changes.active is not None:
        values["active"] = changes.active
    if changes.priority is not None:
        values["priority"] = validate.priority(changes.priority)
    if changes.note is not None:
        values["note"] = changes.note
    if changes.authorised_domains is not None:
        values["authorised_domains"] = list(validate.authorised_domains(changes.authorised_domains))
    if changes.authorised_senders is not None:
        values["authorised_senders"] = list(validate.authorised_senders(changes.authorised_senders))
    if changes.default_options is not None:
        values["default_options"] = parse_default_options(changes.default_options)
    with db.begin() as conn:
        user = user_store.get_smtp_user(conn, username)
        if not values:
            return user
        return user_store.update_smtp_user(conn, user.id, **values)


# -- sending domains ------------------------------------------------------------


def default_selector(now: datetime | None = None) -> str:
    """A dated selector, so a rotated key never reuses the name of the one it replaces."""
    moment = now or datetime.now(UTC)
    return f"pl{moment:%Y%m}"


def add_domain(
    db: Database,
    box: crypto.SecretBox,
    account_name: str,
    domain: str,
    *,
    selector: str | None = None,
    ed25519: bool = False,
    return_path_subdomain: str = "bounce",
) -> SendingDomain:
    name = validate.domain_name(domain)
    rsa_selector = validate.selector(selector) if selector else default_selector()
    return_path = validate.selector(return_path_subdomain)
    rsa = dkim_keys.generate("rsa")
    ed = dkim_keys.generate("ed25519") if ed25519 else None
    with db.begin() as conn:
        account = account_store.get_account(conn, account_name)
        return domain_store.add_domain(
            conn,
            account.id,
            name,
            dkim_selector=rsa_selector,
            dkim_private_key_enc=box.encrypt(rsa.private_pem),
            dkim_public_key=rsa.public_value,
            ed25519_selector=f"{rsa_selector}e" if ed else None,
            ed25519_private_key_enc=box.encrypt(ed.private_pem) if ed else None,
            ed25519_public_key=ed.public_value if ed else None,
            return_path_subdomain=return_path,
        )


def list_domains(db: Database, account_name: str | None = None) -> list[SendingDomain]:
    with db.connect() as conn:
        account_id = account_store.get_account(conn, account_name).id if account_name else None
        return domain_store.list_domains(conn, account_id)


def domain_records(db: Database, domain: str, hostname: str) -> list[DnsRecord]:
    with db.connect() as conn:
        row = domain_store.get_domain(conn, validate.domain_name(domain))
    return sending_domain_records(
        domain=row.name,
        hostname=hostname,
        dkim_selector=row.dkim_selector,
        dkim_txt=f"v=DKIM1; k=rsa; p={row.dkim_public_key}",
        return_path_subdomain=row.return_path_subdomain,
        ed25519_selector=row.ed25519_selector,
        ed25519_txt=f"v=DKIM1; k=ed25519; p={row.ed25519_public_key}"
        if row.ed25519_public_key
        else None,
    )
