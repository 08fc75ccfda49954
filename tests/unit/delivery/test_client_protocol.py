"""The sans-IO SMTP client engine, driven by feeding it server replies byte by byte."""

from __future__ import annotations

import base64
from typing import TypeVar

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from postlane.delivery.client_protocol import (
    Authenticated,
    AuthFailed,
    Capabilities,
    ClientConnection,
    Closed,
    Event,
    Greeting,
    Reply,
    TlsReady,
    TransactionResult,
    prepare_content,
)
from postlane.delivery.sasl import Credentials

E = TypeVar("E")

GREETING = b"220 mx.example.com ESMTP ready\r\n"
EHLO_FULL = (
    b"250-mx.example.com Hello\r\n"
    b"250-PIPELINING\r\n"
    b"250-SIZE 10240000\r\n"
    b"250-8BITMIME\r\n"
    b"250-SMTPUTF8\r\n"
    b"250-ENHANCEDSTATUSCODES\r\n"
    b"250-CHUNKING\r\n"
    b"250-STARTTLS\r\n"
    b"250 AUTH PLAIN LOGIN\r\n"
)
EHLO_PLAIN = b"250-mx.example.com\r\n250 ENHANCEDSTATUSCODES\r\n"
MAIL_OK = b"250 2.1.0 Ok\r\n"
RCPT_OK = b"250 2.1.5 Ok\r\n"
GO = b"354 End data with <CR><LF>.<CR><LF>\r\n"
QUEUED = b"250 2.0.0 Ok: queued as ABC\r\n"
BODY = b"Subject: test\r\n\r\nHello\r\n"


class Client:
    """A ClientConnection, with every event it emits collected in order."""

    def __init__(self, *, helo: str = "out.example.net") -> None:
        self.conn = ClientConnection(helo)
        self.events: list[Event] = []

    def feed(self, data: bytes, *, bytewise: bool = False) -> bytes:
        """Give the engine ``data`` (one byte at a time if asked); return what it sends."""
        chunks = [data[i : i + 1] for i in range(len(data))] if bytewise else [data]
        for chunk in chunks:
            self.conn.receive_data(chunk)
            self.drain()
        return self.conn.data_to_send()

    def drain(self) -> None:
        while (event := self.conn.next_event()) is not None:
            self.events.append(event)

    def sent(self) -> bytes:
        self.drain()
        return self.conn.data_to_send()

    def of(self, kind: type[E]) -> list[E]:
        self.drain()
        return [e for e in self.events if isinstance(e, kind)]

    def send(self, *recipients: str, data: bytes = BODY, **options: object) -> bytes:
        self.conn.send_message("sender@example.net", recipients, data, **options)  # type: ignore[arg-type]
        return self.sent()


def ready(ehlo: bytes = EHLO_FULL) -> Client:
    client = Client()
    assert client.feed(GREETING) == b"EHLO out.example.net\r\n"
    assert client.feed(ehlo) == b""
    return client


def only(items: list[E]) -> E:
    assert len(items) == 1, items
    return items[0]


# -- greeting and EHLO ------------------------------------------------------------------


def test_greeting_then_ehlo() -> None:
    client = Client()
    assert client.sent() == b""  # the client speaks second
    assert client.conn.awaiting == "the server greeting"
    assert client.feed(GREETING) == b"EHLO out.example.net\r\n"
    assert client.of(Greeting) == [Greeting(220, "mx.example.com ESMTP ready")]
    assert client.conn.awaiting == "the reply to EHLO"


def test_multiline_ehlo_is_parsed_into_extensions() -> None:
    client = ready()
    caps = only(client.of(Capabilities))
    assert caps.extensions == {
        "PIPELINING": "",
        "SIZE": "10240000",
        "8BITMIME": "",
        "SMTPUTF8": "",
        "ENHANCEDSTATUSCODES": "",
        "CHUNKING": "",
        "STARTTLS": "",
        "AUTH": "PLAIN LOGIN",
    }
    assert client.conn.capabilities == caps.extensions
    assert client.conn.awaiting is None
    assert not client.conn.waiting


def test_replies_split_anywhere_are_reassembled() -> None:
    client = Client()
    assert client.feed(GREETING, bytewise=True) == b"EHLO out.example.net\r\n"
    client.feed(EHLO_FULL, bytewise=True)
    assert only(client.of(Capabilities)).extensions["SIZE"] == "10240000"


def test_ehlo_keywords_are_upper_cased_and_bare_lf_lines_accepted() -> None:
    client = Client()
    client.feed(b"220 mx\n")
    client.feed(b"250-mx\n250-pipelining\n250-size\n250 x-Custom  a b \n")
    assert only(client.of(Capabilities)).extensions == {
        "PIPELINING": "",
        "SIZE": "",
        "X-CUSTOM": "a b",
    }


def test_last_ehlo_line_may_be_empty_like_smtp_sinks() -> None:
    client = Client()
    client.feed(GREETING)
    client.feed(b"250-smtp-sink\r\n250-PIPELINING\r\n250 \r\n")
    assert only(client.of(Capabilities)).extensions == {"PIPELINING": ""}


def test_ehlo_refused_falls_back_to_helo() -> None:
    client = Client()
    client.feed(GREETING)
    assert client.feed(b"502 5.5.2 Command not recognized\r\n") == b"HELO out.example.net\r\n"
    refusal = only(client.of(Reply))
    assert (refusal.code, refusal.command) == (502, "EHLO")
    assert client.feed(b"250 mx.example.com\r\n") == b""
    assert only(client.of(Capabilities)).extensions == {}


def test_helo_refused_ends_the_session_with_quit() -> None:
    client = Client()
    client.feed(GREETING)
    client.feed(b"500 what\r\n")
    assert client.feed(b"550 5.7.1 go away\r\n") == b"QUIT\r\n"
    closed = only(client.of(Closed))
    assert closed.reply is not None
    assert (closed.reply.code, closed.reply.enhanced, closed.reply.text) == (
        550,
        "5.7.1",
        "go away",
    )
    assert client.conn.closed


def test_ehlo_temporary_refusal_ends_the_session() -> None:
    client = Client()
    client.feed(GREETING)
    assert client.feed(b"451 4.3.0 try later\r\n") == b"QUIT\r\n"
    assert only(client.of(Closed)).reply == Reply(451, "4.3.0", "try later", "EHLO")


def test_554_greeting_gets_quit_and_closes() -> None:
    client = Client()
    client.conn.send_message("a@example.net", ["b@example.com"], BODY)
    assert client.feed(b"554 5.7.1 You are not welcome\r\n") == b"QUIT\r\n"
    closed = only(client.of(Closed))
    assert closed.reply == Reply(554, "5.7.1", "You are not welcome", "greeting")
    # The queued message is answered, not left hanging.
    result = only(client.of(TransactionResult))
    assert result.recipients["b@example.com"] is closed.reply
    assert result.data_reply is None


def test_421_greeting_closes_without_quit() -> None:
    client = Client()
    assert client.feed(b"421 4.3.2 mx.example.com Service not available\r\n") == b""
    closed = only(client.of(Closed))
    assert closed.reply is not None
    assert (closed.reply.code, closed.reply.enhanced) == (421, "4.3.2")
    assert client.conn.closed
    with pytest.raises(RuntimeError, match="closed"):
        client.conn.send_message("a@example.net", ["b@example.com"], BODY)


def test_helo_name_must_be_a_single_printable_word() -> None:
    for bad in ("", "two words", "crlf\r\nQUIT", "ünï"):
        with pytest.raises(ValueError, match="EHLO name"):
            ClientConnection(bad)
    assert ClientConnection("[192.0.2.1]").data_to_send() == b""


