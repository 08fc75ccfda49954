"""The SMTP server protocol as a sans-IO state machine, in the style of h11.

Why not aiosmtpd: we measured it, and aiosmtpd doing nothing (accepting and
discarding mail) is slower than Postfix doing real work (accepting, queueing
and fsyncing it). Postlane is meant to accept mail several times faster than
Postfix, so the per-command cost of the protocol layer is the budget.

Why sans-IO: a :class:`Connection` is fed bytes and hands back events and the
bytes to send; it owns no socket, clock or thread. Every transition can then be
driven byte by byte from a test or a fuzzer, and ``server.py`` stays a thin
loop that cannot get the protocol wrong.

Why the buffer code looks the way it does: all scanning is ``bytes.find`` over
one ``bytearray`` (C speed, no per-byte Python), every complete command in a
buffer is handled in one call so a pipelined burst costs one wake-up, and in
DATA the terminator search resumes where the previous one stopped, so a large
message arriving in many reads is scanned once, not quadratically.

Why the DATA terminator is only ``<CRLF>.<CRLF>``: any laxer reading (bare LF
or bare CR around the dot) lets a sender smuggle a second message past a
filter that reads the terminator strictly (SMTP smuggling, 2023). Bare line
ends stay in the content. Command lines, by contrast, may end in a bare LF,
because many clients send that and nothing is hidden by accepting it.

Driving it::

    conn = Connection(policy)
    send(conn.data_to_send())               # the 220 greeting
    while not conn.closed:
        conn.receive_data(recv())           # b"" when the peer closed
        while (event := conn.next_event()) is not None:
            ...                             # MailFrom -> conn.answer(...), etc.
        send(conn.data_to_send())

While a decision is pending (:attr:`Connection.pending`) the engine processes
no more input; the driver should stop reading from the socket until it answers.
"""

from __future__ import annotations

import binascii
import enum
import re
from collections import deque
from dataclasses import dataclass, field

from postlane.smtp.addresses import AddressError, split_path

__all__ = [
    "AuthAttempt",
    "CloseRequested",
    "Connection",
    "Event",
    "Hello",
    "MailFrom",
    "MessageReceived",
    "Rcpt",
    "Reply",
    "Reset",
    "SessionPolicy",
    "StartTLS",
    "TransactionAborted",
]

_ENHANCED = re.compile(r"[245]\.\d{1,3}\.\d{1,3}")
_REPLY_TEXT = re.compile(r"[\t\x20-\x7e]*")
_NOT_PRINTABLE = re.compile(rb"[^\x20-\x7e]")
_PARAMETER = re.compile(
    r"([A-Za-z0-9][A-Za-z0-9-]*+)(?:=([\x21-\x3c\x3e-\x7e\u0080-\ud7ff\ue000-\U0010ffff]++))?"
)


@dataclass(frozen=True, slots=True)
class Reply:
    """One SMTP reply; validated so a driver's text cannot inject extra lines."""

    code: int
    enhanced: str | None
    lines: tuple[str, ...]

    def __post_init__(self) -> None:
        if not 200 <= self.code <= 599:
            raise ValueError(f"SMTP reply code out of range: {self.code}")
        if self.enhanced is not None and not (
            _ENHANCED.fullmatch(self.enhanced) and self.enhanced[0] == str(self.code)[0]
        ):
            raise ValueError(f"enhanced status {self.enhanced!r} does not fit code {self.code}")
        if not self.lines or not all(_REPLY_TEXT.fullmatch(line) for line in self.lines):
            raise ValueError("reply lines must be one or more lines of printable ASCII")

    def to_bytes(self) -> bytes:
        prefix = "" if self.enhanced is None else self.enhanced + " "
        last = len(self.lines) - 1
        return "".join(
            f"{self.code}{' ' if i == last else '-'}{prefix}{line}\r\n"
            for i, line in enumerate(self.lines)
        ).encode("ascii")


@dataclass(frozen=True, slots=True)
class SessionPolicy:
    """What one listener allows; shared by all its connections."""

    hostname: str
    max_message_size: int = 50 * 1024 * 1024
    max_recipients: int = 1000
    max_errors: int = 10
    max_command_line: int = 2048
    max_auth_line: int = 12288
    starttls_available: bool = False
    require_tls_for_auth: bool = True
    allow_plaintext_auth: bool = False
    auth_required: bool = True
    require_tls: bool = False
    banner: str = "ESMTP Postlane"


@dataclass(frozen=True, slots=True)
class Hello:
    """HELO or EHLO; it also ends any mail transaction (RFC 5321 section 4.1.4)."""

    name: str
    extended: bool


@dataclass(frozen=True, slots=True)
class StartTLS:
    """The 220 is queued: send data_to_send(), do the handshake, call tls_started()."""


@dataclass(frozen=True, slots=True)
class AuthAttempt:
    """Credentials to check; answer with auth_succeeded() or auth_failed()."""

    mechanism: str
    authzid: str
    username: str
    password: str

    def __repr__(self) -> str:
        return (
            f"AuthAttempt(mechanism={self.mechanism!r}, authzid={self.authzid!r}, "
            f"username={self.username!r}, password='********')"
        )


