"""The delivery worker: leases due recipients and takes each to its mail exchanger.

One :class:`DeliveryWorker` per process (the ``delivery`` role). Its loop:

1. **Lease** up to ``lease_batch`` due rows (highest priority first) in one
   short transaction, in a thread: the database driver blocks, the event loop
   must not. Every so often also **sweep**: rows whose lease ran out (a dead
   worker's) go back to the queue, and waiting rows past their expiry expire.
2. **Group** the rows by recipient domain and handle each group in its own
   task, so one slow domain (timeouts, tarpits) never holds up the others;
   new rows are leased while groups are still under way, up to
   ``lease_batch`` rows in flight. A lease that drained the due rows is
   followed by a short pause (``GATHER_SECONDS``) so batches grow with the
   arrival rate instead of one lease per few messages.
3. Per group: load each message once; drop the rows the message's list
   options and the account's lists filter (:mod:`~postlane.delivery.list_filter`,
   a ``suppressed`` event saying which); render
   and sign each copy (:func:`~postlane.delivery.compose.compose`); resolve
   the domain's route once; take **one connection** (per TLS policy) — an
   idle one kept from an earlier batch to the same hosts when it still
   answers RSET (:mod:`~postlane.delivery.connection_cache`,
   ``delivery.connection_cache_seconds``), else a new one — and send the
   copies over it in order, pipelined (each copy's commands travel with the
   previous copy's content), the group spread over several connections (see
   *Traffic shaping*); record each outcome.

A copy the receiver accepted is written to the worker's journal
(:mod:`~postlane.delivery.outcome_journal`, a local file) before the next
copy's content goes out on that connection, and its database row follows in the
background. A worker killed mid-batch therefore resends at most the one copy
each connection was sending; the sweep records a dead worker's journal
before it reclaims that worker's rows, and writes again this worker's own
journaled deliveries whose database write failed.

While rows are in flight their leases are renewed every third of
``lease_seconds``, so a slow receiver never lets another worker's sweep
take a row that is still being sent.

Outcomes, written in shared transactions fenced on the lease (see
:mod:`postlane.store.queue`): 2xx delivered; 4xx, a lost connection or no
reachable host deferred with backoff (at least a minute, never past the
expiry, which turns it into ``expired``); 5xx failed, and the address
suppressed when :func:`~postlane.delivery.bounce_class.classify` says it is a
hard bounce, else put on the account's ``returned`` list (X-ListOption 512);
an expiry after a try lists it there too (:func:`queue.mark_expired`).
Anything that goes wrong for one recipient — a render error, a bug — fails
or defers that recipient only: the worker logs it and goes on. The reply or
reason stored (``last_reply``, the event, a suppression's detail) is cut to
``STORED_REPLY_CHARS`` with a marker saying how much was left out; it is
classified on the full text. A server that answers too slowly is cut off by
the client's deadlines (:mod:`~postlane.delivery.client`): its copies are
deferred with a reason naming the deadline.

Why every copy has its own envelope sender: the VERP address
(:mod:`postlane.delivery.verp`) names the recipient row, so any bounce, in any
format, finds its recipient. That makes each copy one SMTP transaction; the
connection is still reused and the transactions pipelined.

**Traffic shaping** (:mod:`postlane.delivery.shaping`): each group's
destination is its MX provider when a rule matches the route's MX hosts
(``gmail``), else its domain. Before connecting, the group takes as many
rate slots as the destination's token bucket grants now; the rows beyond that
are deferred locally to the slots to come (``4.7.0 local rate limit for
gmail: next slot in 12 s``) instead of waiting with their leases. The
granted rows are spread over connections: one more for every
``SPREAD_FROM`` rows, up to the destination's ``max_connections``, and never
more than ``messages_per_connection`` on one (a connection sends one copy
at a time, so parallel connections are what keeps a destination busy). At
most ``max_connections`` connections to the destination are open at once
(waited for before a global ``concurrency`` slot is taken, so a busy destination never
holds global slots idle). When a reply says the receiver throttles us
(:func:`~postlane.delivery.bounce_class.throttles`), in a transaction or
refusing the whole session (``421`` at the greeting or EHLO, the commonest
way), the shaper halves the destination's rate and the group's rows not yet
sent are deferred locally; deliveries let the rate recover. A local deferral is our
decision, not the receiver's refusal: its event says ``"local": true``, it
carries no bounce ``kind``, and it waits for the next slot rather than the
backoff schedule, and it does not count as an attempt (``queue.reschedule``).

**Where mail goes**: a ``[[delivery.transports]]`` entry matching the
recipient domain (exact first, then the longest ``*.`` suffix), else the
``[delivery.smarthost]``, else the domain's MX hosts. A transport or smarthost
names one host and port and bypasses the MX lookup: the host is resolved for
its addresses, or used as given when it is an IP address. Its ``tls`` replaces
the opportunistic default, but a message that requires TLS is never sent with
less than ``required``. With ``username`` and ``password`` the worker
authenticates after STARTTLS (never in plaintext unless the entry allows it)
and the events say ``"auth": "PLAIN"`` (or ``"LOGIN"``). A failed AUTH defers
the group's mail, even a 535: a wrong password at the operator's relay is a
configuration mistake to fix, not the recipients' problem to be told about.

**MTA-STS** (RFC 8461, :mod:`postlane.delivery.mta_sts`, ``delivery.mta_sts``)
applies to MX delivery only: a policy names the MX hosts a domain allows, and
a relay chosen by the operator is none of those. Under ``enforce`` only the
allowed MX hosts are tried, with TLS required and the certificate verified
for the MX name; with none allowed the rows are deferred (``4.7.5``), never
bounced, since a fixed policy or DNS must get its chance (§5.1). Under
``testing`` delivery goes on as usual and the disallowed hosts are recorded
in the event (``mta_sts_violations``). Every event of a sent copy records the
mode applied (``mta_sts``; None without a policy). A policy lookup that fails
without a cached policy means "no policy", as the RFC says.

Not done here yet: TLS checks and reports under MTA-STS ``testing`` (only the
MX violations are recorded), cluster-wide shaping (limits are per process), DSN
generation.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import ipaddress
import json
import logging
import math
import os
import secrets
import socket
import ssl
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Final, TypeVar

from publicsuffixlist import PublicSuffixList
from sqlalchemy.engine import Connection

from postlane.config import DeliverySettings, Settings, SmarthostSettings, TransportSettings
from postlane.crypto import SecretBox, derive_key
from postlane.delivery import list_filter, outcome_journal, verp
from postlane.delivery.backoff import next_attempt, parse_retry_hint
from postlane.delivery.bounce_class import classify, throttles
from postlane.delivery.client import (
    AuthenticationFailed,
    ConnectFailed,
    OutboundConnection,
    OutboundError,
    ResultHook,
    TlsHandshakeFailed,
    TlsPolicy,
    connect,
    relay_context,
)
from postlane.delivery.client_protocol import Reply, TransactionResult
from postlane.delivery.compose import compose, compose_unsigned
from postlane.delivery.connection_cache import ConnectionCache
from postlane.delivery.list_filter import Filtered
from postlane.delivery.mta_sts import MtaStsCache, StsResult, enforce
from postlane.delivery.resolver import Resolver, to_ascii
from postlane.delivery.routing import DnsFailure, NullMx, Route
from postlane.delivery.sasl import Credentials
from postlane.delivery.shaping import Shaper, load_rules
from postlane.delivery.signer import Signer
from postlane.errors import InvalidInput, NotFound, PostlaneError, StoreError
from postlane.options.model import SendOptions
from postlane.render.dkim import DkimKey, Unsigned
from postlane.store import Database, queue
from postlane.store import accounts as account_store
from postlane.store import archive as archive_store
from postlane.store import domains as domain_store
from postlane.store import messages as message_store
from postlane.store import suppressions as suppression_store
from postlane.store import templates as template_store
from postlane.store.accounts import Account
from postlane.store.domains import SendingDomain
from postlane.store.messages import MessageRecord
from postlane.store.templates import Template

__all__ = ["VERP_KEY_PURPOSE", "DeliveryWorker"]

log = logging.getLogger("postlane.delivery")

VERP_KEY_PURPOSE: Final = "postlane/verp/v1"
SWEEP_INTERVAL: Final = 30.0  # seconds between reclaim/expire sweeps
SWEEP_LIMIT: Final = 1000  # rows expired per sweep transaction (keeps SQLite writers moving)
STOP_GRACE: Final = 30.0  # seconds stop() lets in-flight groups finish
CLOSE_GRACE: Final = 10.0  # seconds close_idle() waits for 221s before aborting the rest
STORED_REPLY_CHARS: Final = 2000  # of a reply or reason kept in last_reply and events
INLINE_COMPOSE_BYTES: Final = 64 * 1024  # at most this, composed on the loop (_quick_to_compose)
YIELD_EVERY: Final = 0.005  # seconds of composing before the loop runs other work
SPREAD_FROM: Final = 10  # rows of a group that earn it one more connection (see _deliver)
GATHER_SECONDS: Final = 0.1  # wait after a lease that drained the due rows (see _run)
SIGN_BATCH: Final = 16  # copies handed to the signer at a time (see _prepare_all)
SIGN_THREADS: Final = 2  # measured: one thread gained nothing, two 19% (delivery/signer.py)
_COUNT_CACHE: Final = 1024  # messages whose recipient count and duplicates are remembered
_OPTIONS_CACHE: Final = 256  # distinct stored options kept parsed
_NO_DOMAIN: Final = "account has no sending domain"
_STS_STATUS: Final = "4.7.5"  # RFC 3463: cryptographic failure (no host the policy allows)
_PSL = PublicSuffixList()

_T = TypeVar("_T")


def _utc_now() -> datetime:
    return datetime.now(UTC)


def _owner_id() -> str:
    """Unique per process *and* incarnation, as the queue's fencing needs."""
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"