# -- reply parsing ----------------------------------------------------------------------------


def test_enhanced_codes_are_parsed_from_every_line_and_stripped() -> None:
    client = ready()
    client.send("a@example.com")
    client.feed(b"550-5.1.1 The email account that you tried to reach does not exist.\r\n")
    client.feed(b"550-5.1.1 Please try double-checking\r\n550 5.1.1 https://support\r\n")
    reply = client.of(Reply)[0]
    assert reply.code == 550
    assert reply.enhanced == "5.1.1"
    assert reply.text == (
        "The email account that you tried to reach does not exist.\n"
        "Please try double-checking\nhttps://support"
    )
    assert str(reply).startswith("550 5.1.1 The email account")
    assert reply.command == "MAIL FROM"
    assert not reply.ok and not reply.temporary and not reply.local


@pytest.mark.parametrize(
    ("line", "code", "enhanced", "text"),
    [
        (b"250 Ok\r\n", 250, None, "Ok"),
        (b"250\r\n", 250, None, ""),
        (b"250 2.1.0\r\n", 250, "2.1.0", ""),
        (b"250 2.01.000 Ok\r\n", 250, "2.1.0", "Ok"),
        (b"450 5.1.1 class does not match\r\n", 450, None, "5.1.1 class does not match"),
        (b"550 5.1.10x not a status\r\n", 550, None, "5.1.10x not a status"),
        (b"550 5.7.1 bad \x01 byte \xff\r\n", 550, "5.7.1", "bad ? byte \ufffd"),
    ],
)
def test_reply_forms(line: bytes, code: int, enhanced: str | None, text: str) -> None:
    client = ready()
    client.send("a@example.com")
    client.feed(line)
    reply = client.of(Reply)[0]
    assert (reply.code, reply.enhanced, reply.text) == (code, enhanced, text)


@pytest.mark.parametrize(
    "garbage",
    [
        b"hello\r\n",
        b"25\r\n",
        b"250x\r\n",
        b"199 too low\r\n",
        b"600 too high\r\n",
        b"250-multi\r\n550 changed code\r\n",
        b"x" * 70000,
    ],
)
def test_malformed_replies_end_the_session(garbage: bytes) -> None:
    client = ready()
    client.send("a@example.com")
    client.feed(garbage)
    closed = only(client.of(Closed))
    assert closed.reason.startswith("protocol error")
    assert closed.reply is None
    result = only(client.of(TransactionResult))
    reply = result.recipients["a@example.com"]
    assert (reply.code, reply.enhanced, reply.local) == (451, "4.5.0", True)


def test_unsolicited_reply_is_a_protocol_error_but_421_is_a_goodbye() -> None:
    client = ready()
    client.feed(b"250 nobody asked\r\n")
    assert only(client.of(Closed)).reason.startswith("protocol error: unexpected reply")
    client = ready()
    client.feed(b"421 4.4.2 idle too long\r\n")
    closed = only(client.of(Closed))
    assert closed.reply is not None and closed.reply.code == 421


def test_intermediate_reply_to_mail_is_a_protocol_error() -> None:
    client = ready()
    client.send("a@example.com")
    client.feed(b"354 what\r\n")
    assert "is not an answer to MAIL FROM" in only(client.of(Closed)).reason


# -- a transaction, pipelined ---------------------------------------------------------------


def test_pipelining_sends_envelope_and_data_in_one_write() -> None:
    client = ready()
    sent = client.send("a@example.com", "b@example.com", "c@example.com")
    assert sent == (
        b"MAIL FROM:<sender@example.net> SIZE=24\r\n"
        b"RCPT TO:<a@example.com>\r\n"
        b"RCPT TO:<b@example.com>\r\n"
        b"RCPT TO:<c@example.com>\r\n"
        b"DATA\r\n"
    )
    assert client.conn.awaiting == "the reply to MAIL FROM"
    # Mixed results: one accepted, one temporary, one permanent.
    assert client.feed(MAIL_OK + RCPT_OK) == b""
    assert client.feed(b"450 4.2.0 greylisted\r\n550 5.1.1 unknown\r\n") == b""
    assert client.feed(GO) == BODY + b".\r\n"
    assert client.of(TransactionResult) == []
    assert client.feed(QUEUED) == b""
    result = only(client.of(TransactionResult))
    assert [r.code for r in result.recipients.values()] == [250, 450, 550]
    assert result.recipients["b@example.com"].temporary
    assert result.data_reply == Reply(250, "2.0.0", "Ok: queued as ABC", "end of DATA")
    assert result.mail_reply == Reply(250, "2.1.0", "Ok", "MAIL FROM")
    assert result.delivered == ["a@example.com"]
    assert result.outcome("a@example.com") is result.data_reply
    assert result.outcome("c@example.com").code == 550
    assert client.conn.messages_accepted == 1
    # One Reply event per command answered, in order.
    assert [r.command for r in client.of(Reply)] == [
        "MAIL FROM",
        "RCPT TO",
        "RCPT TO",
        "RCPT TO",
        "DATA",
        "end of DATA",
    ]


def test_all_replies_in_one_read() -> None:
    client = ready()
    client.send("a@example.com")
    assert client.feed(MAIL_OK + RCPT_OK + GO) == BODY + b".\r\n"
    client.feed(QUEUED)
    assert only(client.of(TransactionResult)).delivered == ["a@example.com"]


def test_data_refused_after_accepted_recipients() -> None:
    client = ready()
    client.send("a@example.com")
    client.feed(MAIL_OK + RCPT_OK + b"451 4.3.0 try again\r\n")
    result = only(client.of(TransactionResult))
    assert result.data_reply is not None and result.data_reply.code == 451
    assert result.delivered == []
    assert result.outcome("a@example.com").code == 451
    # The server may still hold the transaction: the next MAIL is preceded by RSET.
    assert client.send("b@example.com").startswith(b"RSET\r\nMAIL FROM:")


def test_message_refused_at_end_of_data() -> None:
    client = ready()
    client.send("a@example.com", "b@example.com")
    client.feed(MAIL_OK + RCPT_OK + RCPT_OK + GO)
    client.feed(b"554 5.7.1 spam\r\n")
    result = only(client.of(TransactionResult))
    assert result.delivered == []
    assert result.outcome("b@example.com").enhanced == "5.7.1"
    assert client.conn.messages_accepted == 0
    # After a message the server holds nothing: no RSET.
    assert client.send("c@example.com").startswith(b"MAIL FROM:")


def test_no_valid_recipients_data_refused_then_rset_before_next_mail() -> None:
    client = ready()
    client.send("a@example.com", "b@example.com")
    client.feed(MAIL_OK + b"550 5.1.1 no\r\n550 5.1.1 no\r\n")
    assert client.feed(b"554 5.5.1 No valid recipients\r\n") == b""
    result = only(client.of(TransactionResult))
    assert result.data_reply is None  # no content was sent: nothing to report there
    assert {r.code for r in result.recipients.values()} == {550}
    assert result.delivered == []
    sent = client.send("c@example.com")
    assert sent.startswith(b"RSET\r\nMAIL FROM:<sender@example.net>")
    client.feed(b"250 2.0.0 reset\r\n" + MAIL_OK + RCPT_OK + GO)
    client.feed(QUEUED)
    assert client.of(TransactionResult)[1].delivered == ["c@example.com"]
    # Our own RSET is not reported as a Reply of its own.
    assert "RSET" not in [r.command for r in client.of(Reply)]