@dataclass(frozen=True, slots=True)
class MailFrom:
    """MAIL FROM; answer() accepts or rejects it. ``address`` is "" for ``<>``."""

    address: str
    size: int | None
    body: str | None
    smtputf8: bool
    params: dict[str, str]


@dataclass(frozen=True, slots=True)
class Rcpt:
    """RCPT TO; answer() accepts or rejects it."""

    address: str
    params: dict[str, str]


@dataclass(frozen=True, slots=True)
class MessageReceived:
    """A complete message (dot-unstuffed, no terminator); reply with answer_message()."""

    mail_from: str
    recipients: tuple[str, ...]
    data: bytes = field(repr=False)
    body: str | None
    smtputf8: bool


@dataclass(frozen=True, slots=True)
class Reset:
    """RSET: the driver drops whatever it holds for the current transaction."""


@dataclass(frozen=True, slots=True)
class TransactionAborted:
    """The engine ended the mail transaction itself and queued the refusal; drop it as on RSET.

    A message over the size limit, a BDAT the engine cannot read or a refused
    BDAT chunk ends the transaction with no command of the client's to say
    so; without this event the driver would keep what it decided for the
    envelope into the next transaction.
    """

    reason: str


@dataclass(frozen=True, slots=True)
class CloseRequested:
    """Flush data_to_send(), then close the connection."""

    reason: str


Event = (
    Hello
    | StartTLS
    | AuthAttempt
    | MailFrom
    | Rcpt
    | MessageReceived
    | Reset
    | TransactionAborted
    | CloseRequested
)
_Decision = AuthAttempt | MailFrom | Rcpt | MessageReceived


class _Mode(enum.Enum):
    COMMAND = enum.auto()
    SASL = enum.auto()
    DATA = enum.auto()
    BDAT = enum.auto()
    SKIP_LINE = enum.auto()
    TLS_WAIT = enum.auto()


class _Sasl(enum.Enum):
    PLAIN = enum.auto()
    LOGIN_USERNAME = enum.auto()
    LOGIN_PASSWORD = enum.auto()


def _reply(code: int, enhanced: str, text: str) -> bytes:
    return Reply(code, enhanced, (text,)).to_bytes()


# Replies the engine gives itself, encoded once: sending one is a list append.
_OK = _reply(250, "2.0.0", "Ok")
_MAIL_OK = _reply(250, "2.1.0", "Ok")
_RCPT_OK = _reply(250, "2.1.5", "Ok")
_AUTH_OK = _reply(235, "2.7.0", "Authentication successful")
_START_TLS = _reply(220, "2.0.0", "Ready to start TLS")
_DATA_GO = Reply(354, None, ("End data with <CR><LF>.<CR><LF>",)).to_bytes()
_VRFY = _reply(252, "2.5.0", "Cannot VRFY user, but will accept message and attempt delivery")
_HELP = _reply(214, "2.0.0", "Commands: EHLO HELO STARTTLS AUTH MAIL RCPT DATA BDAT RSET NOOP QUIT")
_BYE = _reply(221, "2.0.0", "Bye")
_TOO_MANY_ERRORS = _reply(421, "4.7.0", "Too many errors")
_TOO_MANY_RECIPIENTS = _reply(452, "4.5.3", "Too many recipients")
_TLS_UNAVAILABLE = _reply(454, "4.7.0", "TLS not available")
_UNKNOWN_COMMAND = _reply(500, "5.5.1", "Command unrecognized")
_LINE_TOO_LONG = _reply(500, "5.5.2", "Line too long")
_AUTH_LINE_TOO_LONG = _reply(500, "5.5.6", "Authentication Exchange line is too long")
_AUTH_CANCELLED = _reply(501, "5.7.0", "Authentication cancelled")
_BAD_SASL = _reply(501, "5.5.2", "Cannot decode authentication response")
_BAD_SENDER = _reply(501, "5.1.7", "Bad sender address syntax")
_BAD_RECIPIENT = _reply(501, "5.1.3", "Bad recipient address syntax")
_BAD_PARAMETERS = _reply(501, "5.5.4", "Invalid parameters")
_BAD_SIZE = _reply(501, "5.5.4", "Invalid SIZE parameter")
_BAD_BODY = _reply(501, "5.5.4", "BODY must be 7BIT or 8BITMIME")
_BAD_SMTPUTF8 = _reply(501, "5.5.4", "SMTPUTF8 takes no value")
_EXPN = _reply(502, "5.5.1", "EXPN not supported")
_NEED_HELO = _reply(503, "5.5.1", "Send HELO/EHLO first")
_NEED_EHLO = _reply(503, "5.5.1", "Send EHLO first")
_NESTED_MAIL = _reply(503, "5.5.1", "Nested MAIL command")
_NEED_MAIL = _reply(503, "5.5.1", "Need MAIL command")
_NEED_RCPT = _reply(503, "5.5.1", "Need RCPT command")
_RCPT_AFTER_BDAT = _reply(503, "5.5.1", "RCPT not permitted after BDAT")
_DATA_AFTER_BDAT = _reply(503, "5.5.1", "DATA not permitted after BDAT")
_TLS_ACTIVE = _reply(503, "5.5.1", "TLS already active")
_ALREADY_AUTHENTICATED = _reply(503, "5.5.1", "Already authenticated")
_AUTH_IN_TRANSACTION = _reply(503, "5.5.1", "AUTH not permitted during a mail transaction")
_UNKNOWN_MECHANISM = _reply(504, "5.5.4", "Unrecognized authentication type")
_NEED_STARTTLS = _reply(530, "5.7.0", "Must issue a STARTTLS command first")
_NEED_AUTH = _reply(530, "5.7.0", "Authentication required")
_AUTH_FAILED = Reply(535, "5.7.8", ("Authentication credentials invalid",))
_NEED_ENCRYPTION = _reply(
    538, "5.7.11", "Encryption required for requested authentication mechanism"
)
_TOO_BIG = _reply(552, "5.3.4", "Message size exceeds fixed maximum message size")
_NON_ASCII_ADDRESS = _reply(553, "5.6.7", "Non-ASCII address requires SMTPUTF8")
_NO_VALID_RECIPIENTS = _reply(554, "5.5.1", "No valid recipients")
_EHLO_SYNTAX = _reply(501, "5.5.4", "Syntax: EHLO hostname")
_HELO_SYNTAX = _reply(501, "5.5.4", "Syntax: HELO hostname")
_MAIL_SYNTAX = _reply(501, "5.5.4", "Syntax: MAIL FROM:<address>")
_RCPT_SYNTAX = _reply(501, "5.5.4", "Syntax: RCPT TO:<address>")
_DATA_SYNTAX = _reply(501, "5.5.4", "Syntax: DATA")
_BDAT_SYNTAX = _reply(501, "5.5.4", "Syntax: BDAT size [LAST]")
_RSET_SYNTAX = _reply(501, "5.5.4", "Syntax: RSET")
_STARTTLS_SYNTAX = _reply(501, "5.5.4", "Syntax: STARTTLS")
_AUTH_SYNTAX = _reply(501, "5.5.4", "Syntax: AUTH mechanism [initial-response]")
# SASL challenges are bare base64 (RFC 4954); 3xx replies have no enhanced code.
_LOGIN_USERNAME_PROMPT = Reply(334, None, ("VXNlcm5hbWU6",)).to_bytes()
_LOGIN_PASSWORD_PROMPT = Reply(334, None, ("UGFzc3dvcmQ6",)).to_bytes()
_PLAIN_PROMPT = Reply(334, None, ("",)).to_bytes()

