"""Bounce processing: turning reports received at bounce domains into recipient outcomes.

A remote server that accepted a message may still fail to deliver it and say
so later, by mail, to the envelope sender: the recipient's VERP address
(:mod:`postlane.delivery.verp`). Mailbox providers send complaints ("this is
spam") the same way. The SMTP server stores that mail as an inbound message
(:func:`postlane.intake.pipeline.inbound`); this role reads it and, per
message, in one transaction:

- a DSN (:func:`~postlane.delivery.dsn.parse_report`) whose recipient block
  says ``failed``: the recipient becomes ``bounced`` (whatever it was — a
  ``250`` followed by a bounce is a bounce), with a ``bounced`` event
  (status, diagnostic, remote MTA, classification kind), and the address is
  suppressed (``hard_bounce``) when
  :func:`~postlane.delivery.bounce_class.classify` says it is a hard bounce,
  else put on the ``returned`` list, which only mail asking for X-ListOption
  512 avoids (the mail came back, but not because the address is bad);
  ``delayed``: only a ``delayed`` event, the status stays;
- an ARF ``abuse`` report: a ``complained`` event and a ``complaint``
  suppression; the status stays (complaints come after delivery);
- anything else — no report, no VERP address of ours, a forged tag, a
  recipient of another account — is recorded as not matched;

and always exactly one ``inbound_processed`` event on the inbound message,
written with the effects, so a crash never applies a report twice.

Which recipient: the VERP addresses the report was sent *to* (RCPT TO, as
the SMTP server received it) decide; only when none is ours are the
addresses the report *quotes* tried (a DSN's original envelope sender, an
ARF's Original-Mail-From or returned Return-Path), for reports forwarded
from a mailbox. The tag makes a VERP address unforgeable, but it does not
say whose it is, so a recipient is touched only if it belongs to the account
that owns the bounce domain the report arrived at: one customer cannot
bounce or suppress another's recipients by mailing its own bounce domain.

Plain-text bounces that are not RFC 3464 reports (qmail style) are not acted
on, even at a valid VERP address: vacation replies and people answering go
there too, and marking a delivered recipient bounced on their word would be
wrong. They are recorded as not matched, with the recipient ids they named.

A message whose transaction fails (a bug, a value the database refuses) is
retried, but it must neither be retried for ever nor keep the messages after
it waiting: each failure is logged and counted
(:func:`~postlane.store.inbound.record_inbound_failure`), the next attempt
waits :data:`RETRY_DELAY`, doubled per failure, and the
:data:`MAX_ATTEMPTS`-th failure marks the message processed with the error
as its outcome. A run reads page after page until the work list is read, so
failing or waiting messages never fill the batch that healthy ones needed.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import threading
import time
from collections.abc import Callable, Iterable
from datetime import UTC, datetime, timedelta
from typing import Any, Final

from sqlalchemy.engine import Connection

from postlane.config import Settings
from postlane.crypto import derive_key
from postlane.delivery import verp
from postlane.delivery.bounce_class import Classification, classify
from postlane.delivery.dsn import Arf, Dsn, DsnRecipient, parse_report
from postlane.errors import InvalidInput
from postlane.store import Database
from postlane.store import inbound as inbound_store
from postlane.store.inbound import BounceRecipient, InboundMessage
from postlane.store.suppressions import add_suppression

__all__ = ["BounceProcessor"]

log = logging.getLogger("postlane.bounces")

#: The VERP key's HKDF purpose; must match the delivery worker's VERP_KEY_PURPOSE.
VERP_KEY_PURPOSE: Final = "postlane/verp/v1"
#: Inbound messages read per query (each is then processed in its own transaction).
BATCH: Final = 100
#: Event ids re-read behind the cursor on every poll. On PostgreSQL ids are
#: taken before commit, so an ``inbound`` event may become visible after
#: later ids were already read; re-reading this far back catches it.
LOOKBACK_IDS: Final = 10_000
#: Seconds between full re-reads of the event log from id 0, the safety net
#: for an event that became visible later than :data:`LOOKBACK_IDS` allows.
RESCAN_SECONDS: Final = 3600.0
#: Feedback types that are complaints (RFC 5965 §7.3: "abuse" is "this is spam").
COMPLAINT_TYPES: Final = frozenset({"abuse"})
#: Failed attempts after which a message is given up (marked processed with the error).
MAX_ATTEMPTS: Final = 5
#: Wait before the first retry, doubled after each further failure: a lock
#: timeout or a brief outage gets some 15 minutes in all before a genuine
#: bounce is given up, a message that can never succeed no longer than that.
RETRY_DELAY: Final = timedelta(minutes=1)
#: Longest error text logged and recorded per failure.
_ERROR_CHARS: Final = 500


class _Attempt(enum.Enum):
    PROCESSED = "processed"  # off the work list by this processor, applied or given up
    SKIPPED = "skipped"  # another processor had done it already
    LATER = "later"  # still on the work list: failed, or waiting to be retried


def _utc_now() -> datetime:
    return datetime.now(UTC)


class BounceProcessor:
    """The ``bounces`` role: polls for inbound messages and processes each (see the module).

    ``master_key`` is the installation's master secret; the VERP key is
    derived from it exactly as the delivery worker derives it. ``clock`` is
    for tests. The database work is blocking and runs in a thread.
    """

    name = "bounces"

    def __init__(
        self,
        settings: Settings,
        db: Database,
        master_key: bytes,
        *,
        clock: Callable[[], datetime] = _utc_now,
        poll_interval: float = 5.0,
        monotonic: Callable[[], float] | None = None,
    ) -> None:
        self._settings = settings
        self._db = db
        self._verp_key = derive_key(master_key, VERP_KEY_PURPOSE)
        self._clock = clock
        self._poll_interval = poll_interval
        self._monotonic = monotonic or time.monotonic
        self._cursor = 0
        self._last_rescan = float("-inf")
        self._stopping = asyncio.Event()
        # Read by run_once in its thread, where the asyncio event must not be touched.
        self._halt = threading.Event()
        self._task: asyncio.Task[None] | None = None

    # -- the role ---------------------------------------------------------------------------

    async def start(self) -> None:
        """Start polling; returns at once."""
        self._stopping.clear()
        self._halt.clear()
        self._task = asyncio.create_task(self._run(), name="bounce-processor")
        log.info("bounce processor started")

    async def stop(self) -> None:
        """Stop after the message in hand: each is one transaction, so none is half done."""
        self._stopping.set()
        self._halt.set()
        if self._task is not None:
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        log.info("bounce processor stopped")

    async def _run(self) -> None:
        while not self._stopping.is_set():
            processed = 0
            try:
                processed = await asyncio.to_thread(self.run_once)
            except Exception:  # the database may be down for a moment: wait, then try again
                log.exception("bounce processing failed")
            if processed < BATCH:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stopping.wait(), timeout=self._poll_interval)

    # -- one batch ----------------------------------------------------------------------------

    def run_once(self) -> int:
        """Process the unprocessed inbound messages; how many were taken off the work list.

        Blocking (the running role calls it in a thread). Pages of
        :data:`BATCH` are read until the list is exhausted or a batch's worth
        was processed (the role then calls again at once): a page of messages
        that fail or wait for a retry does not stop the next page being read.
        The cursor stops before the first message left for later, so it is
        read again on the next call.
        """
        now_mono = self._monotonic()
        if now_mono - self._last_rescan >= RESCAN_SECONDS:
            self._cursor, self._last_rescan = 0, now_mono
        after = max(0, self._cursor - LOOKBACK_IDS)
        processed = 0
        first_left: int | None = None
        last_seen: int | None = None
        while not self._halt.is_set():
            with self._db.connect() as conn:
                batch = inbound_store.pending_inbound(conn, after_event_id=after, limit=BATCH)
            for message in batch:
                if self._halt.is_set():  # stopping: the rest waits for the next start
                    break
                result = self._attempt(message)
                if result is _Attempt.PROCESSED:
                    processed += 1
                elif result is _Attempt.LATER and first_left is None:
                    first_left = message.event_id
                last_seen = message.event_id
            if len(batch) < BATCH or processed >= BATCH:
                break
            after = batch[-1].event_id
        if last_seen is not None:
            self._cursor = max(
                self._cursor, first_left - 1 if first_left is not None else last_seen
            )
        return processed

    def _attempt(self, message: InboundMessage) -> _Attempt:
        """Process ``message`` unless its retry is not due; count it if it fails."""
        now = self._clock()
        if message.failures and message.last_failure_at is not None:
            due = message.last_failure_at + RETRY_DELAY * 2 ** (message.failures - 1)
            if now < due:
                return _Attempt.LATER
        try:
            return _Attempt.PROCESSED if self._process(message) else _Attempt.SKIPPED
        except Exception as e:
            error = _describe(e)
            log.error(
                "inbound message %s (event %d): processing failed: %s",
                message.message_id,
                message.event_id,
                error,
                exc_info=True,
            )
        try:
            with self._db.begin() as conn:
                if not inbound_store.claim_inbound(conn, message):
                    return _Attempt.SKIPPED
                given_up = inbound_store.record_inbound_failure(
                    conn, message, now=now, error=error, max_attempts=MAX_ATTEMPTS
                )
        except Exception:  # the database itself is failing: the next run tries again
            log.exception("inbound message %s: failure not recorded", message.message_id)
            return _Attempt.LATER
        if given_up:
            log.error(
                "inbound message %s (event %d): given up after %d failed attempts: %s",
                message.message_id,
                message.event_id,
                MAX_ATTEMPTS,
                error,
            )
            return _Attempt.PROCESSED
        return _Attempt.LATER

    def _process(self, message: InboundMessage) -> bool:
        """Apply one inbound message; False if another processor had done it already."""
        report = _parse(message)
        now = self._clock()
        with self._db.begin() as conn:
            if not inbound_store.claim_inbound(conn, message):
                return False
            if message.raw is None:
                outcome = _unmatched("message purged before processing")
            elif report is None:
                ids = self._decode(message.rcpt_to)
                outcome = _unmatched("not a delivery report", recipient_ids=ids)
            else:
                outcome = self._apply(conn, message, report, now)
            inbound_store.mark_inbound_processed(conn, message, now=now, data=outcome)
        log.info("inbound message %s processed: %s", message.message_id, outcome)
        return True

    # -- matching -----------------------------------------------------------------------------

    def _decode(self, addresses: Iterable[str | None]) -> list[int]:
        """The recipient ids named by those of ``addresses`` that are our VERP addresses."""
        ids: dict[int, None] = {}
        for address in addresses:
            if address:
                decoded = verp.decode(address, key=self._verp_key)
                if decoded is not None:
                    ids[decoded] = None
        return list(ids)

    def _targets(
        self, conn: Connection, message: InboundMessage, report: Dsn | Arf
    ) -> tuple[list[BounceRecipient], str]:
        """The account's own recipients the report is about, or none and the reason why."""
        ids = self._decode(message.rcpt_to)
        if not ids:
            if isinstance(report, Dsn):
                quoted = [report.return_path]
            else:
                quoted = [report.original_mail_from, report.original_header("Return-Path")]
            ids = self._decode(quoted)
        if not ids:
            return [], "no VERP address of ours (foreign, forged or absent)"
        rows = inbound_store.recipients_by_id(conn, ids)
        targets: list[BounceRecipient] = []
        for recipient_id in ids:
            row = rows.get(recipient_id)
            if row is None:
                log.info(
                    "inbound %s: recipient %d no longer exists", message.message_id, recipient_id
                )
            elif row.account_id != message.account_id:
                log.warning(
                    "inbound %s for account %d names recipient %d of account %d: ignored",
                    message.message_id,
                    message.account_id,
                    recipient_id,
                    row.account_id,
                )
            else:
                targets.append(row)
        if not targets:
            return [], "recipient unknown or of another account"
        return targets, ""

    # -- effects ------------------------------------------------------------------------------

    def _apply(
        self, conn: Connection, message: InboundMessage, report: Dsn | Arf, now: datetime
    ) -> dict[str, Any]:
        targets, reason = self._targets(conn, message, report)
        kind = "dsn" if isinstance(report, Dsn) else "arf"
        if not targets:
            return _unmatched(reason, kind=kind)
        results: dict[str, str] = {}
        for target in targets:
            if isinstance(report, Dsn):
                result = self._dsn(conn, message, target, report, now)
            else:
                result = self._arf(conn, message, target, report, now)
            results[str(target.id)] = result
        return {"matched": True, "kind": kind, "recipients": results}

    def _dsn(
        self,
        conn: Connection,
        message: InboundMessage,
        recipient: BounceRecipient,
        report: Dsn,
        now: datetime,
    ) -> str:
        block = _block_for(recipient.address, report.recipients)
        if block is None:
            return "no failed or delayed recipient in the report"
        classification = _classify(block)
        data = {
            "status": block.status,
            "diagnostic": block.diagnostic_code,
            "remote_mta": block.remote_mta or report.reporting_mta,
            "classification": classification.kind.value,
            "reason": classification.reason,
            "inbound_message_id": message.message_id,
        }
        if block.action == "delayed":
            inbound_store.record_event(
                conn,
                account_id=recipient.account_id,
                message_id=recipient.message_id,
                recipient_id=recipient.id,
                event_type="delayed",
                now=now,
                data=data,
            )
            return "delayed"
        changed = inbound_store.record_bounce(
            conn, recipient.id, now=now, status_code=block.status, data=data
        )
        if classification.suppress:
            self._suppress(conn, recipient, "hard_bounce", block.status, now)
        else:
            detail = block.diagnostic_code or block.status
            self._suppress(conn, recipient, "returned", detail, now)
        return "bounced" if changed else "already bounced"

    def _arf(
        self,
        conn: Connection,
        message: InboundMessage,
        recipient: BounceRecipient,
        report: Arf,
        now: datetime,
    ) -> str:
        if report.feedback_type not in COMPLAINT_TYPES:
            return f"feedback type {report.feedback_type!r} ignored"
        inbound_store.record_event(
            conn,
            account_id=recipient.account_id,
            message_id=recipient.message_id,
            recipient_id=recipient.id,
            event_type="complained",
            now=now,
            data={
                "feedback_type": report.feedback_type,
                "user_agent": report.user_agent,
                "source_ip": report.source_ip,
                "arrival_date": report.arrival_date,
                "inbound_message_id": message.message_id,
            },
        )
        self._suppress(conn, recipient, "complaint", report.user_agent, now)
        return "complained"

    def _suppress(
        self,
        conn: Connection,
        recipient: BounceRecipient,
        reason: str,
        detail: str | None,
        now: datetime,
    ) -> None:
        try:
            add_suppression(conn, recipient.account_id, recipient.address, reason, detail, now=now)
        except InvalidInput as e:  # an address intake accepted but the list refuses
            log.warning("recipient %d: not suppressed: %s", recipient.id, e)