def test_no_valid_recipients_but_354_sends_a_single_dot() -> None:
    """RFC 2920 §3.1: if DATA is accepted anyway, send a single dot."""
    client = ready()
    client.send("a@example.com")
    assert client.feed(MAIL_OK + b"550 5.1.1 no\r\n" + GO) == b".\r\n"
    assert client.of(TransactionResult) == []
    client.feed(b"250 2.0.0 empty message queued\r\n")
    result = only(client.of(TransactionResult))
    assert result.data_reply is None
    assert result.delivered == []
    assert result.recipients["a@example.com"].code == 550
    assert client.conn.messages_accepted == 0
    # The single dot ended the transaction: no RSET needed.
    assert client.send("b@example.com").startswith(b"MAIL FROM:")


def test_mail_refused_pipelined_recipients_get_the_mail_reply() -> None:
    client = ready()
    client.send("a@example.com", "b@example.com")
    client.feed(b"451 4.7.1 sender greylisted\r\n")
    client.feed(b"503 5.5.1 need MAIL\r\n503 5.5.1 need MAIL\r\n503 5.5.1 need MAIL\r\n")
    result = only(client.of(TransactionResult))
    # Not 503 (which would look permanent): the refusal of MAIL decides.
    assert {r.code for r in result.recipients.values()} == {451}
    assert result.data_reply is None
    assert result.mail_reply is not None and result.mail_reply.enhanced == "4.7.1"
    assert client.send("c@example.com").startswith(b"MAIL FROM:")  # no RSET needed


def test_duplicate_recipients_are_sent_once() -> None:
    client = ready()
    sent = client.send("a@example.com", "a@example.com", "b@example.com")
    assert sent.count(b"RCPT TO:<a@example.com>") == 1
    client.feed(MAIL_OK + RCPT_OK + RCPT_OK + GO + QUEUED)
    assert list(only(client.of(TransactionResult)).recipients) == [
        "a@example.com",
        "b@example.com",
    ]


def test_no_recipients_is_a_programming_error() -> None:
    with pytest.raises(ValueError, match="at least one recipient"):
        ready().conn.send_message("a@example.net", [], BODY)


# -- without PIPELINING ----------------------------------------------------------------------


def test_without_pipelining_one_command_at_a_time() -> None:
    client = ready(EHLO_PLAIN)
    assert client.send("a@example.com", "b@example.com") == b"MAIL FROM:<sender@example.net>\r\n"
    assert client.feed(MAIL_OK) == b"RCPT TO:<a@example.com>\r\n"
    assert client.feed(b"550 5.1.1 no\r\n") == b"RCPT TO:<b@example.com>\r\n"
    assert client.feed(RCPT_OK) == b"DATA\r\n"
    assert client.feed(GO) == BODY + b".\r\n"
    assert client.feed(QUEUED) == b""
    result = only(client.of(TransactionResult))
    assert result.delivered == ["b@example.com"]


def test_without_pipelining_mail_refused_sends_no_rcpt() -> None:
    client = ready(EHLO_PLAIN)
    client.send("a@example.com", "b@example.com")
    assert client.feed(b"550 5.7.1 sender rejected\r\n") == b""
    result = only(client.of(TransactionResult))
    assert {r.code for r in result.recipients.values()} == {550}
    assert client.conn.awaiting is None
    assert client.send("c@example.com") == b"MAIL FROM:<sender@example.net>\r\n"


def test_without_pipelining_no_accepted_recipient_sends_no_data() -> None:
    client = ready(EHLO_PLAIN)
    client.send("a@example.com")
    client.feed(MAIL_OK)
    assert client.feed(b"450 4.2.2 mailbox full\r\n") == b""
    result = only(client.of(TransactionResult))
    assert result.recipients["a@example.com"].code == 450
    assert result.data_reply is None
    # MAIL was accepted: the transaction is closed with RSET first, one at a time.
    assert client.send("b@example.com") == b"RSET\r\n"
    assert client.feed(b"250 2.0.0 Ok\r\n") == b"MAIL FROM:<sender@example.net>\r\n"


def test_without_pipelining_next_message_waits_for_end_of_data_reply() -> None:
    client = ready(EHLO_PLAIN)
    client.send("a@example.com")
    client.send("b@example.com")
    client.feed(MAIL_OK)
    client.feed(RCPT_OK)
    assert client.feed(GO) == BODY + b".\r\n"
    assert client.feed(QUEUED) == b"MAIL FROM:<sender@example.net>\r\n"


# -- many transactions on one connection -------------------------------------------------


def test_next_transaction_rides_with_the_previous_content() -> None:
    """With PIPELINING, content may start a group: the next envelope goes with it."""
    client = ready()
    first = client.send("a@example.com")
    second = client.send("b@example.com")
    assert second == b""  # waits for the first DATA's reply
    assert first.endswith(b"DATA\r\n")
    sent = client.feed(MAIL_OK + RCPT_OK + GO)
    assert sent == (
        BODY + b".\r\nMAIL FROM:<sender@example.net> SIZE=24\r\nRCPT TO:<b@example.com>\r\nDATA\r\n"
    )
    assert client.feed(QUEUED + MAIL_OK + RCPT_OK + GO) == BODY + b".\r\n"
    client.feed(QUEUED)
    results = client.of(TransactionResult)
    assert [r.delivered for r in results] == [["a@example.com"], ["b@example.com"]]
    assert client.conn.messages_accepted == 2


def test_results_stay_in_call_order_even_when_refused_locally() -> None:
    client = ready()
    client.send("a@example.com")
    client.feed(MAIL_OK + RCPT_OK + GO)
    # The second is refused before it is sent, while the first awaits its reply.
    client.send("b@example.com", data=b"x" * 10240001)
    assert client.of(TransactionResult) == []
    client.feed(QUEUED)
    first, second = client.of(TransactionResult)
    assert first.delivered == ["a@example.com"]
    assert second.recipients["b@example.com"].enhanced == "5.3.4"


def test_reset_is_pipelined_and_reported() -> None:
    client = ready()
    client.send("a@example.com")
    client.feed(MAIL_OK + RCPT_OK)
    client.conn.reset()
    client.send("b@example.com")
    assert client.sent() == b""  # behind the DATA in flight
    assert client.feed(GO) == (
        BODY + b".\r\nRSET\r\nMAIL FROM:<sender@example.net> SIZE=24\r\n"
        b"RCPT TO:<b@example.com>\r\nDATA\r\n"
    )
    client.feed(QUEUED + b"250 2.0.0 Ok\r\n")
    assert [r.command for r in client.of(Reply)][-1] == "RSET"


def test_reset_when_idle() -> None:
    client = ready()
    client.conn.reset()
    assert client.sent() == b"RSET\r\n"
    client.feed(b"250 2.0.0 Ok\r\n")
    assert only(client.of(Reply)) == Reply(250, "2.0.0", "Ok", "RSET")


def test_work_queued_before_the_greeting_waits_for_ehlo() -> None:
    client = Client()
    client.conn.send_message("s@example.net", ["a@example.com"], BODY)
    assert client.sent() == b""
    client.feed(GREETING)
    assert client.feed(EHLO_FULL).startswith(b"MAIL FROM:<s@example.net> SIZE=24\r\n")


def test_quit() -> None:
    client = ready()
    client.conn.quit()
    assert client.sent() == b"QUIT\r\n"
    with pytest.raises(RuntimeError, match="QUIT"):
        client.conn.send_message("s@example.net", ["a@example.com"], BODY)
    client.feed(b"221 2.0.0 Bye\r\n")
    assert client.of(Reply)[-1] == Reply(221, "2.0.0", "Bye", "QUIT")
    assert only(client.of(Closed)).reason == "closed after QUIT"