@dataclass(frozen=True, slots=True)
class _Identity:
    """Whom a message is sent as: the DKIM keys and the bounce domain of one sending domain."""

    domain: str
    bounce_domain: str
    keys: tuple[DkimKey, ...]


@dataclass(slots=True)
class _Loaded:
    """A message as a batch needs it, loaded once for all its recipients.

    ``duplicates`` maps each address the message has more than once to its
    lowest row id (:func:`list_filter.duplicates`), for X-ListOption 64.
    """

    message: MessageRecord
    account: Account
    domains: list[SendingDomain]
    recipients: int
    duplicates: dict[str, int]
    options: SendOptions  # parsed once: every recipient of the message reads them
    #: The account's template the message names; None when it names none or a missing one.
    template: Template | None = None


@dataclass(frozen=True, slots=True)
class _Recipients:
    """What the worker remembers of a message's recipient rows (they never change)."""

    count: int
    duplicates: dict[str, int]


@dataclass(slots=True)
class _Job:
    """One leased recipient, rendered and ready to send."""

    row: queue.Leased
    mail_from: str
    data: bytes
    require_tls: bool
    smtputf8: bool
    eight_bit: bool


@dataclass(frozen=True, slots=True)
class _Pending:
    """One leased recipient, rendered up to its DKIM signatures."""

    row: queue.Leased
    mail_from: str
    unsigned: Unsigned
    options: SendOptions


@dataclass(slots=True)
class _Host:
    """The connection a group's copies go over, and what to say about it in events.

    ``details`` is read when the session is set up: after close() the
    transport (and its TLS facts) is gone. ``used`` counts the copies sent
    over the connection in all its batches, for the destination's
    ``messages_per_connection``; ``reused`` says it came from the cache.
    """

    connection: OutboundConnection
    mx: str
    details: dict[str, Any] = field(default_factory=dict)
    used: int = 0
    reused: bool = False

    @classmethod
    def of(cls, connection: OutboundConnection, mx: str) -> _Host:
        details = {
            "mx": mx,
            "ip": connection.peer_ip,
            "tls": connection.tls_version,
            "cipher": connection.tls_cipher,
        }
        if connection.auth_mechanism is not None:
            details["auth"] = connection.auth_mechanism
        return cls(connection, mx, details)


@dataclass(frozen=True, slots=True)
class _Target:
    """A group's route and how to reach it: port, TLS floor, and what to record.

    ``relay`` is True for a transport, the smarthost or a domain literal: its
    host is not an MX the domain published, so MTA-STS does not apply.
    ``details`` go into every event of a copy sent (or not) over it.
    ``credentials`` (a transport's or the smarthost's) are for AUTH;
    ``ssl_context`` holds the relay's ``ca_file``, trusted instead of the
    system's CAs when its certificate is checked. ``public_only``: the
    recipient's domain chose the hosts (MX records, an address literal), so
    only public addresses are connected to, unless the operator allows
    internal ones (``delivery.allow_internal_mx``).
    """

    route: Route
    port: int
    tls: TlsPolicy | None = None  # None: the group's own policy
    relay: bool = False
    details: dict[str, Any] = field(default_factory=dict)
    credentials: Credentials | None = None
    allow_plaintext_auth: bool = False
    ssl_context: ssl.SSLContext | None = None
    public_only: bool = False

    def tls_for(self, group: TlsPolicy) -> TlsPolicy:
        """The policy to connect with: the target's, but never below a message's ``required``."""
        if group == "required" or self.tls is None:
            return group
        return self.tls

    def connection_key(self, tls: TlsPolicy) -> tuple[Any, ...]:
        """What a cached connection must share to be reused for this target."""
        return (
            self.route.hosts,
            self.port,
            tls,
            self.credentials,
            self.allow_plaintext_auth,
            self.ssl_context,  # a connection verified against another CA is not this one
        )


@dataclass(slots=True)
class _Shaped:
    """One group's (one TLS subset's) sending to a destination, shared by its connections."""

    dest: str
    per_connection: int  # the destination's messages_per_connection
    throttled: bool = False
    unreachable: DnsFailure | OutboundError | None = None  # no connection: others do not retry


_Loads = dict[str, "_Loaded | Exception"]


@dataclass(slots=True)
class _Batch:
    """Per-batch caches shared by the batch's domain groups.

    ``preload`` reads every message of the batch (with accounts, sending
    domains and recipient counts) in one database round trip, started when
    the batch is dispatched; ``loads`` is for a message it does not have.
    """

    preload: asyncio.Future[_Loads] | None = None
    loads: dict[str, asyncio.Task[_Loaded]] = field(default_factory=dict)


