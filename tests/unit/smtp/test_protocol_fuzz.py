"""Property tests: whatever a client sends, the engine neither raises nor speaks bad SMTP."""

from __future__ import annotations

import base64
import re
from dataclasses import replace
from itertools import cycle

from hypothesis import example, given, settings
from hypothesis import strategies as st

from postlane.smtp.protocol import (
    AuthAttempt,
    CloseRequested,
    Connection,
    Event,
    MailFrom,
    MessageReceived,
    Rcpt,
    Reply,
    SessionPolicy,
    StartTLS,
)

HOST = "mx.example.com"
QUEUED = Reply(250, "2.0.0", ("Ok: queued",))
DENIED = Reply(550, "5.7.1", ("Denied",))
FUZZ = settings(max_examples=300, deadline=None)

POLICIES = st.sampled_from(
    [
        SessionPolicy(HOST, starttls_available=True, max_errors=40),
        SessionPolicy(HOST, allow_plaintext_auth=True, max_errors=5),
        SessionPolicy(HOST, require_tls=True, starttls_available=True, max_errors=40),
        SessionPolicy(
            HOST,
            auth_required=False,
            starttls_available=True,
            max_message_size=64,
            max_recipients=2,
            max_command_line=80,
            max_auth_line=120,
            max_errors=20,
        ),
    ]
)


def b64(text: str) -> bytes:
    return base64.b64encode(text.encode())


GOOD_PLAIN = b"AUTH PLAIN " + b64("\0user\0secret") + b"\r\n"
HELLO = st.sampled_from([b"EHLO client.example\r\n", b"HELO client.example\r\n", b"EHLO\r\n"])
AUTH = st.sampled_from(
    [
        GOOD_PLAIN,
        b"AUTH PLAIN " + b64("\0user\0wrong") + b"\r\n",
        b"AUTH PLAIN\r\n" + b64("\0user\0secret") + b"\r\n",
        b"AUTH PLAIN\r\n*\r\n",
        b"AUTH PLAIN =\r\n",
        b"AUTH LOGIN\r\n" + b64("user") + b"\r\n" + b64("secret") + b"\r\n",
        b"AUTH LOGIN " + b64("user") + b"\r\n" + b64("guess") + b"\r\n",
        b"AUTH LOGIN\r\n" + b64("user") + b"\r\n*\r\n",
        b"AUTH LOGIN\r\n",
        b"AUTH CRAM-MD5\r\n",
    ]
)
SENDER = st.sampled_from(
    [
        b"MAIL FROM:<s@example.com>\r\n",
        b"MAIL FROM:<> SIZE=100 BODY=8BITMIME\r\n",
        b"MAIL FROM:<deny@example.com>\r\n",
        "MAIL FROM:<ü@exämple.com> SMTPUTF8\r\n".encode(),
        "MAIL FROM:<ü@exämple.com>\r\n".encode(),
        b"MAIL FROM:<s@example.com> SIZE=99999999999\r\n",
        b"MAIL FROM:<s@example.com> RET=HDRS\r\n",
        b"MAIL FROM:bad\r\n",
    ]
)
RECIPIENT = st.sampled_from(
    [
        b"RCPT TO:<r@example.net>\r\n",
        b"RCPT TO:<deny@example.net>\r\n",
        b"RCPT TO:<postmaster>\r\n",
        "RCPT TO:<δ@example.net>\r\n".encode(),
        b"RCPT TO:<>\r\n",
    ]
)
CONTENT = st.sampled_from(
    [
        b"",
        b"DATA\r\nSubject: x\r\n\r\nbody\r\n.\r\n",
        b"DATA\r\n.\r\n",
        b"DATA\r\n..stuffed\r\n\n.\nMAIL FROM:<evil@example.org>\r\n\r.\r\r\n.\r\n",
        b"DATA\r\n" + b"y" * 100 + b"\r\n.\r\n",
        b"DATA\r\nunterminated\r\n",
        b"BDAT 5\r\nhelloBDAT 3 LAST\r\nend",
        b"BDAT 0 LAST\r\n",
        b"BDAT 4\r\nabcdDATA\r\n",
        b"BDAT 70 LAST\r\n" + b"z" * 70,
        b"BDAT x\r\n",
    ]
)
TRANSACTION = st.tuples(SENDER, st.lists(RECIPIENT, min_size=1, max_size=4), CONTENT).map(
    lambda parts: parts[0] + b"".join(parts[1]) + parts[2]
)
NOISE = st.sampled_from(
    [
        b"RSET\r\n",
        b"NOOP\r\n",
        b"NOOP\n",
        b"VRFY someone\r\n",
        b"HELP\r\n",
        b"EXPN list\r\n",
        b"BOGUS\r\n",
        b"x" * 100 + b"\r\n",
        b"QUIT\r\n",
    ]
) | st.binary(max_size=24)
STARTTLS = b"STARTTLS\r\n"
# A step: up to two odd commands, then a transaction, so that most sessions
# get as far as message content.
STEP = st.tuples(
    st.lists(st.one_of(HELLO, AUTH, st.just(STARTTLS), NOISE), max_size=2), TRANSACTION
).map(lambda parts: [*parts[0], parts[1]])
# Openings that get far enough for transactions to happen under each policy.
OPENING = st.sampled_from(
    [
        [],
        [b"EHLO client.example\r\n"],
        [b"EHLO client.example\r\n" + GOOD_PLAIN],
        [b"EHLO client.example\r\n", STARTTLS, b"EHLO client.example\r\n" + GOOD_PLAIN],
    ]
)
COMMANDS = st.tuples(OPENING, st.lists(STEP, max_size=6)).map(
    lambda parts: [*parts[0], *(command for step in parts[1] for command in step)]
)
CHUNK_SIZES = st.lists(st.integers(min_value=1, max_value=64), min_size=1, max_size=8)
# int() refuses more than 4300 digits; a long enough command line lets them in.
LONG_LINES = SessionPolicy(HOST, auth_required=False, max_command_line=8192)
HUGE = b"9" * 4301
HUGE_COUNTS = [
    b"EHLO c\r\n",
    b"MAIL FROM:<a@b.c> SIZE=" + HUGE + b"\r\n",
    b"MAIL FROM:<a@b.c>\r\nRCPT TO:<r@example.net>\r\nBDAT " + HUGE + b" LAST\r\nx\r\n",
]

