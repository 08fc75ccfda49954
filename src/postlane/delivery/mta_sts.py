"""MTA-STS (RFC 8461): which MX hosts a domain allows, and whether TLS is mandatory.

Without MTA-STS, an attacker on the path can strip STARTTLS or answer for a
fake MX and read the mail. A domain that publishes a policy says "deliver only
to these MX names, over TLS with a certificate valid for them". The policy is
found in two steps: a TXT record at ``_mta-sts.<domain>`` (``v=STSv1;
id=...``) says one exists and names its version, and the policy itself is
fetched over HTTPS from ``https://mta-sts.<domain>/.well-known/mta-sts.txt``,
where the web PKI authenticates it.

The module keeps the pure rules apart from the I/O:

- pure: :func:`parse_policy`, :func:`parse_sts_record`, :func:`sts_record_id`,
  :func:`mx_matches`, :func:`enforce` — tested without a network;
- I/O: :class:`HttpsPolicyFetcher` (the HTTPS GET) and :class:`MtaStsCache`
  (discovery, caching by id and ``max_age``, surviving fetch failures).

Decisions where the RFC leaves room, and why:

- Unknown policy fields are ignored and a repeated field other than ``mx``
  keeps its first value (RFC 8461 §3.2 says so). Everything else is strict: a
  line that is not ``key: value``, an unknown mode, a version other than
  ``STSv1``, a malformed MX pattern or a missing field rejects the policy, and
  a rejected policy is treated as no policy (§3.3), never guessed at.
- ``mx`` may be absent only in mode ``none``, which exists to retire a policy
  (§8.3) and has no hosts to list.
- A ``max_age`` above the maximum of 31557600 s (§3.2) is clamped to it rather
  than rejected: rejecting would silently drop a domain's ``enforce`` policy.
- Blank lines and trailing whitespace are tolerated: they change no meaning.
- The policy must be served as ``text/plain`` (the §3.3 SHOULD, which stops a
  user-uploaded file on a shared web host from passing as a policy), with
  status 200 (redirects are never followed, §3.3), within 64 KiB.
- After a failed fetch, the same policy id is not fetched again for five
  minutes (the §3.3 recommendation), so a broken policy host is not asked
  once per message.
- The cache holds at most ``max_domains`` entries (see :class:`MtaStsCache`
  for which go first): recipient domains are chosen by whoever sends, so an
  unbounded cache is memory anyone can fill.
- A policy keeps its first ``MAX_MX_PATTERNS`` (100) distinct ``mx``
  patterns. RFC 8461 sets no limit, but a 64 KiB policy holds thousands, and
  checking each route host against each pattern ran on the event loop
  (4,756 patterns by 2,800 hosts: 3.2 s). Cutting rather than rejecting the
  policy errs on the safe side: a host matched only by a dropped pattern is
  not used under ``enforce`` (with no host left the mail is deferred, never
  sent in the clear), where a rejected policy would switch MTA-STS off. Patterns are looked up by
  set, so a check costs the same whatever their number.
- Policy fetches run in threads of their own, at most ``FETCH_CONCURRENCY``
  (4) at once (see :class:`HttpsPolicyFetcher`), never in asyncio's default
  executor, which the worker's database calls share: policy hosts that
  accept a connection and then say nothing held every thread of it for the
  whole fetch timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import http.client
import ipaddress
import logging
import re
import socket
import ssl
import threading
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, Literal

from postlane.delivery.resolver import Resolver, to_ascii
from postlane.delivery.routing import DnsFailure
from postlane.errors import InvalidInput, PostlaneError

__all__ = [
    "FETCH_CONCURRENCY",
    "FETCH_RETRY",
    "FETCH_TIMEOUT",
    "MAX_DOMAINS",
    "MAX_MAX_AGE",
    "MAX_MX_PATTERNS",
    "MAX_POLICY_SIZE",
    "HttpsPolicyFetcher",
    "Mode",
    "MtaStsCache",
    "Policy",
    "PolicyFetch",
    "PolicyFetchBusy",
    "PolicyFetchError",
    "StsResult",
    "enforce",
    "mx_matches",
    "parse_policy",
    "parse_sts_record",
    "sts_record_id",
]

log = logging.getLogger("postlane.delivery.mta_sts")

Mode = Literal["enforce", "testing", "none"]
MODES: Final[tuple[Mode, ...]] = ("enforce", "testing", "none")
VERSION: Final = "STSv1"
MAX_MAX_AGE: Final = 31_557_600  # RFC 8461 §3.2: one year
MAX_POLICY_SIZE: Final = 64 * 1024  # RFC 8461 §3.3: senders SHOULD accept at least 64 KB
FETCH_TIMEOUT: Final = 60.0  # RFC 8461 §3.3: a timeout SHOULD be at least one minute
FETCH_RETRY: Final = 300.0  # RFC 8461 §3.3: wait five minutes or more per id after a failure
MAX_DOMAINS: Final = 10_000  # MTA-STS cache entries: a few MB at most
MAX_MX_PATTERNS: Final = 100  # mx patterns kept per policy; RFC 8461 sets no limit
FETCH_CONCURRENCY: Final = 4  # policy fetches (threads) at once, per fetcher
POLICY_PATH: Final = "/.well-known/mta-sts.txt"
HTTPS_PORT: Final = 443

_FIELD = re.compile(r"([A-Za-z0-9][A-Za-z0-9_.-]{0,31}):[ \t]*(.*?)[ \t]*")
_CTL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")  # control characters; HTAB is WSP
_LABEL = re.compile(r"[a-z0-9](?:[a-z0-9-]*[a-z0-9])?")
_STS_START = re.compile(r"v=STSv1[ \t]*;")
_STS_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,31}")
_STS_VALUE = re.compile(r"[\x21-\x3a\x3c\x3e-\x7e]+")
_STS_ID = re.compile(r"[A-Za-z0-9]{1,32}")
_MAX_AGE = re.compile(r"[0-9]{1,10}")


# --- policies -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Policy:
    """A parsed MTA-STS policy (RFC 8461 §3.2).

    ``mx`` holds the allowed MX patterns, lower-case: host names, or
    ``*.<domain>`` for any host exactly one label below ``<domain>``.
    ``max_age`` is how long, in seconds, the policy may be cached.

    The patterns are also kept as two sets, exact names and the domains under
    a wildcard, so that :func:`mx_matches` costs the same for any number of
    patterns instead of one comparison each.
    """

    version: str
    mode: Mode
    mx: tuple[str, ...]
    max_age: int
    _exact: frozenset[str] = field(init=False, repr=False, compare=False)
    _wildcard: frozenset[str] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        wildcard = frozenset(p[2:] for p in self.mx if p.startswith("*."))
        exact = frozenset(p for p in self.mx if not p.startswith("*."))
        object.__setattr__(self, "_exact", exact)
        object.__setattr__(self, "_wildcard", wildcard)


def _mx_pattern(value: str) -> str:
    """An ``mx`` value, checked against ``["*."] Domain`` (RFC 8461 §3.2, RFC 5321 §4.1.2)."""
    pattern = value.lower()
    domain = pattern[2:] if pattern.startswith("*.") else pattern
    labels = domain.split(".")
    if len(domain) > 253 or not all(
        len(label) <= 63 and _LABEL.fullmatch(label) for label in labels
    ):
        raise InvalidInput(
            f"MTA-STS policy: mx {value!r} is not a host name or a '*.' wildcard over one"
        )
    return pattern


def parse_policy(text: str) -> Policy:
    """The policy in ``text``, the body of ``/.well-known/mta-sts.txt``.

    Raises :class:`~postlane.errors.InvalidInput` naming the first problem;
    the module docstring lists what is strict and what is tolerated.
    """
    fields: dict[str, str] = {}
    mx: list[str] = []
    for number, raw in enumerate(text.split("\n"), start=1):
        line = raw[:-1] if raw.endswith("\r") else raw
        if not line.strip(" \t"):
            continue
        match = _FIELD.fullmatch(line)
        if match is None:
            raise InvalidInput(f"MTA-STS policy line {number}: {line[:80]!r} is not 'key: value'")
        key, value = match.groups()
        if not value:
            raise InvalidInput(f"MTA-STS policy line {number}: {key!r} has no value")
        if _CTL.search(value):
            raise InvalidInput(
                f"MTA-STS policy line {number}: the value of {key!r} has a control character"
            )
        if key == "mx":
            mx.append(_mx_pattern(value))
        else:
            fields.setdefault(key, value)  # RFC 8461 §3.2: the first one counts
    for required in ("version", "mode", "max_age"):
        if required not in fields:
            raise InvalidInput(f"MTA-STS policy: the {required!r} field is missing")
    if fields["version"] != VERSION:
        raise InvalidInput(
            f"MTA-STS policy: version {fields['version']!r} is not supported (only {VERSION})"
        )
    mode = fields["mode"]
    if mode not in MODES:
        raise InvalidInput(f"MTA-STS policy: mode {mode!r} is not one of {', '.join(MODES)}")
    if not _MAX_AGE.fullmatch(fields["max_age"]):
        raise InvalidInput(f"MTA-STS policy: max_age {fields['max_age']!r} is not 1 to 10 digits")
    if not mx and mode != "none":
        raise InvalidInput(f"MTA-STS policy: mode {mode} needs at least one 'mx' field")
    max_age = min(int(fields["max_age"]), MAX_MAX_AGE)
    patterns = tuple(dict.fromkeys(mx))[:MAX_MX_PATTERNS]  # module docstring: why a cut
    return Policy(VERSION, mode, patterns, max_age)


def parse_sts_record(text: str) -> str:
    """The policy id of an ``_mta-sts`` TXT record (RFC 8461 §3.1).

    ``v=STSv1`` must come first; fields are separated by ``;`` with optional
    blanks; ``id`` (1 to 32 letters and digits) is required, and the first
    one counts; other ``name=value`` fields are checked and ignored.
    """
    parts = [part.strip(" \t") for part in text.split(";")]
    if text[:1] in (" ", "\t") or parts[0] != "v=STSv1":
        raise InvalidInput(f"MTA-STS record {text!r} does not start with 'v=STSv1'")
    if len(parts) > 2 and parts[-1] == "":
        parts.pop()  # one trailing separator is allowed
    sts_id: str | None = None
    for part in parts[1:]:
        name, equals, value = part.partition("=")
        if not equals or not _STS_NAME.fullmatch(name) or not _STS_VALUE.fullmatch(value):
            raise InvalidInput(f"MTA-STS record {text!r}: {part!r} is not 'name=value'")
        if name == "id" and sts_id is None:
            if not _STS_ID.fullmatch(value):
                raise InvalidInput(
                    f"MTA-STS record {text!r}: id {value!r} is not 1 to 32 letters and digits"
                )
            sts_id = value
    if sts_id is None:
        raise InvalidInput(f"MTA-STS record {text!r} has no id")
    return sts_id


def sts_record_id(records: Sequence[str]) -> str | None:
    """The policy id the ``_mta-sts`` TXT records publish, or None if none claims to.

    RFC 8461 §3.1: records not starting with ``v=STSv1;`` are discarded;
    more than one remaining, or one that does not parse, is an error
    (:class:`~postlane.errors.InvalidInput`), and the domain is then treated
    as having no policy available.
    """
    candidates = [record for record in records if _STS_START.match(record)]
    if not candidates:
        return None
    if len(candidates) > 1:
        raise InvalidInput(f"{len(candidates)} MTA-STS records where one is allowed")
    return parse_sts_record(candidates[0])


def mx_matches(policy: Policy, mx_host: str) -> bool:
    """Whether ``mx_host`` is allowed by one of ``policy``'s ``mx`` patterns.

    RFC 8461 §4.1: names compare case-insensitively; ``*.example.com``
    matches ``mail.example.com`` but neither ``example.com`` nor
    ``a.b.example.com`` — the wildcard is exactly one whole label.
    """
    try:
        host = to_ascii(mx_host)
    except UnicodeError:
        return False
    if host in policy._exact:
        return True
    label, dot, parent = host.partition(".")
    return bool(label and dot and parent in policy._wildcard)


@dataclass(frozen=True, slots=True)
class StsResult:
    """What a domain's policy means for one delivery attempt.

    ``hosts`` are the MX hosts to try, in the order given. ``require_tls``
    (mode ``enforce``) means STARTTLS is mandatory and the certificate must
    chain to a trusted root and be valid for the MX host name (RFC 8461
    §4.2); a host failing that is skipped, never used in plain text.
    ``check_tls`` is also true in mode ``testing``: validate and report a
    failure, but deliver anyway. ``violations`` lists the MX hosts the policy
    does not allow: left out of ``hosts`` under ``enforce``, kept (and to be
    reported) under ``testing``. ``mode`` is None when the domain has no
    policy.
    """

    mode: Mode | None
    hosts: tuple[str, ...]
    violations: tuple[str, ...] = ()
    require_tls: bool = False

    @property
    def check_tls(self) -> bool:
        return self.mode in ("enforce", "testing")

    @property
    def reason(self) -> str | None:
        """Why no host may be used, when none may; otherwise None.

        RFC 8461 §5.1: delivery must not fail permanently before a new policy
        was looked for, so the worker defers (``4.7.5``), never bounces.
        """
        if self.hosts or not self.violations:
            return None
        return "no MX host is allowed by the domain's MTA-STS policy (mode enforce): " + ", ".join(
            self.violations
        )


def enforce(policy: Policy | None, mx_hosts: Sequence[str]) -> StsResult:
    """The MX hosts usable under ``policy`` (RFC 8461 §5), in their given order.

    ``enforce``: only matching hosts, TLS with a valid certificate required.
    ``testing``: every host; the non-matching ones are named in
    ``violations`` for the logs and TLS reports. ``none`` or no policy: every
    host, no requirement.
    """
    hosts = tuple(mx_hosts)
    if policy is None or policy.mode == "none":
        return StsResult(mode=None if policy is None else "none", hosts=hosts)
    matches = [mx_matches(policy, host) for host in hosts]
    violations = tuple(host for host, ok in zip(hosts, matches, strict=True) if not ok)
    if policy.mode == "testing":
        return StsResult(mode="testing", hosts=hosts, violations=violations)
    allowed = tuple(host for host, ok in zip(hosts, matches, strict=True) if ok)
    return StsResult(mode="enforce", hosts=allowed, violations=violations, require_tls=True)


# --- fetching -------------------------------------------------------------------------


class PolicyFetchError(PostlaneError):
    """The policy could not be fetched; the message says why, for the logs."""


class PolicyFetchBusy(PolicyFetchError):
    """Not fetched: every fetch slot stayed taken for the whole fetch timeout.

    Not the policy host's fault, so the cache does not hold it against the
    domain (no five-minute wait): the next delivery asks again.
    """


PolicyFetch = Callable[[str], Awaitable[str]]
"""``await fetch(domain)``: the policy text of ``domain``, or PolicyFetchError."""


class _Connection:
    """One blocking HTTPS GET, abortable from another thread when it runs late."""

    def __init__(self) -> None:
        self._sock: socket.socket | None = None
        self._aborted = False

    def abort(self) -> None:
        self._aborted = True
        if self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.shutdown(socket.SHUT_RDWR)  # wakes a blocked recv

    def get(
        self,
        host: str,
        address: str,
        port: int,
        context: ssl.SSLContext,
        timeout: float,
        max_size: int,
    ) -> str:
        """The policy body from ``address``, authenticated as ``host``.

        Raises ConnectionError when no TCP connection could be made (the
        caller tries the next address) and PolicyFetchError for anything else.
        """
        try:
            raw = socket.create_connection((address, port), timeout=timeout)
        except OSError as exc:
            raise ConnectionError(f"{address} port {port}: {exc}") from None
        self._sock = raw
        try:
            if self._aborted:
                raise PolicyFetchError("timed out")
            with context.wrap_socket(
                raw, server_hostname=host, do_handshake_on_connect=False
            ) as tls:
                self._sock = tls  # before the handshake, so that abort() can end it
                tls.do_handshake()
                host_header = host if port == HTTPS_PORT else f"{host}:{port}"
                tls.sendall(
                    (
                        f"GET {POLICY_PATH} HTTP/1.1\r\nHost: {host_header}\r\n"
                        "User-Agent: Postlane\r\nAccept: text/plain\r\nConnection: close\r\n\r\n"
                    ).encode("ascii")
                )
                response = http.client.HTTPResponse(tls, method="GET")
                try:
                    response.begin()
                    return self._body(response, max_size)
                finally:
                    response.close()
        except ssl.SSLCertVerificationError as exc:
            raise PolicyFetchError(
                f"certificate of {host} not valid: {exc.verify_message}"
            ) from None
        except (OSError, http.client.HTTPException) as exc:
            what = "timed out" if isinstance(exc, TimeoutError) else f"{type(exc).__name__}: {exc}"
            raise PolicyFetchError(f"https://{host}{POLICY_PATH}: {what}") from None
        finally:
            raw.close()

    @staticmethod
    def _body(response: http.client.HTTPResponse, max_size: int) -> str:
        if response.status != 200:
            hint = (
                " (redirects are not followed, RFC 8461 §3.3)"
                if 300 <= response.status < 400
                else ""
            )
            raise PolicyFetchError(f"HTTP {response.status} {response.reason}{hint}")
        content_type = response.getheader("Content-Type") or ""
        if content_type.split(";")[0].strip().lower() != "text/plain":
            raise PolicyFetchError(
                f"served as {content_type or 'no media type'!r}, not text/plain (RFC 8461 §3.3)"
            )
        body = response.read(max_size + 1)
        if len(body) > max_size:
            raise PolicyFetchError(f"policy is larger than {max_size} bytes")
        try:
            return body.decode("utf-8")
        except UnicodeDecodeError:
            raise PolicyFetchError("policy is not UTF-8 text") from None


class HttpsPolicyFetcher:
    """GET ``https://mta-sts.<domain>/.well-known/mta-sts.txt`` (RFC 8461 §3.3).

    The host is resolved through the delivery :class:`Resolver` (so the same
    nameservers answer as for MX) and the addresses are tried in order until
    one accepts a connection. The certificate must be valid for the host
    under ``context`` (default: the system's trusted roots); tests pass a
    context trusting their own CA and a ``port`` where their server listens.
    The blocking ``http.client`` exchange runs in a thread; at the ``timeout``
    (for the whole fetch), or when the fetch is cancelled, its socket is shut
    down.

    **Threads.** Each fetch gets a daemon thread of its own, and at most
    ``concurrency`` fetches run at once; the rest wait, within the same
    ``timeout``. Not asyncio's default executor: the worker's database calls
    share it, and policy hosts that accept a connection and say nothing held
    all of its threads for the whole timeout. Not a pool either: its threads
    would outlive the worker unless something shut it down, and nothing owns
    this fetcher's lifetime (a cache can be handed to the worker). A thread
    ends with its fetch; a cancelled fetch's socket is shut down at once, and
    only a connect still in progress runs on, to its timeout at most.

    **Busy.** A fetch still waiting for a slot at its timeout raises
    :class:`PolicyFetchBusy`. Waiting keeps an ``enforce`` policy from being
    skipped because a burst of other domains' fetches came first; the bound
    keeps anyone from stalling every other domain's delivery indefinitely
    with slow policy hosts. Past it, the domain is treated as having no
    policy fetched yet, which RFC 8461 §3.3 and §5 make mail without MTA-STS
    (a cached policy still applies: the cache keeps it).

    The host is named by whoever controls the recipient's domain, so any
    sender could otherwise make Postlane open connections (a TLS hello with
    a name of the sender's choosing) to loopback, private or link-local
    addresses (a cloud's metadata service) inside the operator's network.
    Only global addresses are tried, unless ``internal`` allows the rest
    (tests, whose policy servers listen on loopback). Without a policy the
    mail goes out as it would with none (RFC 8461 §3.3).
    """

    def __init__(
        self,
        resolver: Resolver,
        *,
        context: ssl.SSLContext | None = None,
        port: int = HTTPS_PORT,
        timeout: float = FETCH_TIMEOUT,
        max_size: int = MAX_POLICY_SIZE,
        internal: bool = False,
        concurrency: int = FETCH_CONCURRENCY,
    ) -> None:
        if concurrency < 1:
            raise InvalidInput(f"MTA-STS fetch concurrency must be at least 1, got {concurrency}")
        self._resolver = resolver
        self._slots = asyncio.Semaphore(concurrency)
        self._internal = internal
        self._context = context if context is not None else ssl.create_default_context()
        if self._context.verify_mode != ssl.CERT_REQUIRED or not self._context.check_hostname:
            raise ValueError("an MTA-STS context must verify certificates and host names")
        self._port = port
        self._timeout = timeout
        self._max_size = max_size

    async def __call__(self, domain: str) -> str:
        host = f"mta-sts.{domain}"
        addresses = await self._resolver.addresses(host)
        if isinstance(addresses, DnsFailure):
            raise PolicyFetchError(f"{host}: {addresses.reason}")
        if not self._internal:
            public = [a for a in addresses if ipaddress.ip_address(a).is_global]
            if not public:
                raise PolicyFetchError(
                    f"{host} resolves only to addresses that are not public"
                    f" ({', '.join(addresses)}): not fetched"
                )
            addresses = public
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._timeout
        try:
            async with asyncio.timeout_at(deadline):
                await self._slots.acquire()
        except TimeoutError:
            raise PolicyFetchBusy(
                f"https://{host}{POLICY_PATH}: not fetched, no fetch slot free within "
                f"{self._timeout:g} s"
            ) from None
        try:
            return await self._get(host, addresses, deadline)
        finally:
            self._slots.release()

    async def _get(self, host: str, addresses: Sequence[str], deadline: float) -> str:
        loop = asyncio.get_running_loop()
        unreachable: list[str] = []
        for address in addresses:
            connection = _Connection()
            remaining = deadline - loop.time()
            if remaining <= 0:
                break
            try:
                return await asyncio.wait_for(
                    _in_thread(
                        functools.partial(
                            connection.get,
                            host,
                            address,
                            self._port,
                            self._context,
                            remaining,
                            self._max_size,
                        )
                    ),
                    timeout=remaining,
                )
            except ConnectionError as exc:
                unreachable.append(str(exc))
            except TimeoutError:
                raise PolicyFetchError(
                    f"https://{host}{POLICY_PATH}: timed out after {self._timeout:g} s"
                ) from None
            finally:
                connection.abort()  # frees a thread still blocked in it; harmless once done
        raise PolicyFetchError(f"{host} unreachable: " + "; ".join(unreachable or ["timed out"]))


async def _in_thread(call: Callable[[], str]) -> str:
    """``call()`` in a daemon thread of its own (see :class:`HttpsPolicyFetcher`: why)."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[str] = loop.create_future()

    def settle(result: str, error: BaseException | None) -> None:
        if future.done():  # cancelled: nobody waits for it any more
            return
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)

    def work() -> None:
        result, error = "", None
        try:
            result = call()
        except BaseException as exc:  # handed to the awaiting coroutine, whatever it is
            error = exc
        with contextlib.suppress(RuntimeError):  # the loop closed while this ran
            loop.call_soon_threadsafe(settle, result, error)

    threading.Thread(target=work, name="mta-sts-fetch", daemon=True).start()
    return await future


# --- the cache ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Cached:
    sts_id: str
    policy: Policy
    expires: float


@dataclass(frozen=True, slots=True)
class _Failed:
    sts_id: str
    retry_at: float


class MtaStsCache:
    """The current MTA-STS policy of each recipient domain (RFC 8461 §5.1).

    :meth:`policy` is called before each delivery to a domain. It reads the
    ``_mta-sts`` TXT record (cheap: the resolver caches it for its TTL) and
    fetches the policy only when its id is new; a fetched policy is kept for
    its ``max_age``. A cached policy outlives anything that cannot be trusted
    to retire it: a failed TXT lookup, a vanished or malformed TXT record, a
    new id whose policy cannot be fetched — otherwise an attacker who blocks
    DNS or HTTPS would switch MTA-STS off. Only a successful fetch of a new
    policy (mode ``none`` to retire it) or the end of ``max_age`` replaces it.

    **The bound.** A domain without an ``_mta-sts`` record leaves nothing
    here, but every policy fetched and every failed fetch used to stay until
    its domain was mailed again, so for ever for a domain mailed once. Now
    at most ``max_domains`` entries are kept, expired ones dropped first.
    Evicting a policy early is allowed (§5.1 says keep it *up to* max_age)
    and usually costs one refetch, but not always: an evicted ``enforce``
    policy is lost to an attacker who then blocks its refetch, exactly the
    downgrade the cache exists to prevent. So entries go in order of what
    losing them costs, least recently used first within each kind:

    1. failed-fetch markers: losing one only lets the policy host be asked
       again before five minutes are up;
    2. policies in mode ``testing`` or ``none``: they enforce nothing, so a
       blocked refetch takes away only the reports of mode ``testing``;
    3. policies in mode ``enforce``, evicted only when the cache holds
       nothing else.

    Senders choose the recipient domains, so a flood of domains that fail
    or publish no enforcing policy churns kinds 1 and 2 and never pushes an
    ``enforce`` policy out. Using an entry makes it the most recent of its
    kind.

    ``fetch`` replaces the HTTPS fetch entirely (tests of the cache logic);
    otherwise an :class:`HttpsPolicyFetcher` is built from ``https_context``,
    ``https_port``, ``https_internal`` and ``timeout``. ``clock`` is
    monotonic seconds.
    """

    def __init__(
        self,
        resolver: Resolver,
        *,
        fetch: PolicyFetch | None = None,
        https_context: ssl.SSLContext | None = None,
        https_port: int = HTTPS_PORT,
        https_internal: bool = False,
        timeout: float = FETCH_TIMEOUT,
        retry_after: float = FETCH_RETRY,
        max_domains: int = MAX_DOMAINS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if fetch is not None and (https_context is not None or https_port != HTTPS_PORT):
            raise ValueError("give either fetch or https_context/https_port, not both")
        if max_domains < 1:
            raise InvalidInput(f"max_domains must be at least 1, got {max_domains}")
        self._resolver = resolver
        self._fetch: PolicyFetch = fetch or HttpsPolicyFetcher(
            resolver,
            context=https_context,
            port=https_port,
            timeout=timeout,
            internal=https_internal,
        )
        self._retry_after = retry_after
        self._max_domains = max_domains
        self._clock = clock
        # Each in least recently used order; eviction empties them in this order.
        self._failed: OrderedDict[str, _Failed] = OrderedDict()
        self._lenient: OrderedDict[str, _Cached] = OrderedDict()
        self._enforced: OrderedDict[str, _Cached] = OrderedDict()
        self._inflight: dict[tuple[str, str], asyncio.Task[Policy | None]] = {}

    @property
    def size(self) -> int:
        """Entries held: cached policies and failed-fetch markers.

        Not ``__len__``: an empty cache would then be false, and ``cache or
        MtaStsCache(...)`` would quietly drop one handed in.
        """
        return len(self._failed) + len(self._lenient) + len(self._enforced)

    async def policy(self, domain: str) -> Policy | None:
        """The policy to apply to mail for ``domain`` now, or None if it has none."""
        try:
            name = to_ascii(domain)
        except UnicodeError:
            return None
        records = await self._resolver.txt(f"_mta-sts.{name}")
        entry = self._entry(name)
        cached = entry.policy if entry is not None else None
        if isinstance(records, DnsFailure):
            log.info("MTA-STS record of %s not looked up: %s", name, records.reason)
            return cached
        try:
            sts_id = sts_record_id(records)
        except InvalidInput as exc:
            log.info("MTA-STS record of %s ignored: %s", name, exc)
            return cached
        if sts_id is None or (entry is not None and entry.sts_id == sts_id):
            return cached  # §3.1: a missing record does not retire a cached policy
        fetched = await self._refresh(name, sts_id)
        if fetched is not None:
            return fetched
        entry = self._entry(name)  # §5.1: the old policy holds until its max_age
        return entry.policy if entry is not None else None

    def _entry(self, name: str) -> _Cached | None:
        for kind in (self._enforced, self._lenient):
            entry = kind.get(name)
            if entry is None:
                continue
            if entry.expires <= self._clock():
                del kind[name]
                return None
            kind.move_to_end(name)
            return entry
        return None

    def _keep(self, name: str, entry: _Cached) -> None:
        self._lenient.pop(name, None)
        self._enforced.pop(name, None)
        self._failed.pop(name, None)  # the fetch that succeeded is the newest word
        kind = self._enforced if entry.policy.mode == "enforce" else self._lenient
        kind[name] = entry
        self._make_room()

    def _make_room(self) -> None:
        """Evict down to the bound: expired entries, then by kind, least recently used first."""
        if self.size <= self._max_domains:
            return
        now = self._clock()
        for name in [n for n, f in self._failed.items() if f.retry_at <= now]:
            del self._failed[name]
        for policies in (self._lenient, self._enforced):
            for name in [n for n, e in policies.items() if e.expires <= now]:
                del policies[name]
        kinds: tuple[OrderedDict[str, Any], ...] = (self._failed, self._lenient, self._enforced)
        for kind in kinds:
            while kind and self.size > self._max_domains:
                kind.popitem(last=False)

    async def _refresh(self, name: str, sts_id: str) -> Policy | None:
        """The policy with id ``sts_id``, fetched once however many deliveries wait for it."""
        key = (name, sts_id)
        failed = self._failed.get(name)
        if failed is not None and failed.sts_id == sts_id:
            if failed.retry_at > self._clock():
                self._failed.move_to_end(name)
                return None
            del self._failed[name]
        task = self._inflight.get(key)
        if task is None:
            task = asyncio.ensure_future(self._fetch_policy(name, sts_id))
            self._inflight[key] = task
            task.add_done_callback(lambda _: self._inflight.pop(key, None))
        return await asyncio.shield(task)  # one caller's cancellation stops no one else

    async def _fetch_policy(self, name: str, sts_id: str) -> Policy | None:
        try:
            policy = parse_policy(await self._fetch(name))
        except PolicyFetchBusy as exc:  # no failure marker: the next delivery asks again
            log.warning("MTA-STS policy of %s (id %s) not fetched yet: %s", name, sts_id, exc)
            return None
        except (PolicyFetchError, InvalidInput, OSError) as exc:
            log.warning("MTA-STS policy of %s (id %s) not usable: %s", name, sts_id, exc)
            self._failed.pop(name, None)
            self._failed[name] = _Failed(sts_id, self._clock() + self._retry_after)
            self._make_room()
            return None
        log.info("MTA-STS policy of %s: id %s, mode %s", name, sts_id, policy.mode)
        if policy.max_age > 0:
            self._keep(name, _Cached(sts_id, policy, self._clock() + policy.max_age))
        else:  # valid for this delivery only
            self._lenient.pop(name, None)
            self._enforced.pop(name, None)
            self._failed.pop(name, None)
        return policy
