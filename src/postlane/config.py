"""Settings: one TOML file, ``POSTLANE_*`` environment variables, defaults that run.

Postlane must start with no file at all (SQLite under ``./var``, self-signed TLS,
unprivileged ports), so every setting has a working default. Operators mostly
change a handful of keys; a typo must not be silently ignored, so unknown keys
are errors, and every error names the key and the value that was given.

Precedence, later wins: defaults, then the TOML file (``--config`` or
``POSTLANE_CONFIG``), then environment variables. Nested keys use ``__`` in the
environment: ``POSTLANE_SMTP__MAX_MESSAGE_SIZE=1000000``; the database URL is the
top-level ``database_url`` (``POSTLANE_DATABASE_URL``).
"""

from __future__ import annotations

import ipaddress
import os
import re
import socket
import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict
from pydantic_settings.exceptions import SettingsError

from postlane.errors import ConfigError

CONFIG_ENV = "POSTLANE_CONFIG"
DEFAULT_CONFIG_FILE = "postlane.toml"

TlsMode = Literal["none", "starttls", "implicit"]

#: An ASCII domain name: dot-separated labels of letters, digits and inner hyphens.
_HOST_NAME = re.compile(
    r"(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)*"
    r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?",
    re.ASCII,
)


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _check_address(value: str) -> str:
    if value in ("", "localhost"):
        return value
    try:
        ipaddress.ip_address(value)
    except ValueError as exc:
        raise ValueError(f"not an IP address: {value!r}") from exc
    return value


class ListenerSettings(_Section):
    """One SMTP listening socket."""

    address: str = Field("0.0.0.0", description="IP address to bind; '::' for all IPv6")
    port: int = Field(ge=1, le=65535, description="TCP port")
    tls: TlsMode = Field(
        "starttls",
        description="'none', 'starttls' (offered, upgrade on request) "
        "or 'implicit' (TLS from the first byte)",
    )
    submission: bool = Field(
        True,
        description="Submission listener: no MAIL before AUTH. When false, unauthenticated "
        "clients may only send to Postlane's own bounce domains (never an open relay)",
    )
    require_tls_for_auth: bool = Field(True, description="Offer AUTH only once TLS is active")
    allow_plaintext_auth: bool = Field(
        False, description="Allow AUTH without TLS on this listener (the operator's decision)"
    )
    proxy_protocol: bool = Field(
        False, description="Expect a PROXY protocol v1/v2 header from a load balancer"
    )
    proxy_trusted_networks: list[str] = Field(
        default_factory=list,
        description="Addresses (IP or CIDR) of the load balancers allowed to send the "
        "PROXY header; required with proxy_protocol. Connections from anywhere else "
        "are closed before the greeting",
    )

    @field_validator("address")
    @classmethod
    def _valid_address(cls, value: str) -> str:
        return _check_address(value)

    @field_validator("proxy_trusted_networks")
    @classmethod
    def _valid_networks(cls, value: list[str]) -> list[str]:
        for entry in value:
            try:
                ipaddress.ip_network(entry.strip(), strict=False)
            except ValueError:
                raise ValueError(f"{entry!r} is not an IP address or CIDR network") from None
        return [str(ipaddress.ip_network(entry.strip(), strict=False)) for entry in value]

    @model_validator(mode="after")
    def _proxy_with_tls(self) -> ListenerSettings:
        if self.proxy_protocol and self.tls == "implicit":
            raise ValueError(
                "proxy_protocol cannot be combined with tls = 'implicit': terminate TLS "
                "at the load balancer, or use tls = 'starttls'"
            )
        # Whoever sends the header chooses the client address that trusted
        # networks, throttles and logs then believe: a client reaching the port
        # directly could claim an account's trusted network and send as it
        # without AUTH. So the balancers are named, as Dovecot's
        # haproxy_trusted_networks does.
        if self.proxy_protocol and not self.proxy_trusted_networks:
            raise ValueError(
                "proxy_protocol needs proxy_trusted_networks: the addresses of the load "
                "balancers that send the PROXY header (anyone else could claim any "
                "client address, a trusted network's included)"
            )
        if self.proxy_trusted_networks and not self.proxy_protocol:
            raise ValueError("proxy_trusted_networks is only used with proxy_protocol = true")
        return self

    def proxy_peer_trusted(self, address: str) -> bool:
        """Whether a connection from ``address`` may send this listener a PROXY header."""
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return False
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        return any(ip in ipaddress.ip_network(net) for net in self.proxy_trusted_networks)


