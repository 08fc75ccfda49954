"""The sans-IO SMTP server engine, driven by feeding it client text."""

from __future__ import annotations

import base64
from dataclasses import replace
from typing import TypeVar

import pytest

from postlane.smtp.protocol import (
    AuthAttempt,
    CloseRequested,
    Connection,
    Event,
    Hello,
    MailFrom,
    MessageReceived,
    Rcpt,
    Reply,
    Reset,
    SessionPolicy,
    StartTLS,
    TransactionAborted,
)

HOST = "mx.example.com"
RELAY = SessionPolicy(HOST, auth_required=False)
SUBMISSION = SessionPolicy(HOST, starttls_available=True)
PLAINTEXT_AUTH = SessionPolicy(HOST, allow_plaintext_auth=True)
QUEUED = Reply(250, "2.0.0", ("Ok: queued",))
CREDENTIALS = {"user": "secret", "ünï": "pässwörd"}
E = TypeVar("E")


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


AUTH_OK = "AUTH PLAIN " + b64("\0user\0secret")


class Driver:
    """Feeds a Connection and answers its decisions like a simple server would.

    MAIL and RCPT are accepted unless the address is in ``refuse``; messages
    are answered with QUEUED; AUTH succeeds for the pairs in CREDENTIALS.
    """

    def __init__(self, policy: SessionPolicy = RELAY, *, tls: bool = False) -> None:
        self.conn = Connection(policy, tls_active=tls)
        self.greeting = self.conn.data_to_send()
        self.events: list[Event] = []
        self.refuse: dict[str, Reply] = {}
        self.message_reply = QUEUED
        self.decide = True

    def feed(self, data: bytes) -> bytes:
        self.conn.receive_data(data)
        self.drain()
        return self.conn.data_to_send()

    def send(self, *lines: str) -> list[str]:
        """Send command lines (CRLF added); return the reply lines."""
        return lines_of(self.feed("".join(f"{line}\r\n" for line in lines).encode()))

    def drain(self) -> None:
        while (event := self.conn.next_event()) is not None:
            self.events.append(event)
            if self.decide:
                self.answer(event)

    def answer(self, event: Event) -> None:
        if isinstance(event, MailFrom | Rcpt):
            self.conn.answer(self.refuse.get(event.address))
        elif isinstance(event, MessageReceived):
            self.conn.answer_message(self.message_reply)
        elif isinstance(event, AuthAttempt):
            if CREDENTIALS.get(event.username) == event.password:
                self.conn.auth_succeeded(event.username)
            else:
                self.conn.auth_failed()

    def of_type(self, kind: type[E]) -> list[E]:
        return [event for event in self.events if isinstance(event, kind)]


def feed_in_two(driver: Driver, stream: bytes, cut: int) -> bytes:
    """Feed ``stream`` in two reads split at ``cut`` (an empty read would mean EOF)."""
    return b"".join(driver.feed(piece) for piece in (stream[:cut], stream[cut:]) if piece)


def lines_of(data: bytes) -> list[str]:
    text = data.decode("ascii")
    assert text == "" or text.endswith("\r\n")
    return text.split("\r\n")[:-1]


def ready(policy: SessionPolicy = RELAY, *, tls: bool = False) -> Driver:
    driver = Driver(policy, tls=tls)
    driver.send("EHLO client.example")
    return driver


def authenticated(policy: SessionPolicy = PLAINTEXT_AUTH) -> Driver:
    driver = ready(policy)
    assert driver.send(AUTH_OK) == ["235 2.7.0 Authentication successful"]
    return driver


def in_transaction(policy: SessionPolicy = RELAY) -> Driver:
    driver = ready(policy)
    driver.send("MAIL FROM:<sender@example.com>", "RCPT TO:<rcpt@example.net>")
    return driver


# -- greeting, EHLO, HELO -------------------------------------------------------


def test_greeting_is_queued_at_construction() -> None:
    assert Driver().greeting == b"220 mx.example.com ESMTP Postlane\r\n"


def test_banner_is_configurable() -> None:
    assert (
        Driver(replace(RELAY, banner="ESMTP ready")).greeting
        == b"220 mx.example.com ESMTP ready\r\n"
    )


BASE_EXTENSIONS = [
    "250-mx.example.com",
    "250-PIPELINING",
    "250-SIZE 52428800",
    "250-8BITMIME",
    "250-SMTPUTF8",
    "250-ENHANCEDSTATUSCODES",
]


def test_ehlo_advertises_extensions_without_auth_before_tls() -> None:
    driver = Driver()
    assert driver.send("EHLO client.example") == [*BASE_EXTENSIONS, "250 CHUNKING"]
    assert driver.events == [Hello("client.example", extended=True)]


def test_ehlo_offers_starttls_when_available_and_auth_once_encrypted() -> None:
    driver = Driver(SUBMISSION)
    assert driver.send("EHLO c")[-2:] == ["250-CHUNKING", "250 STARTTLS"]
    tls = Driver(SUBMISSION, tls=True)
    assert tls.send("EHLO c")[-2:] == ["250-CHUNKING", "250 AUTH PLAIN LOGIN"]


@pytest.mark.parametrize(
    ("policy", "offered"),
    [
        (SessionPolicy(HOST, allow_plaintext_auth=True), True),
        (SessionPolicy(HOST, require_tls_for_auth=False), True),
        (SessionPolicy(HOST, require_tls=True, allow_plaintext_auth=True), False),
        (SessionPolicy(HOST), False),
    ],
)
def test_auth_is_advertised_only_when_permitted(policy: SessionPolicy, offered: bool) -> None:
    assert ("250 AUTH PLAIN LOGIN" in Driver(policy).send("EHLO c")) is offered


def test_size_advertises_the_policy_limit() -> None:
    assert "250-SIZE 1000" in Driver(replace(RELAY, max_message_size=1000)).send("EHLO c")


def test_helo_gives_one_line_and_no_extensions() -> None:
    driver = Driver()
    assert driver.send("HELO client.example") == ["250 mx.example.com"]
    assert driver.events == [Hello("client.example", extended=False)]


@pytest.mark.parametrize(
    "command", ["EHLO", "HELO", "EHLO   ", "EHLO a\rb", "HELO a\x00", "EHLO \x7f"]
)
def test_hello_without_a_usable_name_is_refused(command: str) -> None:
    assert Driver().send(command) == [f"501 5.5.4 Syntax: {command[:4]} hostname"]


@pytest.mark.parametrize(
    "name", [b"cli\xffent", "ex\u00e4mple.com".encode(), b"a\x80", b"a\tb", b"\xc2\xa0"]
)
@pytest.mark.parametrize("verb", [b"EHLO", b"HELO"])
def test_hello_name_outside_printable_ascii_is_refused(verb: bytes, name: bytes) -> None:
    """The name goes into the Received header: non-ASCII there would need 8BITMIME."""
    driver = Driver()
    out = lines_of(driver.feed(verb + b" " + name + b"\r\n"))
    assert out == [f"501 5.5.4 Syntax: {verb.decode()} hostname"]
    assert not driver.of_type(Hello)


@pytest.mark.parametrize(
    "name", ["[192.0.2.1]", "[IPv6:2001:db8::1]", "localhost", "my_host", "client.example."]
)
def test_hello_names_seen_in_the_wild_are_accepted(name: str) -> None:
    driver = Driver()
    assert driver.send(f"EHLO {name}")[0] == "250-mx.example.com"
    assert driver.events == [Hello(name, extended=True)]


def test_ehlo_ends_the_transaction() -> None:
    driver = in_transaction()
    driver.send("EHLO again")
    assert driver.send("RCPT TO:<x@example.com>") == ["503 5.5.1 Need MAIL command"]