class DeliveryWorker:
    """The ``delivery`` role: see the module docstring.

    ``master_key`` is the installation's master secret: DKIM keys and
    attachment passwords are decrypted with a :class:`SecretBox` derived from
    it, and VERP tags are made with another key derived from it. ``clock``,
    ``resolver``, ``ssl_context`` (the CA store for required TLS),
    ``shaper`` and ``mta_sts`` are for tests; the shaper is otherwise built
    from ``delivery.shaping_rules`` (the shipped rules when unset), and the
    MTA-STS cache from the worker's resolver, so policies are discovered
    through the same nameservers as the MX hosts. ``delivery.mta_sts =
    false`` turns MTA-STS off, an injected cache included.
    ``helo_name`` defaults to ``settings.hostname``.
    """

    name = "delivery"

    def __init__(
        self,
        settings: Settings,
        db: Database,
        master_key: bytes,
        *,
        resolver: Resolver | None = None,
        clock: Callable[[], datetime] = _utc_now,
        ssl_context: ssl.SSLContext | None = None,
        helo_name: str | None = None,
        connect_timeout: float = 30.0,
        command_timeout: float = 300.0,
        shaper: Shaper | None = None,
        mta_sts: MtaStsCache | None = None,
    ) -> None:
        self._settings = settings.delivery
        self._db = db
        self._outcomes: list[_Outcome] = []
        self._outcome_writer: asyncio.Future[None] | None = None
        self._box = SecretBox(master_key)
        self._verp_key = derive_key(master_key, VERP_KEY_PURPOSE)
        self._resolver = resolver or Resolver(self._settings.nameservers)
        self._clock = clock
        self._ssl_context = ssl_context
        self._helo = helo_name or settings.hostname
        self._connect_timeout = connect_timeout
        self._command_timeout = command_timeout
        self.owner = _owner_id()
        self._journal = outcome_journal.OutcomeJournal(
            settings.data_dir / "delivery-journal", self.owner
        )
        # Journaled deliveries whose database write failed: the sweep tries again.
        self._unrecorded: list[tuple[queue.Delivery, int]] = []
        self._connections = asyncio.Semaphore(self._settings.concurrency)
        self._shaper = shaper or Shaper(load_rules(self._settings.shaping_rules))
        self._mta_sts: MtaStsCache | None = None
        if self._settings.mta_sts:
            self._mta_sts = mta_sts or MtaStsCache(self._resolver)
        self._transports = _transport_table(self._settings.transports)
        self._relay_contexts = _relay_contexts(self._settings)
        self._groups: set[asyncio.Task[None]] = set()
        self._in_flight = 0
        self._stopping = asyncio.Event()
        self._wake = asyncio.Event()
        self._loop_task: asyncio.Task[None] | None = None
        self._renew_task: asyncio.Task[None] | None = None
        self._leased: set[int] = set()  # ids of the rows in flight, for lease renewal
        self._last_sweep = float("-inf")
        self._identities: dict[tuple[int, datetime], _Identity] = {}
        self._recipient_facts: OrderedDict[str, _Recipients] = OrderedDict()
        self._parsed_options: dict[str, SendOptions] = {}
        self._idle: ConnectionCache[_Host] = ConnectionCache(
            self._settings.connection_cache_seconds,
            time.monotonic,
            limit=self._settings.concurrency,
        )
        self._closing: set[asyncio.Task[None]] = set()
        self._signer = Signer(SIGN_THREADS)

    # -- the role ---------------------------------------------------------------------------

    async def start(self) -> None:
        """Start the loop; returns at once."""
        self._stopping.clear()
        self._loop_task = asyncio.create_task(self._run(), name="delivery-loop")
        self._renew_task = asyncio.create_task(self._renew_leases(), name="delivery-renew")
        log.info("delivery worker %s started", self.owner)

    async def stop(self) -> None:
        """Stop leasing, let groups in flight finish (up to STOP_GRACE seconds), then cancel.

        A group cancelled mid-way leaves its unreported rows ``sending``; their
        lease runs out and any worker's sweep puts them back in the queue.
        """
        self._stopping.set()
        self._wake.set()
        if self._loop_task is not None:
            await asyncio.gather(self._loop_task, return_exceptions=True)
            self._loop_task = None
        if self._groups:
            _, pending = await asyncio.wait(set(self._groups), timeout=STOP_GRACE)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        if self._renew_task is not None:
            self._renew_task.cancel()
            await asyncio.gather(self._renew_task, return_exceptions=True)
            self._renew_task = None
        await self.close_idle()
        self._journal.close()
        self._signer.close()
        log.info("delivery worker %s stopped", self.owner)

    async def close_idle(self) -> None:
        """QUIT every cached idle connection; abort those not closed within CLOSE_GRACE.

        Bounded because stop() waits for it: a server that dribbles its 221,
        or never sends it, must not hold up the worker's shutdown for a reply
        deadline per connection.
        """
        for host in self._idle.drain():
            self._close_soon(host)
        if self._closing:
            _, late = await asyncio.wait(set(self._closing), timeout=CLOSE_GRACE)
            for task in late:
                task.cancel()  # close() aborts the connection when cancelled
            await asyncio.gather(*late, return_exceptions=True)

    async def _run(self) -> None:
        """Lease while there is room; after a short lease, gather before leasing again.

        A lease that returns fewer rows than there was room for has drained
        what is due. Leasing again at once, while intake commits a few
        messages at a time, makes many tiny batches: each a write transaction
        (on SQLite competing with intake for the one write lock) and each
        domain group its own round of connections. Measured under bench/relay
        at ``-s 10``: 975 connections for 20,000 messages, about 20 messages
        per group (docs/benchmarks.md, run 2). So after a short lease the
        loop waits ``GATHER_SECONDS`` (or the poll interval, if shorter)
        before the next: mail waits at most that long longer, and batches
        grow with the arrival rate.
        """
        interval = self._settings.poll_interval
        gather = min(interval, GATHER_SECONDS)
        while not self._stopping.is_set():
            leased = 0
            room = 0
            try:
                await self._sweep_if_due()
                self._close_expired_idle()
                room = self._settings.lease_batch - self._in_flight
                if room > 0:
                    rows = await self._lease(room)
                    self._dispatch(rows)
                    leased = len(rows)
            except Exception:  # the database may be down for a moment: wait, then try again
                log.exception("delivery loop iteration failed")
            if leased == 0:
                self._wake.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), timeout=interval)
            elif leased < room:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stopping.wait(), timeout=gather)

    # -- one batch ----------------------------------------------------------------------------

    async def run_once(self) -> int:
        """Lease one batch and deliver it completely; the number of rows leased.

        For tests and tools: the running role leases continuously instead.
        Also runs the sweep (reclaim, expire) first.
        """
        await self._sweep()
        rows = await self._lease(self._settings.lease_batch)
        await asyncio.gather(*self._dispatch(rows))
        return len(rows)

    async def _lease(self, limit: int) -> list[queue.Leased]:
        now = self._clock()
        lease_for = timedelta(seconds=self._settings.lease_seconds)
        dialect = self._db.dialect_name

        def lease(conn: Connection) -> list[queue.Leased]:
            return queue.lease_due(
                conn, owner=self.owner, now=now, limit=limit, lease_for=lease_for, dialect=dialect
            )

        return await self._write(lease)

    def _dispatch(self, rows: Sequence[queue.Leased]) -> list[asyncio.Task[None]]:
        """One task per recipient domain; rows arrive sorted by domain.

        A row this worker is still sending is not sent again. It comes back
        when another worker's sweep took it while this one's lease renewal
        failed (the database away longer than a lease): a second attempt would
        send the copy twice, and the outcome fence, which compares owners,
        could not keep the stale attempt's outcome from overwriting the new
        one's. The attempt in flight reports for the row; the new lease only
        holds it.
        """
        again = [row.id for row in rows if row.id in self._leased]
        if again:
            log.warning("%d leased row(s) are already in flight here; not sent twice", len(again))
            rows = [row for row in rows if row.id not in self._leased]
        batch = _Batch()
        if rows:
            ids = list(dict.fromkeys(row.message_id for row in rows))
            batch.preload = asyncio.ensure_future(
                self._read(lambda conn: self._load_many(conn, ids))
            )
        groups: dict[str, list[queue.Leased]] = {}
        for row in rows:
            groups.setdefault(row.domain.lower(), []).append(row)
        tasks = []
        for domain, members in groups.items():
            self._in_flight += len(members)
            self._leased.update(member.id for member in members)
            task = asyncio.create_task(
                self._group(domain, members, batch), name=f"deliver:{domain}"
            )
            self._groups.add(task)
            task.add_done_callback(self._group_done(members))
            tasks.append(task)
        return tasks

    def _group_done(self, members: list[queue.Leased]) -> Callable[[asyncio.Task[None]], None]:
        def done(task: asyncio.Task[None]) -> None:
            self._groups.discard(task)
            self._in_flight -= len(members)
            self._leased.difference_update(member.id for member in members)
            self._wake.set()
            if not task.cancelled() and task.exception() is not None:
                log.error("delivery group failed", exc_info=task.exception())

        return done

    async def _renew_leases(self) -> None:
        """Every third of a lease, extend the leases of the rows still in flight.

        A row's outcome normally comes in well within its lease; a slow
        receiver (timeouts up to ``command_timeout`` per reply), a throttled
        destination or a large group can take longer, and a sweep elsewhere
        would then hand the row to another worker while this one sends it.
        Rows already reported are no longer ``sending`` and are left alone.
        """
        lease_for = timedelta(seconds=self._settings.lease_seconds)
        while True:
            await asyncio.sleep(self._settings.lease_seconds / 3)
            ids = list(self._leased)
            if not ids:
                continue
            try:
                renewed = await self._write(_renewing(ids, self.owner, self._clock(), lease_for))
            except Exception:  # the database may be down a moment; the next round retries
                log.exception("renewing %d leases failed", len(ids))
                continue
            log.debug("renewed %d of %d leases", renewed, len(ids))

    async def _sweep_if_due(self) -> None:
        loop_time = asyncio.get_running_loop().time()
        if loop_time - self._last_sweep >= SWEEP_INTERVAL:
            self._last_sweep = loop_time
            await self._sweep()

    async def _sweep(self) -> None:
        """Reclaim rows of dead workers and expire overdue waiting rows, in small transactions.

        Deliveries a dead worker wrote to its journal but not to the database
        are recorded first, while its leases still hold them.
        """
        await self._record_orphans()
        await self._record_unrecorded()
        now = self._clock()
        in_flight = frozenset(self._leased)
        reclaimed = await self._write(
            lambda conn: queue.reclaim_expired_leases(
                conn, now=now, owner=self.owner, in_flight=in_flight
            )
        )
        expired = SWEEP_LIMIT
        total = 0
        while expired == SWEEP_LIMIT:
            expired = await self._write(
                lambda conn: queue.expire_overdue(conn, now=now, limit=SWEEP_LIMIT)
            )
            total += expired
        if reclaimed or total:
            log.info("sweep: %d leases reclaimed, %d recipients expired", reclaimed, total)

    async def _record_unrecorded(self) -> None:
        """Write this worker's journaled deliveries whose database write failed, if it can now.

        Before the sweep reclaims expired leases: otherwise a copy accepted
        by its receiver would go out again while this worker lives on.
        """
        if not self._unrecorded:
            return
        pending, self._unrecorded = self._unrecorded, []
        try:
            written = await self._write(
                _delivering([delivery for delivery, _ in pending], self.owner, self._clock())
            )
        except Exception:  # still failing: keep them for the next sweep
            log.exception("%d deliveries still not recorded", len(pending))
            self._unrecorded = pending + self._unrecorded
            return
        for _, token in pending:
            self._journal.recorded(token)
        log.info("recorded %d deliveries whose first write had failed", sum(written))

    async def _record_orphans(self) -> None:
        for orphan in outcome_journal.orphans(self._journal.directory):
            deliveries = [
                queue.Delivery(d.id, {**d.data, "recovered": "journal"}, d.reply)
                for d in orphan.deliveries
            ]
            try:
                written = await self._write(_delivering(deliveries, orphan.owner, self._clock()))
            except Exception:  # the database may be down a moment: the next sweep retries
                log.exception("cannot record the journal of stopped worker %s", orphan.owner)
                orphan.keep()
                continue
            orphan.done()
            log.log(
                logging.WARNING if any(written) else logging.INFO,
                "stopped worker %s: %d deliveries recorded from its journal (%d were already)",
                orphan.owner,
                sum(written),
                len(written) - sum(written),
            )

    # -- one domain ---------------------------------------------------------------------------

    async def _group(self, domain: str, rows: list[queue.Leased], batch: _Batch) -> None:
        """Deliver one domain's rows; never raises for a single recipient's trouble."""
        jobs = [job for job in await self._prepare_all(rows, batch) if job is not None]
        if not jobs:
            return
        for require_tls in (False, True):
            subset = [job for job in jobs if job.require_tls == require_tls]
            if subset:
                await self._deliver(domain, subset, "required" if require_tls else "opportunistic")

    async def _prepare_all(self, rows: list[queue.Leased], batch: _Batch) -> list[_Job | None]:
        """Each row rendered into a job, or its outcome recorded now (None).

        Copies rendered on the loop are signed by the signer's threads while
        the loop renders the next ones, SIGN_BATCH at a time.
        """
        suppressed = await self._suppressed(rows, batch)
        prepared: list[_Job | _Pending | None] = []
        waiting: list[_Pending] = []
        signing: dict[int, tuple[asyncio.Future[list[bytes]], int]] = {}  # row: batch, place
        loop = asyncio.get_running_loop()
        yielded = loop.time()
        for row in rows:
            if loop.time() - yielded > YIELD_EVERY:  # copies composed on the loop: let I/O in
                await asyncio.sleep(0)
                yielded = loop.time()
            item = await self._or_fail(row, self._prepare(row, batch, suppressed))
            prepared.append(item)
            if isinstance(item, _Pending):
                waiting.append(item)
                if len(waiting) >= SIGN_BATCH:
                    self._sign(waiting, signing)
                    waiting = []
        if waiting:
            self._sign(waiting, signing)
        results: list[_Job | None] = []
        for item in prepared:
            if not isinstance(item, _Pending):
                results.append(item)
                continue
            future, index = signing[item.row.id]
            try:
                copies = await future
            except Exception as exc:  # nothing sent: try again later
                log.error("recipient %d: DKIM signing failed: %s", item.row.id, exc)
                await self._defer(item.row, f"DKIM signing failed: {exc}", {"stage": "sign"})
                results.append(None)
                continue
            finished = self._finish(item.row, item.mail_from, copies[index], item.options)
            results.append(await self._or_fail(item.row, finished))
        return results

    async def _or_fail(self, row: queue.Leased, work: Awaitable[_T]) -> _T | None:
        """``work``'s result; a bug for one recipient fails that recipient only (None)."""
        try:
            return await work
        except Exception as exc:
            log.exception("cannot prepare recipient %d", row.id)
            await self._fail(row, f"internal error preparing the message: {exc}", {})
            return None

    def _sign(
        self,
        pendings: list[_Pending],
        signing: dict[int, tuple[asyncio.Future[list[bytes]], int]],
    ) -> None:
        """Hand ``pendings`` to the signer; note each one's batch and place in ``signing``."""
        future = asyncio.ensure_future(self._signer.sign([p.unsigned for p in pendings]))
        for index, pending in enumerate(pendings):
            signing[pending.row.id] = (future, index)

    async def _suppressed(self, rows: list[queue.Leased], batch: _Batch) -> dict[int, Filtered]:
        """The rows a list filter keeps from being sent, each with why.

        One list lookup per account for the whole group, whatever the bits:
        the suppression list applies to every message that does not bypass.
        """
        checked: list[tuple[queue.Leased, SendOptions, _Loaded]] = []
        addresses: dict[int, list[str]] = {}
        for row in rows:
            try:
                loaded = await self._load(row.message_id, batch)
                options = loaded.options
            except Exception as exc:
                log.debug("recipient %d: not checked against the lists: %s", row.id, exc)
                continue  # _prepare fails it with the reason
            if not options.bypass_list_filters:
                checked.append((row, options, loaded))
                addresses.setdefault(row.account_id, []).append(row.address)
        lists: dict[int, dict[str, str]] = {}
        for account_id, members in addresses.items():
            lists[account_id] = await self._read(_list_check(account_id, members))
        found: dict[int, Filtered] = {}
        for row, options, loaded in checked:
            filtered = list_filter.filter_row(
                options,
                row_id=row.id,
                address=row.address,
                duplicates=loaded.duplicates,
                listed=lists[row.account_id].get(row.address),
            )
            if filtered is not None:
                found[row.id] = filtered
        return found

    async def _prepare(
        self, row: queue.Leased, batch: _Batch, suppressed: dict[int, Filtered]
    ) -> _Job | _Pending | None:
        now = self._clock()
        filtered = suppressed.get(row.id)
        if filtered is not None:
            await self._record(
                row,
                lambda conn: queue.mark_suppressed(
                    conn,
                    row.id,
                    owner=self.owner,
                    now=now,
                    reason=filtered.reason,
                    data={"filter": filtered.filter},
                ),
            )
            return None
        if row.expires_at <= now:
            await self._record(
                row,
                lambda conn: queue.mark_expired(
                    conn,
                    row.id,
                    owner=self.owner,
                    now=now,
                    reply=None,
                    data={"reason": "expired before it could be sent"},
                    attempted=False,
                ),
            )
            return None
        try:
            loaded = await self._load(row.message_id, batch)
            options = loaded.options
            identity = self._identity(loaded)
            if identity is None:
                await self._fail(row, _NO_DOMAIN, {"stage": "render"})
                return None
            password = None
            if loaded.account.attachment_password_enc:
                password = self._box.decrypt(loaded.account.attachment_password_enc).decode()
            mail_from = verp.encode(row.id, key=self._verp_key, domain=identity.bounce_domain)
            arguments: dict[str, Any] = {
                "recipient": row.address,
                "options": options,
                "account": loaded.account,
                "dkim_keys": identity.keys,
                "recipients_in_message": loaded.recipients,
                "template": loaded.template,
                "attachment_password": password,
            }
            if _quick_to_compose(loaded):
                unsigned = compose_unsigned(loaded.message.raw, **arguments)
                return _Pending(row, mail_from, unsigned, options)
            render = functools.partial(compose, loaded.message.raw, **arguments)
            data = await asyncio.to_thread(render)
        except PostlaneError as exc:
            await self._fail(row, str(exc), {"stage": "render"})
            return None
        return await self._finish(row, mail_from, data, options)

    async def _finish(
        self, row: queue.Leased, mail_from: str, data: bytes, options: SendOptions
    ) -> _Job | None:
        """The job that sends the signed copy ``data``; None when it is not to be sent."""
        if options.archive_copy:  # X-JobOption 128: keep what leaves (store/archive.py)
            await self._record(row, _archiving(row, data, self._clock()))
        if options.test_mode:
            await self._record(row, queue.Delivery(row.id, {"test": True, "size": len(data)}))
            return None
        header_end = data.find(b"\r\n\r\n")
        return _Job(
            row=row,
            mail_from=mail_from,
            data=data,
            require_tls=options.require_tls,
            smtputf8=not row.address.isascii() or not data[:header_end].isascii(),
            eight_bit=not data.isascii(),
        )

    async def _load(self, message_id: str, batch: _Batch) -> _Loaded:
        """The message, its account, domains and template: once per batch, shared by groups."""
        if batch.preload is not None:
            preloaded = (await asyncio.shield(batch.preload)).get(message_id)
            if isinstance(preloaded, Exception):
                raise preloaded
            if preloaded is not None:
                return preloaded
        task = batch.loads.get(message_id)
        if task is None:
            task = asyncio.ensure_future(self._read(lambda conn: self._load_now(conn, message_id)))
            batch.loads[message_id] = task
        return await asyncio.shield(task)

    def _load_now(self, conn: Connection, message_id: str) -> _Loaded:
        loaded = self._load_many(conn, [message_id])[message_id]
        if isinstance(loaded, Exception):
            raise loaded
        return loaded

    def _load_many(self, conn: Connection, message_ids: list[str]) -> _Loads:
        """Each message with its account, sending domains and recipient count, or its problem.

        Measured under bench/relay: loading one message per thread hop and
        connection (four queries, one of them reading every recipient row)
        was the delivery role's largest cost. Here a batch is one hop, two
        queries for all its messages, and two per account.
        """
        found = message_store.get_messages(conn, message_ids)
        unknown = [mid for mid in message_ids if mid not in self._recipient_facts]
        counts = message_store.recipient_counts(conn, unknown) if unknown else {}
        accounts: dict[int, Account] = {}
        domains: dict[int, list[SendingDomain]] = {}
        out: _Loads = {}
        for message_id in message_ids:
            message = found.get(message_id)
            if message is None:
                out[message_id] = NotFound(f"message {message_id!r} not found")
                continue
            try:
                owner = message.account_id
                if owner not in accounts:
                    accounts[owner] = account_store.get_account(conn, owner)
                    domains[owner] = domain_store.domains_for_account(conn, owner)
                options = self._options(message.options_json)
                facts = self._recipient_facts.get(message_id)
                if facts is None:
                    # Remembered, so a campaign leased in many batches is read
                    # once. Every row is read only when duplicates matter.
                    count = counts.get(message_id, 0)
                    duplicates: dict[str, int] = {}
                    if count > 1 and options.remove_duplicates:
                        rows = message_store.recipients_of(conn, message_id)
                        duplicates = list_filter.duplicates((r.id, r.address) for r in rows)
                    facts = self._recipient_facts[message_id] = _Recipients(count, duplicates)
                    if len(self._recipient_facts) > _COUNT_CACHE:
                        self._recipient_facts.popitem(last=False)
                # Read with the message, not cached across batches: an edited
                # template applies to the next batch. A missing one is None;
                # compose says so.
                template = None
                if options.template is not None:
                    template = template_store.find_template(conn, owner, options.template)
                out[message_id] = _Loaded(
                    message,
                    accounts[owner],
                    domains[owner],
                    facts.count,
                    facts.duplicates,
                    options,
                    template,
                )
            except Exception as exc:  # one message's problem is that message's only
                out[message_id] = exc
        return out

    def _options(self, stored: str) -> SendOptions:
        """The message's options (stored JSON text), parsed once per distinct text.

        Most messages of an account carry the same stored options (its defaults).
        """
        options = self._parsed_options.get(stored)
        if options is None:
            options = SendOptions.from_json(json.loads(stored) or {})
            if len(self._parsed_options) >= _OPTIONS_CACHE:
                self._parsed_options.clear()
            self._parsed_options[stored] = options
        return options

    def _identity(self, loaded: _Loaded) -> _Identity | None:
        """The sending domain aligned with the From (exact, else same organisational domain).

        Falls back to the account's first domain: intake's "alert" policy may
        have accepted a From aligned with none, and such mail still leaves
        signed by the customer's own domain, never unsigned.
        """
        domains = loaded.domains
        if not domains:
            return None
        from_domain = loaded.message.header_from.rpartition("@")[2].lower().rstrip(">")
        chosen = next((d for d in domains if d.name == from_domain), None)
        if chosen is None:
            organisation = _organisational(from_domain)
            chosen = next(
                (d for d in domains if organisation and _organisational(d.name) == organisation),
                domains[0],
            )
        key = (chosen.id, chosen.updated_at)
        identity = self._identities.get(key)
        if identity is None:
            keys = [
                DkimKey.from_pem(
                    chosen.name,
                    chosen.dkim_selector,
                    self._box.decrypt(chosen.dkim_private_key_enc),
                )
            ]
            if chosen.ed25519_selector and chosen.ed25519_private_key_enc:
                pem = self._box.decrypt(chosen.ed25519_private_key_enc)
                keys.append(DkimKey.from_pem(chosen.name, chosen.ed25519_selector, pem))
            identity = _Identity(
                chosen.name, f"{chosen.return_path_subdomain}.{chosen.name}", tuple(keys)
            )
            self._identities[key] = identity
        return identity

    # -- sending ----------------------------------------------------------------------------

    async def _deliver(self, domain: str, jobs: list[_Job], tls: TlsPolicy) -> None:
        target = await self._target(domain)
        if isinstance(target, NullMx | DnsFailure):
            if target.temporary:
                for job in jobs:
                    await self._defer(job.row, target.reason, {"status": target.status})
                return
            # No mail can reach this domain: a hard bounce (5.1.10, 5.1.2) as
            # a receiver's reply with that status would be, suppression included.
            verdict = classify(550, target.status, target.reason)
            failure = {"status": target.status, "kind": verdict.kind.value}
            for job in jobs:
                await self._fail(job.row, target.reason, failure, suppress=verdict.suppress)
            return
        if not target.relay:
            sts = await self._sts(domain, target.route)
            if sts is not None and sts.reason is not None:
                log.warning("MTA-STS: deferring mail for %s: %s", domain, sts.reason)
                data = {"status": _STS_STATUS, "mta_sts": sts.mode}
                for job in jobs:
                    await self._defer(job.row, f"{_STS_STATUS} {sts.reason}", data)
                return
            target = _apply_sts(target, sts)
        route = target.route
        dest = self._shaper.destination(domain, route.hosts)
        shaped = _Shaped(dest, self._shaper.messages_per_connection(dest))
        granted = self._shaper.take(shaped.dest, len(jobs))
        if granted < len(jobs):
            await self._defer_locally(jobs[granted:], shaped.dest, "")
        sending = jobs[:granted]
        spread = -(-len(sending) // self._shaper.rule(dest).max_connections)
        size = min(shaped.per_connection, max(SPREAD_FROM, spread))
        chunks = [sending[start : start + size] for start in range(0, len(sending), size)]
        policy = target.tls_for(tls)
        await asyncio.gather(
            *(self._deliver_chunk(target, policy, chunk, shaped) for chunk in chunks)
        )

    async def _deliver_chunk(
        self, target: _Target, tls: TlsPolicy, jobs: list[_Job], shaped: _Shaped
    ) -> None:
        """Send ``jobs`` over one connection, within the destination's connection limit."""
        async with self._shaper.connection(shaped.dest):
            if shaped.throttled:  # another connection of this group was told to slow down
                await self._defer_locally(jobs, shaped.dest, " (the server throttled us)")
                return
            async with self._connections:
                host = shaped.unreachable or await self._checkout(
                    target, tls, len(jobs), shaped.per_connection
                )
                if not isinstance(host, _Host):
                    problem = shaped.unreachable = host
                    refusal = problem.reply if isinstance(problem, OutboundError) else None
                    if refusal is not None:
                        # Decided before the slot is given up, as _adapt is below.
                        self._slow_down_if_throttled(shaped, refusal)
                    data = {**target.details, "status": problem.status}
                    hint = _retry_hint(refusal)
                    for job in jobs:
                        if problem.temporary:
                            await self._defer(job.row, problem.reason, data, hint=hint)
                        else:
                            await self._fail(job.row, problem.reason, data)
                    return
                connected = host
                connected.used += len(jobs)
                try:
                    results = await self._send_all(connected, jobs)
                finally:
                    self._checkin(target.connection_key(tls), connected, shaped.per_connection)
            # Decided before the connection slot is given up, so a connection
            # waiting for it sees the flag and does not open at the old rate.
            try:
                self._adapt(shaped, jobs, results)
            except Exception:  # shaping must never keep outcomes from being recorded
                log.exception("traffic shaping failed for %s", shaped.dest)

    async def _checkout(
        self, target: _Target, tls: TlsPolicy, count: int, per_connection: int
    ) -> _Host | DnsFailure | OutboundError:
        """A cached connection to ``target`` that answers RSET, else a new one.

        A cached connection is skipped when ``count`` more copies would take
        it past the destination's ``messages_per_connection``, or when it
        does not answer RSET with 250 (the server closed it while idle):
        nothing has been sent over it for this batch yet, so trying the next
        one costs nothing but the probe.
        """
        key = target.connection_key(tls)
        while True:
            cached, stale = self._idle.take(key)
            for old in stale:
                self._close_soon(old)
            if cached is None:
                break
            if cached.connection.closed or cached.used + count > per_connection:
                self._close_soon(cached)
                continue
            try:
                reply = await cached.connection.reset()
            except OutboundError as exc:
                log.debug("cached connection to %s unusable: %s", cached.mx, exc.reason)
                self._close_soon(cached)
                continue
            if reply.code != 250:
                self._close_soon(cached)
                continue
            host = _Host.of(cached.connection, cached.mx)
            host.details.update(target.details)
            host.used, host.reused = cached.used, True
            return host
        return await self._connect(target, tls)

    def _checkin(self, key: tuple[Any, ...], host: _Host, per_connection: int) -> None:
        """Keep ``host`` for the next batch to the same hosts, or close it."""
        if host.connection.closed or host.used >= per_connection:
            self._close_soon(host)
            return
        for surplus in self._idle.give(key, host):
            self._close_soon(surplus)

    def _close_expired_idle(self) -> None:
        for host in self._idle.expired():
            self._close_soon(host)

    def _close_soon(self, host: _Host) -> None:
        """QUIT and close in the background: nobody waits for a 221."""
        task = asyncio.ensure_future(host.connection.close())
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    async def _send_all(
        self, host: _Host, jobs: list[_Job]
    ) -> list[TransactionResult | BaseException]:
        """Send ``jobs`` over ``host``, pipelined; outcomes are recorded in the background.

        Every copy is queued on the connection at once, so each copy's
        commands go out with the previous copy's content: one round trip
        and one write per copy instead of two (RFC 2920 §3.1 lets content
        start a pipelined group). A copy the receiver accepted is written to
        the journal (:mod:`~postlane.delivery.outcome_journal`) when its
        reply is read, before the connection writes the next copy's content,
        so a worker killed mid-batch resends at most the one copy each
        connection had in flight (the receiver may have taken it just as we
        died). Should the journal fail, the connection holds its output
        until the database row is written instead.
        """
        connection = host.connection
        journal: dict[int, tuple[bool, tuple[queue.Delivery, int] | None]] = {}

        def noted(index: int, job: _Job) -> ResultHook:
            def on_result(result: TransactionResult) -> bool:
                journal[index] = self._journal_delivery(job, host, result)
                return journal[index][0]

            return on_result

        queued: list[asyncio.Future[TransactionResult] | BaseException] = []
        for index, job in enumerate(jobs):
            try:
                queued.append(self._submit(host, job, noted(index, job)))
            except Exception as exc:  # the outcome path turns it into a deferral or failure
                queued.append(exc)
        results: list[TransactionResult | BaseException] = []
        recording: list[asyncio.Future[None]] = []
        try:
            for index, (job, waiting) in enumerate(zip(jobs, queued, strict=True)):
                result: TransactionResult | BaseException
                if isinstance(waiting, BaseException):
                    result = waiting
                else:
                    try:
                        result = await waiting
                    except Exception as exc:
                        result = exc
                results.append(result)
                # a result the hook never saw (an error) guards nothing; one it failed on, all
                default = (not isinstance(result, TransactionResult), None)
                journaled, entry = journal.pop(index, default)
                task = asyncio.ensure_future(self._record_outcome(job, host, result, entry))
                recording.append(task)
                if not journaled:
                    await asyncio.wait([task])
                    connection.release()
        except asyncio.CancelledError:  # stopping: the copies still queued must not go out
            connection.abort("delivery stopped")
            raise
        await asyncio.gather(*recording)
        return results

    def _journal_delivery(
        self, job: _Job, host: _Host, result: TransactionResult | BaseException
    ) -> tuple[bool, tuple[queue.Delivery, int] | None]:
        """(whether the next copy may go out now, this copy's delivery and journal token)."""
        if not isinstance(result, TransactionResult):
            return True, None
        reply = result.outcome(job.row.address)
        if reply.code >= 400:
            return True, None  # sent again it is refused again: nothing to guard
        delivery = queue.Delivery(job.row.id, dict(host.details), _stored(str(reply)))
        try:
            return True, (delivery, self._journal.append(delivery))
        except StoreError:
            log.exception("recipient %d: the delivery journal failed", job.row.id)
            return False, None

    async def _record_outcome(
        self,
        job: _Job,
        host: _Host,
        result: TransactionResult | BaseException,
        journaled: tuple[queue.Delivery, int] | None,
    ) -> None:
        try:
            await self._outcome(job, host, result)
        except Exception as exc:  # a bug here must not leave the others unrecorded
            log.exception("cannot record the outcome for recipient %d", job.row.id)
            if not (isinstance(result, TransactionResult) and result.delivered):
                # never resend something accepted remotely because of our own error
                with contextlib.suppress(Exception):
                    await self._defer(job.row, f"internal error recording the outcome: {exc}", {})
            if journaled is not None:  # the next sweep writes it (_record_unrecorded)
                self._unrecorded.append(journaled)
            return
        if journaled is not None:
            self._journal.recorded(journaled[1])

    def _adapt(
        self,
        shaped: _Shaped,
        jobs: list[_Job],
        results: list[TransactionResult | BaseException],
    ) -> None:
        """Tell the shaper how the destination took this connection's mail."""
        delivered = False
        for job, result in zip(jobs, results, strict=True):
            if isinstance(result, TransactionResult):
                reply = result.outcome(job.row.address)
            elif isinstance(result, OutboundError) and result.reply is not None:
                reply = result.reply  # the session ended on this reply (a 421 mid-batch)
            else:
                continue
            if reply.code < 400:
                delivered = True
            else:
                self._slow_down_if_throttled(shaped, reply)
        if delivered and not shaped.throttled:
            self._shaper.succeeded(shaped.dest)

    def _slow_down_if_throttled(self, shaped: _Shaped, reply: Reply) -> None:
        """Halve the destination's rate if ``reply`` says it throttles us; once per group."""
        if shaped.throttled or not _throttled(reply):
            return
        shaped.throttled = True
        self._shaper.throttled(shaped.dest)
        rate = self._shaper.current_rate(shaped.dest)
        log.info("%s throttles us (%s): rate now %.1f/min", shaped.dest, reply, rate)

    async def _target(self, domain: str) -> _Target | NullMx | DnsFailure:
        """Where ``domain``'s mail goes: its transport, else the smarthost, else its MX hosts."""
        relay = self._relay(domain)
        if relay is not None:
            label, entry = relay
            route = Route(domain=domain, hosts=(entry.host,))
            return _Target(
                route,
                entry.port,
                entry.tls,
                relay=True,
                details={"transport": label},
                credentials=_credentials(entry),
                allow_plaintext_auth=entry.allow_plaintext_auth,
                ssl_context=self._relay_contexts.get(entry.ca_file) if entry.ca_file else None,
            )
        found = await self._route(domain)
        if not isinstance(found, Route):
            return found
        # A domain literal's "host" is an address the sender chose, not an MX:
        # no MTA-STS policy can name it.
        return _Target(
            found,
            self._settings.mx_port,
            relay=domain.startswith("["),
            public_only=not self._settings.allow_internal_mx,
        )

    def _relay(self, domain: str) -> tuple[str, TransportSettings | SmarthostSettings] | None:
        """The transport (exact domain, then the longest ``*.`` suffix) or smarthost, with a label.

        The label (the transport's ``domain`` pattern, or ``smarthost``) goes
        into the events, so a delivery shows which configured route it took.
        """
        try:
            name = to_ascii(domain)
        except UnicodeError:
            name = domain.lower()
        entry = self._transports.get(name)
        if entry is not None:
            return entry.domain, entry
        labels = name.split(".")
        for start in range(1, len(labels)):
            entry = self._transports.get("*." + ".".join(labels[start:]))
            if entry is not None:
                return entry.domain, entry
        if self._settings.smarthost is not None:
            return "smarthost", self._settings.smarthost
        return None

    async def _route(self, domain: str) -> Route | NullMx | DnsFailure:
        if domain.startswith("[") and domain.endswith("]"):
            literal = domain[1:-1].removeprefix("ipv6:").removeprefix("IPv6:")
            return Route(domain=domain, hosts=(literal,), implicit=True)
        try:
            return await self._resolver.route(domain)
        except Exception as exc:  # a resolver bug must not take the group down silently
            log.exception("route lookup for %s failed", domain)
            return DnsFailure(temporary=True, reason=f"DNS lookup failed: {exc}", status="4.4.3")

    async def _sts(self, domain: str, route: Route) -> StsResult | None:
        """What ``domain``'s MTA-STS policy makes of ``route``; None when MTA-STS is off.

        A failure inside the cache (a bug: it handles DNS and HTTPS trouble
        itself) counts as "no policy", like a failed fetch without a cached
        policy, rather than holding the domain's mail forever.
        """
        if self._mta_sts is None:
            return None
        try:
            policy = await self._mta_sts.policy(domain)
        except Exception:
            log.exception("MTA-STS policy lookup for %s failed", domain)
            policy = None
        result = enforce(policy, route.hosts)
        if result.violations and result.mode == "testing":
            log.warning(
                "MTA-STS (testing): %s MX hosts not allowed by its policy: %s",
                domain,
                ", ".join(result.violations),
            )
        return result

    async def _connect(self, target: _Target, tls: TlsPolicy) -> _Host | DnsFailure | OutboundError:
        """A connection to the first host and address that answers, or the last problem.

        The problem is permanent only when every host had a permanent DNS
        failure (none exists or has an address) and they were the domain's
        own; any connection trouble or temporary DNS failure makes it
        temporary. A host that refused the session asking us to slow down is
        reported rather than the last problem: that refusal is what the
        destination's rate and the retry must hear, and a later host that
        was merely unreachable says nothing about either.

        At most ``MX_ADDRESS_LIMIT`` addresses are tried and at most
        ``MX_SESSION_LIMIT`` sessions opened per attempt (Postfix's numbers):
        the recipient's DNS chooses the hosts and their addresses.
        """
        route = target.route
        problem: DnsFailure | OutboundError | None = None
        throttled: OutboundError | None = None
        temporary = False
        tried = sessions = 0
        for mx in route.hosts:
            if tried >= MX_ADDRESS_LIMIT or sessions >= MX_SESSION_LIMIT:
                log.info("delivery to %s: gave up after %d addresses", route.domain, tried)
                break
            addresses: list[str] | DnsFailure
            if _is_address(mx):  # a domain literal, or a transport given as an address
                addresses = [mx]
            else:
                addresses = await self._resolver.addresses(mx)
            if isinstance(addresses, DnsFailure):
                problem, temporary = addresses, temporary or addresses.temporary
                continue
            if target.public_only:
                addresses, internal = _split_public(addresses)
                if not addresses:
                    problem, temporary = _only_internal(mx, internal), True
                    continue
            for address in addresses[: MX_ADDRESS_LIMIT - tried]:
                tried += 1
                try:
                    connection = await self._open(
                        address,
                        mx,
                        tls,
                        target.port,
                        credentials=target.credentials,
                        allow_plaintext_auth=target.allow_plaintext_auth,
                        ssl_context=target.ssl_context,
                    )
                except OutboundError as exc:
                    log.info("delivery to %s [%s] failed: %s", mx, address, exc.reason)
                    problem, temporary = exc, True
                    if throttled is None and exc.reply is not None and _throttled(exc.reply):
                        throttled = exc
                    if _session_began(exc):
                        sessions += 1
                        if sessions >= MX_SESSION_LIMIT:
                            break
                    continue
                host = _Host.of(connection, mx)
                host.details.update(target.details)
                return host
        if throttled is not None:
            return throttled
        if problem is None:
            problem = DnsFailure(temporary=True, reason=f"{route.domain}: no hosts", status="4.4.4")
        if isinstance(problem, DnsFailure) and temporary and not problem.temporary:
            problem = DnsFailure(temporary=True, reason=problem.reason, status="4.4.4")
        if isinstance(problem, DnsFailure) and target.relay and not problem.temporary:
            # A relay the operator configured that has no address is a
            # configuration mistake to fix, not a reason to bounce the mail.
            problem = DnsFailure(temporary=True, reason=problem.reason, status="4.4.4")
        if isinstance(problem, AuthenticationFailed) and not problem.temporary:
            # Credentials the relay refuses (535) are the same kind of mistake:
            # deferred, the status's class made 4 to match (5.7.8 -> 4.7.8).
            problem = AuthenticationFailed(
                problem.reason, status=f"4{problem.status[1:]}", reply=problem.reply
            )
        return problem

    async def _open(
        self,
        address: str,
        mx: str,
        tls: TlsPolicy,
        port: int,
        *,
        credentials: Credentials | None = None,
        allow_plaintext_auth: bool = False,
        ssl_context: ssl.SSLContext | None = None,
    ) -> OutboundConnection:
        """Connect; an opportunistic TLS handshake that fails is retried once in plaintext.

        That is Postfix's ``may`` level: unverified TLS only protects against
        passive listening, and refusing to deliver because a server's TLS is
        broken would make that server unreachable. Required TLS is never
        downgraded, nor is a connection whose credentials may not go out in
        plaintext: the retry could only fail at AUTH, hiding the real problem.
        ``ssl_context`` is a relay's own CA; without one, the worker's (tests)
        or the system's is used.
        """

        async def attempt(policy: TlsPolicy) -> OutboundConnection:
            return await connect(
                address,
                port,
                helo_name=self._helo,
                tls=policy,
                server_hostname=mx,
                ssl_context=ssl_context or self._ssl_context,
                connect_timeout=self._connect_timeout,
                command_timeout=self._command_timeout,
                credentials=credentials,
                allow_plaintext_auth=allow_plaintext_auth,
            )

        try:
            return await attempt(tls)
        except TlsHandshakeFailed:
            if tls != "opportunistic" or (credentials is not None and not allow_plaintext_auth):
                raise
            return await attempt("none")

    def _submit(
        self, host: _Host, job: _Job, on_result: ResultHook
    ) -> asyncio.Future[TransactionResult]:
        return host.connection.submit(
            job.mail_from,
            [job.row.address],
            job.data,
            smtputf8=job.smtputf8,
            eight_bit=job.eight_bit,
            size=len(job.data),
            crlf_only=True,  # every copy is signed, and signing makes its lines CRLF
            on_result=on_result,
        )

    async def _outcome(
        self, job: _Job, host: _Host, result: TransactionResult | BaseException
    ) -> None:
        row = job.row
        details = dict(host.details)
        if isinstance(result, OutboundError):
            data = {**details, "status": result.status}
            await self._defer(row, result.reason, data, hint=_retry_hint(result.reply))
            return
        if isinstance(result, BaseException):
            log.error("sending recipient %d failed", row.id, exc_info=result)
            await self._defer(row, f"internal error while sending: {result}", details)
            return
        reply = result.outcome(row.address)
        await self._reply_outcome(row, reply, details)

    async def _reply_outcome(
        self, row: queue.Leased, reply: Reply, details: dict[str, Any]
    ) -> None:
        text = _stored(str(reply))  # classified and hinted on the full text, below
        if reply.code < 400:
            await self._record(row, queue.Delivery(row.id, details, text))
            return
        verdict = classify(reply.code, reply.enhanced, reply.text)
        data = {**details, "kind": verdict.kind.value, "reason": verdict.reason}
        if reply.enhanced:
            data["status"] = reply.enhanced
        if not verdict.permanent:
            await self._defer(row, text, data, hint=parse_retry_hint(reply.text))
            return
        now = self._clock()

        def fail(conn: Connection) -> bool:
            done = queue.mark_failed(conn, row.id, owner=self.owner, now=now, reply=text, data=data)
            if done and verdict.suppress:
                suppression_store.add_suppression(
                    conn, row.account_id, row.address, "hard_bounce", text, now=now
                )
            elif done:
                _list_returned(conn, row, text, now)
            return done

        await self._record(row, fail)

    # -- recording outcomes -------------------------------------------------------------------

    async def _defer(
        self,
        row: queue.Leased,
        reason: str,
        data: dict[str, Any],
        *,
        hint: timedelta | None = None,
    ) -> None:
        """Deferred with backoff, or expired when the next try would be past the expiry."""
        reason = _stored(reason)  # may quote a server's reply (a refused session)
        now = self._clock()
        due = next_attempt(row.attempts + 1, now, expires_at=row.expires_at, retry_hint=hint)
        if due is None:
            await self._record(
                row,
                lambda conn: queue.mark_expired(
                    conn, row.id, owner=self.owner, now=now, reply=reason, data=data
                ),
            )
            return
        await self._record(
            row,
            lambda conn: queue.mark_deferred(
                conn,
                row.id,
                owner=self.owner,
                now=now,
                next_attempt_at=due,
                reply=reason,
                data=data,
            ),
        )

    async def _defer_locally(self, jobs: list[_Job], dest: str, why: str) -> None:
        """Defer rows the destination's rate has no slot for now, each to a slot to come.

        Spread over the coming slots (the first row to the next one, the
        second to the one after), so they do not all return at one moment and
        get deferred again. Not a remote failure: no bounce ``kind``, no
        backoff; a row whose slot falls after its expiry is left for the
        sweep to expire.
        """
        now = self._clock()
        for position, job in enumerate(jobs):
            row = job.row
            wait = max(1, math.ceil(self._shaper.next_slot(dest, position)))
            due = min(now + timedelta(seconds=wait), max(row.expires_at, now))
            reason = f"4.7.0 local rate limit for {dest}{why}: next slot in {wait} s"
            data = {"local": True, "destination": dest, "status": "4.7.0", "reason": reason}
            await self._record(row, _rescheduling(row.id, self.owner, now, due, reason, data))

    async def _fail(
        self,
        row: queue.Leased,
        reason: str,
        data: dict[str, Any],
        *,
        status: str | None = None,
        suppress: bool = False,
    ) -> None:
        """Fail ``row`` for good; ``suppress`` also lists the address as a hard bounce."""
        reason = _stored(reason)
        now = self._clock()
        payload = dict(data)
        if status is not None:
            payload.setdefault("status", status)
        payload.setdefault("reason", reason)

        def fail(conn: Connection) -> bool:
            done = queue.mark_failed(
                conn, row.id, owner=self.owner, now=now, reply=reason, data=payload
            )
            if done and suppress:
                suppression_store.add_suppression(
                    conn, row.account_id, row.address, "hard_bounce", reason, now=now
                )
            return done

        await self._record(row, fail)

    async def _record(self, row: queue.Leased, write: _Write) -> None:
        """Record one outcome as soon as possible; a lost lease is logged, not an error.

        Outcomes that arrive while a transaction of earlier ones is being
        written share the next transaction (group commit, as at intake):
        measured under bench/relay, one transaction and fsync per delivered
        recipient was the delivery role's largest cost and starved intake of
        SQLite's single write lock. A connection does not wait for this: a
        delivery is in the journal before the next copy's content goes out
        (:meth:`_send_all`). Deliveries (most outcomes) are written together
        by :func:`~postlane.store.queue.mark_delivered_many`, the rest one by one.
        """
        future: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._outcomes.append((write, future))
        if self._outcome_writer is None or self._outcome_writer.done():
            self._outcome_writer = asyncio.ensure_future(self._write_outcomes())
        if not await future:
            log.warning("recipient %d: lease lost before its outcome was recorded", row.id)

    async def _write_outcomes(self) -> None:
        while self._outcomes:
            await asyncio.sleep(0)  # outcomes of this same loop turn join the batch
            batch, self._outcomes = self._outcomes, []

            def run(batch: list[_Outcome] = batch) -> list[bool]:
                with self._db.begin() as conn:
                    return self._write_batch(conn, [write for write, _ in batch])

            try:
                results = await asyncio.to_thread(run)
            except Exception:  # one bad write must not fail its neighbours: one by one
                for write, future in batch:
                    try:
                        done = await self._write(self._one(write))
                    except Exception as exc:
                        if not future.done():
                            future.set_exception(exc)
                    else:
                        if not future.done():
                            future.set_result(done)
                continue
            for (_, future), done in zip(batch, results, strict=True):
                if not future.done():
                    future.set_result(done)

    def _write_batch(self, conn: Connection, writes: list[_Write]) -> list[bool]:
        deliveries = [w for w in writes if isinstance(w, queue.Delivery)]
        delivered = iter(
            queue.mark_delivered_many(conn, deliveries, owner=self.owner, now=self._clock())
            if deliveries
            else []
        )
        return [
            next(delivered) if isinstance(write, queue.Delivery) else write(conn)
            for write in writes
        ]

    def _one(self, write: _Write) -> Callable[[Connection], bool]:
        if not isinstance(write, queue.Delivery):
            return write
        return lambda conn: self._write_batch(conn, [write])[0]

    # -- the database, off the event loop -------------------------------------------------------

    async def _write(self, work: Callable[[Connection], _T]) -> _T:
        def run() -> _T:
            with self._db.begin() as conn:
                return work(conn)

        return await asyncio.to_thread(run)

    async def _read(self, work: Callable[[Connection], _T]) -> _T:
        def run() -> _T:
            with self._db.connect() as conn:
                return work(conn)

        return await asyncio.to_thread(run)


_Write = Callable[[Connection], bool] | queue.Delivery
_Outcome = tuple[_Write, "asyncio.Future[bool]"]


def _organisational(domain: str) -> str | None:
    """The registrable domain (RFC 7489 §3.2), for relaxed From alignment."""
    if not domain or domain.startswith("["):
        return None
    try:
        ascii_name = domain if domain.isascii() else domain.encode("idna").decode("ascii")
    except UnicodeError:
        return None
    result: str | None = _PSL.privatesuffix(ascii_name)
    return result


def _is_address(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _transport_table(entries: Sequence[TransportSettings]) -> dict[str, TransportSettings]:
    """Transports by their ``domain`` pattern (already lower-case A-labels, checked unique)."""
    return {entry.domain: entry for entry in entries}


def _split_public(addresses: Sequence[str]) -> tuple[list[str], list[str]]:
    """Split ``addresses`` into public ones (to connect to) and the rest (skipped)."""
    public: list[str] = []
    internal: list[str] = []
    for address in addresses:
        (public if ipaddress.ip_address(address).is_global else internal).append(address)
    return public, internal


# Postfix's smtp_mx_address_limit and smtp_mx_session_limit defaults: per delivery
# attempt, at most 5 addresses are tried and 2 sessions opened, whatever the MX
# records list (routing.MAX_MX_HOSTS keeps 10 hosts). Mail to a domain whose
# hosts are all failing waits for the retry; without a limit, anyone's DNS made
# one group try 4,800 addresses, a day and more at 30 s each.
MX_ADDRESS_LIMIT: Final = 5
MX_SESSION_LIMIT: Final = 2


def _session_began(exc: OutboundError) -> bool:
    """Whether the connection was made before ``exc``: it then counts as a session.

    As in Postfix, an address that could not be reached at all counts only
    against ``MX_ADDRESS_LIMIT``.
    """
    return not isinstance(exc, ConnectFailed)


def _only_internal(mx: str, internal: Sequence[str]) -> DnsFailure:
    """Why a host with only non-public addresses was not connected to.

    Temporary: the operator may allow internal hosts or add a transport, and
    the mail should still be there when they do; it expires like any other.
    """
    shown = ", ".join(internal[:3]) + (", ..." if len(internal) > 3 else "")
    return DnsFailure(
        temporary=True,
        reason=f"{mx} has no public address ({shown}); delivery.allow_internal_mx is off",
        status="4.4.4",
    )


def _relay_contexts(settings: DeliverySettings) -> dict[Path, ssl.SSLContext]:
    """The TLS context of each relay ``ca_file``, built once rather than for every connection.

    A file that went missing or changed since the settings were checked
    stops the worker with a :class:`ConfigError` naming it, rather than
    deferring all of the relay's mail.
    """
    relays = [*settings.transports, settings.smarthost]
    files = {relay.ca_file for relay in relays if relay is not None and relay.ca_file}
    return {ca_file: relay_context(ca_file) for ca_file in files}


def _credentials(entry: TransportSettings | SmarthostSettings) -> Credentials | None:
    """The entry's AUTH credentials; the settings allow both or neither."""
    if entry.username is None or entry.password is None:
        return None
    return Credentials(entry.username, entry.password.get_secret_value())


def _apply_sts(target: _Target, sts: StsResult | None) -> _Target:
    """``target`` limited to the hosts the policy allows, with its TLS demand and the event facts.

    ``enforce`` makes TLS ``required``: :func:`connect` then verifies the
    certificate for the MX name, and a host failing that is skipped, never
    used in plain text (RFC 8461 §4.2).
    """
    if sts is None:
        return target
    details: dict[str, Any] = {**target.details, "mta_sts": sts.mode}
    if sts.mode == "testing" and sts.violations:
        details["mta_sts_violations"] = list(sts.violations)
    route = Route(
        domain=target.route.domain,
        hosts=sts.hosts,
        implicit=target.route.implicit,
        ignored=target.route.ignored,
    )
    tls: TlsPolicy | None = "required" if sts.require_tls else target.tls
    return dataclasses.replace(target, route=route, tls=tls, details=details)


def _list_check(account_id: int, addresses: list[str]) -> Callable[[Connection], dict[str, str]]:
    def check(conn: Connection) -> dict[str, str]:
        return suppression_store.listed(conn, account_id, addresses)

    return check


def _list_returned(conn: Connection, row: queue.Leased, reply: str, now: datetime) -> None:
    """A permanent refusal that is not a hard bounce: the address goes on the ``returned`` list.

    The mail came back, but the reply does not prove the address bad (a
    policy or content refusal, a full mailbox), so it only keeps mail that
    asks for X-ListOption 512 from the address. An address the list cannot
    hold is logged and skipped: the failure itself is already recorded.
    """
    try:
        suppression_store.add_suppression(
            conn, row.account_id, row.address, "returned", reply, now=now
        )
    except InvalidInput as exc:
        log.warning("recipient %d: not put on the returned list: %s", row.id, exc)


def _stored(text: str) -> str:
    """``text`` cut to about STORED_REPLY_CHARS, at a line end when one is near, marked so.

    A reply may be 64 KiB, and it is stored per recipient (``last_reply``,
    the event, the suppression): a server must not make every recipient's
    row that big. The first lines say what went wrong; classification and
    retry hints read the full reply before it is cut.
    """
    if len(text) <= STORED_REPLY_CHARS:
        return text
    kept = text[:STORED_REPLY_CHARS]
    line_end = kept.rfind("\n")
    if line_end >= STORED_REPLY_CHARS // 2:
        kept = kept[:line_end]
    return f"{kept}\n… ({len(text) - len(kept)} more characters)"


def _throttled(reply: Reply) -> bool:
    """Whether a refusal says the receiver wants us to slow down (421, 4.7.x rate limits).

    A reply the client made up itself (a lost connection) is our words, not
    the receiver's: it throttles nothing.
    """
    return not reply.local and throttles(reply.code, reply.enhanced, reply.text)


def _retry_hint(reply: Reply | None) -> timedelta | None:
    """The wait a server asked for as it ended the session ("421 ... try again in 30 minutes").

    Read as the in-transaction path reads a 4xx; a reply the client made up
    itself asks for nothing.
    """
    if reply is None or reply.local:
        return None
    return parse_retry_hint(reply.text)


def _quick_to_compose(loaded: _Loaded) -> bool:
    """Whether a copy of this message is composed on the event loop rather than in a thread.

    A thread hop per copy cost CPU and latency: without it bench/relay at
    ``-s 10`` went from 1.98-2.11 to 1.75-1.98 ms of CPU per message end to
    end (three runs before, four after; docs/benchmarks.md, runs 5 to 7),
    at ``-s 100`` from 1.61-1.67 to 1.47-1.63. A small message with no
    template and no attachment policy has no slow step (template rendering,
    zip work), and :meth:`DeliveryWorker._prepare_all` lets the loop run
    every ``YIELD_EVERY`` seconds of composing; templates, attachment
    policies and large messages stay in a thread.
    """
    return (
        len(loaded.message.raw) <= INLINE_COMPOSE_BYTES
        and loaded.template is None
        and loaded.account.attachment_policy == "off"
    )


def _delivering(
    deliveries: list[queue.Delivery], owner: str, now: datetime
) -> Callable[[Connection], list[bool]]:
    def deliver(conn: Connection) -> list[bool]:
        return queue.mark_delivered_many(conn, deliveries, owner=owner, now=now)

    return deliver


def _renewing(
    ids: list[int], owner: str, now: datetime, lease_for: timedelta
) -> Callable[[Connection], int]:
    def renew(conn: Connection) -> int:
        return queue.renew_leases(conn, ids, owner=owner, now=now, lease_for=lease_for)

    return renew


def _archiving(row: queue.Leased, data: bytes, now: datetime) -> Callable[[Connection], bool]:
    def archive(conn: Connection) -> bool:
        archive_store.archive_copy(
            conn,
            account_id=row.account_id,
            message_id=row.message_id,
            recipient_id=row.id,
            address=row.address,
            data=data,
            now=now,
        )
        return True  # a copy kept by an earlier attempt is just as good

    return archive


def _rescheduling(
    id: int, owner: str, now: datetime, due: datetime, reason: str, data: dict[str, Any]
) -> Callable[[Connection], bool]:
    def reschedule(conn: Connection) -> bool:
        return queue.reschedule(
            conn, id, owner=owner, now=now, next_attempt_at=due, reason=reason, data=data
        )

    return reschedule
