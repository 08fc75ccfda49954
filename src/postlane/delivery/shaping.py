"""Per-destination traffic shaping: how hard the delivery worker may push one receiver.

Big mailbox providers judge a sender by its behaviour as much as by its mail:
too many connections at once, too many messages per connection or a burst of
messages per minute gets ``421 4.7.0`` "try again later" and, repeated, a worse
reputation. The worker's global ``concurrency`` protects Postlane; the limits
here protect each receiver, on top of it.

**Destinations.** Many customer domains are hosted by one provider (Google
Workspace domains all have ``*.google.com`` MX hosts), and the provider sees
all that traffic as one. So a destination is keyed by the first rule whose
``mx`` patterns match one of the route's MX host names (``"gmail"``), else by
the recipient domain itself, which gets the ``[default]`` limits. Rule names
may not contain a dot, so a rule's key never collides with a domain's.

**Rules** (TOML): a ``[default]`` table and any number of ``[[rule]]`` entries,
each with ``name``, ``mx`` (patterns: ``"*.google.com"`` matches any name
below ``google.com``, a pattern without ``*`` matches that one name),
``max_connections``, ``messages_per_connection`` and ``messages_per_minute``.
A rule may leave out the three limits; it then has the default's.

**Rate.** A token bucket per destination: it refills at the destination's
current rate (messages per minute / 60 per second) and holds at most ten
seconds' worth (at least one message), so a worker that starts with a full
queue sends a short burst, not a minute's quota in one go. The worker asks
:meth:`Shaper.take` for the messages it wants to send now, sends what it is
granted and defers the rest to :meth:`Shaper.next_slot` — it never sleeps
holding leased rows.

**Adaptive slow-down.** When a receiver throttles us anyway (a reply
classified as ``throttled``), :meth:`Shaper.throttled` halves the
destination's current rate, never below :data:`MIN_RATE` per minute, and
empties its bucket. A pipelined batch gets many such replies for one event,
so halving happens at most once per :data:`THROTTLE_COOLDOWN` seconds.
:meth:`Shaper.succeeded` recovers additively: for each full minute since the
last change, the current rate grows by 10 % of the configured rate, up to the
configured rate (from half to full in five minutes). Additive, not
multiplicative, so a destination at the floor comes back in bounded time; only
on success, so a destination we stopped sending to does not recover blind.

The limits in the shipped ``shaping_rules.toml`` are conservative starting
points, not measured truths: every provider's real limits depend on the
sending IPs' reputation and change without notice.

Pure apart from asyncio waiting: the clock (monotonic seconds) is injected.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
import tomllib
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Final

from postlane.errors import InvalidInput

__all__ = [
    "BURST_SECONDS",
    "MIN_RATE",
    "RECOVERY_STEP",
    "THROTTLE_COOLDOWN",
    "Rule",
    "Rules",
    "Shaper",
    "load_rules",
    "parse_rules",
]

MIN_RATE: Final = 1.0  # messages per minute a throttled destination keeps
BURST_SECONDS: Final = 10.0  # a bucket holds this many seconds' worth of messages
THROTTLE_COOLDOWN: Final = 10.0  # seconds between two halvings of one destination
RECOVERY_STEP: Final = 0.1  # share of the configured rate regained per minute of success
_MAX_TRACKED: Final = 10_000  # idle destinations are forgotten beyond this many
_LIMITS: Final = ("max_connections", "messages_per_connection", "messages_per_minute")
_SHIPPED: Final = "shaping_rules.toml"


@dataclass(frozen=True, slots=True)
class Rule:
    """The limits for one destination (``mx`` is empty for the default)."""

    name: str
    mx: tuple[str, ...]
    max_connections: int
    messages_per_connection: int
    messages_per_minute: float

    def matches(self, host: str) -> bool:
        """Whether MX host name ``host`` (any case, trailing dot or not) is this rule's."""
        name = host.lower().rstrip(".")
        for pattern in self.mx:
            if pattern.startswith("*."):
                if name.endswith(pattern[1:]):
                    return True
            elif name == pattern:
                return True
        return False