def _default_listeners() -> list[ListenerSettings]:
    return [
        ListenerSettings(port=2525, tls="starttls", submission=False),
        ListenerSettings(port=2465, tls="implicit"),
        ListenerSettings(port=2587, tls="starttls"),
    ]


class SmtpSettings(_Section):
    """The SMTP submission server."""

    listeners: list[ListenerSettings] = Field(
        default_factory=_default_listeners, description="Listening sockets ([[smtp.listeners]])"
    )
    tls_cert: Path | None = Field(
        None, description="PEM certificate chain; unset: a self-signed one in data_dir"
    )
    tls_key: Path | None = Field(None, description="PEM private key for tls_cert")
    max_message_size: int = Field(
        50 * 1024 * 1024, ge=1024, description="Largest message accepted, in bytes (SIZE)"
    )
    max_recipients: int = Field(1000, ge=1, description="Recipients per message")
    max_errors: int = Field(
        10,
        ge=1,
        description="Errors (protocol errors, failed logins, permanently refused recipients) "
        "before the session is closed",
    )
    max_line_length: int = Field(
        2048, ge=512, description="Longest command line in bytes, CRLF included"
    )
    command_timeout: float = Field(300.0, gt=0, description="Seconds to wait for a command")
    data_timeout: float = Field(600.0, gt=0, description="Seconds to wait for message data")
    max_received_headers: int = Field(
        25, ge=1, description="Postlane's own Received headers that mean a mail loop"
    )
    duplicate_window: float = Field(
        86400.0,
        ge=0,
        le=366 * 86400,  # a year: far more (1e11 s) overflowed every duplicate check
        description="Seconds in which a resubmission (same Message-ID, sender, recipients) "
        "is accepted but not queued again",
    )
    commit_max_delay: float = Field(
        0.002, ge=0, le=1, description="Seconds an intake commit may wait to group with others"
    )
    commit_max_batch: int = Field(256, ge=1, description="Messages in one grouped commit at most")
    commit_timeout: float = Field(
        30.0,
        gt=0,
        description="Seconds a session waits for its message's commit before answering "
        "451 4.3.0 (the message may still commit: a retry is then a duplicate)",
    )
    max_pending_bytes: int = Field(
        256 * 1024 * 1024,
        ge=1,
        description="Bytes of messages waiting for their commit in one intake process; "
        "above it MAIL and the end of DATA get 452 4.3.1",
    )
    max_connections: int = Field(
        2000,
        ge=1,
        description="Connections open at once per listener and intake process; "
        "more get 421 4.7.0 and are closed",
    )
    processes: int = Field(
        1,
        ge=1,
        le=64,
        description="Intake processes sharing the listening ports (SO_REUSEPORT); more than 1 "
        "lets intake use more cores",
    )
    commit_process: bool = Field(
        True,
        description="Commit accepted messages in a process of their own, shared by every "
        "intake process (false: in a thread of each intake process)",
    )


class AuthSettings(_Section):
    """SMTP authentication."""

    cache_ttl: float = Field(
        300.0, ge=0, description="Seconds a verified credential is remembered (0: off)"
    )
    max_failures: int = Field(
        10, ge=1, description="Failed AUTH per client IP or username within failure_window"
    )
    failure_window: float = Field(300.0, gt=0, description="Seconds over which failures count")


OutboundTls = Literal["opportunistic", "required", "none"]


def _is_ip(value: str) -> bool:
    try:
        ipaddress.ip_address(value)
    except ValueError:
        return False
    return True


def _check_host(value: str, key: str) -> str:
    """A host name or IP address (brackets allowed) for a relay, lower-cased.

    Checked at start-up so a typo stops Postlane with the key named, instead
    of deferring every message for the domain until someone reads the log.
    """
    host = value.strip().rstrip(".").lower()
    if _is_ip(host.removeprefix("[").removesuffix("]")):
        return host.removeprefix("[").removesuffix("]")
    labels = host.split(".")
    if not host or len(host) > 253 or any(not label or len(label) > 63 for label in labels):
        raise ValueError(f"{key} {value!r} is not a host name or an IP address")
    if any(c.isspace() or c in "/:@[]" for c in host):
        raise ValueError(f"{key} {value!r} is not a host name or an IP address")
    return host