_MECHANISMS = (b"PLAIN", b"LOGIN")
_BODY_TYPES = ("7BIT", "8BITMIME")
_DATA_END = b"\r\n.\r\n"
# Bytes at the end of the buffer that may be the start of a split terminator.
_DATA_TAIL = len(_DATA_END) - 1
_STUFFED = b"\r\n."
# Significant digits of a SIZE or BDAT count beyond which it is over any limit
# (RFC 1870 allows SIZE 20 digits): 10**20 octets never cross one connection.
_COUNT_DIGITS = 20
# What is left of a BDAT chunk whose count has more digits than that: in effect
# endless, so its bytes are discarded until the session ends.
_ENDLESS = 10**_COUNT_DIGITS


def _unsupported(key: str) -> bytes:
    return _reply(555, "5.5.4", f"Unsupported parameter {key}")


def _parse_params(text: str) -> dict[str, str] | None:
    """ESMTP parameters (RFC 5321 section 4.1.2), keys upper-cased; None if malformed."""
    params: dict[str, str] = {}
    for item in text.split(" "):
        if not item:
            continue
        match = _PARAMETER.fullmatch(item)
        if match is None:
            return None
        key = match.group(1).upper()
        if key in params:
            return None
        params[key] = match.group(2) or ""
    return params


def _size_value(digits: str) -> int | None:
    """A SIZE value or BDAT chunk size in ASCII digits; None when too long to be real.

    The length is bounded before int(), which refuses more than 4300 digits
    and is slow well before that; any configurable line length allows more.
    """
    significant = digits.lstrip("0")
    if len(significant) > _COUNT_DIGITS:
        return None
    return int(significant or "0")


