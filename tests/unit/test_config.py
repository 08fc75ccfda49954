from __future__ import annotations

import tomllib
import typing
from pathlib import Path

import pytest

from postlane import config
from postlane.errors import ConfigError


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import os

    for key in list(os.environ):
        if key.startswith("POSTLANE_"):
            monkeypatch.delenv(key)
    monkeypatch.chdir(tmp_path)


def test_no_file_gives_working_defaults() -> None:
    s = config.load_settings()
    assert s.effective_database_url == "sqlite:///var/postlane.db"
    assert [(li.port, li.tls, li.submission) for li in s.smtp.listeners] == [
        (2525, "starttls", False),
        (2465, "implicit", True),
        (2587, "starttls", True),
    ]
    assert all(li.require_tls_for_auth for li in s.smtp.listeners)
    assert s.http.port == 8025
    assert s.hostname


def test_file_and_environment_layer(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "p.toml"
    path.write_text(
        'hostname = "smtp.example.com"\n[smtp]\nmax_recipients = 50\nmax_errors = 3\n'
        '[[smtp.listeners]]\nport = 25\ntls = "none"\nsubmission = false\n'
    )
    monkeypatch.setenv("POSTLANE_SMTP__MAX_RECIPIENTS", "7")
    monkeypatch.setenv("POSTLANE_DATABASE_URL", "postgresql://u:pw@db/postlane")
    s = config.load_settings(path)
    assert s.hostname == "smtp.example.com"
    assert s.smtp.max_recipients == 7  # environment wins over the file
    assert s.smtp.max_errors == 3
    assert [(li.port, li.tls) for li in s.smtp.listeners] == [(25, "none")]
    assert s.effective_database_url == "postgresql://u:pw@db/postlane"


def test_config_file_from_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "elsewhere.toml"
    path.write_text('hostname = "a.example.net"\n')
    monkeypatch.setenv("POSTLANE_CONFIG", str(path))
    assert config.load_settings().hostname == "a.example.net"


@pytest.mark.parametrize(
    ("toml", "expected"),
    [
        ("[smtp]\nmax_recipients = 0\n", "'smtp.max_recipients' = 0: Input should be greater"),
        ("[[smtp.listeners]]\nport = 70000\n", "'smtp.listeners.0.port' = 70000"),
        ('[[smtp.listeners]]\nport = 25\ntls = "ssl"\n', "'smtp.listeners.0.tls' = 'ssl'"),
        ('[[smtp.listeners]]\nport = 25\naddress = "x.y"\n', "not an IP address: 'x.y'"),
        ("[[smtp.listeners]]\ntls = 'none'\n", "setting 'smtp.listeners.0.port' is required"),
        ("hostnme = 'x'\n", "unknown setting 'hostnme'"),
        ("[smtp]\nmax_mesage_size = 5\n", "unknown setting 'smtp.max_mesage_size'"),
        ('database_url = "mysql://x"\n', "'database_url' = 'mysql://x': must start with"),
        ('hostname = "a..b"\n', "not a host name"),
        ('secret_key = "short"\n', "'secret_key' = '***': must be at least 32"),
        ('log_level = "loud"\n', "'log_level' = 'loud'"),
        ('[delivery]\nnameservers = ["dns.google"]\n', "'delivery.nameservers' = ['dns.google']"),
        ("[smtp]\nprocesses = 0\n", "'smtp.processes' = 0: Input should be greater"),
        ("[smtp]\nprocesses = 65\n", "'smtp.processes' = 65: Input should be less"),
        (
            "[delivery]\nconnection_cache_seconds = -1\n",
            "'delivery.connection_cache_seconds' = -1: Input should be greater",
        ),
        ('[delivery]\nown_process = "sometimes"\n', "'delivery.own_process' = 'sometimes'"),
        ('[smtp]\ncommit_process = "maybe"\n', "'smtp.commit_process' = 'maybe'"),
        (
            "[[smtp.listeners]]\nport = 25\nproxy_protocol = true\n",
            "proxy_protocol needs proxy_trusted_networks",
        ),
        (
            "[[smtp.listeners]]\nport = 25\nproxy_trusted_networks = ['10.0.0.1']\n",
            "proxy_trusted_networks is only used with proxy_protocol = true",
        ),
        (
            "[[smtp.listeners]]\nport = 25\nproxy_protocol = true\n"
            "proxy_trusted_networks = ['lb.example']\n",
            "'lb.example' is not an IP address or CIDR network",
        ),
    ],
)
def test_bad_values_name_key_and_value(tmp_path: Path, toml: str, expected: str) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(toml)
    with pytest.raises(ConfigError) as info:
        config.load_settings(path)
    assert expected in str(info.value)
    assert str(path) in str(info.value)


def test_bad_environment_value(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("POSTLANE_SMTP__MAX_MESSAGE_SIZE", "big")
    with pytest.raises(ConfigError, match=r"'smtp.max_message_size' = 'big'"):
        config.load_settings()


def test_unreadable_or_invalid_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        config.load_settings(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("hostname = \n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        config.load_settings(bad)


def test_example_file_parses_to_the_defaults(tmp_path: Path) -> None:
    path = tmp_path / "postlane.toml"
    path.write_text(config.example_toml())
    tomllib.loads(path.read_text())
    loaded = config.load_settings(path)
    assert loaded.model_dump(exclude={"hostname"}) == config.load_settings().model_dump(
        exclude={"hostname"}
    )


def test_effective_settings_mask_secrets(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("POSTLANE_DATABASE_URL", "postgresql://user:hunter2@db/x")
    monkeypatch.setenv("POSTLANE_SECRET_KEY", "k" * 40)
    data = config.effective_settings(config.load_settings())
    text = config.to_toml(data)
    assert "hunter2" not in text
    assert "k" * 40 not in text
    assert 'database_url = "postgresql://user:***@db/x"' in text
    assert tomllib.loads(text)["smtp"]["listeners"][1]["port"] == 2465


def _keys(model: type, prefix: str = "") -> list[str]:
    """Every settings key, with those of optional sections and arrays of tables."""
    from pydantic import BaseModel

    keys = []
    for name, info in model.model_fields.items():  # type: ignore[attr-defined]
        ann = info.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            keys += _keys(ann, f"{prefix}{name}.")
            continue
        # list[Section] ([[...]]) and Section | None ([...], unset by default)
        sections = [
            inner
            for inner in typing.get_args(ann)
            if isinstance(inner, type) and issubclass(inner, BaseModel)
        ]
        if not sections:
            keys.append(f"{prefix}{name}")
        for section in sections:
            keys += _keys(section, f"{prefix}{name}.")
    return keys


def test_every_key_is_documented() -> None:
    doc = (Path(__file__).parents[2] / "docs" / "configuration.md").read_text()
    missing = [key for key in _keys(config.Settings) if f"`{key}`" not in doc]
    assert not missing, f"docs/configuration.md lacks {missing}"


@pytest.mark.parametrize(
    ("toml", "expected"),
    [
        ("[delivery]\nmta_sts = 'sometimes'\n", "'delivery.mta_sts' = 'sometimes'"),
        (
            "[[delivery.transports]]\ndomain = 'a.test'\nhost = 'gw.test'\nport = 0\n",
            "'delivery.transports.0.port' = 0: Input should be greater",
        ),
        (
            "[[delivery.transports]]\ndomain = 'a.test'\nhost = 'gw.test'\ntls = 'maybe'\n",
            "'delivery.transports.0.tls' = 'maybe'",
        ),
        (
            "[[delivery.transports]]\ndomain = 'a..test'\nhost = 'gw.test'\n",
            "'delivery.transports.0.domain' = 'a..test'",
        ),
        (
            "[[delivery.transports]]\ndomain = 'mail.*.test'\nhost = 'gw.test'\n",
            "'delivery.transports.0.domain' = 'mail.*.test': domain 'mail.*.test' is not",
        ),
        (
            "[[delivery.transports]]\ndomain = 'a.test'\nhost = 'gw test:25'\n",
            "'delivery.transports.0.host' = 'gw test:25': host 'gw test:25' is not",
        ),
        (
            "[[delivery.transports]]\nhost = 'gw.test'\n",
            "'delivery.transports.0.domain' is required",
        ),
        (
            "[[delivery.transports]]\ndomain = 'a.test'\nhost = 'x'\n"
            "[[delivery.transports]]\ndomain = 'A.test.'\nhost = 'y'\n",
            "domain 'a.test' has more than one transport",
        ),
        (
            "[[delivery.transports]]\ndomain = '10.0.0.1'\nhost = 'gw.test'\n",
            "'delivery.transports.0.domain' = '10.0.0.1': domain '10.0.0.1' is not a domain",
        ),
        ("[delivery.smarthost]\nport = 587\n", "'delivery.smarthost.host' is required"),
        (
            "[delivery.smarthost]\nhost = 'relay.test'\nport = 70000\n",
            "'delivery.smarthost.port' = 70000",
        ),
        (
            "[delivery.smarthost]\nhost = 'relay.test'\ntls = 'starttls'\n",
            "'delivery.smarthost.tls' = 'starttls'",
        ),
        (
            "[delivery.smarthost]\nhost = 'relay.test'\nuser = 'u'\npassword = 'p'\n",
            "unknown setting 'delivery.smarthost.user'",
        ),
        (
            "[delivery.smarthost]\nhost = 'relay.test'\nusername = 'u'\n",
            "setting 'delivery.smarthost.password' is required "
            "when 'delivery.smarthost.username' is set",
        ),
        (
            "[[delivery.transports]]\ndomain = 'a.test'\nhost = 'gw.test'\npassword = 'p'\n",
            "setting 'delivery.transports.0.username' is required "
            "when 'delivery.transports.0.password' is set",
        ),
        (
            "[delivery.smarthost]\nhost = 'relay.test'\nusername = ''\npassword = 'p'\n",
            "setting 'delivery.smarthost.username' = '': must not be empty",
        ),
        (
            "[delivery.smarthost]\nhost = 'relay.test'\nusername = 'u'\npassword = \"a\\u0000b\"\n",
            "setting 'delivery.smarthost.password' = '***': must not contain a NUL",
        ),
        (
            "[delivery.smarthost]\nhost = 'relay.test'\nallow_plaintext_auth = 'maybe'\n",
            "'delivery.smarthost.allow_plaintext_auth' = 'maybe'",
        ),
    ],
)
def test_bad_delivery_routes_name_key_and_value(tmp_path: Path, toml: str, expected: str) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(toml)
    with pytest.raises(ConfigError) as info:
        config.load_settings(path)
    assert expected in str(info.value)


def test_delivery_routes_are_normalised(tmp_path: Path) -> None:
    path = tmp_path / "routes.toml"
    path.write_text(
        "[[delivery.transports]]\ndomain = '*.Corp.TEST.'\nhost = '[10.0.0.1]'\n"
        "[[delivery.transports]]\ndomain = 'bücher.test'\nhost = 'GW.test'\ntls = 'none'\n"
        "[delivery.smarthost]\nhost = 'relay.test'\nport = 587\ntls = 'required'\n"
    )
    delivery = config.load_settings(path).delivery
    assert [(t.domain, t.host, t.port, t.tls) for t in delivery.transports] == [
        ("*.corp.test", "10.0.0.1", 25, "opportunistic"),
        ("xn--bcher-kva.test", "gw.test", 25, "none"),
    ]
    assert delivery.smarthost is not None
    assert (delivery.smarthost.host, delivery.smarthost.port) == ("relay.test", 587)
    assert delivery.mta_sts is True
    # No credentials unless given; never AUTH in plaintext unless allowed.
    for relay in (*delivery.transports, delivery.smarthost):
        assert (relay.username, relay.password, relay.allow_plaintext_auth) == (None, None, False)


RELAY_WITH_CREDENTIALS = """
[[delivery.transports]]
domain = "partner.test"
host = "gw.partner.test"
tls = "none"
username = "postlane"
password = "transport-secret"
allow_plaintext_auth = true

[delivery.smarthost]
host = "relay.test"
port = 587
username = "postlane@relay.test"
password = "smarthost-secret"
"""


def test_relay_credentials_are_read(tmp_path: Path) -> None:
    path = tmp_path / "relay.toml"
    path.write_text(RELAY_WITH_CREDENTIALS)
    delivery = config.load_settings(path).delivery
    transport, smarthost = delivery.transports[0], delivery.smarthost
    assert smarthost is not None
    assert transport.username == "postlane" and transport.allow_plaintext_auth is True
    assert transport.password is not None
    assert transport.password.get_secret_value() == "transport-secret"
    assert smarthost.username == "postlane@relay.test"
    assert smarthost.password is not None
    assert smarthost.password.get_secret_value() == "smarthost-secret"
    assert smarthost.allow_plaintext_auth is False
    assert "smarthost-secret" not in repr(smarthost)


def test_relay_password_from_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Kept out of the file, e.g. from a secret store: the environment fills it in."""
    path = tmp_path / "relay.toml"
    path.write_text("[delivery.smarthost]\nhost = 'relay.test'\nusername = 'u'\n")
    monkeypatch.setenv("POSTLANE_DELIVERY__SMARTHOST__PASSWORD", "from-env")
    smarthost = config.load_settings(path).delivery.smarthost
    assert smarthost is not None and smarthost.password is not None
    assert smarthost.password.get_secret_value() == "from-env"


def test_effective_settings_mask_relay_passwords(tmp_path: Path) -> None:
    path = tmp_path / "relay.toml"
    path.write_text(RELAY_WITH_CREDENTIALS)
    text = config.to_toml(config.effective_settings(config.load_settings(path)))
    assert "transport-secret" not in text and "smarthost-secret" not in text
    shown = tomllib.loads(text)["delivery"]
    assert shown["smarthost"]["password"] == "***"
    assert shown["smarthost"]["username"] == "postlane@relay.test"
    assert shown["transports"][0]["password"] == "***"
    assert shown["transports"][0]["allow_plaintext_auth"] is True


def test_an_error_about_a_list_of_transports_does_not_show_their_passwords(
    tmp_path: Path,
) -> None:
    """The duplicate check quotes the whole list; the passwords in it are masked."""
    entry = "[[delivery.transports]]\ndomain = 'a.test'\nhost = 'gw.test'\n"
    path = tmp_path / "bad.toml"
    path.write_text(
        f"{entry}username = 'u'\npassword = 'hunter2'\n"
        f"{entry}username = 'v'\npassword = 'swordfish'\n"
    )
    with pytest.raises(ConfigError) as info:
        config.load_settings(path)
    message = str(info.value)
    assert "domain 'a.test' has more than one transport" in message
    assert "hunter2" not in message and "swordfish" not in message
    assert "'password': '***'" in message


def _ca_pem(*, ca: bool = True) -> bytes:
    """A self-signed certificate in PEM: a CA's, or (``ca=False``) a server's."""
    import datetime as dt

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Relay CA")])
    now = dt.datetime.now(dt.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    return certificate.public_bytes(serialization.Encoding.PEM)


SMARTHOST = "[delivery.smarthost]\nhost = 'relay.test'\n"
TRANSPORT = "[[delivery.transports]]\ndomain = 'a.test'\nhost = 'gw.test'\n"
CREDENTIALS = "username = 'u'\npassword = 'hunter2'\n"


def _load(tmp_path: Path, toml: str) -> config.DeliverySettings:
    path = tmp_path / "relay.toml"
    path.write_text(toml)
    return config.load_settings(path).delivery


def _refused(tmp_path: Path, toml: str) -> str:
    path = tmp_path / "relay.toml"
    path.write_text(toml)
    with pytest.raises(ConfigError) as info:
        config.load_settings(path)
    assert "hunter2" not in str(info.value)
    return str(info.value)


def test_credentials_make_the_default_tls_required(tmp_path: Path) -> None:
    """Opportunistic TLS checks no certificate: whoever answers for host would get the password."""
    delivery = _load(tmp_path, SMARTHOST + CREDENTIALS + TRANSPORT + CREDENTIALS)
    assert delivery.smarthost is not None
    assert delivery.smarthost.tls == "required"
    assert delivery.transports[0].tls == "required"
    delivery = _load(tmp_path, SMARTHOST + TRANSPORT)
    assert delivery.smarthost is not None
    assert delivery.smarthost.tls == "opportunistic"
    assert delivery.transports[0].tls == "opportunistic"


def test_credentials_with_allowed_plaintext_auth_keep_opportunistic_tls(tmp_path: Path) -> None:
    """The operator accepted that the password can be read: STARTTLS when offered, as before."""
    allowed = CREDENTIALS + "allow_plaintext_auth = true\n"
    delivery = _load(
        tmp_path, SMARTHOST + allowed + TRANSPORT + allowed + "tls = 'opportunistic'\n"
    )
    assert delivery.smarthost is not None
    assert delivery.smarthost.tls == "opportunistic"
    assert delivery.transports[0].tls == "opportunistic"


@pytest.mark.parametrize(
    ("toml", "key"),
    [
        (SMARTHOST + CREDENTIALS + "tls = 'opportunistic'\n", "delivery.smarthost.tls"),
        (TRANSPORT + CREDENTIALS + "tls = 'opportunistic'\n", "delivery.transports.0.tls"),
    ],
    ids=["smarthost", "transport"],
)
def test_credentials_with_explicit_opportunistic_tls_are_refused(
    tmp_path: Path, toml: str, key: str
) -> None:
    message = _refused(tmp_path, toml)
    host = "relay.test" if "smarthost" in key else "gw.test"
    assert f"setting '{key}' = 'opportunistic': with username and password" in message
    assert f"the password to whoever answers for {host}" in message
    assert "because the certificate is not checked" in message
    assert "use tls = 'required' (with ca_file for a private CA)" in message
    assert "or set allow_plaintext_auth = true" in message


def test_credentials_with_tls_none_need_allow_plaintext_auth(tmp_path: Path) -> None:
    message = _refused(tmp_path, SMARTHOST + CREDENTIALS + "tls = 'none'\n")
    assert "setting 'delivery.smarthost.tls' = 'none'" in message
    assert "send the password to relay.test in plaintext" in message
    assert "or set allow_plaintext_auth = true" in message
    allowed = SMARTHOST + CREDENTIALS + "tls = 'none'\nallow_plaintext_auth = true\n"
    smarthost = _load(tmp_path, allowed).smarthost
    assert smarthost is not None and smarthost.tls == "none"


def test_ca_file_is_loaded_and_makes_tls_required(tmp_path: Path) -> None:
    ca_file = tmp_path / "relay-ca.pem"
    ca_file.write_bytes(_ca_pem())
    delivery = _load(tmp_path, f"{SMARTHOST}ca_file = '{ca_file}'\n{TRANSPORT}{CREDENTIALS}")
    assert delivery.smarthost is not None
    assert (delivery.smarthost.ca_file, delivery.smarthost.tls) == (ca_file, "required")
    assert delivery.transports[0].ca_file is None


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (None, "cannot be read: No such file or directory"),
        (b"", "does not hold PEM CA certificates"),
        (b"not a certificate\n", "does not hold PEM CA certificates"),
        (_ca_pem(ca=False), "holds no CA certificate"),
    ],
    ids=["missing", "empty", "not-pem", "not-a-ca"],
)
def test_ca_file_that_is_not_pem_ca_certificates_is_refused(
    tmp_path: Path, content: bytes | None, expected: str
) -> None:
    ca_file = tmp_path / "relay-ca.pem"
    if content is not None:
        ca_file.write_bytes(content)
    message = _refused(tmp_path, f"{TRANSPORT}{CREDENTIALS}ca_file = '{ca_file}'\n")
    assert f"setting 'delivery.transports.0.ca_file' = '{ca_file}': ca_file {ca_file}" in message
    assert expected in message


@pytest.mark.parametrize(
    ("tls", "why"),
    [
        ("none", "tls = 'none' makes no TLS connection"),
        ("opportunistic", "opportunistic TLS checks no certificate, so the CA would be ignored"),
    ],
)
def test_ca_file_without_required_tls_is_refused(tmp_path: Path, tls: str, why: str) -> None:
    ca_file = tmp_path / "relay-ca.pem"
    ca_file.write_bytes(_ca_pem())
    message = _refused(tmp_path, f"{SMARTHOST}tls = '{tls}'\nca_file = '{ca_file}'\n")
    assert f"setting 'delivery.smarthost.ca_file' = '{ca_file}': ca_file is only used" in message
    assert why in message


@pytest.mark.parametrize(
    "name",
    ["mail.example.com\r\nX", "mail example.com", "bücher.example", "-bad.example", "a..b"],
)
def test_hostname_must_be_an_ascii_domain_name(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("POSTLANE_HOSTNAME", name)
    with pytest.raises(ConfigError, match=r"'hostname'.*not a host name") as info:
        config.load_settings()
    assert "\n" not in str(info.value) and "\r" not in str(info.value)


def test_hostname_in_xn_form_is_accepted(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("POSTLANE_HOSTNAME", "Mail.XN--bcher-kva.example.")
    assert config.load_settings().hostname == "mail.xn--bcher-kva.example"


def test_hostname_error_names_the_xn_form(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("POSTLANE_HOSTNAME", "mail.bücher.example")
    with pytest.raises(ConfigError, match="xn--"):
        config.load_settings()


@pytest.mark.parametrize(
    ("variable", "value"),
    [("POSTLANE_SMTP", "{bad"), ("POSTLANE_SMTP__LISTENERS", "notjson")],
)
def test_environment_json_errors_are_config_errors(
    variable: str, value: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(variable, value)
    with pytest.raises(ConfigError, match=r"POSTLANE_SMTP.*'smtp' is not valid JSON"):
        config.load_settings()


def test_malformed_smarthost_error_hides_its_password(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(
        "POSTLANE_DELIVERY__SMARTHOST",
        '{"host":"relay.example","username":"u","password":"Hunter2SecretPw"',
    )
    with pytest.raises(ConfigError, match=r"delivery.smarthost") as info:
        config.load_settings()
    assert "Hunter2SecretPw" not in str(info.value)


def test_secret_inside_a_parent_table_is_hidden(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("POSTLANE_DELIVERY", '{"smarthost": "u:Hunter2SecretPw"}')
    with pytest.raises(ConfigError) as info:
        config.load_settings()
    assert "Hunter2SecretPw" not in str(info.value)


def test_transport_given_as_text_is_not_repeated(tmp_path: Path) -> None:
    path = tmp_path / "p.toml"
    path.write_text('[delivery]\ntransports = ["relay.example u hunter2"]\n')
    with pytest.raises(ConfigError, match=r"delivery.transports.0") as info:
        config.load_settings(path)
    assert "hunter2" not in str(info.value)


def test_bad_database_url_error_hides_its_password(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("POSTLANE_DATABASE_URL", "mysql://u:s3cretpw@h/db")
    with pytest.raises(ConfigError, match=r"database_url.*must start with") as info:
        config.load_settings()
    assert "s3cretpw" not in str(info.value)


def test_config_show_masks_passwords_in_the_database_url_query(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("POSTLANE_DATABASE_URL", "postgresql://u:s3cretpw@h/db?password=qsecret")
    shown = config.effective_settings(config.load_settings())["database_url"]
    assert shown == "postgresql://u:***@h/db?password=***"


def test_a_duplicate_window_beyond_a_year_is_refused() -> None:
    # 1e11 seconds was taken, and then every message with a Message-ID failed
    # its commit (the window's start overflowed the calendar) with 451.
    with pytest.raises(ConfigError, match=r"smtp\.duplicate_window"):
        config.load_settings(smtp={"duplicate_window": 1e11})
    assert config.load_settings(smtp={"duplicate_window": 366 * 86400}).smtp.duplicate_window