class _RelayAuthSettings(_Section):
    """AUTH at a relay, and the CA its certificate is checked against: for transports and smarthost.

    Why ``allow_plaintext_auth`` exists and is off: the password would cross
    the network readable by anyone on the path, or go to whoever answers for
    the host when TLS does not check the certificate. A relay on the same
    host or a private link may still need it; that is for the operator to say.
    """

    username: str | None = Field(
        None, description="User name for AUTH (PLAIN or LOGIN) at host; needs password"
    )
    password: SecretStr | None = Field(
        None, description="Password for username; masked by 'postlane config show'"
    )
    allow_plaintext_auth: bool = Field(
        False,
        description="Send the credentials even without TLS (tls = 'none', or STARTTLS "
        "not offered) or with TLS that checks no certificate (tls = 'opportunistic'); "
        "otherwise such a connection is given up and the mail deferred",
    )
    ca_file: Path | None = Field(
        None,
        description="PEM CA certificates trusted for host's certificate instead of the "
        "system's (a private CA); needs tls = 'required', the default when it is set",
    )

    @field_validator("username", "password")
    @classmethod
    def _valid_credential(cls, value: str | SecretStr | None) -> str | SecretStr | None:
        text = value.get_secret_value() if isinstance(value, SecretStr) else value
        if text is not None and not text:
            raise ValueError("must not be empty")
        if text is not None and "\0" in text:
            raise ValueError("must not contain a NUL character")
        return value

    @field_validator("ca_file")
    @classmethod
    def _loadable_ca_file(cls, value: Path | None) -> Path | None:
        """Loaded now, so a wrong path stops start-up instead of deferring the relay's mail."""
        if value is None:
            return None
        # Imported here: reading settings does not otherwise need the SMTP client.
        from postlane.delivery.client import relay_context

        try:
            relay_context(value)
        except ConfigError as exc:
            raise ValueError(str(exc)) from None
        return value

    @model_validator(mode="after")
    def _both_or_neither(self) -> _RelayAuthSettings:
        if (self.username is None) != (self.password is None):
            given, missing = (
                ("username", "password") if self.password is None else ("password", "username")
            )
            raise PydanticCustomError(
                "required_with",
                "{missing} is required when {given} is set",
                {"missing": missing, "given": given},
            )
        return self


def _relay_error(setting: str, value: str, message: str, **context: str) -> PydanticCustomError:
    """An error about one key of a relay, named by :func:`_describe` without the whole table.

    The table holds the password: quoting it, even masked, says nothing useful.
    """
    return PydanticCustomError(
        "relay_setting", message, {"setting": setting, "value": value, **context}
    )


_PASSWORD_WAYS_OUT = (
    "use tls = 'required' (with ca_file for a private CA), or set allow_plaintext_auth = "
    "true to accept that the password can be read"
)


def _secure_relay_tls(relay: TransportSettings | SmarthostSettings) -> None:
    """Keep a relay's password away from whoever can intercept the connection.

    Opportunistic TLS encrypts without checking the certificate, so a
    spoofed DNS answer or anyone on the path can present any certificate and
    receive the password. With credentials and no ``tls`` given, TLS is
    therefore required; a weaker ``tls`` given on purpose needs
    ``allow_plaintext_auth``, the operator's word that the password may be
    read. ``ca_file`` implies required TLS too: only required TLS checks a
    certificate against it.
    """
    credentials = relay.username is not None
    if "tls" not in relay.model_fields_set:
        if (credentials and not relay.allow_plaintext_auth) or relay.ca_file is not None:
            # The model is frozen; this runs while it is being built.
            object.__setattr__(relay, "tls", "required")
        return
    if relay.ca_file is not None and relay.tls != "required":
        why = (
            "opportunistic TLS checks no certificate, so the CA would be ignored"
            if relay.tls == "opportunistic"
            else "tls = 'none' makes no TLS connection, so there is no certificate to check"
        )
        raise _relay_error(
            "ca_file", str(relay.ca_file), f"ca_file is only used with tls = 'required': {why}"
        )
    if not credentials or relay.allow_plaintext_auth or relay.tls == "required":
        return
    if relay.tls == "opportunistic":
        message = (
            "with username and password, opportunistic TLS would give the password to "
            "whoever answers for {host}, because the certificate is not checked (a spoofed "
            "DNS answer or anyone on the path can present any certificate); "
        )
    else:
        message = (
            "with username and password, tls = 'none' would send the password to {host} "
            "in plaintext, readable by anyone on the path; "
        )
    raise _relay_error("tls", relay.tls, message + _PASSWORD_WAYS_OUT, host=relay.host)