@dataclass(frozen=True, slots=True)
class Rules:
    """A parsed rules file: the default limits and the provider rules, in file order."""

    default: Rule
    rules: tuple[Rule, ...] = ()

    def named(self, name: str) -> Rule:
        """The rule called ``name``; the default for any other key (a recipient domain)."""
        return next((rule for rule in self.rules if rule.name == name), self.default)


def parse_rules(text: str, *, source: str = "shaping rules") -> Rules:
    """Parse rules TOML; :class:`InvalidInput` naming the rule and key for any mistake."""
    try:
        document = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise InvalidInput(f"{source}: not valid TOML: {exc}") from None
    unknown = set(document) - {"default", "rule"}
    if unknown:
        raise InvalidInput(f"{source}: unknown top-level key(s) {sorted(unknown)}")
    raw_default = document.get("default")
    if not isinstance(raw_default, dict):
        raise InvalidInput(f"{source}: a [default] table is required")
    _no_unknown_keys(source, "[default]", raw_default, set(_LIMITS))
    default = Rule(
        name="default",
        mx=(),
        max_connections=_count(source, "[default]", raw_default, "max_connections"),
        messages_per_connection=_count(source, "[default]", raw_default, "messages_per_connection"),
        messages_per_minute=_rate(source, "[default]", raw_default),
    )
    raw_rules = document.get("rule", [])
    if not isinstance(raw_rules, list):
        raise InvalidInput(f"{source}: 'rule' must be an array of tables ([[rule]])")
    rules: list[Rule] = []
    for index, raw in enumerate(raw_rules, start=1):
        if not isinstance(raw, dict):
            raise InvalidInput(f"{source}: rule #{index} is not a table")
        rules.append(_rule(source, index, raw, default, {rule.name for rule in rules}))
    return Rules(default, tuple(rules))


def load_rules(path: Path | None = None) -> Rules:
    """The rules in ``path``, or the shipped defaults (``shaping_rules.toml``) when None."""
    if path is None:
        text = resources.files("postlane.delivery").joinpath(_SHIPPED).read_text("utf-8")
        return parse_rules(text, source=_SHIPPED)
    try:
        text = path.read_text("utf-8")
    except OSError as exc:
        raise InvalidInput(f"{path}: cannot read shaping rules: {exc.strerror or exc}") from None
    return parse_rules(text, source=str(path))


def _rule(source: str, index: int, raw: Mapping[str, Any], default: Rule, taken: set[str]) -> Rule:
    name = raw.get("name")
    if not isinstance(name, str) or not name.strip():
        raise InvalidInput(f"{source}: rule #{index}: 'name' is required (a non-empty string)")
    where = f"rule {name!r}"
    if "." in name or name != name.strip() or name == "default":
        raise InvalidInput(
            f"{source}: {where}: 'name' may not contain a dot, spaces or be 'default' "
            "(it must never equal a recipient domain)"
        )
    if name in taken:
        raise InvalidInput(f"{source}: {where}: 'name' is used twice")
    _no_unknown_keys(source, where, raw, {"name", "mx", *_LIMITS})
    return Rule(
        name=name,
        mx=_patterns(source, where, raw.get("mx")),
        max_connections=_count(source, where, raw, "max_connections", default.max_connections),
        messages_per_connection=_count(
            source, where, raw, "messages_per_connection", default.messages_per_connection
        ),
        messages_per_minute=_rate(source, where, raw, default.messages_per_minute),
    )


def _no_unknown_keys(source: str, where: str, raw: Mapping[str, Any], known: set[str]) -> None:
    unknown = set(raw) - known
    if unknown:
        raise InvalidInput(
            f"{source}: {where}: unknown key(s) {sorted(unknown)}; known: {sorted(known)}"
        )