# -- STARTTLS -------------------------------------------------------------------


def test_starttls_refused_when_not_available() -> None:
    assert ready().send("STARTTLS") == ["454 4.7.0 TLS not available"]


def test_starttls_refused_when_already_active() -> None:
    assert ready(SUBMISSION, tls=True).send("STARTTLS") == ["503 5.5.1 TLS already active"]


def test_starttls_takes_no_argument() -> None:
    assert ready(SUBMISSION).send("STARTTLS now") == ["501 5.5.4 Syntax: STARTTLS"]


def test_starttls_discards_pipelined_plaintext_and_resets_the_session() -> None:
    driver = ready(SUBMISSION)
    driver.decide = False
    out = driver.send("STARTTLS", AUTH_OK, "MAIL FROM:<a@b.example>")
    assert out == ["220 2.0.0 Ready to start TLS"]
    assert driver.events[-1] == StartTLS()
    assert driver.send("NOOP") == []  # still plaintext: ignored until the handshake is done
    driver.conn.tls_started()
    assert driver.conn.tls_active
    assert driver.send("MAIL FROM:<a@b.example>") == ["503 5.5.1 Send HELO/EHLO first"]
    assert driver.send("EHLO c")[-1] == "250 AUTH PLAIN LOGIN"
    assert not driver.of_type(AuthAttempt)


def test_starttls_drops_identity_from_plaintext_auth() -> None:
    driver = authenticated(replace(PLAINTEXT_AUTH, starttls_available=True))
    driver.send("STARTTLS")
    driver.conn.tls_started()
    assert driver.conn.authenticated is None


def test_trusted_identity_survives_starttls() -> None:
    driver = ready(SUBMISSION)
    driver.conn.authenticate_as("trusted-net")
    driver.send("STARTTLS")
    driver.conn.tls_started()
    assert driver.conn.authenticated == "trusted-net"


def test_tls_started_without_starttls_is_driver_misuse() -> None:
    with pytest.raises(RuntimeError):
        Driver(SUBMISSION).conn.tls_started()


# -- AUTH -----------------------------------------------------------------------


def test_auth_plain_with_initial_response() -> None:
    driver = authenticated()
    assert driver.of_type(AuthAttempt) == [AuthAttempt("PLAIN", "", "user", "secret")]
    assert driver.conn.authenticated == "user"


def test_auth_plain_with_authzid_and_utf8() -> None:
    driver = ready(PLAINTEXT_AUTH)
    driver.send("auth plain " + b64("admin\0ünï\0pässwörd"))
    assert driver.of_type(AuthAttempt) == [AuthAttempt("PLAIN", "admin", "ünï", "pässwörd")]
    assert driver.conn.authenticated == "ünï"


def test_auth_plain_without_initial_response() -> None:
    driver = ready(PLAINTEXT_AUTH)
    assert driver.send("AUTH PLAIN") == ["334 "]
    assert driver.send(b64("\0user\0secret")) == ["235 2.7.0 Authentication successful"]


@pytest.mark.parametrize("lines", [["AUTH PLAIN ="], ["AUTH PLAIN", ""], ["AUTH PLAIN", "="]])
def test_auth_plain_empty_response_is_malformed(lines: list[str]) -> None:
    out = ready(PLAINTEXT_AUTH).send(*lines)
    assert out[-1] == "501 5.5.2 Cannot decode authentication response"


@pytest.mark.parametrize(
    "response",
    [b64("user\0secret"), b64("\0user\0secret\0"), b64("\0\0secret"), b64("\0user\0")],
)
def test_auth_plain_malformed_message(response: str) -> None:
    out = ready(PLAINTEXT_AUTH).send(f"AUTH PLAIN {response}")
    assert out == ["501 5.5.2 Cannot decode authentication response"]


@pytest.mark.parametrize("response", ["not-base64!", "AGZvbwBiYXI", "=AAAA", "/w==", "AP8A/w=="])
def test_auth_bad_base64_or_utf8(response: str) -> None:
    out = ready(PLAINTEXT_AUTH).send(f"AUTH PLAIN {response}")
    assert out == ["501 5.5.2 Cannot decode authentication response"]


def test_auth_login_without_initial_response() -> None:
    driver = ready(PLAINTEXT_AUTH)
    assert driver.send("AUTH LOGIN") == ["334 VXNlcm5hbWU6"]
    assert driver.send(b64("user")) == ["334 UGFzc3dvcmQ6"]
    assert driver.send(b64("secret")) == ["235 2.7.0 Authentication successful"]
    assert driver.of_type(AuthAttempt) == [AuthAttempt("LOGIN", "", "user", "secret")]


def test_auth_login_with_initial_response() -> None:
    driver = ready(PLAINTEXT_AUTH)
    assert driver.send(f"AUTH LOGIN {b64('user')}") == ["334 UGFzc3dvcmQ6"]
    assert driver.send(b64("secret")) == ["235 2.7.0 Authentication successful"]


@pytest.mark.parametrize("lines", [["AUTH LOGIN ="], ["AUTH LOGIN", b64("user"), ""]])
def test_auth_login_empty_username_or_password(lines: list[str]) -> None:
    out = ready(PLAINTEXT_AUTH).send(*lines)
    assert out[-1] == "501 5.5.2 Cannot decode authentication response"


@pytest.mark.parametrize(
    "lines", [["AUTH PLAIN", "*"], ["AUTH LOGIN", "*"], ["AUTH LOGIN", b64("user"), "*"]]
)
def test_auth_cancelled(lines: list[str]) -> None:
    driver = ready(PLAINTEXT_AUTH)
    assert driver.send(*lines)[-1] == "501 5.7.0 Authentication cancelled"
    assert driver.send("NOOP") == ["250 2.0.0 Ok"]
    assert not driver.of_type(AuthAttempt)


def test_auth_wrong_password_gets_535() -> None:
    driver = ready(PLAINTEXT_AUTH)
    out = driver.send("AUTH PLAIN " + b64("\0user\0wrong"))
    assert out == ["535 5.7.8 Authentication credentials invalid"]
    assert driver.conn.authenticated is None


def test_auth_failed_with_a_custom_reply() -> None:
    driver = ready(PLAINTEXT_AUTH)
    driver.decide = False
    driver.send(AUTH_OK)
    driver.conn.auth_failed(Reply(454, "4.7.0", ("Temporary authentication failure",)))
    assert lines_of(driver.conn.data_to_send()) == ["454 4.7.0 Temporary authentication failure"]


def test_auth_failed_with_a_success_code_is_driver_misuse() -> None:
    driver = ready(PLAINTEXT_AUTH)
    driver.decide = False
    driver.send(AUTH_OK)
    with pytest.raises(RuntimeError):
        driver.conn.auth_failed(Reply(235, "2.7.0", ("fine",)))
    assert driver.conn.pending


def test_auth_unknown_mechanism() -> None:
    assert ready(PLAINTEXT_AUTH).send("AUTH CRAM-MD5") == [
        "504 5.5.4 Unrecognized authentication type"
    ]


def test_auth_twice() -> None:
    out = authenticated().send(AUTH_OK)
    assert out == ["503 5.5.1 Already authenticated"]


def test_auth_inside_a_transaction() -> None:
    driver = in_transaction(replace(RELAY, allow_plaintext_auth=True))
    out = driver.send(AUTH_OK)
    assert out == ["503 5.5.1 AUTH not permitted during a mail transaction"]


def test_auth_before_ehlo() -> None:
    driver = Driver(PLAINTEXT_AUTH)
    driver.send("HELO c")
    assert driver.send("AUTH PLAIN") == ["503 5.5.1 Send EHLO first"]