_LINE = re.compile(rb"([2-5][0-9][0-9])([ -])([\t\x20-\x7e]*)\r\n")
_ENHANCED = re.compile(r"([245])\.[0-9]{1,3}\.[0-9]{1,3} ")


class FakeDriver:
    """Answers decisions like a real server would and checks the auth invariant."""

    def __init__(self, policy: SessionPolicy) -> None:
        self.policy = policy
        self.conn = Connection(policy)
        greeting = self.conn.data_to_send()
        assert greeting == f"220 {HOST} ESMTP Postlane\r\n".encode()
        self.out = bytearray()
        self.events: list[Event] = []
        self.auth_succeeded = False

    def feed(self, data: bytes) -> None:
        self.conn.receive_data(data)
        self.drain()

    def feed_in_chunks(self, stream: bytes, sizes: list[int]) -> None:
        pos = 0
        for size in cycle(sizes):
            if pos >= len(stream):
                break
            self.feed(stream[pos : pos + size])
            pos += size

    def drain(self) -> None:
        while (event := self.conn.next_event()) is not None:
            self.events.append(event)
            self.answer(event)
        self.out += self.conn.data_to_send()

    def answer(self, event: Event) -> None:
        conn = self.conn
        if isinstance(event, StartTLS):
            self.out += conn.data_to_send()
            self.auth_succeeded = False  # the session starts over after TLS
            conn.tls_started()
        elif isinstance(event, AuthAttempt):
            if (event.username, event.password) == ("user", "secret"):
                self.auth_succeeded = True
                conn.auth_succeeded(event.username)
            else:
                conn.auth_failed()
        elif isinstance(event, MailFrom | Rcpt):
            conn.answer(DENIED if event.address.startswith("deny") else None)
        elif isinstance(event, MessageReceived):
            assert self.auth_succeeded or not self.policy.auth_required
            conn.answer_message(QUEUED)


def check_replies(data: bytes) -> None:
    """Every byte sent is a well-formed SMTP reply, with enhanced codes where due."""
    pos = 0
    reply: list[tuple[bytes, str]] = []
    while pos < len(data):
        match = _LINE.match(data, pos)
        assert match is not None, data[pos : pos + 80]
        pos = match.end()
        code, separator, text = match.group(1), match.group(2), match.group(3).decode()
        assert not reply or reply[0][0] == code, "a multi-line reply changed its code"
        reply.append((code, text))
        if separator == b" ":
            check_enhanced(reply)
            reply = []
    assert not reply, "the last reply is unfinished"