def _decode_sasl(data: bytes) -> str | None:
    """A base64 SASL response as text; ``=`` is the empty response (RFC 4954)."""
    if data == b"=":
        return ""
    try:
        return binascii.a2b_base64(data, strict_mode=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        return None


def _refusal_bytes(reply: Reply) -> bytes:
    if reply.code < 400:
        raise RuntimeError(f"a refusal needs a 4xx or 5xx reply, not {reply.code}")
    return reply.to_bytes()


class Connection:
    """One SMTP server session: bytes in, events and reply bytes out."""

    __slots__ = (
        "_bdat",
        "_buf",
        "_chunk_last",
        "_chunk_left",
        "_chunk_size",
        "_chunk_target",
        "_closed",
        "_data_at_start",
        "_data_counted",
        "_data_dots",
        "_data_oversize",
        "_data_scanned",
        "_eof",
        "_errors",
        "_events",
        "_extended",
        "_helo",
        "_identity",
        "_mail",
        "_mode",
        "_out",
        "_pending_event",
        "_policy",
        "_pos",
        "_rcpt_rejected",
        "_recipients",
        "_sasl",
        "_sasl_username",
        "_tls",
        "_trusted_identity",
    )

    def __init__(self, policy: SessionPolicy, *, tls_active: bool = False) -> None:
        self._policy = policy
        self._tls = tls_active
        greeting = Reply(220, None, (f"{policy.hostname} {policy.banner}",))
        self._out: list[bytes] = [greeting.to_bytes()]
        self._events: deque[Event] = deque()
        self._buf = bytearray()
        self._pos = 0
        self._mode = _Mode.COMMAND
        self._eof = False
        self._closed = False
        self._pending_event: _Decision | None = None
        self._errors = 0
        # Session: survives transactions, reset by STARTTLS.
        self._helo: str | None = None
        self._extended = False
        self._identity: str | None = None
        self._trusted_identity: str | None = None
        self._sasl = _Sasl.PLAIN
        self._sasl_username = ""
        # Transaction: from an accepted MAIL to the end of the message or RSET.
        self._mail: MailFrom | None = None
        self._recipients: list[str] = []
        self._rcpt_rejected = False
        self._bdat: bytearray | None = None
        # The BDAT chunk being read: where its bytes go, or the refusal to give after it.
        self._chunk_target: bytearray | bytes = b""
        self._chunk_left = 0
        self._chunk_size = 0
        self._chunk_last = False
        # DATA: how far the terminator search got, relative to the message start.
        self._data_scanned = 0
        self._data_at_start = False
        self._data_oversize = False
        # Stuffing dots among the first _data_counted bytes, counted only once
        # the bytes held pass the size limit (RFC 1870 counts without them).
        self._data_dots = 0
        self._data_counted = 0

    # -- the driver's side -------------------------------------------------

    @property
    def pending(self) -> bool:
        """A MailFrom, Rcpt, MessageReceived or AuthAttempt awaits the driver's answer."""
        return self._pending_event is not None

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def authenticated(self) -> str | None:
        """The identity from AUTH or authenticate_as(), if any."""
        return self._identity

    @property
    def tls_active(self) -> bool:
        return self._tls

    def data_to_send(self) -> bytes:
        out = b"".join(self._out)
        self._out.clear()
        return out

    def receive_data(self, data: bytes) -> None:
        """Feed bytes from the peer; ``b""`` means the peer closed its side.

        A close arriving while a decision is pending takes effect after it is
        answered and the input that came before the close has been handled.
        """
        if self._closed:
            return
        if not data:
            self._eof = True
        elif self._mode is not _Mode.TLS_WAIT:
            self._buf += data
        self._process()

    def next_event(self) -> Event | None:
        return self._events.popleft() if self._events else None

    # Decisions arriving after the connection closed (say the peer hung up while
    # the driver was checking) are ignored rather than raised: the driver could
    # not have known.

    def answer(self, reply: Reply | None = None) -> None:
        """Decide a pending MailFrom or Rcpt: None accepts, a 4xx/5xx Reply refuses.

        A refusal here is the driver's policy, not a protocol error, so it
        mostly does not count towards ``max_errors``. A permanently refused
        recipient does: otherwise one connection could probe for relaying,
        or for addresses, without end.
        """
        if self._closed:
            return
        event = self._pending_event
        if not isinstance(event, MailFrom | Rcpt):
            raise RuntimeError("answer() needs a pending MailFrom or Rcpt")
        refusal = None if reply is None else _refusal_bytes(reply)
        self._pending_event = None
        if refusal is not None:
            if isinstance(event, Rcpt):
                self._rcpt_rejected = True
            if isinstance(event, Rcpt) and reply is not None and reply.code >= 500:
                self._reject(refusal)
            else:
                self._out.append(refusal)
        elif isinstance(event, MailFrom):
            self._mail = event
            self._out.append(_MAIL_OK)
        else:
            self._recipients.append(event.address)
            self._out.append(_RCPT_OK)
        self._resume_after(reply)

    def answer_message(self, reply: Reply) -> None:
        """Reply to a pending MessageReceived: 250 once queued durably, or a refusal."""
        if self._closed:
            return
        if not isinstance(self._pending_event, MessageReceived):
            raise RuntimeError("answer_message() needs a pending MessageReceived")
        if 300 <= reply.code < 400:
            raise RuntimeError(f"a message needs a 2xx, 4xx or 5xx reply, not {reply.code}")
        self._pending_event = None
        self._out.append(reply.to_bytes())
        self._resume_after(reply)

    def auth_succeeded(self, identity: str) -> None:
        if self._closed:
            return
        if not isinstance(self._pending_event, AuthAttempt):
            raise RuntimeError("auth_succeeded() needs a pending AuthAttempt")
        self._pending_event = None
        self._identity = identity
        self._out.append(_AUTH_OK)
        self._process()

    def auth_failed(self, reply: Reply | None = None) -> None:
        """Refuse a pending AuthAttempt; counts as an error, which limits guessing."""
        if self._closed:
            return
        if not isinstance(self._pending_event, AuthAttempt):
            raise RuntimeError("auth_failed() needs a pending AuthAttempt")
        refusal = _refusal_bytes(_AUTH_FAILED if reply is None else reply)
        self._pending_event = None
        self._reject(refusal)
        self._resume_after(reply)

    def tls_started(self) -> None:
        """The handshake after StartTLS finished: start a fresh session (RFC 3207)."""
        if self._closed:
            return
        if self._mode is not _Mode.TLS_WAIT:
            raise RuntimeError("tls_started() needs a StartTLS in progress")
        self._tls = True
        self._mode = _Mode.COMMAND
        self._helo = None
        self._extended = False
        self._identity = self._trusted_identity
        self._reset_transaction()
        self._process()

    def authenticate_as(self, identity: str) -> None:
        """Trust the connection (say, by network) as ``identity``; survives STARTTLS."""
        self._trusted_identity = identity
        self._identity = identity

    def timed_out(self) -> None:
        if self._closed:
            return
        self._out.append(_reply(421, "4.4.2", f"{self._policy.hostname} Timeout exceeded"))
        self._close("timeout")

    # -- input loop --------------------------------------------------------

    def _resume_after(self, reply: Reply | None) -> None:
        """Go on reading after a decision; a driver's 421 means closing (RFC 5321 3.8)."""
        if self._closed:
            return
        if reply is not None and reply.code == 421:
            self._close("service closing")
        else:
            self._process()

    def _process(self) -> None:
        while self._pending_event is None and not self._closed and self._advance():
            pass
        if self._closed:
            return
        if self._pos:
            del self._buf[: self._pos]
            self._pos = 0
        if self._eof and self._pending_event is None:
            self._close("peer closed")

    def _advance(self) -> bool:
        """Handle the next unit of input; False when more bytes are needed."""
        mode = self._mode
        if mode is _Mode.COMMAND:
            return self._line_step(self._policy.max_command_line, _LINE_TOO_LONG)
        if mode is _Mode.DATA:
            return self._data_step()
        if mode is _Mode.BDAT:
            return self._chunk_step()
        if mode is _Mode.SASL:
            return self._line_step(self._policy.max_auth_line, _AUTH_LINE_TOO_LONG)
        if mode is _Mode.SKIP_LINE:
            return self._skip_step()
        return False  # TLS_WAIT: nothing is read until the handshake is done

    def _line_step(self, limit: int, too_long: bytes) -> bool:
        buf = self._buf
        pos = self._pos
        end = buf.find(b"\n", pos, pos + limit)
        if end < 0:
            if len(buf) - pos < limit:
                return False
            auth_limit = self._policy.max_auth_line
            if limit < auth_limit and buf[pos : pos + 5].upper() == b"AUTH ":
                # RFC 4954 section 4: an initial response may be as long as any SASL line.
                return self._line_step(auth_limit, _AUTH_LINE_TOO_LONG)
            self._mode = _Mode.SKIP_LINE
            self._pos = pos + limit
            self._reject(too_long)
            return True
        self._pos = end + 1
        if end > pos and buf[end - 1] == 0x0D:
            end -= 1
        line = bytes(buf[pos:end])
        if self._mode is _Mode.SASL:
            self._sasl_response(line)
        else:
            self._command(line)
        return True

    def _skip_step(self) -> bool:
        end = self._buf.find(b"\n", self._pos)
        if end < 0:
            self._pos = len(self._buf)
            return False
        self._pos = end + 1
        self._mode = _Mode.COMMAND
        return True

    def _command(self, line: bytes) -> None:
        verb, _, arg = line.partition(b" ")
        handler = _COMMANDS.get(verb.upper())
        if handler is None:
            self._reject(_UNKNOWN_COMMAND)
        else:
            handler(self, arg)

    # -- output and state ------------------------------------------------------

    def _reject(self, reply: bytes) -> None:
        """Send an error reply the client caused; too many of them end the session."""
        self._out.append(reply)
        self._errors += 1
        if self._errors >= self._policy.max_errors:
            self._out.append(_TOO_MANY_ERRORS)
            self._close("too many errors")

    def _close(self, reason: str) -> None:
        self._closed = True
        self._pending_event = None
        self._buf.clear()
        self._pos = 0
        self._reset_transaction()
        self._events.append(CloseRequested(reason))

    def _reset_transaction(self) -> None:
        self._mail = None
        self._recipients = []
        self._rcpt_rejected = False
        self._bdat = None

    def _abort_transaction(self, refusal: bytes, reason: str) -> None:
        """End the transaction on the engine's own initiative, and tell the driver."""
        if self._mail is not None:
            self._events.append(TransactionAborted(reason))
        self._reset_transaction()
        self._reject(refusal)

    def _decide(self, event: _Decision) -> None:
        self._events.append(event)
        self._pending_event = event

    # -- session commands ----------------------------------------------------

    def _cmd_ehlo(self, arg: bytes) -> None:
        self._hello(arg, extended=True)

    def _cmd_helo(self, arg: bytes) -> None:
        self._hello(arg, extended=False)

    def _hello(self, arg: bytes, *, extended: bool) -> None:
        name = arg.strip()
        # The name is a domain or an address literal (RFC 5321 section
        # 4.1.1.1); its finer syntax is left to policy, as most MTAs do, but
        # it is copied into the Received header, where a control byte would
        # start a new header line and a non-ASCII one would make a 7-bit
        # message need 8BITMIME downstream.
        if not name or _NOT_PRINTABLE.search(name):
            self._reject(_EHLO_SYNTAX if extended else _HELO_SYNTAX)
            return
        self._reset_transaction()
        self._helo = name.decode("ascii")
        self._extended = extended
        self._events.append(Hello(self._helo, extended))
        # Like the EHLO reply, the HELO reply starts with our domain (RFC 5321
        # section 4.1.1.1), so it carries no enhanced code.
        lines = self._extensions() if extended else [self._policy.hostname]
        self._out.append(Reply(250, None, tuple(lines)).to_bytes())

    def _extensions(self) -> list[str]:
        policy = self._policy
        lines = [
            policy.hostname,
            "PIPELINING",
            f"SIZE {policy.max_message_size}",
            "8BITMIME",
            "SMTPUTF8",
            "ENHANCEDSTATUSCODES",
            "CHUNKING",
        ]
        if policy.starttls_available and not self._tls:
            lines.append("STARTTLS")
        if self._auth_permitted():
            lines.append("AUTH PLAIN LOGIN")
        return lines

    def _auth_permitted(self) -> bool:
        policy = self._policy
        return self._tls or (
            not policy.require_tls
            and (policy.allow_plaintext_auth or not policy.require_tls_for_auth)
        )

    def _cmd_starttls(self, arg: bytes) -> None:
        if arg.strip():
            self._reject(_STARTTLS_SYNTAX)
        elif self._tls:
            self._reject(_TLS_ACTIVE)
        elif not self._policy.starttls_available:
            self._reject(_TLS_UNAVAILABLE)
        else:
            self._out.append(_START_TLS)
            # RFC 3207 section 5, CVE-2011-0411: plaintext pipelined after
            # STARTTLS must never be executed inside the TLS session.
            self._pos = len(self._buf)
            self._mode = _Mode.TLS_WAIT
            self._events.append(StartTLS())

    def _cmd_rset(self, arg: bytes) -> None:
        if arg.strip():
            self._reject(_RSET_SYNTAX)
            return
        self._reset_transaction()
        self._events.append(Reset())
        self._out.append(_OK)

    def _cmd_noop(self, arg: bytes) -> None:
        self._out.append(_OK)

    def _cmd_vrfy(self, arg: bytes) -> None:
        self._out.append(_VRFY)

    def _cmd_expn(self, arg: bytes) -> None:
        self._reject(_EXPN)

    def _cmd_help(self, arg: bytes) -> None:
        self._out.append(_HELP)

    def _cmd_quit(self, arg: bytes) -> None:
        self._out.append(_BYE)
        self._close("quit")

    # -- AUTH (RFC 4954) -----------------------------------------------------

    def _cmd_auth(self, arg: bytes) -> None:
        parts = arg.split()
        if not 1 <= len(parts) <= 2:
            self._reject(_AUTH_SYNTAX)
            return
        mechanism = parts[0].upper()
        refusal = self._auth_refusal(mechanism)
        if refusal is not None:
            self._reject(refusal)
        elif mechanism == b"PLAIN":
            if len(parts) == 2:
                self._plain(parts[1])
            else:
                self._challenge(_Sasl.PLAIN, _PLAIN_PROMPT)
        elif len(parts) == 2:
            self._login_username(parts[1])
        else:
            self._challenge(_Sasl.LOGIN_USERNAME, _LOGIN_USERNAME_PROMPT)

    def _auth_refusal(self, mechanism: bytes) -> bytes | None:
        if not self._extended:
            return _NEED_EHLO
        if self._identity is not None:
            return _ALREADY_AUTHENTICATED
        if self._mail is not None:
            return _AUTH_IN_TRANSACTION
        if self._policy.require_tls and not self._tls:
            return _NEED_STARTTLS
        if mechanism not in _MECHANISMS:
            return _UNKNOWN_MECHANISM
        if not self._auth_permitted():
            return _NEED_ENCRYPTION
        return None

    def _challenge(self, step: _Sasl, prompt: bytes) -> None:
        self._sasl = step
        self._mode = _Mode.SASL
        self._out.append(prompt)

    def _sasl_response(self, line: bytes) -> None:
        self._mode = _Mode.COMMAND
        if line == b"*":
            self._sasl_username = ""
            self._reject(_AUTH_CANCELLED)
        elif self._sasl is _Sasl.PLAIN:
            self._plain(line)
        elif self._sasl is _Sasl.LOGIN_USERNAME:
            self._login_username(line)
        else:
            self._login_password(line)

    def _plain(self, response: bytes) -> None:
        """RFC 4616: ``[authzid] NUL authcid NUL passwd``."""
        text = _decode_sasl(response)
        if text is None or text.count("\0") != 2:
            self._reject(_BAD_SASL)
            return
        authzid, username, password = text.split("\0")
        if not username or not password:
            self._reject(_BAD_SASL)
            return
        self._decide(AuthAttempt("PLAIN", authzid, username, password))

    def _login_username(self, response: bytes) -> None:
        username = _decode_sasl(response)
        if not username:
            self._reject(_BAD_SASL)
            return
        self._sasl_username = username
        self._challenge(_Sasl.LOGIN_PASSWORD, _LOGIN_PASSWORD_PROMPT)

    def _login_password(self, response: bytes) -> None:
        password = _decode_sasl(response)
        username = self._sasl_username
        self._sasl_username = ""
        if not password:
            self._reject(_BAD_SASL)
            return
        self._decide(AuthAttempt("LOGIN", "", username, password))

    # -- envelope ------------------------------------------------------------

    def _cmd_mail(self, arg: bytes) -> None:
        refusal = self._mail_refusal()
        result = self._parse_mail(arg) if refusal is None else refusal
        if isinstance(result, MailFrom):
            self._decide(result)
        else:
            self._reject(result)

    def _mail_refusal(self) -> bytes | None:
        if self._helo is None:
            return _NEED_HELO
        if self._mail is not None:
            return _NESTED_MAIL
        if self._policy.require_tls and not self._tls:
            return _NEED_STARTTLS
        if self._policy.auth_required and self._identity is None:
            return _NEED_AUTH
        return None

    def _parse_mail(self, arg: bytes) -> MailFrom | bytes:
        if arg[:5].upper() != b"FROM:":
            return _MAIL_SYNTAX
        try:
            address, rest = split_path(
                arg[5:].decode("utf-8").lstrip(" "), null_allowed=True, postmaster_allowed=False
            )
        except (UnicodeDecodeError, AddressError):
            return _BAD_SENDER
        params = _parse_params(rest)
        if params is None:
            return _BAD_PARAMETERS
        refusal = self._mail_params_refusal(params)
        if refusal is not None:
            return refusal
        smtputf8 = "SMTPUTF8" in params
        if not (smtputf8 or address.isascii()):
            return _NON_ASCII_ADDRESS
        size = params.get("SIZE")
        body = params.get("BODY")
        return MailFrom(
            address,
            None if size is None else _size_value(size),
            None if body is None else body.upper(),
            smtputf8,
            params,
        )

    def _mail_params_refusal(self, params: dict[str, str]) -> bytes | None:
        for key, value in params.items():
            if key == "SIZE":
                if not (value.isascii() and value.isdigit()):
                    return _BAD_SIZE
                size = _size_value(value)
                if size is None or size > self._policy.max_message_size:
                    return _TOO_BIG
            elif key == "BODY":
                if value.upper() not in _BODY_TYPES:
                    return _BAD_BODY
            elif key == "SMTPUTF8":
                if value:
                    return _BAD_SMTPUTF8
            elif key != "AUTH":  # RFC 4954 section 5: must be accepted; it is not trusted
                return _unsupported(key)
        return None

    def _cmd_rcpt(self, arg: bytes) -> None:
        result = self._parse_rcpt(arg)
        if isinstance(result, Rcpt):
            if len(self._recipients) < self._policy.max_recipients:
                self._decide(result)
            else:
                # Not counted as an error: RFC 5321 section 4.5.3.1.10 makes this flow
                # control, and the client sends the rest in another transaction.
                self._out.append(_TOO_MANY_RECIPIENTS)
        else:
            self._reject(result)

    def _parse_rcpt(self, arg: bytes) -> Rcpt | bytes:
        mail = self._mail
        if mail is None:
            return _NEED_MAIL
        if self._bdat is not None:
            return _RCPT_AFTER_BDAT
        if arg[:3].upper() != b"TO:":
            return _RCPT_SYNTAX
        try:
            address, rest = split_path(
                arg[3:].decode("utf-8").lstrip(" "), null_allowed=False, postmaster_allowed=True
            )
        except (UnicodeDecodeError, AddressError):
            return _BAD_RECIPIENT
        params = _parse_params(rest)
        if params is None:
            return _BAD_PARAMETERS
        if params:  # RCPT parameters belong to extensions not offered (DSN)
            return _unsupported(next(iter(params)))
        if not (mail.smtputf8 or address.isascii()):
            return _NON_ASCII_ADDRESS
        return Rcpt(address, params)

    # -- message content -----------------------------------------------------

    def _message_refusal(self) -> bytes | None:
        if self._mail is None:
            return _NEED_MAIL
        if not self._recipients:
            return _NO_VALID_RECIPIENTS if self._rcpt_rejected else _NEED_RCPT
        return None

    def _cmd_data(self, arg: bytes) -> None:
        if arg.strip():
            self._reject(_DATA_SYNTAX)
            return
        refusal = self._message_refusal()
        if refusal is None and self._bdat is not None:
            refusal = _DATA_AFTER_BDAT
        if refusal is not None:
            self._reject(refusal)
            return
        self._out.append(_DATA_GO)
        self._mode = _Mode.DATA
        self._data_scanned = 0
        self._data_at_start = True
        self._data_oversize = False
        self._data_dots = 0
        self._data_counted = 0

    def _data_step(self) -> bool:
        buf = self._buf
        start = self._pos
        if self._data_at_start:
            if len(buf) - start < 3:
                return False
            self._data_at_start = False
            if buf[start : start + 3] == b".\r\n":
                self._pos = start + 3
                self._end_data(b"")
                return True
        end = buf.find(_DATA_END, start + self._data_scanned)
        if end < 0:
            self._hold_data(start)
            return False
        self._pos = end + len(_DATA_END)
        self._end_data(None if self._data_oversize else bytes(buf[start : end + 2]))
        return True

    def _hold_data(self, start: int) -> None:
        """Remember how far the terminator search got; drop an oversized message's bytes."""
        buf = self._buf
        tail = len(buf) - _DATA_TAIL
        limit = self._policy.max_message_size
        if not self._data_oversize and tail - start > limit:
            self._data_oversize = self._unstuffed_size(start, tail) > limit
        if self._data_oversize:
            if tail > start:
                del buf[start:tail]
            self._data_scanned = 0
        else:
            self._data_scanned = max(0, tail - start)

    def _unstuffed_size(self, start: int, tail: int) -> int:
        """The size of the message held so far without its stuffing dots, never over it.

        Only a message whose bytes pass the limit gets here, and the count goes
        on from where it stopped, so no byte is counted twice.
        """
        buf = self._buf
        counted = start + self._data_counted
        if counted == start and buf[start] == 0x2E:
            self._data_dots += 1  # the first line's dot (".\r\n" would have ended DATA)
        # A "\r\n." starting before tail lies wholly in the buffer and is no
        # terminator (the search found none), so its dot is stuffing; one
        # whose dot lies past tail only makes the size smaller, never too big.
        self._data_dots += buf.count(_STUFFED, counted, tail + 2)
        self._data_counted = tail - start
        return tail - start - self._data_dots

    def _end_data(self, data: bytes | None) -> None:
        """Finish DATA; None means the message was too big and has been discarded."""
        self._mode = _Mode.COMMAND
        if data is not None:
            # RFC 5321 section 4.5.2: drop the first period of every line that has one.
            data = data.replace(_STUFFED, b"\r\n")
            if data.startswith(b"."):
                data = data[1:]
            # RFC 1870: the limit is on the message, without the dots DATA added.
            if len(data) > self._policy.max_message_size:
                data = None
        if data is None:
            self._abort_transaction(_TOO_BIG, "message too big")
            return
        self._deliver(data)

    def _deliver(self, data: bytes) -> None:
        mail = self._mail
        assert mail is not None  # DATA and BDAT start only inside a transaction
        event = MessageReceived(
            mail.address, tuple(self._recipients), data, mail.body, mail.smtputf8
        )
        self._reset_transaction()
        self._decide(event)

    # -- CHUNKING (RFC 3030) -------------------------------------------------

    def _cmd_bdat(self, arg: bytes) -> None:
        parts = arg.split()
        if not (
            1 <= len(parts) <= 2
            and parts[0].isdigit()
            and (len(parts) == 1 or parts[1].upper() == b"LAST")
        ):
            # The chunk's length is unknown, so its bytes will be read as
            # commands, and the message would have a hole: end the transaction.
            self._abort_transaction(_BDAT_SYNTAX, "BDAT syntax error")
            return
        size = _size_value(parts[0].decode("ascii"))
        self._chunk_target = self._chunk_target_for(size)
        self._chunk_left = self._chunk_size = _ENDLESS if size is None else size
        self._chunk_last = len(parts) == 2
        self._mode = _Mode.BDAT

    def _chunk_target_for(self, size: int | None) -> bytearray | bytes:
        """The buffer the chunk extends, or the refusal to give once it is skipped."""
        refusal = self._message_refusal()
        if refusal is not None:
            return refusal
        if self._bdat is None:
            self._bdat = bytearray()
        if size is None or len(self._bdat) + size > self._policy.max_message_size:
            return _TOO_BIG
        return self._bdat

    def _chunk_step(self) -> bool:
        buf = self._buf
        pos = self._pos
        take = min(len(buf) - pos, self._chunk_left)
        if take:
            target = self._chunk_target
            if isinstance(target, bytearray):
                target += buf[pos : pos + take]
            self._pos = pos + take
            self._chunk_left -= take
        if self._chunk_left:
            return False
        self._mode = _Mode.COMMAND
        self._end_chunk()
        return True

    def _end_chunk(self) -> None:
        target = self._chunk_target
        self._chunk_target = b""
        if not isinstance(target, bytearray):
            # RFC 3030 section 4.2: the chunk was read and discarded. The
            # message now has a hole, so the transaction ends.
            self._abort_transaction(target, "BDAT chunk refused")
        elif self._chunk_last:
            self._deliver(bytes(target))
        else:
            self._out.append(_reply(250, "2.0.0", f"{self._chunk_size} octets received"))


_COMMANDS = {
    b"EHLO": Connection._cmd_ehlo,
    b"HELO": Connection._cmd_helo,
    b"STARTTLS": Connection._cmd_starttls,
    b"AUTH": Connection._cmd_auth,
    b"MAIL": Connection._cmd_mail,
    b"RCPT": Connection._cmd_rcpt,
    b"DATA": Connection._cmd_data,
    b"BDAT": Connection._cmd_bdat,
    b"RSET": Connection._cmd_rset,
    b"NOOP": Connection._cmd_noop,
    b"VRFY": Connection._cmd_vrfy,
    b"EXPN": Connection._cmd_expn,
    b"HELP": Connection._cmd_help,
    b"QUIT": Connection._cmd_quit,
}