def test_auth_without_mechanism() -> None:
    out = ready(PLAINTEXT_AUTH).send("AUTH")
    assert out == ["501 5.5.4 Syntax: AUTH mechanism [initial-response]"]


def test_auth_without_tls_when_tls_is_required_for_auth() -> None:
    out = ready(SUBMISSION).send(AUTH_OK)
    assert out == ["538 5.7.11 Encryption required for requested authentication mechanism"]


def test_auth_on_a_listener_that_requires_starttls() -> None:
    policy = replace(SUBMISSION, require_tls=True, allow_plaintext_auth=True)
    assert ready(policy).send("AUTH LOGIN") == ["530 5.7.0 Must issue a STARTTLS command first"]


def test_auth_after_starttls() -> None:
    driver = ready(SUBMISSION)
    driver.send("STARTTLS")
    driver.conn.tls_started()
    driver.send("EHLO c")
    assert driver.send(AUTH_OK) == ["235 2.7.0 Authentication successful"]


def test_auth_line_longer_than_the_auth_limit() -> None:
    driver = ready(replace(PLAINTEXT_AUTH, max_auth_line=100))
    assert driver.send("AUTH PLAIN") == ["334 "]
    assert driver.send("A" * 200) == ["500 5.5.6 Authentication Exchange line is too long"]
    assert driver.send("NOOP") == ["250 2.0.0 Ok"]


def test_auth_initial_response_may_be_longer_than_a_command_line() -> None:
    driver = ready(replace(PLAINTEXT_AUTH, max_command_line=64, max_auth_line=200))
    CREDENTIALS["long"] = "p" * 100
    try:
        line = "AUTH PLAIN " + b64("\0long\0" + "p" * 100)
        assert driver.send(line) == ["235 2.7.0 Authentication successful"]
    finally:
        del CREDENTIALS["long"]


def test_auth_command_longer_than_the_auth_limit() -> None:
    driver = ready(replace(PLAINTEXT_AUTH, max_command_line=64, max_auth_line=200))
    out = driver.send("AUTH PLAIN " + "A" * 300, "NOOP")
    assert out == ["500 5.5.6 Authentication Exchange line is too long", "250 2.0.0 Ok"]


def test_auth_lines_may_be_longer_than_commands() -> None:
    driver = ready(replace(PLAINTEXT_AUTH, max_command_line=64))
    password = "p" * 500
    CREDENTIALS["long"] = password
    try:
        driver.send("AUTH PLAIN")
        assert driver.send(b64("\0long\0" + password)) == ["235 2.7.0 Authentication successful"]
    finally:
        del CREDENTIALS["long"]


def test_credentials_never_appear_in_repr() -> None:
    attempt = AuthAttempt("PLAIN", "", "user", "hunter2")
    assert "hunter2" not in repr(attempt)
    assert "hunter2" not in str(attempt)
    assert "user" in repr(attempt)


# -- MAIL -----------------------------------------------------------------------


def test_mail_accepted() -> None:
    driver = ready()
    assert driver.send("MAIL FROM:<sender@example.com>") == ["250 2.1.0 Ok"]
    assert driver.of_type(MailFrom) == [MailFrom("sender@example.com", None, None, False, {})]


def test_mail_with_parameters() -> None:
    driver = ready()
    driver.send("mail from:<s@example.com> size=1000 BODY=8bitmime AUTH=<> SMTPUTF8")
    assert driver.of_type(MailFrom) == [
        MailFrom(
            "s@example.com",
            1000,
            "8BITMIME",
            True,
            {"SIZE": "1000", "BODY": "8bitmime", "AUTH": "<>", "SMTPUTF8": ""},
        )
    ]


def test_mail_null_sender() -> None:
    driver = ready()
    assert driver.send("MAIL FROM:<>") == ["250 2.1.0 Ok"]
    assert driver.of_type(MailFrom)[0].address == ""


def test_mail_tolerates_a_space_after_the_colon() -> None:
    assert ready().send("MAIL FROM: <s@example.com>") == ["250 2.1.0 Ok"]


def test_mail_before_hello() -> None:
    assert Driver().send("MAIL FROM:<s@example.com>") == ["503 5.5.1 Send HELO/EHLO first"]


def test_mail_before_auth_on_submission() -> None:
    assert ready(SUBMISSION, tls=True).send("MAIL FROM:<s@example.com>") == [
        "530 5.7.0 Authentication required"
    ]


def test_mail_before_starttls_when_required() -> None:
    policy = replace(RELAY, require_tls=True, starttls_available=True)
    assert ready(policy).send("MAIL FROM:<s@example.com>") == [
        "530 5.7.0 Must issue a STARTTLS command first"
    ]


def test_mail_after_auth_on_submission() -> None:
    assert authenticated().send("MAIL FROM:<s@example.com>") == ["250 2.1.0 Ok"]


def test_mail_on_a_trusted_connection_needs_no_auth() -> None:
    driver = ready(SUBMISSION)
    driver.conn.authenticate_as("relay-host")
    assert driver.send("MAIL FROM:<s@example.com>") == ["250 2.1.0 Ok"]
    assert driver.send("AUTH PLAIN") == ["503 5.5.1 Already authenticated"]


@pytest.mark.parametrize("command", ["MAIL", "MAIL TO:<s@example.com>", "MAIL FROM<s@example.com>"])
def test_mail_syntax(command: str) -> None:
    assert ready().send(command) == ["501 5.5.4 Syntax: MAIL FROM:<address>"]


@pytest.mark.parametrize(
    "command",
    [
        "MAIL FROM:s@example.com",
        "MAIL FROM:<s@example.com",
        "MAIL FROM:<s@@example.com>",
        "MAIL FROM:<s@example.com>SIZE=1",
        "MAIL FROM:<postmaster>",
    ],
)
def test_mail_bad_address(command: str) -> None:
    assert ready().send(command) == ["501 5.1.7 Bad sender address syntax"]


def test_mail_address_with_invalid_utf8() -> None:
    driver = ready()
    assert lines_of(driver.feed(b"MAIL FROM:<\xff@example.com> SMTPUTF8\r\n")) == [
        "501 5.1.7 Bad sender address syntax"
    ]


def test_mail_size_over_the_limit() -> None:
    out = ready(replace(RELAY, max_message_size=1000)).send("MAIL FROM:<s@example.com> SIZE=1001")
    assert out == ["552 5.3.4 Message size exceeds fixed maximum message size"]


LONG_LINES = replace(RELAY, max_command_line=8192)


def test_mail_size_with_more_digits_than_int_reads_is_too_big() -> None:
    """int() refuses over 4300 digits: this raised out of receive_data()."""
    driver = ready(LONG_LINES)
    out = driver.send("MAIL FROM:<a@b.c> SIZE=" + "9" * 4301)
    assert out == ["552 5.3.4 Message size exceeds fixed maximum message size"]
    assert driver.send("NOOP") == ["250 2.0.0 Ok"]


def test_mail_size_with_many_leading_zeros_is_its_value() -> None:
    driver = ready(LONG_LINES)
    assert driver.send("MAIL FROM:<a@b.c> SIZE=" + "0" * 4301 + "1000") == ["250 2.1.0 Ok"]
    assert driver.of_type(MailFrom)[0].size == 1000


@pytest.mark.parametrize(
    "size", ["SIZE", "SIZE=", "SIZE=abc", "SIZE=-1", "SIZE=١٢", "SIZE=" + "9" * 4301 + "x"]
)
def test_mail_size_malformed(size: str) -> None:
    out = ready(LONG_LINES).send(f"MAIL FROM:<s@example.com> {size}")
    assert out[0].startswith("501 5.5.4")