class TransportSettings(_RelayAuthSettings):
    """Where one recipient domain's mail goes instead of its MX hosts.

    Why: mail for a partner or an internal domain often has to go through a
    fixed gateway (a VPN, a split-horizon relay) that public MX records do
    not name.
    """

    domain: str = Field(
        description="Recipient domain: exact ('example.com') or any subdomain ('*.example.com')"
    )
    host: str = Field(description="Host name or IP address to send to; no MX lookup")
    port: int = Field(25, ge=1, le=65535, description="TCP port of host")
    tls: OutboundTls = Field(
        "opportunistic",
        description="'opportunistic' (STARTTLS if offered), 'required' (certificate "
        "valid for host, checked against ca_file if set) or 'none'; unset: 'required' "
        "with ca_file, or with username unless allow_plaintext_auth",
    )

    @field_validator("domain")
    @classmethod
    def _valid_domain(cls, value: str) -> str:
        pattern = value.strip().rstrip(".").lower()
        name = pattern.removeprefix("*.")
        if "*" in name or not name:
            raise ValueError(f"domain {value!r} is not a domain or '*.' followed by one")
        try:
            name = name if name.isascii() else name.encode("idna").decode("ascii")
        except UnicodeError:
            raise ValueError(f"domain {value!r} is not a valid domain name") from None
        # An IP address is refused: address literals are not recipient domains here.
        if _check_host(name, "domain") != name or _is_ip(name):
            raise ValueError(f"domain {value!r} is not a domain name")
        return f"*.{name}" if pattern.startswith("*.") else name

    @field_validator("host")
    @classmethod
    def _valid_host(cls, value: str) -> str:
        return _check_host(value, "host")

    @model_validator(mode="after")
    def _secure_tls(self) -> TransportSettings:
        _secure_relay_tls(self)
        return self


class SmarthostSettings(_RelayAuthSettings):
    """The relay every domain without a transport goes through."""

    host: str = Field(description="Host name or IP address of the relay; no MX lookup")
    port: int = Field(25, ge=1, le=65535, description="TCP port of the relay")
    tls: OutboundTls = Field(
        "opportunistic",
        description="'opportunistic' (STARTTLS if offered), 'required' (certificate "
        "valid for host, checked against ca_file if set) or 'none'; unset: 'required' "
        "with ca_file, or with username unless allow_plaintext_auth",
    )

    @field_validator("host")
    @classmethod
    def _valid_host(cls, value: str) -> str:
        return _check_host(value, "host")

    @model_validator(mode="after")
    def _secure_tls(self) -> SmarthostSettings:
        _secure_relay_tls(self)
        return self