def test_quit_waits_for_the_transaction_and_a_silent_close_after_it_is_fine() -> None:
    client = ready()
    client.send("a@example.com")
    client.conn.quit()
    assert client.feed(MAIL_OK + RCPT_OK + GO) == BODY + b".\r\nQUIT\r\n"
    client.feed(QUEUED)
    client.feed(b"")
    assert only(client.of(TransactionResult)).delivered == ["a@example.com"]
    assert only(client.of(Closed)).reason == "the connection was closed after QUIT"


# -- the connection ends mid-transaction --------------------------------------------------


def test_421_mid_transaction_keeps_answers_already_given() -> None:
    client = ready()
    client.send("a@example.com", "b@example.com", "c@example.com")
    client.send("d@example.com")
    client.feed(MAIL_OK + RCPT_OK + b"550 5.1.1 unknown\r\n")
    client.feed(b"421 4.7.0 Too many errors, closing\r\n")
    first, second = client.of(TransactionResult)
    assert first.recipients["a@example.com"].code == 250
    assert first.recipients["b@example.com"].code == 550  # an answer is an answer
    assert first.recipients["c@example.com"].code == 421  # never answered
    assert first.data_reply is not None and first.data_reply.code == 421
    assert first.delivered == []
    assert first.outcome("a@example.com").code == 421
    assert second.recipients["d@example.com"].code == 421
    assert second.data_reply is None
    closed = only(client.of(Closed))
    assert closed.reply is not None
    assert (closed.reply.code, closed.reply.enhanced, closed.reply.command) == (
        421,
        "4.7.0",
        "RCPT TO",
    )
    assert client.conn.closed
    assert client.feed(QUEUED) == b""  # nothing more is read


def test_421_in_reply_to_end_of_data() -> None:
    client = ready()
    client.send("a@example.com")
    client.feed(MAIL_OK + RCPT_OK + GO)
    client.feed(b"421 4.3.0 shutting down\r\n")
    result = only(client.of(TransactionResult))
    assert result.outcome("a@example.com") == Reply(421, "4.3.0", "shutting down", "end of DATA")


def test_connection_lost_mid_transaction_is_a_local_temporary_failure() -> None:
    client = ready()
    client.send("a@example.com")
    client.feed(MAIL_OK + RCPT_OK + GO)
    client.feed(b"")
    result = only(client.of(TransactionResult))
    reply = result.outcome("a@example.com")
    assert (reply.code, reply.enhanced, reply.local) == (451, "4.4.2", True)
    assert reply.text == "the server closed the connection"
    assert reply.command == "end of DATA"
    assert only(client.of(Closed)).reply is None


def test_abort_for_a_timeout_finishes_everything() -> None:
    client = ready()
    client.send("a@example.com")
    assert client.conn.waiting
    reason = f"timed out waiting for {client.conn.awaiting}"
    client.conn.abort(reason)
    reply = only(client.of(TransactionResult)).recipients["a@example.com"]
    assert reply == Reply(
        451, "4.4.2", "timed out waiting for the reply to MAIL FROM", "MAIL FROM", True
    )
    assert only(client.of(Closed)).reason == reason
    client.conn.abort("again")  # harmless
    assert len(client.of(Closed)) == 1
    assert not client.conn.waiting


# -- message content --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "wire"),
    [
        (b"", b".\r\n"),
        (b"a\r\nb\r\n", b"a\r\nb\r\n.\r\n"),
        (b"no final line end", b"no final line end\r\n.\r\n"),
        (b".starts with a dot\r\n", b"..starts with a dot\r\n.\r\n"),
        (b"a\r\n.\r\nb\r\n", b"a\r\n..\r\nb\r\n.\r\n"),  # a line that is just "."
        (b"a\r\n.", b"a\r\n..\r\n.\r\n"),
        (b".", b"..\r\n.\r\n"),
        (b"a\r\n..two\r\n", b"a\r\n...two\r\n.\r\n"),
        (b"bare\nlf\n.\nend", b"bare\r\nlf\r\n..\r\nend\r\n.\r\n"),
        (b"bare\rcr\r.\r", b"bare\r\ncr\r\n..\r\n.\r\n"),
        (b"mixed\r\n\n\r.\r\n", b"mixed\r\n\r\n\r\n..\r\n.\r\n"),
        (b"\n", b"\r\n.\r\n"),
        (b"dot.in.middle\r\n", b"dot.in.middle\r\n.\r\n"),
    ],
)
def test_prepare_content(data: bytes, wire: bytes) -> None:
    assert prepare_content(data) == wire


def _reference_content(data: bytes) -> bytes:
    """prepare_content as first written: always three rewriting passes."""
    data = data.replace(b"\r\n", b"\n").replace(b"\r", b"\n").replace(b"\n", b"\r\n")
    if not data:
        return b".\r\n"
    data = data.replace(b"\r\n.", b"\r\n..")
    if data[:1] == b".":
        data = b"." + data
    return data + (b".\r\n" if data.endswith(b"\r\n") else b"\r\n.\r\n")


@given(st.lists(st.sampled_from([b"a", b".", b"\r", b"\n", b"\r\n"]), max_size=30))
def test_prepare_content_skips_no_bare_line_end(parts: list[bytes]) -> None:
    data = b"".join(parts)
    assert prepare_content(data) == _reference_content(data)


@given(st.lists(st.sampled_from([b"a", b".", b"\r\n"]), max_size=30))
def test_crlf_only_content_is_sent_as_the_full_check_would_send_it(parts: list[bytes]) -> None:
    data = b"".join(parts)
    assert prepare_content(data, crlf_only=True) == _reference_content(data)


def test_crlf_only_is_the_callers_word_and_skips_the_line_end_check() -> None:
    """The engine passes the flag on: content it was told is CRLF is not looked at again."""
    checked, trusted = ready(), ready()
    checked.send("a@example.com", data=b"x\ny\r\n")
    trusted.send("a@example.com", data=b"x\ny\r\n", crlf_only=True)
    assert checked.feed(MAIL_OK + RCPT_OK + GO) == b"x\r\ny\r\n.\r\n"
    assert trusted.feed(MAIL_OK + RCPT_OK + GO) == b"x\ny\r\n.\r\n"


def test_content_on_the_wire_is_dot_stuffed() -> None:
    client = ready()
    client.send("a@example.com", data=b"Subject: x\n\n.\n..\nend")
    assert client.feed(MAIL_OK + RCPT_OK + GO) == b"Subject: x\r\n\r\n..\r\n...\r\nend\r\n.\r\n"


def test_smuggling_sequences_cannot_end_the_message_early() -> None:
    """Bare-LF and bare-CR terminators (SMTP smuggling) become stuffed lines."""
    for trick in (b"\n.\n", b"\r.\r", b"\n.\r\n", b"\r\n.\r", b"\r.\r\n"):
        wire = prepare_content(b"a" + trick + b"MAIL FROM:<evil@example.org>\r\n")
        assert wire.count(b"\r\n.\r\n") == 1 and wire.endswith(b"\r\n.\r\n")


# -- local refusals ----------------------------------------------------------------------------