@pytest.mark.parametrize("body", ["BODY=BINARYMIME", "BODY=", "BODY=8BIT"])
def test_mail_body_must_be_7bit_or_8bitmime(body: str) -> None:
    out = ready().send(f"MAIL FROM:<s@example.com> {body}")
    assert out[0].startswith("501 5.5.4")


def test_mail_unknown_parameter() -> None:
    out = ready().send("MAIL FROM:<s@example.com> RET=FULL")
    assert out == ["555 5.5.4 Unsupported parameter RET"]


@pytest.mark.parametrize("params", ["SIZE=1 size=2", "=x", "-X=1", "X=a=b", "SMTPUTF8=yes"])
def test_mail_malformed_parameters(params: str) -> None:
    assert ready().send(f"MAIL FROM:<s@example.com> {params}")[0].startswith("501 5.5.4")


def test_mail_non_ascii_needs_smtputf8() -> None:
    driver = ready()
    assert driver.send("MAIL FROM:<ü@example.com>") == [
        "553 5.6.7 Non-ASCII address requires SMTPUTF8"
    ]
    assert driver.send("MAIL FROM:<ü@exämple.com> SMTPUTF8") == ["250 2.1.0 Ok"]


def test_mail_nested() -> None:
    driver = ready()
    driver.send("MAIL FROM:<s@example.com>")
    assert driver.send("MAIL FROM:<s@example.com>") == ["503 5.5.1 Nested MAIL command"]


def test_mail_refused_by_the_driver() -> None:
    driver = ready()
    driver.refuse["s@example.com"] = Reply(550, "5.7.1", ("Sender not authorised",))
    assert driver.send("MAIL FROM:<s@example.com>") == ["550 5.7.1 Sender not authorised"]
    assert driver.send("RCPT TO:<r@example.net>") == ["503 5.5.1 Need MAIL command"]


def test_answer_message_with_an_intermediate_reply_is_driver_misuse() -> None:
    driver = in_transaction()
    driver.decide = False
    driver.send("DATA", "x", ".")
    with pytest.raises(RuntimeError):
        driver.conn.answer_message(Reply(354, None, ("more?",)))
    assert driver.conn.pending


def test_answer_with_a_success_reply_is_driver_misuse() -> None:
    driver = ready()
    driver.decide = False
    driver.send("MAIL FROM:<s@example.com>")
    with pytest.raises(RuntimeError):
        driver.conn.answer(Reply(250, "2.1.0", ("fine",)))


@pytest.mark.parametrize(
    "call",
    [
        lambda c: c.answer(),
        lambda c: c.answer_message(QUEUED),
        lambda c: c.auth_succeeded("user"),
        lambda c: c.auth_failed(),
    ],
)
def test_decisions_with_nothing_pending_are_driver_misuse(call: object) -> None:
    conn = ready().conn
    with pytest.raises(RuntimeError):
        call(conn)  # type: ignore[operator]


# -- RCPT -----------------------------------------------------------------------


def test_rcpt_accepted() -> None:
    driver = ready()
    out = driver.send("MAIL FROM:<s@example.com>", "RCPT TO:<r@example.net>")
    assert out == ["250 2.1.0 Ok", "250 2.1.5 Ok"]
    assert driver.of_type(Rcpt) == [Rcpt("r@example.net", {})]


def test_rcpt_before_mail() -> None:
    assert ready().send("RCPT TO:<r@example.net>") == ["503 5.5.1 Need MAIL command"]


def test_rcpt_postmaster_without_domain() -> None:
    driver = ready()
    out = driver.send("MAIL FROM:<>", "RCPT TO:<Postmaster>")
    assert out[-1] == "250 2.1.5 Ok"
    assert driver.of_type(Rcpt)[0].address == "Postmaster"


@pytest.mark.parametrize(
    "rcpt", ["RCPT TO:<>", "RCPT TO:r@example.net", "RCPT TO:<r@exa_mple.net>"]
)
def test_rcpt_bad_address(rcpt: str) -> None:
    out = ready().send("MAIL FROM:<s@example.com>", rcpt)
    assert out[-1] == "501 5.1.3 Bad recipient address syntax"


def test_rcpt_syntax() -> None:
    out = ready().send("MAIL FROM:<s@example.com>", "RCPT FROM:<r@example.net>")
    assert out[-1] == "501 5.5.4 Syntax: RCPT TO:<address>"


def test_rcpt_parameters_are_not_offered() -> None:
    out = ready().send("MAIL FROM:<s@example.com>", "RCPT TO:<r@example.net> NOTIFY=NEVER")
    assert out[-1] == "555 5.5.4 Unsupported parameter NOTIFY"


def test_rcpt_malformed_parameters() -> None:
    out = ready().send("MAIL FROM:<s@example.com>", "RCPT TO:<r@example.net> =x")
    assert out[-1] == "501 5.5.4 Invalid parameters"


def test_rcpt_non_ascii_needs_smtputf8_on_mail() -> None:
    driver = ready()
    out = driver.send("MAIL FROM:<s@example.com>", "RCPT TO:<δοκιμή@example.net>")
    assert out[-1] == "553 5.6.7 Non-ASCII address requires SMTPUTF8"
    driver.send("RSET", "MAIL FROM:<s@example.com> SMTPUTF8")
    assert driver.send("RCPT TO:<δοκιμή@example.net>") == ["250 2.1.5 Ok"]


def test_rcpt_too_many_recipients_is_not_an_error() -> None:
    driver = ready(replace(RELAY, max_recipients=2, max_errors=2))
    driver.send("MAIL FROM:<s@example.com>")
    out = driver.send(*(f"RCPT TO:<r{i}@example.net>" for i in range(5)))
    assert out == ["250 2.1.5 Ok"] * 2 + ["452 4.5.3 Too many recipients"] * 3
    assert not driver.conn.closed


def test_rcpt_refused_by_the_driver() -> None:
    driver = ready()
    driver.refuse["r@example.net"] = Reply(550, "5.1.1", ("No such user",))
    out = driver.send("MAIL FROM:<s@example.com>", "RCPT TO:<r@example.net>")
    assert out[-1] == "550 5.1.1 No such user"


# -- DATA -----------------------------------------------------------------------


def message(driver: Driver) -> MessageReceived:
    (received,) = driver.of_type(MessageReceived)
    return received


def test_data_delivers_the_message() -> None:
    driver = in_transaction()
    driver.send("RCPT TO:<second@example.net>")
    assert driver.send("DATA") == ["354 End data with <CR><LF>.<CR><LF>"]
    assert driver.send("Subject: hi", "", "body", ".") == ["250 2.0.0 Ok: queued"]
    assert message(driver) == MessageReceived(
        "sender@example.com",
        ("rcpt@example.net", "second@example.net"),
        b"Subject: hi\r\n\r\nbody\r\n",
        None,
        False,
    )


def test_data_carries_body_and_smtputf8_from_mail() -> None:
    driver = ready()
    driver.send("MAIL FROM:<s@example.com> BODY=8BITMIME SMTPUTF8", "RCPT TO:<r@example.net>")
    driver.send("DATA", "x", ".")
    assert (message(driver).body, message(driver).smtputf8) == ("8BITMIME", True)


def test_data_without_mail() -> None:
    assert ready().send("DATA") == ["503 5.5.1 Need MAIL command"]


def test_data_without_rcpt() -> None:
    assert ready().send("MAIL FROM:<s@example.com>", "DATA")[-1] == "503 5.5.1 Need RCPT command"


def test_data_when_every_rcpt_was_refused() -> None:
    driver = ready()
    driver.refuse["r@example.net"] = Reply(550, "5.1.1", ("No such user",))
    out = driver.send("MAIL FROM:<s@example.com>", "RCPT TO:<r@example.net>", "DATA")
    assert out[-1] == "554 5.5.1 No valid recipients"