def _parse(message: InboundMessage) -> Dsn | Arf | None:
    """The report in ``message``; None for anything unreadable, which is then not matched."""
    if message.raw is None:
        return None
    try:
        return parse_report(message.raw)
    except Exception:  # a malformed message must not block the queue behind it
        log.exception("inbound message %s: unreadable", message.message_id)
        return None


def _block_for(address: str, blocks: Iterable[DsnRecipient]) -> DsnRecipient | None:
    """The failed (else delayed) block about ``address``, or else the first such block.

    A DSN to a VERP address is about that one recipient, but forwarding can
    change the final recipient, so a block naming another address is still
    taken when none names ours.
    """
    relevant = [b for b in blocks if b.action in ("failed", "delayed")]
    relevant.sort(key=lambda b: b.action != "failed")
    wanted = address.lower()
    for block in relevant:
        named = {b.lower() for b in (block.final_recipient, block.original_recipient) if b}
        if wanted in named:
            return block
    return relevant[0] if relevant else None


def _classify(block: DsnRecipient) -> Classification:
    """Classify a DSN block: the SMTP reply code if given, else one made from the status.

    ``failed`` without any code is permanent (550); ``delayed`` temporary (450).
    Some MTAs report every failure as ``Status: 5.0.0`` and quote the remote
    reply, with its own enhanced code, in the diagnostic. That code is then
    the one classified, as the worker would have classified the reply: a
    ``550 5.7.1 Unknown user`` must not suppress the address because the
    report's status said less than the server did.
    """
    code = block.reply_code
    text = block.diagnostic_code or ""
    if code is not None:
        text = text[3:].lstrip(" -")  # the reply's text, where classify reads a leading code
    if code is None or not 400 <= code <= 599:
        if block.status and block.status[0] in "45":
            code = int(block.status[0]) * 100 + 50
        else:
            code = 550 if block.action == "failed" else 450
    status = block.status
    if status is not None and status[1:] == ".0.0":
        status = None  # generic: let the reply's own code, if any, speak
    return classify(code, status, text)


def _describe(error: Exception) -> str:
    """One bounded line naming the error, without the SQL and parameters a driver error adds.

    The parameters may be the very text that failed (a NUL the database
    refused) and the recipients' addresses: not for the event log.
    """
    first = str(error).strip().partition("\n")[0]
    return inbound_store.printable(f"{type(error).__name__}: {first}", _ERROR_CHARS)


def _unmatched(reason: str, **extra: Any) -> dict[str, Any]:
    return {"matched": False, "reason": reason, **extra}