def test_size_over_the_servers_limit_is_refused_before_sending() -> None:
    client = ready(b"250-mx\r\n250-PIPELINING\r\n250 SIZE 1000\r\n")
    assert client.send("a@example.com", "b@example.com", data=b"x" * 1001) == b""
    result = only(client.of(TransactionResult))
    reply = result.recipients["a@example.com"]
    assert (reply.code, reply.enhanced, reply.local, reply.command) == (
        552,
        "5.3.4",
        True,
        "MAIL FROM",
    )
    assert "1001" in reply.text and "1000" in reply.text
    assert result.data_reply is None and result.mail_reply is None
    # The declared size counts, not only the content's length.
    assert client.send("a@example.com", data=b"x", size=5000) == b""
    assert client.of(TransactionResult)[1].recipients["a@example.com"].code == 552
    assert client.send("a@example.com", data=b"x" * 1000).startswith(
        b"MAIL FROM:<sender@example.net> SIZE=1000\r\n"
    )


def test_size_without_a_limit_is_still_declared() -> None:
    client = ready(b"250-mx\r\n250-PIPELINING\r\n250 SIZE\r\n")
    assert client.send("a@example.com", data=b"x" * 99).startswith(
        b"MAIL FROM:<sender@example.net> SIZE=99\r\n"
    )
    client = ready(b"250-mx\r\n250-PIPELINING\r\n250 SIZE 0\r\n")
    assert b"SIZE=2000000" in client.send("a@example.com", data=b"x" * 2000000)


def test_size_with_thousands_of_digits_is_no_limit_and_the_message_goes() -> None:
    # int() of more than 4,300 digits raises ValueError: it used to escape
    # send_message with the transaction half started, and no result ever came.
    client = ready(b"250-mx\r\n250-PIPELINING\r\n250 SIZE " + b"9" * 5000 + b"\r\n")
    assert client.send("a@example.com").startswith(b"MAIL FROM:<sender@example.net> SIZE=24\r\n")
    client.feed(MAIL_OK + RCPT_OK + GO)
    client.feed(QUEUED)
    assert only(client.of(TransactionResult)).delivered == ["a@example.com"]
    client.conn.quit()
    assert client.sent() == b"QUIT\r\n"
    client.feed(b"221 2.0.0 Bye\r\n")
    assert only(client.of(Closed)).reason == "closed after QUIT"


def test_size_limit_is_read_up_to_18_digits() -> None:
    client = ready(b"250-mx\r\n250-PIPELINING\r\n250 SIZE 000000000000001000\r\n")
    assert client.send("a@example.com", data=b"x" * 1001) == b""
    assert only(client.of(TransactionResult)).recipients["a@example.com"].code == 552
    client = ready(b"250-mx\r\n250-PIPELINING\r\n250 SIZE 0000000000000001000\r\n")
    assert client.send("a@example.com", data=b"x" * 1001).startswith(b"MAIL FROM:")


