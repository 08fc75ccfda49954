"""What a remote server's refusal means: a small, ordered table of rules.

Delivery has to decide three things from a 4xx/5xx reply: retry or not (the
basic code decides: 5xx is never retried, the Omnivery rule), whether the
address should be suppressed for future mail (only when the *address* is bad),
and what to tell the customer (the kind, for statistics and webhooks). The
enhanced status code (RFC 3463, extended by the IANA registry of RFC 5248) is
the most precise signal, so it is read first; but many servers send a generic
``5.7.1`` or ``5.0.0`` with the real reason in the text, so text patterns come
next, and the basic code last.

Enhanced codes that decide alone (``X`` is 4 or 5 unless shown):

========== ============ ====================================================
code       kind         meaning (source)
========== ============ ====================================================
5.1.1      hard         bad destination mailbox address (RFC 3463)
5.1.2      hard         bad destination system address (RFC 3463)
5.1.3      hard         bad destination mailbox address syntax (RFC 3463)
5.1.6      hard         destination mailbox has moved, no forwarding (RFC 3463)
5.1.10     hard         recipient address has null MX (RFC 7505)
5.2.1      hard         mailbox disabled, not accepting messages (RFC 3463)
5.4.1      hard         with "recipient address rejected": Microsoft's
                        directory-based edge blocking for unknown recipients
X.1.7/8    policy       bad sender's mailbox / system address (RFC 3463):
                        the receiver refused our return path
X.2.1      throttled    with a rate text; 4.2.1 always (Gmail: "receiving
                        mail at a rate that prevents additional messages")
X.2.2      soft         mailbox full (RFC 3463) — 5.2.2 too: a full mailbox
                        is a state of the mailbox, not a bad address
X.2.3      content      message length exceeds administrative limit (RFC 3463)
X.3.4      content      message too big for system (RFC 3463)
X.7.5      tls          cryptographic failure (RFC 3463)
X.7.10     tls          encryption needed (RFC 5248 registry)
X.7.30     tls          REQUIRETLS support required (RFC 8689)
X.7.20-27  policy       DKIM/SPF/reverse-DNS/DMARC checks failed (RFC 7372),
                        sender has null MX (RFC 7505)
4.7.28     throttled    Gmail: rate limited for unsolicited volume
5.7.606-49 reputation   Microsoft: banned sending IP
5.7.511    reputation   Microsoft: banned sender
5.7.708    reputation   Microsoft: traffic not accepted from this IP
4.7.650-1  reputation   Microsoft: rate limited due to IP reputation
========== ============ ====================================================

Then text patterns, in this order: tls, reputation (blocklists, "Spamhaus",
"listed in", "reputation", Microsoft's S3150, Gmail's "unusual rate"),
message size (content), mailbox full (soft), rate limiting (throttled),
SPF/DKIM/DMARC (policy), spam/virus (content), unknown user (hard),
greylisting (soft), any other policy wording. Reputation and rate come before
"unknown user" on purpose: suppression needs unambiguous evidence, and any
sign of another cause wins. Then the generic enhanced classes — X.2.x and
X.3.x soft (mailbox or receiving system), X.6.x content (RFC 3463 "message
content or media status"), X.7.x policy (security or policy status) — and
last the basic code: 421 throttled, other 4xx soft, other 5xx undetermined.

A temporary reply is never a hard bounce: a 4xx that says "user unknown"
(Postfix's ``soft_bounce``, address verification in progress) is soft.
Only hard bounces suppress the address; a policy rejection says something
about the sender, not the recipient, so it does not. For the same reason an
explicit X.7.x code outranks a text that says the recipient does not exist
(``550 5.7.1 Unknown user``): the code is the server's own statement that it
refused on policy, the text is often a canned phrase, and with the two at odds
there is no unambiguous evidence against the address. Such a reply is a
policy rejection. The text still decides among the other kinds (a 5.7.1 that
cites Spamhaus is reputation), since none of them suppresses.

Whether a refusal should slow the destination down (:func:`throttles`) is a
separate question from its kind, because receivers throttle in words that
classify as something else: Yahoo's ``421 4.7.0 [TSS04] ... temporarily
deferred due to unexpected volume or user complaints`` is reputation,
Microsoft's ``451 4.7.650 ... temporarily rate limited due to IP reputation``
too, Gmail's ``421 4.7.0 Temporary System Problem. Try again later`` falls to
the X.7.x catch-all. Slowing down is cheap and recovers on its own, sending
on at full rate into a receiver that pushes back costs reputation, so:

- any 421 slows down: the server is closing the channel (RFC 5321 §4.2.2,
  "service not available"), and whatever its words, the next connection at
  the same pace meets the same answer. It is how receivers throttle most;
- so does every reply classified ``throttled``, as before;
- so does a temporary 4.7.x whose text speaks of rate, volume, "too many",
  "slow down", "try again later" or a temporary deferral;
- but not a temporary 4.7.x that names greylisting or TLS, whatever else it
  says: greylisting holds one sender/recipient pair until its retry, and a
  missing STARTTLS is not cured by sending slower, so halving the rate for
  every recipient at that destination would only delay mail the receiver
  is willing to take.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import StrEnum
from typing import Final

__all__ = ["BounceKind", "Classification", "classify", "throttles"]


class BounceKind(StrEnum):
    """Why a delivery attempt was refused; the value is what reports show."""

    HARD = "hard"
    SOFT = "soft"
    POLICY = "policy"
    REPUTATION = "reputation"
    CONTENT = "content"
    THROTTLED = "throttled"
    TLS = "tls"
    UNDETERMINED = "undetermined"


@dataclass(frozen=True, slots=True)
class Classification:
    """The verdict on one reply.

    ``permanent`` follows the basic code (5xx: never retry this message);
    ``suppress`` is True only for hard bounces (stop mailing the address).
    ``kind`` describes the cause, so a 5.2.2 "mailbox full" is a permanent
    ``soft`` bounce: this message is done, the address is fine.
    """

    kind: BounceKind
    permanent: bool
    suppress: bool
    reason: str


@dataclass(frozen=True, slots=True)
class _Rule:
    kind: BounceKind
    reason: str
    status: re.Pattern[str] | None = None
    text: re.Pattern[str] | None = None

    def matches(self, status: str | None, text: str) -> bool:
        if self.status is not None and (status is None or not self.status.fullmatch(status)):
            return False
        return self.text is None or self.text.search(text) is not None


def _status(pattern: str) -> re.Pattern[str]:
    return re.compile(pattern)


def _text(pattern: str) -> re.Pattern[str]:
    return re.compile(pattern, re.IGNORECASE)


_RATE: Final = (
    r"too many|rate[- ]?limit|ratelimit|too (?:fast|quickly)|receiving mail at a rate"
    r"|(?:sending|message|connection) rate|throttl|(?:server|system) (?:is )?busy"
    r"|(?:connection|rate|sending|message|recipient)s? limit"
)
_H, _S, _P, _R, _C, _T, _TLS = (
    BounceKind.HARD,
    BounceKind.SOFT,
    BounceKind.POLICY,
    BounceKind.REPUTATION,
    BounceKind.CONTENT,
    BounceKind.THROTTLED,
    BounceKind.TLS,
)

_STATUS_RULES: Final = (
    _Rule(_H, "5.1.1 bad destination mailbox address", _status(r"5\.1\.1")),
    _Rule(_H, "5.1.2 bad destination system address", _status(r"5\.1\.2")),
    _Rule(_H, "5.1.3 bad destination mailbox address syntax", _status(r"5\.1\.3")),
    _Rule(_H, "5.1.6 mailbox has moved, no forwarding address", _status(r"5\.1\.6")),
    _Rule(_H, "5.1.10 recipient domain has a null MX", _status(r"5\.1\.10")),
    _Rule(_T, "mailbox receiving mail too fast", _status(r"[45]\.2\.1"), _text(_RATE)),
    _Rule(_H, "5.2.1 mailbox disabled", _status(r"5\.2\.1")),
    _Rule(_T, "4.2.1 mailbox busy, try later", _status(r"4\.2\.1")),
    _Rule(
        _H,
        "recipient rejected by directory lookup (Microsoft 5.4.1)",
        _status(r"5\.4\.1"),
        _text(r"recipient address rejected"),
    ),
    _Rule(_P, "the receiver refused the sender address", _status(r"[45]\.1\.[78]")),
    _Rule(_S, "mailbox full", _status(r"[45]\.2\.2")),
    _Rule(_C, "message longer than the receiver's limit", _status(r"[45]\.2\.3")),
    _Rule(_C, "message too big for the receiving system", _status(r"[45]\.3\.4")),
    _Rule(_TLS, "TLS required or failed", _status(r"[45]\.7\.(?:5|10|30)")),
    _Rule(_P, "sender authentication failed (SPF/DKIM/DMARC)", _status(r"[45]\.7\.2[0-7]")),
    _Rule(_T, "4.7.28 rate limited (Gmail)", _status(r"4\.7\.28")),
    _Rule(
        _R,
        "sending IP or sender banned (Microsoft)",
        _status(r"5\.7\.(?:60[6-9]|6[1-4]\d|511|708)"),
    ),
    _Rule(_R, "rate limited for IP reputation (Microsoft)", _status(r"4\.7\.65[01]")),
)

_TEXT_RULES: Final = (
    _Rule(
        _TLS,
        "reply says TLS is required or failed",
        text=_text(
            r"\bstarttls\b|\btls\b[^.]{0,40}\b(?:required|needed|fail)"
            r"|encryption (?:is )?(?:required|needed)"
        ),
    ),
    _Rule(
        _R,
        "reply cites a blocklist or the sender's reputation",
        text=_text(
            r"blocked using|\b(?:black|block|deny|ban)[- ]?list|\bdnsbl\b|\brbl\b|spamhaus"
            r"|spamcop|barracuda|\bsorbs\b|uceprotect|(?<!not )\blisted (?:in|on|at|by)\b"
            r"|reputation|unusual rate|user complaints|\bS3\d{3}\b|\[TSS?0\d\]"
            r"|\bip\b[^;\n]{0,40}?\b(?:blocked|banned)\b"
        ),
    ),
    _Rule(
        _C,
        "reply says the message is too big",
        text=_text(r"message (?:size|length|too (?:big|large))|too (?:big|large)|size exceed"),
    ),
    _Rule(
        _S,
        "reply says the mailbox is full",
        text=_text(
            r"mailbox (?:is )?full|over ?quota|quota exceeded|exceeded storage"
            r"|insufficient (?:storage|disk space)|out of storage"
        ),
    ),
    _Rule(_T, "reply says too many or too fast", text=_text(_RATE)),
    _Rule(
        _P,
        "reply cites SPF, DKIM or DMARC",
        text=_text(r"\bspf\b|\bdkim\b|\bdmarc\b|authenticat|reverse dns|\bptr\b"),
    ),
    _Rule(
        _C,
        "reply says the content was refused",
        text=_text(
            r"\bspam|unsolicited|virus|malware|phishing|infected|\bcontent\b|suspicious"
            r"|attachment"
        ),
    ),
    _Rule(
        _H,
        "reply says the recipient does not exist",
        text=_text(
            r"user unknown|unknown (?:user|recipient|mailbox|address)"
            r"|no such (?:user|mailbox|recipient|address|account)"
            r"|(?:user|mailbox|recipient|address|account) (?:does not|doesn't|did not) exist"
            r"|(?:user|mailbox|recipient|address) not found|recipientnotfound"
            r"|invalid (?:recipient|mailbox)|no mailbox here|account (?:is |has been )?disabled"
            r"|recipient address rejected: undeliverable"
        ),
    ),
    _Rule(_S, "greylisted: retry later", text=_text(r"grey ?list|gray ?list")),
    _Rule(
        _P,
        "reply cites a policy",
        text=_text(
            r"policy|not authori[sz]ed|access denied|relay(?:ing)? (?:access )?denied"
            r"|administrative prohibition|prohibited"
        ),
    ),
)

_CLASS_RULES: Final = (
    _Rule(_S, "mailbox status", _status(r"[45]\.2\.\d+")),
    _Rule(_S, "receiving mail system status", _status(r"[45]\.3\.\d+")),
    _Rule(_C, "message content or media status", _status(r"[45]\.6\.\d+")),
    _Rule(_P, "security or policy status", _status(r"[45]\.7\.\d+")),
)

_POLICY_STATUS: Final = _status(r"[45]\.7\.\d+")
# A temporary 4.7.x speaking of rate or a deferral to come, and what overrides it (throttles()).
_SLOW_DOWN: Final = _text(
    _RATE + r"|volume|slow(?:ing)? down|(?:try|again) later"
    r"|temporar(?:il)?y deferred|deferred temporarily"
)
_NOT_RATE: Final = _text(r"grey ?list|gray ?list|\bstarttls\b|\btls\b|encryption")

_ENHANCED: Final = re.compile(r"([45])\.(\d{1,3})\.(\d{1,3})")
_LEADING_ENHANCED: Final = re.compile(r"\s*([45])\.(\d{1,3})\.(\d{1,3})\b")


def _enhanced(enhanced: str | None, text: str) -> str | None:
    """The enhanced status in canonical form, from the argument or else the text's start.

    Remote servers send what they like: a malformed or class-2 code is ignored,
    and leading zeros (``5.01.001``) are dropped so the table matches.
    """
    found = None if enhanced is None else _ENHANCED.fullmatch(enhanced.strip())
    if found is None:
        found = _LEADING_ENHANCED.match(text)
    if found is None:
        return None
    code, subject, detail = found.groups()
    return f"{code}.{int(subject)}.{int(detail)}"


def classify(code: int, enhanced: str | None, text: str) -> Classification:
    """Classify a 4xx/5xx reply: basic ``code``, ``enhanced`` status (or None), reply text.

    When ``enhanced`` is None or malformed, a code at the start of ``text``
    (``"5.1.1 <x@example.com>: ..."``) is used. Raises ValueError for a code
    that is not a failure (outside 400-599): that is a bug in the caller.
    """
    if not 400 <= code <= 599:
        raise ValueError(f"classify needs a 4xx or 5xx reply code, got {code}")
    permanent = code >= 500
    status = _enhanced(enhanced, text)
    for rule in (*_STATUS_RULES, *_TEXT_RULES, *_CLASS_RULES):
        if rule.matches(status, text):
            kind, reason = rule.kind, rule.reason
            break
    else:
        if code == 421:
            kind, reason = BounceKind.THROTTLED, "421 service not available (RFC 5321)"
        elif permanent:
            kind, reason = BounceKind.UNDETERMINED, f"{code} without a recognised cause"
        else:
            kind, reason = BounceKind.SOFT, f"{code} temporary failure"
    if kind is BounceKind.HARD and not permanent:
        kind, reason = BounceKind.SOFT, f"{reason} (temporary reply)"
    if kind is BounceKind.HARD and status is not None and _POLICY_STATUS.fullmatch(status):
        # Only a text rule can call an X.7.x hard; the code says policy (module notes).
        kind, reason = BounceKind.POLICY, f"{status} policy refusal ({reason})"
    return Classification(
        kind=kind, permanent=permanent, suppress=kind is BounceKind.HARD, reason=reason
    )


def throttles(code: int, enhanced: str | None, text: str) -> bool:
    """Whether a refusal asks us to send to its destination more slowly.

    Same arguments as :func:`classify`; the rules and why they differ from
    the ``throttled`` kind are in the module notes. A reply that is not a
    failure (outside 400-599) throttles nothing.
    """
    if code == 421:
        return True
    if not 400 <= code <= 599:
        return False
    if classify(code, enhanced, text).kind is BounceKind.THROTTLED:
        return True
    if code >= 500:
        return False
    status = _enhanced(enhanced, text)
    return (
        status is not None
        and status.startswith("4.7.")
        and _SLOW_DOWN.search(text) is not None
        and _NOT_RATE.search(text) is None
    )