def test_data_takes_no_argument() -> None:
    assert in_transaction().send("DATA now") == ["501 5.5.4 Syntax: DATA"]


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (b"..\r\n", b".\r\n"),
        (b"..leading\r\n", b".leading\r\n"),
        (b"a\r\n..\r\nb\r\n", b"a\r\n.\r\nb\r\n"),
        (b"a\r\n...x\r\n", b"a\r\n..x\r\n"),
        (b"a\r\n..\r\n..\r\n", b"a\r\n.\r\n.\r\n"),
        (b"\r\n", b"\r\n"),
        (b"a.\r\n.b\r\n", b"a.\r\nb\r\n"),
        (b"bare\nlf\n", b"bare\nlf\n\r\n"),
        (b"no final newline", b"no final newline\r\n"),
    ],
)
def test_data_is_dot_unstuffed(content: bytes, expected: bytes) -> None:
    driver = in_transaction()
    driver.send("DATA")
    terminator = b".\r\n" if content.endswith(b"\r\n") else b"\r\n.\r\n"
    driver.feed(content + terminator)
    assert message(driver).data == expected


def test_data_empty_message() -> None:
    driver = in_transaction()
    assert lines_of(driver.feed(b"DATA\r\n.\r\nNOOP\r\n")) == [
        "354 End data with <CR><LF>.<CR><LF>",
        "250 2.0.0 Ok: queued",
        "250 2.0.0 Ok",
    ]
    assert message(driver).data == b""


@pytest.mark.parametrize(
    ("fake_end", "kept"),
    [
        (b"\n.\n", b"\n.\n"),
        (b"\r.\r", b"\r.\r"),
        (b"\n.\r\n", b"\n.\r\n"),
        # After a real CRLF the dot starts a line, and RFC 5321 section 4.5.2
        # removes the first period of such a line; the rest stays content.
        (b"\r\n.\n", b"\r\n\n"),
        (b"\r\n.\r", b"\r\n\r"),
    ],
)
def test_data_smuggling_sequences_are_content(fake_end: bytes, kept: bytes) -> None:
    driver = in_transaction()
    smuggled = b"MAIL FROM:<evil@example.org>\r\nRCPT TO:<victim@example.net>\r\nDATA\r\n"
    out = driver.feed(b"DATA\r\nreal" + fake_end + smuggled + b"spoofed\r\n.\r\n")
    assert lines_of(out) == ["354 End data with <CR><LF>.<CR><LF>", "250 2.0.0 Ok: queued"]
    assert message(driver).data == b"real" + kept + smuggled + b"spoofed\r\n"
    assert len(driver.of_type(MailFrom)) == 1


@pytest.mark.parametrize("first_line", [b".\n", b".\r", b".\rX\r\n", b".\n.\r\n"])
def test_data_first_line_dot_without_crlf_is_content(first_line: bytes) -> None:
    driver = in_transaction()
    driver.feed(b"DATA\r\n" + first_line)
    assert not driver.of_type(MessageReceived)
    driver.feed(b"\r\n.\r\n")
    assert len(driver.of_type(MessageReceived)) == 1


def test_data_terminator_split_at_every_point() -> None:
    content = b"line one\r\nline two\r\n"
    stream = b"DATA\r\n" + content + b".\r\nNOOP\r\n"
    for cut in range(len(stream) + 1):
        driver = in_transaction()
        out = feed_in_two(driver, stream, cut)
        assert lines_of(out)[-2:] == ["250 2.0.0 Ok: queued", "250 2.0.0 Ok"]
        assert message(driver).data == content


def test_data_refused_by_the_driver_ends_the_transaction() -> None:
    driver = in_transaction()
    driver.message_reply = Reply(554, "5.7.1", ("Message refused",))
    assert driver.send("DATA", "x", ".")[-1] == "554 5.7.1 Message refused"
    assert driver.send("RCPT TO:<r@example.net>") == ["503 5.5.1 Need MAIL command"]


def test_session_survives_the_message() -> None:
    driver = authenticated()
    driver.send("MAIL FROM:<s@example.com>", "RCPT TO:<r@example.net>", "DATA", "one", ".")
    out = driver.send("MAIL FROM:<s@example.com>", "RCPT TO:<r2@example.net>", "DATA", "two", ".")
    assert out[-1] == "250 2.0.0 Ok: queued"
    assert [m.recipients for m in driver.of_type(MessageReceived)] == [
        ("r@example.net",),
        ("r2@example.net",),
    ]


def test_data_at_exactly_the_size_limit_is_accepted() -> None:
    driver = in_transaction(replace(RELAY, max_message_size=100))
    driver.send("DATA")
    driver.feed(b"x" * 98 + b"\r\n.\r\n")
    assert len(message(driver).data) == 100


# RFC 1870: the size is the message's, without the dots DATA adds for
# transparency. These have 20 octets, and stuffed 21 and 25: the second is held
# over the limit of 20 before its terminator arrives. TOO_BIG's have 21.
EXACTLY_20 = [b"Subject: x\r\n\r\n.abc\r\n", b".\r\n.\r\n.\r\n.\r\n.ab\r\nc\r\n"]
TOO_BIG = [b"Subject: x\r\n\r\n.abcd\r\n", b".\r\n.\r\n.\r\n.\r\n.ab\r\ncd\r\n"]


def stuffed(content: bytes) -> bytes:
    """What a client sends in DATA for ``content`` (RFC 5321 section 4.5.2)."""
    text = content.replace(b"\r\n.", b"\r\n..")
    return b"." + text if text.startswith(b".") else text


QUEUED_LINE = "250 2.0.0 Ok: queued"
TOO_BIG_LINE = "552 5.3.4 Message size exceeds fixed maximum message size"


@pytest.mark.parametrize(
    ("content", "reply"),
    [(c, QUEUED_LINE) for c in EXACTLY_20] + [(c, TOO_BIG_LINE) for c in TOO_BIG],
)
def test_data_size_limit_does_not_count_stuffing_dots(content: bytes, reply: str) -> None:
    """20 octets are taken whatever the stuffing, 21 refused, however the stream is split."""
    stream = b"DATA\r\n" + stuffed(content) + b".\r\nNOOP\r\n"
    for cut in range(len(stream) + 1):
        driver = in_transaction(replace(RELAY, max_message_size=20))
        out = feed_in_two(driver, stream, cut)
        assert lines_of(out)[-2:] == [reply, "250 2.0.0 Ok"], cut
        taken = [event.data for event in driver.of_type(MessageReceived)]
        assert taken == ([content] if reply == QUEUED_LINE else []), cut


@pytest.mark.parametrize("piece", [1, 2, 3, 5])
def test_data_size_limit_without_stuffing_dots_in_small_reads(piece: int) -> None:
    """Held over the limit, the dots are counted as reads come: none missed, none twice."""
    content = b"." + b"x\r\n." * 30 + b"\r\n"
    stream = b"DATA\r\n" + stuffed(content) + b".\r\n"
    for limit in (len(content), len(content) - 1):
        driver = in_transaction(replace(RELAY, max_message_size=limit))
        out = b"".join(driver.feed(stream[at : at + piece]) for at in range(0, len(stream), piece))
        accepted = limit == len(content)
        assert lines_of(out)[-1].startswith("250" if accepted else "552"), limit