def _patterns(source: str, where: str, value: object) -> tuple[str, ...]:
    if not isinstance(value, list) or not value:
        raise InvalidInput(f"{source}: {where}: 'mx' must be a non-empty list of host patterns")
    patterns = []
    for item in value:
        if not isinstance(item, str):
            raise InvalidInput(f"{source}: {where}: 'mx' entry {item!r} is not a string")
        pattern = item.strip().lower().rstrip(".")
        bare = pattern.removeprefix("*.")
        if not bare or "*" in bare or " " in bare or bare.startswith(".") or ".." in bare:
            raise InvalidInput(
                f"{source}: {where}: 'mx' entry {item!r} is not a host name or '*.suffix' pattern"
            )
        patterns.append(pattern)
    return tuple(patterns)


def _count(
    source: str, where: str, raw: Mapping[str, Any], key: str, fallback: int | None = None
) -> int:
    value = raw.get(key, fallback)
    if value is None:
        raise InvalidInput(f"{source}: {where}: '{key}' is required")
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InvalidInput(f"{source}: {where}: '{key}' must be a whole number >= 1, not {value!r}")
    return value


def _rate(source: str, where: str, raw: Mapping[str, Any], fallback: float | None = None) -> float:
    key = "messages_per_minute"
    value = raw.get(key, fallback)
    if value is None:
        raise InvalidInput(f"{source}: {where}: '{key}' is required")
    if isinstance(value, bool) or not isinstance(value, int | float) or not value >= MIN_RATE:
        raise InvalidInput(
            f"{source}: {where}: '{key}' must be a number >= {MIN_RATE:g}, not {value!r}"
        )
    if math.isinf(value):
        raise InvalidInput(f"{source}: {where}: '{key}' must be finite")
    return float(value)


@dataclass(slots=True)
class _State:
    """One destination's bucket, adaptive rate and connection gate."""

    rule: Rule
    rate: float  # messages per minute now (the configured rate unless throttled)
    tokens: float
    updated: float  # clock reading the tokens were last refilled at
    changed: float  # clock reading of the last slow-down or recovery step
    throttled_at: float = float("-inf")
    connections: int = 0
    waiters: deque[asyncio.Future[None]] = field(default_factory=deque)

    @property
    def capacity(self) -> float:
        return max(1.0, self.rate * BURST_SECONDS / 60.0)

    def refill(self, now: float) -> None:
        elapsed = max(0.0, now - self.updated)
        self.tokens = min(self.capacity, self.tokens + elapsed * self.rate / 60.0)
        self.updated = now

    def idle(self) -> bool:
        return (
            not self.connections
            and not self.waiters
            and self.rate >= self.rule.messages_per_minute
            and self.tokens >= self.capacity
        )