def test_a_failure_building_mail_from_costs_that_message_only(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    client = ready()

    def broken(self: ClientConnection, txn: object) -> bytes:
        raise ValueError("a bug")

    with monkeypatch.context() as patched:
        patched.setattr(ClientConnection, "_mail_parameters", broken)
        assert client.send("a@example.com") == b""  # no exception, nothing sent
    first = only(client.of(TransactionResult)).recipients["a@example.com"]
    assert (first.code, first.enhanced, first.local) == (451, "4.3.0", True)
    assert "ValueError: a bug" in first.text
    assert client.send("b@example.com").startswith(b"MAIL FROM:")  # the session goes on
    client.feed(MAIL_OK + RCPT_OK + GO)
    client.feed(QUEUED)
    assert client.of(TransactionResult)[1].delivered == ["b@example.com"]


def test_replies_received_counts_complete_replies_only() -> None:
    client = Client()
    client.feed(GREETING[:-3])
    assert client.conn.replies_received == 0
    client.feed(GREETING[-3:])
    assert client.conn.replies_received == 1
    client.feed(EHLO_FULL[:-5])  # a multi-line reply is one, when its last line is in
    assert client.conn.replies_received == 1
    client.feed(EHLO_FULL[-5:])
    assert client.conn.replies_received == 2


def test_smtputf8_needed_but_not_offered() -> None:
    client = ready(b"250-mx\r\n250-PIPELINING\r\n250 8BITMIME\r\n")
    assert client.send("a@example.com", smtputf8=True) == b""
    reply = only(client.of(TransactionResult)).recipients["a@example.com"]
    assert (reply.code, reply.enhanced, reply.local) == (553, "5.6.7", True)
    assert "SMTPUTF8" in reply.text
    # A UTF-8 sender needs it too.
    client.conn.send_message("sändare@example.net", ["a@example.com"], BODY)
    assert client.sent() == b""
    assert client.of(TransactionResult)[1].recipients["a@example.com"].enhanced == "5.6.7"


def test_a_non_ascii_recipient_without_smtputf8_is_refused_alone() -> None:
    client = ready(b"250-mx\r\n250 PIPELINING\r\n")
    sent = client.send("ünï@example.com", "a@example.com")
    assert b"\xc3" not in sent and b"SMTPUTF8" not in sent
    client.feed(MAIL_OK + RCPT_OK + GO + QUEUED)
    result = only(client.of(TransactionResult))
    assert result.recipients["ünï@example.com"].enhanced == "5.6.7"
    assert result.delivered == ["a@example.com"]


def test_smtputf8_offered_is_used_for_utf8_addresses() -> None:
    client = ready()
    sent = client.send("ünï@exämple.com")
    assert sent.startswith(b"MAIL FROM:<sender@example.net> SIZE=24 SMTPUTF8\r\n")
    assert "RCPT TO:<ünï@exämple.com>\r\n".encode() in sent
    client = ready()
    assert b" SMTPUTF8\r\n" in client.send("a@example.com", smtputf8=True)


def test_eight_bit_content_without_8bitmime_is_refused() -> None:
    client = ready(b"250-mx\r\n250 PIPELINING\r\n")
    assert client.send("a@example.com", data="Grüße\r\n".encode()) == b""
    reply = only(client.of(TransactionResult)).recipients["a@example.com"]
    assert (reply.code, reply.enhanced, reply.local) == (554, "5.6.3", True)
    assert "8BITMIME" in reply.text and "not done" in reply.text
    # Declared 8-bit with 7-bit bytes is refused just the same.
    assert client.send("a@example.com", eight_bit=True) == b""


def test_eight_bit_content_declared_when_offered() -> None:
    client = ready()
    sent = client.send("a@example.com", data="Grüße\r\n".encode())
    assert sent.startswith(b"MAIL FROM:<sender@example.net> SIZE=9 BODY=8BITMIME\r\n")
    client = ready()
    assert b"BODY=8BITMIME" in client.send("a@example.com", eight_bit=True)
    client = ready()
    assert b"BODY" not in client.send("a@example.com")


def test_smtputf8_implies_eight_bit_when_8bitmime_is_missing() -> None:
    client = ready(b"250-mx\r\n250-PIPELINING\r\n250 SMTPUTF8\r\n")
    sent = client.send("a@example.com", data="Subject: Grüße\r\n".encode(), smtputf8=True)
    assert sent.startswith(b"MAIL FROM:<sender@example.net> SMTPUTF8\r\n")


@pytest.mark.parametrize(
    "address",
    [
        "a@example.com>\r\nRCPT TO:<evil@example.org",
        "no-at-sign",
        "a b@example.com",
        "<a@example.com>",
        "a@example.com SIZE=1",
    ],
)
def test_bad_recipient_is_refused_locally_and_not_sent(address: str) -> None:
    client = ready()
    sent = client.send(address, "good@example.com")
    assert b"evil" not in sent
    assert sent.count(b"RCPT TO") == 1
    client.feed(MAIL_OK + RCPT_OK + GO + QUEUED)
    result = only(client.of(TransactionResult))
    assert result.recipients[address] == Reply(
        501, "5.1.3", "bad recipient address syntax", "RCPT TO", True
    )
    assert result.delivered == ["good@example.com"]


def test_bad_sender_refuses_the_message_and_null_sender_is_fine() -> None:
    client = ready()
    client.conn.send_message("x>\r\nQUIT", ["a@example.com"], BODY)
    assert client.sent() == b""
    assert only(client.of(TransactionResult)).recipients["a@example.com"].enhanced == "5.1.7"
    client.conn.send_message("", ["postmaster", '"john doe"@example.com'], BODY)
    sent = client.sent()
    assert sent.startswith(b"MAIL FROM:<> SIZE=24\r\nRCPT TO:<postmaster>\r\n")
    assert b'RCPT TO:<"john doe"@example.com>\r\n' in sent


def test_only_bad_recipients_sends_nothing() -> None:
    client = ready()
    assert client.send("bad") == b""
    assert only(client.of(TransactionResult)).recipients["bad"].enhanced == "5.1.3"


# -- STARTTLS --------------------------------------------------------------------------------


def test_starttls_flow() -> None:
    client = ready()
    client.conn.start_tls()
    assert client.send("a@example.com") == b"STARTTLS\r\n"  # the message waits for TLS
    assert client.feed(b"220 2.0.0 Ready to start TLS\r\n") == b""
    assert only(client.of(TlsReady)) == TlsReady()
    assert client.conn.awaiting is None and not client.conn.waiting  # the handshake's own time
    assert not client.conn.tls_active
    client.conn.tls_established()
    assert client.sent() == b"EHLO out.example.net\r\n"
    assert client.conn.tls_active
    assert client.conn.capabilities == {}  # what was learnt before TLS is forgotten
    sent = client.feed(b"250-mx.example.com\r\n250-PIPELINING\r\n250 AUTH PLAIN\r\n")
    assert client.of(Capabilities)[-1].extensions == {"PIPELINING": "", "AUTH": "PLAIN"}
    assert sent.startswith(b"MAIL FROM:<sender@example.net>\r\n")
    with pytest.raises(RuntimeError, match="TLS is already active"):
        client.conn.start_tls()


def test_bytes_after_the_starttls_220_are_refused_as_injection() -> None:
    client = ready()
    client.conn.start_tls()
    client.sent()
    client.feed(b"220 Go ahead\r\n250-injected\r\n250 PIPELINING\r\n")
    assert client.of(TlsReady) == []
    assert "response injection" in only(client.of(Closed)).reason
    client = ready()
    client.conn.start_tls()
    client.sent()
    client.feed(b"220 Go ahead\r\n")
    client.feed(b"250 late injection\r\n")  # plaintext before the handshake
    assert "response injection" in only(client.of(Closed)).reason


def test_starttls_refused_is_a_reply_and_the_session_goes_on() -> None:
    client = ready()
    client.conn.start_tls()
    client.send("a@example.com")
    assert client.sent() == b""
    sent = client.feed(b"454 4.7.0 TLS not available due to temporary reason\r\n")
    refusal = only(client.of(Reply))
    assert (refusal.code, refusal.command) == (454, "STARTTLS")
    assert sent.startswith(b"MAIL FROM:")


def test_starttls_odd_answer_is_a_protocol_error() -> None:
    client = ready()
    client.conn.start_tls()
    client.sent()
    client.feed(b"250 sure\r\n")
    assert "not an answer to STARTTLS" in only(client.of(Closed)).reason


def test_tls_established_out_of_turn_is_a_programming_error() -> None:
    with pytest.raises(RuntimeError, match="TlsReady"):
        ready().conn.tls_established()


def test_endless_multiline_reply_ends_the_session() -> None:
    client = ready()
    client.send("a@example.com")
    client.feed(b"250-this goes on and on\r\n" * 3000)
    assert only(client.of(Closed)).reason == "protocol error: reply too long"


def test_success_reply_to_data_is_a_protocol_error_not_a_delivery() -> None:
    client = ready()
    client.send("a@example.com")
    client.feed(MAIL_OK + RCPT_OK + b"250 2.0.0 sure\r\n")
    assert "is not an answer to DATA" in only(client.of(Closed)).reason
    result = only(client.of(TransactionResult))
    assert result.delivered == []
    assert result.outcome("a@example.com").enhanced == "4.5.0"


# -- AUTH ------------------------------------------------------------------------------------

USER, PASSWORD = "relay-user", "s3cret pass"
CREDENTIALS = Credentials(USER, PASSWORD)
PLAIN_BLOB = base64.b64encode(f"\0{USER}\0{PASSWORD}".encode())
AUTH_OK = b"235 2.7.0 Authentication successful\r\n"
LOGIN_USER_PROMPT = b"334 VXNlcm5hbWU6\r\n"  # "Username:"
LOGIN_PASSWORD_PROMPT = b"334 UGFzc3dvcmQ6\r\n"  # "Password:"


def ehlo_with(*extensions: bytes) -> bytes:
    lines = [b"mx.example.com", b"PIPELINING", b"ENHANCEDSTATUSCODES", *extensions]
    return b"".join(
        b"250" + (b" " if i == len(lines) - 1 else b"-") + line + b"\r\n"
        for i, line in enumerate(lines)
    )


def in_tls(inner: bytes, *, outer: bytes = EHLO_FULL) -> Client:
    """A client past STARTTLS: ``outer`` offered before the handshake, ``inner`` after it."""
    client = ready(outer)
    client.conn.start_tls()
    assert client.sent() == b"STARTTLS\r\n"
    client.feed(b"220 2.0.0 Ready to start TLS\r\n")
    client.conn.tls_established()
    assert client.sent() == b"EHLO out.example.net\r\n"
    client.feed(inner)
    return client


def assert_no_credentials(wire: bytes) -> None:
    assert USER.encode() not in wire and PASSWORD.encode() not in wire
    assert PLAIN_BLOB not in wire
    assert base64.b64encode(PASSWORD.encode()) not in wire
    assert b"AUTH" not in wire


def test_auth_plain_sends_the_initial_response_and_235_authenticates() -> None:
    client = in_tls(ehlo_with(b"AUTH PLAIN LOGIN"))
    client.conn.authenticate(CREDENTIALS)
    assert client.sent() == b"AUTH PLAIN " + PLAIN_BLOB + b"\r\n"
    assert client.conn.awaiting == "the reply to AUTH"
    assert client.conn.auth_mechanism is None
    assert client.feed(AUTH_OK, bytewise=True) == b""
    assert only(client.of(Authenticated)) == Authenticated("PLAIN")
    assert client.conn.auth_mechanism == "PLAIN"
    assert client.of(AuthFailed) == [] and client.of(Reply) == []  # AUTH is summed up
    assert client.conn.awaiting is None and not client.conn.closed


def test_auth_login_answers_the_two_challenges_in_turn() -> None:
    client = in_tls(ehlo_with(b"AUTH LOGIN"))
    client.conn.authenticate(CREDENTIALS)
    assert client.sent() == b"AUTH LOGIN\r\n"
    assert client.feed(LOGIN_USER_PROMPT, bytewise=True) == base64.b64encode(USER.encode()) + (
        b"\r\n"
    )
    assert client.conn.awaiting == "the reply to AUTH"
    assert client.feed(LOGIN_PASSWORD_PROMPT, bytewise=True) == base64.b64encode(
        PASSWORD.encode()
    ) + (b"\r\n")
    assert client.feed(AUTH_OK) == b""
    assert only(client.of(Authenticated)) == Authenticated("LOGIN")
    assert client.conn.auth_mechanism == "LOGIN"


def test_non_ascii_credentials_are_sent_as_utf8() -> None:
    client = in_tls(ehlo_with(b"AUTH PLAIN"))
    client.conn.authenticate(Credentials("jürgen", "pässwort"))
    expected = base64.b64encode("\0jürgen\0pässwort".encode())
    assert client.sent() == b"AUTH PLAIN " + expected + b"\r\n"


@pytest.mark.parametrize(
    ("extensions", "mechanism"),
    [
        ((b"AUTH LOGIN PLAIN",), "PLAIN"),  # PLAIN preferred whatever the order
        ((b"AUTH CRAM-MD5 LOGIN",), "LOGIN"),
        ((b"AUTH login xoauth2",), "LOGIN"),  # case does not matter
        ((b"AUTH=LOGIN",), "LOGIN"),  # the pre-standard form of old servers
        ((b"AUTH CRAM-MD5", b"AUTH=PLAIN LOGIN"), "PLAIN"),
    ],
)
def test_the_mechanism_is_the_best_one_offered(
    extensions: tuple[bytes, ...], mechanism: str
) -> None:
    client = in_tls(ehlo_with(*extensions))
    client.conn.authenticate(CREDENTIALS)
    assert client.sent().startswith(f"AUTH {mechanism}".encode())


def test_no_mechanism_in_common_ends_the_session_naming_what_was_offered() -> None:
    client = in_tls(ehlo_with(b"AUTH CRAM-MD5 XOAUTH2"))
    client.conn.authenticate(CREDENTIALS)
    sent = client.sent()
    assert sent == b"QUIT\r\n"
    failed = only(client.of(AuthFailed))
    assert failed.reason == "the server offers AUTH CRAM-MD5 XOAUTH2, none of PLAIN and LOGIN"
    assert failed.reply is None and failed.temporary
    assert client.events[-1] == Closed(f"authentication failed: {failed.reason}", None)
    assert client.conn.closed and client.conn.auth_mechanism is None


def test_no_auth_offered_ends_the_session() -> None:
    client = Client()
    # Both asked for before the greeting; plaintext allowed, so AUTH is what is missing.
    client.conn.authenticate(CREDENTIALS, allow_plaintext_auth=True)
    client.conn.send_message("s@example.net", ["a@example.com"], BODY)
    client.feed(GREETING)
    sent = client.feed(ehlo_with(b"SIZE 1000"))
    assert sent == b"QUIT\r\n"  # the message waited for AUTH: never sent
    assert_no_credentials(sent)
    failed = only(client.of(AuthFailed))
    assert failed.reason == "the server does not offer AUTH"
    assert failed.temporary
    result = only(client.of(TransactionResult))
    assert result.recipients["a@example.com"] == Reply(
        451, "4.7.0", "authentication failed: the server does not offer AUTH", "AUTH", local=True
    )


def test_535_is_a_permanent_refusal_and_queued_mail_is_not_blamed() -> None:
    client = in_tls(ehlo_with(b"AUTH PLAIN"))
    client.conn.authenticate(CREDENTIALS)
    client.conn.send_message("s@example.net", ["a@example.com"], BODY)
    assert client.sent().startswith(b"AUTH PLAIN ")  # and nothing else: MAIL waits
    assert client.feed(b"535 5.7.8 Authentication credentials invalid\r\n") == b"QUIT\r\n"
    refusal = Reply(535, "5.7.8", "Authentication credentials invalid", "AUTH")
    failed = only(client.of(AuthFailed))
    assert failed == AuthFailed(
        "the server refused AUTH PLAIN: 535 5.7.8 Authentication credentials invalid", refusal
    )
    assert not failed.temporary
    closed = only(client.of(Closed))
    assert closed.reply == refusal
    # The recipient gets a local temporary reply, never the server's 535 about us.
    reply = only(client.of(TransactionResult)).recipients["a@example.com"]
    assert (reply.code, reply.enhanced, reply.local) == (451, "4.7.0", True)
    assert client.of(Authenticated) == []


def test_454_is_a_temporary_refusal() -> None:
    client = in_tls(ehlo_with(b"AUTH PLAIN"))
    client.conn.authenticate(CREDENTIALS)
    client.sent()
    assert client.feed(b"454 4.7.0 Temporary authentication failure\r\n") == b"QUIT\r\n"
    failed = only(client.of(AuthFailed))
    assert failed.temporary
    assert failed.reply is not None and failed.reply.code == 454
    assert client.conn.closed


def test_login_refused_after_the_password() -> None:
    client = in_tls(ehlo_with(b"AUTH LOGIN"))
    client.conn.authenticate(CREDENTIALS)
    client.sent()
    client.feed(LOGIN_USER_PROMPT)
    client.feed(LOGIN_PASSWORD_PROMPT)
    assert client.feed(b"535 5.7.8 no\r\n") == b"QUIT\r\n"
    failed = only(client.of(AuthFailed))
    assert failed.reason == "the server refused AUTH LOGIN: 535 5.7.8 no"
    assert not failed.temporary


def test_421_to_auth_is_the_server_going_away() -> None:
    client = in_tls(ehlo_with(b"AUTH PLAIN"))
    client.conn.authenticate(CREDENTIALS)
    client.sent()
    assert client.feed(b"421 4.3.2 shutting down\r\n") == b""
    closed = only(client.of(Closed))
    assert closed.reply is not None and closed.reply.code == 421
    assert client.of(AuthFailed) == []


def test_credentials_are_not_sent_without_tls() -> None:
    client = ready(ehlo_with(b"AUTH PLAIN LOGIN"))  # no STARTTLS, AUTH offered in the clear
    client.conn.authenticate(CREDENTIALS)
    sent = client.sent()
    assert sent == b"QUIT\r\n"
    assert_no_credentials(sent)
    failed = only(client.of(AuthFailed))
    assert failed.reason == (
        "TLS is not active, and credentials are not sent over an unencrypted "
        "connection unless allow_plaintext_auth is set"
    )
    assert failed.temporary and failed.reply is None
    assert client.conn.closed


def test_credentials_without_tls_when_plaintext_auth_is_allowed() -> None:
    client = ready(ehlo_with(b"AUTH PLAIN LOGIN"))
    client.conn.authenticate(CREDENTIALS, allow_plaintext_auth=True)
    assert client.sent() == b"AUTH PLAIN " + PLAIN_BLOB + b"\r\n"
    client.feed(AUTH_OK)
    assert only(client.of(Authenticated)).mechanism == "PLAIN"


def test_starttls_refused_then_auth_is_not_sent_in_plaintext() -> None:
    """Opportunistic TLS whose STARTTLS is refused: the session would go on in the clear."""
    client = ready()
    client.conn.start_tls()
    client.conn.authenticate(CREDENTIALS)
    assert client.sent() == b"STARTTLS\r\n"  # AUTH waits for the outcome
    sent = client.feed(b"454 4.7.0 TLS not available\r\n")
    assert sent == b"QUIT\r\n"
    assert_no_credentials(sent)
    assert "TLS is not active" in only(client.of(AuthFailed)).reason


def test_auth_after_starttls_uses_the_mechanisms_offered_inside_tls() -> None:
    # Before TLS only LOGIN is offered; inside it PLAIN: the inner list decides.
    client = ready(ehlo_with(b"STARTTLS", b"AUTH LOGIN"))
    client.conn.start_tls()
    client.conn.authenticate(CREDENTIALS)  # asked before the handshake: it waits
    assert client.sent() == b"STARTTLS\r\n"
    client.feed(b"220 2.0.0 go ahead\r\n")
    assert client.sent() == b""
    client.conn.tls_established()
    assert client.sent() == b"EHLO out.example.net\r\n"
    assert client.feed(ehlo_with(b"AUTH PLAIN")) == b"AUTH PLAIN " + PLAIN_BLOB + b"\r\n"
    # And the other way round: AUTH offered outside TLS only is no AUTH at all.
    client = in_tls(ehlo_with(b"SIZE 1000"), outer=ehlo_with(b"STARTTLS", b"AUTH PLAIN"))
    client.conn.authenticate(CREDENTIALS)
    assert client.sent() == b"QUIT\r\n"
    assert only(client.of(AuthFailed)).reason == "the server does not offer AUTH"


def test_mail_after_auth_is_pipelined() -> None:
    client = in_tls(ehlo_with(b"AUTH PLAIN"))
    client.conn.authenticate(CREDENTIALS)
    client.conn.send_message("s@example.net", ["a@example.com", "b@example.com"], BODY)
    client.conn.send_message("s@example.net", ["c@example.com"], BODY)
    assert client.sent() == b"AUTH PLAIN " + PLAIN_BLOB + b"\r\n"  # AUTH ends the group
    # The 235, then the first envelope with its DATA in one write.
    assert client.feed(AUTH_OK) == (
        b"MAIL FROM:<s@example.net>\r\n"
        b"RCPT TO:<a@example.com>\r\n"
        b"RCPT TO:<b@example.com>\r\n"
        b"DATA\r\n"
    )
    client.feed(MAIL_OK + RCPT_OK + RCPT_OK)
    assert client.feed(
        GO
    ) == BODY + b".\r\nMAIL FROM:<s@example.net>\r\nRCPT TO:<c@example.com>\r\n" + (b"DATA\r\n")
    client.feed(QUEUED + MAIL_OK + RCPT_OK + GO)
    client.feed(QUEUED)
    assert [r.delivered for r in client.of(TransactionResult)] == [
        ["a@example.com", "b@example.com"],
        ["c@example.com"],
    ]


@pytest.mark.parametrize(
    ("ehlo", "replies", "problem"),
    [
        (b"AUTH PLAIN", [b"334 \r\n"], "a challenge '334' after AUTH PLAIN with an initial"),
        (
            b"AUTH LOGIN",
            [LOGIN_USER_PROMPT, LOGIN_PASSWORD_PROMPT, b"334 VGhpcmQ6\r\n"],
            "a third challenge '334 VGhpcmQ6' in AUTH LOGIN",
        ),
        (b"AUTH LOGIN", [b"334 not base64!\r\n"], "challenge '334 not base64!' is not base64"),
        (b"AUTH PLAIN", [b"250 2.0.0 fine\r\n"], "'250 2.0.0 fine' is not an answer to AUTH"),
    ],
)
def test_auth_answers_out_of_turn_end_the_session_without_a_response(
    ehlo: bytes, replies: list[bytes], problem: str
) -> None:
    client = in_tls(ehlo_with(ehlo))
    client.conn.authenticate(CREDENTIALS)
    client.sent()
    sent = b"".join(client.feed(reply) for reply in replies)
    if b"LOGIN" in ehlo:
        sent = sent.replace(base64.b64encode(USER.encode()) + b"\r\n", b"")
        sent = sent.replace(base64.b64encode(PASSWORD.encode()) + b"\r\n", b"")
    assert sent == b""  # no answer, not even QUIT: it would be read as a SASL response
    failed = only(client.of(AuthFailed))
    assert failed.reason.startswith("protocol error: ")
    assert problem in failed.reason
    assert failed.temporary and client.conn.closed


def test_auth_is_asked_for_once() -> None:
    client = in_tls(ehlo_with(b"AUTH PLAIN"))
    client.conn.authenticate(CREDENTIALS)
    with pytest.raises(RuntimeError, match="AUTH was asked for already"):
        client.conn.authenticate(CREDENTIALS)


def test_no_event_shows_the_password() -> None:
    client = in_tls(ehlo_with(b"AUTH LOGIN"))
    client.conn.authenticate(CREDENTIALS)
    client.sent()
    client.feed(LOGIN_USER_PROMPT + LOGIN_PASSWORD_PROMPT + b"535 5.7.8 no\r\n")
    shown = repr(client.events) + str(client.events) + repr(CREDENTIALS)
    assert PASSWORD not in shown
    assert base64.b64encode(PASSWORD.encode()).decode() not in shown


# -- property: whatever the server says, every message gets exactly one result, in order ------

REPLY_LINES = st.sampled_from(
    [
        b"250 2.1.0 Ok\r\n",
        b"250-more\r\n",
        b"354 go\r\n",
        b"220 ready\r\n",
        b"450 4.2.0 later\r\n",
        b"550 5.1.1 no\r\n",
        b"421 4.3.0 bye\r\n",
        b"503 5.5.1 order\r\n",
        b"221 bye\r\n",
        b"235 2.7.0 ok\r\n",
        b"334 VXNlcm5hbWU6\r\n",
        b"535 5.7.8 no\r\n",
        b"garbage\r\n",
        b"25",
        b"0 ok\n",
    ]
)


@settings(max_examples=300, deadline=None)
@given(
    ehlo=st.sampled_from([EHLO_FULL, EHLO_PLAIN, b"250-mx\r\n250 AUTH LOGIN\r\n"]),
    messages=st.lists(
        st.tuples(
            st.lists(st.sampled_from(["a@example.com", "b@example.com", "bad"]), min_size=1),
            st.sampled_from([BODY, b"", "Grüße".encode(), b"x" * 10240001]),
        ),
        min_size=1,
        max_size=4,
    ),
    chunks=st.lists(st.one_of(REPLY_LINES, st.binary(max_size=12)), max_size=30),
    tls=st.booleans(),
    auth=st.booleans(),
)
def test_any_server_behaviour_gives_one_result_per_message(
    ehlo: bytes,
    messages: list[tuple[list[str], bytes]],
    chunks: list[bytes],
    tls: bool,
    auth: bool,
) -> None:
    client = Client()  # everything asked for before the greeting, so nothing is refused yet
    if tls:
        client.conn.start_tls()
    if auth:  # plaintext allowed, so that the dialogue itself meets the noise
        client.conn.authenticate(CREDENTIALS, allow_plaintext_auth=True)
    for recipients, data in messages:
        client.conn.send_message("s@example.net", recipients, data)
    wire = client.feed(GREETING) + client.feed(ehlo)
    for chunk in chunks:
        wire += client.feed(chunk)
        if client.of(TlsReady) and not client.conn.tls_active and not client.conn.closed:
            client.conn.tls_established()
            wire += client.sent()
    client.conn.abort("the test is over")
    # AUTH ends one way at most, and without its 235 no mail leaves.
    assert len(client.of(Authenticated)) + len(client.of(AuthFailed)) <= int(auth)
    if auth and not client.of(Authenticated):
        assert b"MAIL FROM" not in wire
    results = client.of(TransactionResult)
    assert len(results) == len(messages)
    for result, (recipients, _) in zip(results, messages, strict=True):
        assert list(result.recipients) == list(dict.fromkeys(recipients))
        for recipient, reply in result.recipients.items():
            assert 200 <= reply.code <= 599
            # A recipient's deciding reply says success only if the message was taken.
            assert (result.outcome(recipient).code < 300) == (recipient in result.delivered)
        if result.delivered:
            assert result.data_reply is not None and result.data_reply.code < 300
    assert len(client.of(Closed)) == 1
    assert client.of(Closed)[0] is client.events[-1]