def test_data_over_the_size_limit_with_stuffing_dots_is_not_buffered() -> None:
    policy = replace(RELAY, max_message_size=100)
    driver = in_transaction(policy)
    driver.send("DATA")
    chunk = b"..\r\n"  # a line of one dot: 4 octets sent, 3 in the message
    most = 0
    for _ in range(200):
        assert driver.feed(chunk) == b""
        most = max(most, len(driver.conn._buf))
    out = driver.feed(b".\r\n")
    assert lines_of(out) == ["552 5.3.4 Message size exceeds fixed maximum message size"]
    assert most <= policy.max_message_size * 4 // 3 + 2 * len(chunk)


@pytest.mark.parametrize(
    ("content", "accepted"), [(c, True) for c in EXACTLY_20] + [(c, False) for c in TOO_BIG]
)
def test_data_and_bdat_agree_on_the_size_limit(content: bytes, accepted: bool) -> None:
    policy = replace(RELAY, max_message_size=20)
    data = in_transaction(policy).feed(b"DATA\r\n" + stuffed(content) + b".\r\n")
    bdat = in_transaction(policy).feed(b"BDAT %d LAST\r\n" % len(content) + content)
    assert lines_of(data)[-1] == lines_of(bdat)[-1]
    assert lines_of(bdat)[-1].startswith("250" if accepted else "552")


def test_data_over_the_size_limit_is_read_and_refused() -> None:
    policy = replace(RELAY, max_message_size=100)
    driver = in_transaction(policy)
    driver.send("DATA")
    chunk = b"0123456789" * 3 + b"\r\n"
    most = 0
    for _ in range(50):
        assert driver.feed(chunk) == b""
        most = max(most, len(driver.conn._buf))
    out = driver.feed(b".\r\nNOOP\r\n")
    assert lines_of(out) == [
        "552 5.3.4 Message size exceeds fixed maximum message size",
        "250 2.0.0 Ok",
    ]
    assert not driver.of_type(MessageReceived)
    assert most <= policy.max_message_size + len(chunk)
    assert driver.send("RCPT TO:<r@example.net>") == ["503 5.5.1 Need MAIL command"]


def test_oversized_data_terminator_split_across_reads_is_found() -> None:
    driver = in_transaction(replace(RELAY, max_message_size=10))
    driver.send("DATA")
    driver.feed(b"x" * 50 + b"\r\n.")
    out = driver.feed(b"\r\n")
    assert lines_of(out) == ["552 5.3.4 Message size exceeds fixed maximum message size"]


def test_oversized_data_keeps_smuggling_protection() -> None:
    driver = in_transaction(replace(RELAY, max_message_size=10))
    driver.send("DATA")
    driver.feed(b"x" * 50)
    assert driver.feed(b"\n.\r\nNOOP\n") == b""
    assert driver.feed(b".\r\n") == b""  # a dot line after a bare LF is still content
    out = driver.feed(b"\r\n.\r\n")
    assert lines_of(out) == ["552 5.3.4 Message size exceeds fixed maximum message size"]


def test_large_message_in_many_reads() -> None:
    driver = in_transaction()
    driver.send("DATA")
    line = b"x" * 998 + b"\r\n"
    for _ in range(2000):
        driver.feed(line)
    driver.feed(b".\r\n")
    assert len(message(driver).data) == 2000 * len(line)


# -- BDAT -----------------------------------------------------------------------


def test_bdat_single_last_chunk_is_not_unstuffed() -> None:
    driver = in_transaction()
    content = b"Subject: x\r\n\r\n..\r\n.\r\n"
    out = driver.feed(b"BDAT %d LAST\r\n" % len(content) + content)
    assert lines_of(out) == ["250 2.0.0 Ok: queued"]
    assert message(driver).data == content


def test_bdat_several_chunks() -> None:
    driver = in_transaction()
    out = driver.feed(b"BDAT 5\r\nhelloBDAT 6\r\n world")
    assert lines_of(out) == ["250 2.0.0 5 octets received", "250 2.0.0 6 octets received"]
    out = driver.feed(b"bdat 0 last\r\n")
    assert lines_of(out) == ["250 2.0.0 Ok: queued"]
    assert message(driver).data == b"hello world"


def test_bdat_chunk_split_across_reads_with_pipelined_commands_after() -> None:
    stream = b"BDAT 10 LAST\r\n0123456789NOOP\r\nMAIL FROM:<s@example.com>\r\n"
    for cut in range(len(stream) + 1):
        driver = in_transaction()
        out = feed_in_two(driver, stream, cut)
        assert lines_of(out) == ["250 2.0.0 Ok: queued", "250 2.0.0 Ok", "250 2.1.0 Ok"]
        assert message(driver).data == b"0123456789"


def test_bdat_without_mail_consumes_the_chunk() -> None:
    driver = ready()
    out = driver.feed(b"BDAT 6\r\nQUIT\r\nNOOP\r\n")
    assert lines_of(out) == ["503 5.5.1 Need MAIL command", "250 2.0.0 Ok"]
    assert not driver.conn.closed


def test_bdat_without_rcpt() -> None:
    driver = ready()
    driver.send("MAIL FROM:<s@example.com>")
    assert lines_of(driver.feed(b"BDAT 1 LAST\r\nx")) == ["503 5.5.1 Need RCPT command"]


def test_bdat_when_every_rcpt_was_refused() -> None:
    driver = ready()
    driver.refuse["r@example.net"] = Reply(550, "5.1.1", ("No such user",))
    driver.send("MAIL FROM:<s@example.com>", "RCPT TO:<r@example.net>")
    assert lines_of(driver.feed(b"BDAT 1 LAST\r\nx")) == ["554 5.5.1 No valid recipients"]


def test_data_after_bdat() -> None:
    driver = in_transaction()
    driver.feed(b"BDAT 1\r\nx")
    assert driver.send("DATA") == ["503 5.5.1 DATA not permitted after BDAT"]


def test_rcpt_after_bdat() -> None:
    driver = in_transaction()
    driver.feed(b"BDAT 1\r\nx")
    assert driver.send("RCPT TO:<more@example.net>") == ["503 5.5.1 RCPT not permitted after BDAT"]


def test_bdat_over_the_size_limit_is_consumed_and_ends_the_transaction() -> None:
    driver = in_transaction(replace(RELAY, max_message_size=10))
    out = driver.feed(b"BDAT 6\r\n012345BDAT 6\r\n6789ab")
    assert lines_of(out) == [
        "250 2.0.0 6 octets received",
        "552 5.3.4 Message size exceeds fixed maximum message size",
    ]
    out = driver.feed(b"BDAT 2 LAST\r\nQUIT")
    assert lines_of(out) == ["503 5.5.1 Need MAIL command"]
    assert not driver.of_type(MessageReceived)


def test_bdat_oversized_chunk_is_never_buffered() -> None:
    driver = in_transaction(replace(RELAY, max_message_size=10))
    out = driver.feed(b"BDAT 100000 LAST\r\n")
    for _ in range(100):
        out += driver.feed(b"x" * 1000)
        assert len(driver.conn._buf) == 0
    assert lines_of(out) == ["552 5.3.4 Message size exceeds fixed maximum message size"]


def test_bdat_count_with_more_digits_than_int_reads_is_an_oversized_chunk() -> None:
    """int() refuses over 4300 digits: this raised out of receive_data().

    Like any oversized chunk it is read and discarded; one this long never ends.
    """
    driver = in_transaction(LONG_LINES)
    out = driver.feed(b"BDAT " + b"9" * 4301 + b" LAST\r\n")
    for _ in range(10):
        out += driver.feed(b"x" * 1000 + b"\r\nQUIT\r\n")
        assert len(driver.conn._buf) == 0
    assert out == b""
    assert not driver.of_type(MessageReceived)
    driver.feed(b"")
    assert driver.events[-1] == CloseRequested("peer closed")