class Shaper:
    """Per-destination limits for one worker process: see the module docstring.

    One per :class:`~postlane.delivery.worker.DeliveryWorker`; limits are per
    process, so N workers may together send N times a destination's rate (a
    cluster-wide limit would need the database, see the design). ``clock``
    returns monotonic seconds; tests pass a fake one.
    """

    def __init__(self, rules: Rules, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.rules = rules
        self._clock = clock
        self._states: dict[str, _State] = {}

    # -- keys and limits ----------------------------------------------------------------------

    def destination(self, domain: str, mx_hosts: Iterable[str]) -> str:
        """The first rule whose patterns match one of ``mx_hosts``, else ``domain`` (lowercase)."""
        hosts = list(mx_hosts)
        for rule in self.rules.rules:
            if any(rule.matches(host) for host in hosts):
                return rule.name
        return domain.lower().rstrip(".")

    def rule(self, dest: str) -> Rule:
        """The limits that apply to destination key ``dest``."""
        return self.rules.named(dest)

    def messages_per_connection(self, dest: str) -> int:
        """At most this many messages go over one connection to ``dest``."""
        return self.rule(dest).messages_per_connection

    def current_rate(self, dest: str) -> float:
        """Messages per minute ``dest`` may get now (lower than configured after throttling)."""
        state = self._states.get(dest)
        return state.rate if state is not None else self.rule(dest).messages_per_minute

    # -- connections ----------------------------------------------------------------------------

    async def acquire_connection(self, dest: str) -> None:
        """Wait until ``dest`` has fewer than ``max_connections`` open; count one more.

        First come, first served. Every successful call needs one
        :meth:`release_connection`; a call cancelled while waiting holds nothing.
        """
        state = self._state(dest)
        if state.connections < state.rule.max_connections and not state.waiters:
            state.connections += 1
            return
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        state.waiters.append(waiter)
        try:
            await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                self.release_connection(dest)  # granted just as we were cancelled
            raise

    def release_connection(self, dest: str) -> None:
        """One connection to ``dest`` closed: hand its place to the next waiter, if any."""
        state = self._states.get(dest)
        if state is None or state.connections <= 0:
            raise RuntimeError(f"release_connection({dest!r}) without acquire_connection")
        state.connections -= 1
        while state.waiters and state.connections < state.rule.max_connections:
            waiter = state.waiters.popleft()
            if not waiter.done():
                state.connections += 1
                waiter.set_result(None)

    @contextlib.asynccontextmanager
    async def connection(self, dest: str) -> AsyncIterator[None]:
        """``async with shaper.connection(dest):`` — acquire, and release however it ends."""
        await self.acquire_connection(dest)
        try:
            yield
        finally:
            self.release_connection(dest)

    def open_connections(self, dest: str) -> int:
        """Connections to ``dest`` counted now (for tests and logs)."""
        state = self._states.get(dest)
        return state.connections if state is not None else 0

    # -- rate ------------------------------------------------------------------------------------

    def take(self, dest: str, wanted: int) -> int:
        """Take up to ``wanted`` message slots for ``dest`` now; how many were granted."""
        if wanted <= 0:
            return 0
        state = self._state(dest)
        state.refill(self._clock())
        granted = min(wanted, int(state.tokens + 1e-9))
        state.tokens -= granted
        return granted

    def next_slot(self, dest: str, position: int = 0) -> float:
        """Seconds until ``position + 1`` more messages may go to ``dest`` (0: one may now).

        With ``position`` the worker spreads the rows it defers over the slots
        to come instead of bringing them all back at the same moment. Nothing
        is reserved: others may take the slots first, and then the row is
        deferred again.
        """
        state = self._state(dest)
        state.refill(self._clock())
        missing = position + 1 - state.tokens
        if missing <= 1e-9:
            return 0.0
        return missing * 60.0 / state.rate

    # -- adaptation ------------------------------------------------------------------------------

    def throttled(self, dest: str) -> None:
        """The receiver said "too fast": halve the rate (not below MIN_RATE), empty the bucket.

        At most once per THROTTLE_COOLDOWN seconds: the many 421 replies of one
        pipelined batch are one event.
        """
        state = self._state(dest)
        now = self._clock()
        state.refill(now)
        state.tokens = 0.0
        if now - state.throttled_at < THROTTLE_COOLDOWN:
            return
        state.throttled_at = now
        state.rate = max(MIN_RATE, state.rate / 2.0)
        state.changed = now

    def succeeded(self, dest: str) -> None:
        """The receiver accepted mail: regain 10 % of the configured rate per full minute since
        the last change, up to the configured rate."""
        state = self._states.get(dest)
        if state is None:
            return
        target = state.rule.messages_per_minute
        if state.rate >= target:
            return
        now = self._clock()
        minutes = int((now - state.changed) // 60.0)
        if minutes <= 0:
            return
        state.refill(now)
        state.rate = min(target, state.rate + minutes * RECOVERY_STEP * target)
        state.changed += minutes * 60.0

    # -- bookkeeping ----------------------------------------------------------------------------

    def _state(self, dest: str) -> _State:
        state = self._states.get(dest)
        if state is None:
            if len(self._states) >= _MAX_TRACKED:
                self._forget_idle()
            rule = self.rule(dest)
            now = self._clock()
            rate = rule.messages_per_minute
            state = _State(rule, rate, max(1.0, rate * BURST_SECONDS / 60.0), now, now)
            self._states[dest] = state
        return state

    def _forget_idle(self) -> None:
        """Drop destinations indistinguishable from new ones, so memory stays bounded."""
        now = self._clock()
        for key in list(self._states):
            state = self._states[key]
            state.refill(now)
            if state.idle():
                del self._states[key]