def check_enhanced(reply: list[tuple[bytes, str]]) -> None:
    code = reply[0][0].decode()
    if reply[0][1] == HOST:  # the EHLO/HELO reply starts with our name instead
        return
    for _, text in reply:
        match = _ENHANCED.match(text)
        if code.startswith("3"):
            assert match is None
        else:
            assert match is not None, f"{code} {text}"
            assert match.group(1) == code[0]


def segments(commands: list[bytes]) -> list[bytes]:
    """Cut the client's stream after each STARTTLS, as a client waits for the 220."""
    cuts: list[bytes] = [b""]
    for command in commands:
        cuts[-1] += command
        if command == STARTTLS:
            cuts.append(b"")
    return cuts


def run(policy: SessionPolicy, commands: list[bytes], sizes: list[int]) -> FakeDriver:
    driver = FakeDriver(policy)
    for segment in segments(commands):
        driver.feed_in_chunks(segment, sizes)
    driver.feed(b"")
    check_replies(bytes(driver.out))
    assert driver.conn.closed
    assert isinstance(driver.events[-1], CloseRequested)
    assert sum(isinstance(event, CloseRequested) for event in driver.events) == 1
    return driver


@FUZZ
@given(policy=POLICIES, chunks=st.lists(st.binary(max_size=200), max_size=20))
def test_arbitrary_bytes(policy: SessionPolicy, chunks: list[bytes]) -> None:
    driver = FakeDriver(policy)
    for chunk in chunks:
        if chunk:
            driver.feed(chunk)
    driver.feed(b"")
    check_replies(bytes(driver.out))
    assert driver.conn.closed


@FUZZ
@given(policy=POLICIES, commands=COMMANDS, sizes=CHUNK_SIZES)
@example(policy=LONG_LINES, commands=HUGE_COUNTS, sizes=[4096])
def test_plausible_sessions(policy: SessionPolicy, commands: list[bytes], sizes: list[int]) -> None:
    driver = run(policy, commands, sizes)
    driver.feed(b"NOOP\r\n")
    assert driver.conn.data_to_send() == b""


@FUZZ
@given(policy=POLICIES, commands=COMMANDS, sizes=CHUNK_SIZES)
def test_how_input_is_split_does_not_matter(
    policy: SessionPolicy, commands: list[bytes], sizes: list[int]
) -> None:
    # Without STARTTLS: after it, what arrived in the same read is dropped by
    # design while later reads are TLS, so there splitting rightly matters.
    policy = replace(policy, starttls_available=False)
    whole = run(policy, commands, [max(1, sum(map(len, commands)))])
    split = run(policy, commands, sizes)
    assert split.out == whole.out
    assert split.events == whole.events


MESSAGE = st.lists(st.sampled_from([b".", b"..", b"\r\n", b"a", b"\r"]), max_size=40).map(
    lambda parts: b"".join(parts) + b"\r\n"
)


@FUZZ
@given(content=MESSAGE, limit=st.integers(min_value=0, max_value=50), sizes=CHUNK_SIZES)
def test_data_and_bdat_agree_on_the_size_limit(
    content: bytes, limit: int, sizes: list[int]
) -> None:
    """RFC 1870: the limit is on the message, not on the dots DATA adds for transparency."""
    policy = SessionPolicy(HOST, auth_required=False, max_message_size=limit)
    opening = b"EHLO c\r\nMAIL FROM:<s@example.com>\r\nRCPT TO:<r@example.net>\r\n"
    text = content.replace(b"\r\n.", b"\r\n..")
    text = b"." + text if text.startswith(b".") else text
    data = FakeDriver(policy)
    data.feed_in_chunks(opening + b"DATA\r\n" + text + b".\r\n", sizes)
    bdat = FakeDriver(policy)
    bdat.feed(opening + b"BDAT %d LAST\r\n" % len(content) + content)
    expected = [content] if len(content) <= limit else []
    for driver in (data, bdat):
        received = [e.data for e in driver.events if isinstance(e, MessageReceived)]
        assert received == expected