def test_bdat_count_with_many_leading_zeros_is_its_value() -> None:
    driver = in_transaction(LONG_LINES)
    out = driver.feed(b"BDAT " + b"0" * 4301 + b"5 LAST\r\nhelloNOOP\r\n")
    assert lines_of(out) == ["250 2.0.0 Ok: queued", "250 2.0.0 Ok"]
    assert message(driver).data == b"hello"


@pytest.mark.parametrize(
    "command",
    ["BDAT", "BDAT x", "BDAT 1 FIRST", "BDAT -1", "BDAT 1 LAST more", "BDAT " + "9" * 4301 + "x"],
)
def test_bdat_syntax(command: str) -> None:
    assert in_transaction(LONG_LINES).send(command) == ["501 5.5.4 Syntax: BDAT size [LAST]"]


def test_bdat_syntax_error_ends_the_transaction() -> None:
    driver = in_transaction()
    driver.feed(b"BDAT 3\r\nabc")
    driver.send("BDAT x")
    assert lines_of(driver.feed(b"BDAT 1 LAST\r\nz")) == ["503 5.5.1 Need MAIL command"]


@pytest.mark.parametrize(
    ("stream", "reason"),
    [
        (b"DATA\r\n" + b"x" * 20 + b"\r\n.\r\n", "message too big"),
        (b"BDAT x\r\n", "BDAT syntax error"),
        (b"BDAT 20 LAST\r\n" + b"x" * 20, "BDAT chunk refused"),
        (b"BDAT 5\r\nhelloBDAT 6\r\n world", "BDAT chunk refused"),
    ],
)
@pytest.mark.parametrize("piece", [1, 1000])
def test_a_transaction_the_engine_ends_is_announced(stream: bytes, reason: str, piece: int) -> None:
    """Without the event the driver kept the envelope's state into the next transaction."""
    driver = in_transaction(replace(RELAY, max_message_size=10))
    for at in range(0, len(stream), piece):
        driver.feed(stream[at : at + piece])
    assert driver.events[-1] == TransactionAborted(reason)
    assert driver.send("RCPT TO:<r@example.net>") == ["503 5.5.1 Need MAIL command"]


def test_a_refused_chunk_with_no_transaction_announces_none() -> None:
    driver = ready()
    driver.feed(b"BDAT x\r\nBDAT 1 LAST\r\nx")
    assert not driver.of_type(TransactionAborted)


def test_bdat_empty_last_chunk() -> None:
    driver = in_transaction()
    assert driver.send("BDAT 0 LAST") == ["250 2.0.0 Ok: queued"]
    assert message(driver).data == b""


# -- other commands -------------------------------------------------------------


def test_rset() -> None:
    driver = in_transaction()
    assert driver.send("RSET") == ["250 2.0.0 Ok"]
    assert driver.events[-1] == Reset()
    assert driver.send("RCPT TO:<r@example.net>") == ["503 5.5.1 Need MAIL command"]


def test_rset_takes_no_argument() -> None:
    assert ready().send("RSET now") == ["501 5.5.4 Syntax: RSET"]


@pytest.mark.parametrize(
    ("command", "reply"),
    [
        ("NOOP", "250 2.0.0 Ok"),
        ("noop anything", "250 2.0.0 Ok"),
        ("VRFY user", "252 2.5.0 Cannot VRFY user, but will accept message and attempt delivery"),
        ("HELP", "214 2.0.0 Commands: EHLO HELO STARTTLS AUTH MAIL RCPT DATA BDAT RSET NOOP QUIT"),
        ("EXPN list", "502 5.5.1 EXPN not supported"),
        ("TURN", "500 5.5.1 Command unrecognized"),
        ("", "500 5.5.1 Command unrecognized"),
        ("MAILFROM:<a@b.c>", "500 5.5.1 Command unrecognized"),
    ],
)
def test_simple_commands(command: str, reply: str) -> None:
    assert Driver().send(command) == [reply]


def test_quit() -> None:
    driver = ready()
    assert driver.send("QUIT", "NOOP") == ["221 2.0.0 Bye"]
    assert driver.events[-1] == CloseRequested("quit")
    assert driver.conn.closed
    assert driver.send("NOOP") == []


def test_commands_are_case_insensitive() -> None:
    driver = Driver()
    out = driver.send("eHlO c", "mail FROM:<s@example.com>", "Rcpt to:<r@example.net>", "data", ".")
    assert out[-3:] == [
        "250 2.1.5 Ok",
        "354 End data with <CR><LF>.<CR><LF>",
        "250 2.0.0 Ok: queued",
    ]


def test_bare_lf_ends_a_command() -> None:
    driver = Driver()
    out = lines_of(driver.feed(b"EHLO c\nMAIL FROM:<s@example.com>\nRCPT TO:<r@example.net>\n"))
    assert out[-2:] == ["250 2.1.0 Ok", "250 2.1.5 Ok"]


def test_line_too_long_is_refused_and_skipped() -> None:
    driver = ready(replace(RELAY, max_command_line=64))
    out = driver.feed(b"NOOP " + b"x" * 100 + b"QUIT\r\nNOOP\r\n")
    assert lines_of(out) == ["500 5.5.2 Line too long", "250 2.0.0 Ok"]


def test_line_too_long_arriving_in_pieces() -> None:
    driver = ready(replace(RELAY, max_command_line=64))
    out = b"".join(driver.feed(b"y" * 30) for _ in range(10)) + driver.feed(b"QUIT\r\nNOOP\r\n")
    assert lines_of(out) == ["500 5.5.2 Line too long", "250 2.0.0 Ok"]


def test_line_at_the_limit_is_accepted() -> None:
    driver = ready(replace(RELAY, max_command_line=64))
    assert driver.send("NOOP " + "x" * 57) == ["250 2.0.0 Ok"]
    assert driver.send("NOOP " + "x" * 58) == ["500 5.5.2 Line too long"]


def test_too_many_errors_closes_the_connection() -> None:
    driver = ready(replace(RELAY, max_errors=3))
    out = driver.send("BOGUS", "RCPT TO:<r@example.net>", "DATA", "NOOP")
    assert out == [
        "500 5.5.1 Command unrecognized",
        "503 5.5.1 Need MAIL command",
        "503 5.5.1 Need MAIL command",
        "421 4.7.0 Too many errors",
    ]
    assert driver.events[-1] == CloseRequested("too many errors")
    assert driver.conn.closed


def test_permanently_refused_recipients_count_as_errors() -> None:
    # One connection could probe for relaying (554 5.7.1 per RCPT) without end.
    driver = ready(replace(RELAY, max_errors=3))
    denied = Reply(554, "5.7.1", ("Relay access denied",))
    driver.refuse = {f"r{n}@example.net": denied for n in range(3)}
    out = driver.send(
        "MAIL FROM:<s@example.com>", *(f"RCPT TO:<r{n}@example.net>" for n in range(3))
    )
    assert out == [
        "250 2.1.0 Ok",
        "554 5.7.1 Relay access denied",
        "554 5.7.1 Relay access denied",
        "554 5.7.1 Relay access denied",
        "421 4.7.0 Too many errors",
    ]
    assert driver.conn.closed


def test_temporarily_refused_recipients_and_refused_senders_do_not_count() -> None:
    driver = ready(replace(RELAY, max_errors=2))
    busy = Reply(452, "4.5.3", ("Too many recipients",))
    driver.refuse = {
        "s@example.com": Reply(550, "5.7.1", ("Sender not allowed",)),
        **{f"r{n}@example.net": busy for n in range(3)},
    }
    out = driver.send(
        "MAIL FROM:<s@example.com>",
        "MAIL FROM:<s@example.com>",
        "MAIL FROM:<t@example.com>",
        *(f"RCPT TO:<r{n}@example.net>" for n in range(3)),
    )
    assert "421 4.7.0 Too many errors" not in out
    assert not driver.conn.closed