class DeliverySettings(_Section):
    """The outbound queue."""

    nameservers: list[str] = Field(
        default_factory=list,
        description="DNS resolvers as host:port (e.g. 127.0.0.1:5353); empty: the system's",
    )
    mx_port: int = Field(
        25, ge=1, le=65535, description="TCP port of recipients' mail exchangers (25; tests)"
    )
    allow_internal_mx: bool = Field(
        False,
        description="Deliver to mail exchangers and address literals whose addresses are "
        "not public (loopback, private, link-local, shared, reserved); off, they are "
        "skipped. Transports and the smarthost are always allowed",
    )
    concurrency: int = Field(
        20, ge=1, le=10000, description="Outbound SMTP connections open at once, in total"
    )
    lease_batch: int = Field(
        100, ge=1, le=10000, description="Recipients a worker leases from the queue at once"
    )
    lease_seconds: float = Field(
        300.0,
        ge=10,
        description="Seconds a leased recipient stays with its worker before another may take it",
    )
    poll_interval: float = Field(
        1.0, gt=0, le=60, description="Seconds between queue polls when nothing is due"
    )
    own_process: bool = Field(
        True,
        description="When 'postlane serve' runs every role, run delivery in a child process "
        "of its own, so intake and delivery use two cores",
    )
    connection_cache_seconds: float = Field(
        2.0,
        ge=0,
        le=300,
        description="Seconds an idle outbound connection is kept for the next mail to the "
        "same hosts; 0: close each connection when its batch is sent",
    )

    @field_validator("nameservers")
    @classmethod
    def _valid_nameservers(cls, value: list[str]) -> list[str]:
        from postlane.delivery.routing import parse_nameserver
        from postlane.errors import InvalidInput

        for entry in value:
            try:
                parse_nameserver(entry)
            except InvalidInput as exc:
                raise ValueError(str(exc)) from None
        return value

    max_queue_lifetime: float = Field(
        259200.0,
        gt=0,
        description="Seconds a recipient may stay undelivered before it expires "
        "(unless the message sets its own expiry)",
    )
    shaping_rules: Path | None = Field(
        None,
        description="TOML file of per-destination traffic-shaping rules "
        "(connections, messages per connection and per minute); unset: the shipped defaults",
    )

    mta_sts: bool = Field(
        True,
        description="Apply recipient domains' MTA-STS policies (RFC 8461) to MX delivery",
    )
    transports: list[TransportSettings] = Field(
        default_factory=list,
        description="Per-domain routes that replace the MX lookup ([[delivery.transports]])",
    )
    smarthost: SmarthostSettings | None = Field(
        None,
        description="Relay for every domain without a transport ([delivery.smarthost]); "
        "unset: MX delivery",
    )

    @field_validator("transports")
    @classmethod
    def _unique_transports(cls, value: list[TransportSettings]) -> list[TransportSettings]:
        # Two entries for one domain would make the route depend on list
        # order, which an operator editing the file would not expect.
        seen: set[str] = set()
        for entry in value:
            if entry.domain in seen:
                raise ValueError(f"domain {entry.domain!r} has more than one transport")
            seen.add(entry.domain)
        return value

    @field_validator("shaping_rules")
    @classmethod
    def _valid_shaping_rules(cls, value: Path | None) -> Path | None:
        # Parsed now so a broken rules file stops the process at start, with
        # the rule and key named, rather than at the first delivery.
        from postlane.delivery.shaping import load_rules
        from postlane.errors import InvalidInput

        if value is not None:
            try:
                load_rules(value)
            except InvalidInput as exc:
                raise ValueError(str(exc)) from None
        return value


class HttpSettings(_Section):
    """The HTTP API, tracking endpoints and control panel."""

    address: str = Field("127.0.0.1", description="IP address to bind")
    port: int = Field(8025, ge=1, le=65535, description="TCP port")

    @field_validator("address")
    @classmethod
    def _valid_address(cls, value: str) -> str:
        return _check_address(value)