def test_failed_auth_counts_as_an_error() -> None:
    driver = ready(replace(PLAINTEXT_AUTH, max_errors=2))
    wrong = "AUTH PLAIN " + b64("\0user\0guess")
    assert driver.send(wrong, wrong)[-1] == "421 4.7.0 Too many errors"


# -- connection lifecycle -------------------------------------------------------


def test_peer_close() -> None:
    driver = ready()
    assert driver.feed(b"") == b""
    assert driver.events[-1] == CloseRequested("peer closed")
    assert driver.feed(b"NOOP\r\n") == b""


def test_peer_close_mid_message_drops_it() -> None:
    driver = in_transaction()
    driver.send("DATA", "partial")
    driver.feed(b"")
    assert driver.events[-1] == CloseRequested("peer closed")
    assert not driver.of_type(MessageReceived)


def test_peer_close_while_a_decision_is_pending_waits_for_it() -> None:
    driver = in_transaction()
    driver.decide = False
    driver.feed(b"DATA\r\nbody\r\n.\r\nNOOP\r\n")
    driver.feed(b"")
    assert [type(event) for event in driver.events[-2:]] == [Rcpt, MessageReceived]
    driver.conn.answer_message(QUEUED)
    driver.drain()
    assert lines_of(driver.conn.data_to_send())[-2:] == ["250 2.0.0 Ok: queued", "250 2.0.0 Ok"]
    assert driver.events[-1] == CloseRequested("peer closed")


def test_timeout() -> None:
    driver = in_transaction()
    driver.decide = False
    driver.send("DATA", "x", ".")
    driver.conn.timed_out()
    driver.drain()
    assert lines_of(driver.conn.data_to_send()) == ["421 4.4.2 mx.example.com Timeout exceeded"]
    assert driver.events[-1] == CloseRequested("timeout")
    driver.conn.answer_message(QUEUED)  # too late: ignored, not raised
    assert driver.conn.data_to_send() == b""


@pytest.mark.parametrize(
    "call",
    [
        lambda c: c.answer(),
        lambda c: c.answer_message(QUEUED),
        lambda c: c.auth_succeeded("user"),
        lambda c: c.auth_failed(),
        lambda c: c.tls_started(),
        lambda c: c.timed_out(),
    ],
)
def test_calls_after_close_are_ignored(call: object) -> None:
    driver = ready()
    driver.send("QUIT")
    call(driver.conn)  # type: ignore[operator]
    assert driver.conn.data_to_send() == b""
    assert driver.conn.next_event() is None


@pytest.mark.parametrize("command", ["MAIL FROM:<s@example.com>", AUTH_OK])
def test_a_421_from_the_driver_closes_the_session(command: str) -> None:
    driver = ready(replace(RELAY, allow_plaintext_auth=True))
    driver.decide = False
    driver.send(command, "NOOP")
    closing = Reply(421, "4.7.0", ("Try again later",))
    if driver.of_type(MailFrom):
        driver.conn.answer(closing)
    else:
        driver.conn.auth_failed(closing)
    assert lines_of(driver.conn.data_to_send()) == ["421 4.7.0 Try again later"]
    assert driver.conn.next_event() == CloseRequested("service closing")
    assert driver.conn.closed


def test_a_421_answer_to_a_message_closes_the_session() -> None:
    driver = in_transaction()
    driver.message_reply = Reply(421, "4.3.0", ("Queue unavailable",))
    assert driver.send("DATA", "x", ".", "NOOP")[-1] == "421 4.3.0 Queue unavailable"
    assert driver.events[-1] == CloseRequested("service closing")


def test_pending_decision_holds_back_pipelined_commands() -> None:
    driver = ready()
    driver.decide = False
    out = driver.feed(b"MAIL FROM:<s@example.com>\r\nRCPT TO:<r@example.net>\r\nNOOP\r\n")
    assert out == b""
    assert driver.conn.pending
    assert [type(e) for e in driver.events] == [Hello, MailFrom]
    driver.conn.answer()
    driver.drain()
    assert driver.conn.data_to_send() == b"250 2.1.0 Ok\r\n"
    assert isinstance(driver.events[-1], Rcpt)
    driver.conn.answer(Reply(450, "4.2.1", ("Try later",)))
    assert lines_of(driver.conn.data_to_send()) == ["450 4.2.1 Try later", "250 2.0.0 Ok"]


# -- whole sessions -------------------------------------------------------------

SESSION = (
    b"EHLO client.example\r\n" + AUTH_OK.encode() + b"\r\n"
    b"MAIL FROM:<s@example.com> SIZE=100\r\n"
    b"RCPT TO:<a@example.net>\r\n"
    b"RCPT TO:<b@example.net>\r\n"
    b"DATA\r\n"
    b"Subject: one\r\n\r\n..dot\n.\r\r\n.\r\n"
    b"RSET\r\n"
    b"MAIL FROM:<> BODY=8BITMIME\r\n"
    b"RCPT TO:<postmaster>\r\n"
    b"BDAT 7\r\nSubject"
    b"BDAT 5 LAST\r\n: two"
    b"AUTH LOGIN\r\n"
    b"BOGUS\r\n"
    b"VRFY x\r\n"
    b"QUIT\r\n"
)


def run_session(pieces: list[bytes]) -> tuple[bytes, list[Event]]:
    driver = Driver(PLAINTEXT_AUTH)
    out = driver.greeting + b"".join(driver.feed(piece) for piece in pieces)
    return out, driver.events


def test_session_byte_by_byte_equals_one_pipelined_chunk() -> None:
    whole = run_session([SESSION])
    assert run_session([SESSION[i : i + 1] for i in range(len(SESSION))]) == whole
    assert run_session([SESSION[i : i + 7] for i in range(0, len(SESSION), 7)]) == whole
    out, events = whole
    assert lines_of(out)[-5:] == [
        "250 2.0.0 Ok: queued",
        "503 5.5.1 Already authenticated",
        "500 5.5.1 Command unrecognized",
        "252 2.5.0 Cannot VRFY user, but will accept message and attempt delivery",
        "221 2.0.0 Bye",
    ]
    messages = [e for e in events if isinstance(e, MessageReceived)]
    assert [m.data for m in messages] == [b"Subject: one\r\n\r\n.dot\n.\r\r\n", b"Subject: two"]
    assert isinstance(events[-1], CloseRequested)


# -- Reply ----------------------------------------------------------------------


def test_reply_formats_multiline_with_enhanced_code_on_every_line() -> None:
    reply = Reply(550, "5.7.1", ("first", "second"))
    assert reply.to_bytes() == b"550-5.7.1 first\r\n550 5.7.1 second\r\n"
    assert Reply(250, None, ("a", "b")).to_bytes() == b"250-a\r\n250 b\r\n"


@pytest.mark.parametrize(
    ("code", "enhanced", "lines"),
    [
        (250, "2.0.0", ("injected\r\n250 2.0.0 more",)),
        (250, "2.0.0", ("bare\nlf",)),
        (250, "2.0.0", ()),
        (250, "5.0.0", ("class mismatch",)),
        (354, "3.0.0", ("no enhanced class 3",)),
        (250, "2.0", ("short",)),
        (99, None, ("bad code",)),
        (600, None, ("bad code",)),
        (250, "2.0.0", ("nön-ascii",)),
    ],
)
def test_reply_refuses_invalid_values(
    code: int, enhanced: str | None, lines: tuple[str, ...]
) -> None:
    with pytest.raises(ValueError, match=r"."):
        Reply(code, enhanced, lines)