class Settings(BaseSettings):
    """Every setting of one Postlane process."""

    model_config = SettingsConfigDict(
        env_prefix="POSTLANE_",
        env_nested_delimiter="__",
        extra="forbid",
        frozen=True,
    )

    hostname: str = Field(
        default_factory=socket.getfqdn,
        description="Name in the SMTP banner, EHLO and the self-signed certificate",
    )
    data_dir: Path = Field(Path("var"), description="Where SQLite, keys and certificates live")
    database_url: str = Field(
        "", description="sqlite:///path or postgresql://user@host/db; unset: SQLite in data_dir"
    )
    secret_key: SecretStr | None = Field(
        None,
        description="Key for secrets at rest and signed URLs; unset: generated once "
        "into data_dir/secret.key",
    )
    log_level: Literal["debug", "info", "warning", "error"] = Field(
        "info", description="Log verbosity"
    )
    smtp: SmtpSettings = Field(default_factory=SmtpSettings, description="SMTP server")
    auth: AuthSettings = Field(default_factory=AuthSettings, description="SMTP authentication")
    delivery: DeliverySettings = Field(
        default_factory=DeliverySettings, description="Outbound queue"
    )
    http: HttpSettings = Field(default_factory=HttpSettings, description="HTTP server")

    @field_validator("hostname")
    @classmethod
    def _hostname(cls, value: str) -> str:
        # The name goes verbatim into the SMTP banner and EHLO: a CR/LF or a
        # space would break every greeting, and SMTP has no room for Unicode
        # there, so an IDN must be given in its ASCII (xn--) form.
        name = value.rstrip(".")
        if not _HOST_NAME.fullmatch(name) or len(name) > 253:
            hint = (
                " (give an internationalised name in its xn-- form)" if not value.isascii() else ""
            )
            raise ValueError(
                "not a host name: use letters, digits, hyphens and dots, "
                f"labels of 1 to 63 characters{hint}"
            )
        return name.lower()

    @field_validator("database_url")
    @classmethod
    def _database_url(cls, value: str) -> str:
        if value and not value.startswith(("sqlite:", "postgresql:", "postgres:", "postgresql+")):
            raise ValueError("must start with sqlite:/// or postgresql://")
        return value

    @field_validator("secret_key")
    @classmethod
    def _secret_key(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and len(value.get_secret_value()) < 32:
            raise ValueError("must be at least 32 characters")
        return value

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # The TOML file arrives as init kwargs; the environment overrides it.
        return (env_settings, init_settings)

    @property
    def effective_database_url(self) -> str:
        """The database URL, defaulting to SQLite inside data_dir."""
        return self.database_url or f"sqlite:///{self.data_dir / 'postlane.db'}"


def config_path(explicit: str | Path | None = None) -> Path | None:
    """The TOML file to read: the explicit path, POSTLANE_CONFIG, or ./postlane.toml if present."""
    if explicit is not None:
        return Path(explicit)
    from_env = os.environ.get(CONFIG_ENV)
    if from_env:
        return Path(from_env)
    default = Path(DEFAULT_CONFIG_FILE)
    return default if default.exists() else None


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError as exc:
        raise ConfigError(f"config file {path} does not exist") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from exc
    except OSError as exc:
        raise ConfigError(f"config file {path} cannot be read: {exc.strerror}") from exc


#: Settings whose value is a table that holds a credential (a relay's
#: password). Given as text instead (a malformed JSON variable), that text is
#: never repeated: it is likely to contain the password.
_SECRET_TABLES = ("delivery", "smarthost", "transports")
_SECRET_WORDS = ("password", "passwd", "secret", "token", "credential")
_URL_USERINFO = re.compile(r"://[^/?#\s]*@")


def _is_secret(key: str) -> bool:
    leaf = key.rsplit(".", 1)[-1].lower()
    return any(word in leaf for word in _SECRET_WORDS)


def _holds_secrets(key: str) -> bool:
    """Whether ``key`` names a relay table (or one entry of the transports list)."""
    parts = [part for part in key.lower().split(".") if not part.isdigit()]
    return bool(parts) and parts[-1] in _SECRET_TABLES


def _looks_secret(value: str) -> bool:
    """Whether text seems to carry a credential whatever its key is called.

    Why: a JSON blob or URL given for a harmless-looking key can hold a
    password that the key's name does not announce.
    """
    lowered = value.lower()
    return any(word in lowered for word in _SECRET_WORDS) or bool(_URL_USERINFO.search(value))


def _masked(value: Any, key: str) -> Any:
    """``value`` for an error message, with every secret in it (nested ones too) masked."""
    if isinstance(value, SecretStr) or (value is not None and _is_secret(key)):
        return "***"
    if isinstance(value, dict):
        return {k: _masked(v, f"{key}.{k}") for k, v in value.items()}
    if isinstance(value, list):
        return [_masked(v, key) for v in value]
    if isinstance(value, str) and key == "database_url":
        # Imported here: the store loads SQLAlchemy, which reading settings does not need.
        from postlane.store.db import mask_url

        return mask_url(value)
    if isinstance(value, str) and (_holds_secrets(key) or _looks_secret(value)):
        return "***"
    return value


def _describe(error: dict[str, Any]) -> str:
    key = ".".join(str(part) for part in error["loc"])
    message = str(error["msg"]).removeprefix("Value error, ")
    if error["type"] == "extra_forbidden":
        return f"unknown setting {key!r}"
    if error["type"] == "missing":
        return f"setting {key!r} is required"
    if error["type"] == "relay_setting":
        context = error.get("ctx") or {}
        return f"setting '{key}.{context['setting']}' = {context['value']!r}: {message}"
    if error["type"] == "required_with":
        context = error.get("ctx") or {}
        return (
            f"setting '{key}.{context['missing']}' is required "
            f"when '{key}.{context['given']}' is set"
        )
    given = error.get("input")
    shown = _masked(given, key)
    if isinstance(given, str) and given and shown != given:
        # The message itself may quote what was given.
        message = message.replace(given, str(shown))
    return f"setting {key!r} = {shown!r}: {message}"


def load_settings(path: str | Path | None = None, **overrides: Any) -> Settings:
    """Load and validate settings; raise ConfigError naming every bad key."""
    source = config_path(path)
    data: dict[str, Any] = _read_toml(source) if source is not None else {}
    data.update(overrides)
    try:
        return Settings(**data)
    except ValidationError as exc:
        where = f" (in {source})" if source is not None else ""
        problems = "; ".join(_describe(dict(err)) for err in exc.errors())
        raise ConfigError(f"invalid configuration{where}: {problems}") from None
    except SettingsError as exc:
        # Raised when a POSTLANE_* variable for a table or list is not JSON.
        # The value is not repeated: it may be a relay table with a password.
        raise ConfigError(_describe_env_error(exc)) from None


def _describe_env_error(exc: SettingsError) -> str:
    found = re.search(r'field "([^"]+)"', str(exc))
    field = found.group(1) if found else "?"
    variable = f"POSTLANE_{field.upper()}"
    cause = exc.__cause__ or exc.__context__
    reason = ""
    if isinstance(cause, ValueError) and hasattr(cause, "msg") and hasattr(cause, "colno"):
        reason = f" ({cause.msg} at column {cause.colno})"
    return (
        f"invalid configuration: environment variable {variable} or {variable}__* "
        f"for setting {field!r} is not valid JSON{reason}"
    )


def effective_settings(settings: Settings) -> dict[str, Any]:
    """Settings as plain data with secrets masked (for ``postlane config show``)."""
    from postlane.store.db import mask_url

    data = settings.model_dump(mode="json")
    if settings.secret_key is not None:
        data["secret_key"] = "***"
    data["database_url"] = mask_url(settings.effective_database_url)
    delivery = data["delivery"]
    for relay in [*delivery["transports"], delivery["smarthost"]]:
        if relay is not None and relay.get("password") is not None:
            relay["password"] = "***"
    return data


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if value is None:
        return '""'
    text = str(value).replace("\\", "\\\\").replace('"', '\\"')
    return f'"{text}"'


def to_toml(data: dict[str, Any], prefix: str = "") -> str:
    """Plain settings data as TOML text (scalars first, then tables, then arrays of tables)."""
    lines: list[str] = []
    tables: list[tuple[str, dict[str, Any]]] = []
    arrays: list[tuple[str, list[dict[str, Any]]]] = []
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            tables.append((name, value))
        elif isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
            arrays.append((name, value))
        elif value is not None:
            lines.append(f"{key} = {_toml_value(value)}")
    for name, table in tables:
        lines += ["", f"[{name}]", to_toml(table, f"{name}.").strip("\n")]
    for name, items in arrays:
        for item in items:
            lines += ["", f"[[{name}]]", to_toml(item, f"{name}.").strip("\n")]
    return "\n".join(lines) + "\n"


def _commented(model: type[BaseModel], defaults: dict[str, Any], prefix: str) -> list[str]:
    lines: list[str] = []
    later: list[str] = []
    for key, info in model.model_fields.items():
        value = defaults.get(key)
        annotation = info.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            later += ["", f"# {info.description}", f"[{prefix}{key}]"]
            later += _commented(annotation, value or {}, f"{prefix}{key}.")
        elif key == "listeners":
            for listener in value or []:
                later += ["", f"# {info.description}", f"# [[{prefix}{key}]]"]
                later += _commented(ListenerSettings, listener, f"{prefix}{key}.")
        else:
            lines.append(f"# {info.description}")
            if value is None:  # no value to show: say so rather than print a wrong one
                lines.append(f"# {key} = ...  (unset by default; see docs/configuration.md)")
            else:
                lines.append(f"# {key} = {_toml_value(value)}")
    return lines + later


def example_toml() -> str:
    """A settings file with every key commented out at its default, for ``postlane init``."""
    defaults = Settings.model_construct().model_dump(mode="json")
    defaults["hostname"] = "mail.example.com"
    defaults["smtp"] = SmtpSettings().model_dump(mode="json")
    header = [
        "# Postlane settings. Every key is shown at its default, commented out.",
        "# Environment variables override this file: POSTLANE_HOSTNAME, POSTLANE_DATABASE_URL,",
        "# POSTLANE_SMTP__MAX_MESSAGE_SIZE (nested keys joined by __). See docs/configuration.md.",
        "",
    ]
    return "\n".join(header + _commented(Settings, defaults, "")) + "\n"
