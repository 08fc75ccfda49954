"""Who a message may claim to be from: the SMTP user's and the account's rules.

Two independent rules, both from the seeds:

* **SMTP+ authorised senders and domains.** When an SMTP user has either list
  filled in, the envelope sender and the header From must each be an
  authorised sender or be at an authorised domain. Domains match exactly: the
  SMTP+ page lists 2nd- and 3rd-level domains separately, so authorising
  ``acme.com`` does not authorise ``marketing.acme.com``. Both lists empty
  means every sender is allowed.
* **Omnivery sending domains.** The envelope sender (the bounce address)
  must be at a sending domain of the account or a subdomain of one, because
  that is where Postlane receives bounces and publishes SPF. The header From
  must be aligned with a sending domain in the relaxed DMARC sense (RFC 7489
  section 3.1.1, same organisational domain), because that is what receivers
  check against the DKIM signature Postlane adds.

Local parts are compared case-insensitively although RFC 5321 section 2.4
lets a mailbox be case-sensitive: customers type ``Info@`` in one place and
``info@`` in another, and no mailbox provider gives those to different
people, so a case-sensitive match would only block legitimate mail. Domains
are compared as lower-case A-labels so that an SMTPUTF8 address written with
a U-label matches the sending domain it was registered as.

Nothing here decides what happens to a problem (alert or block): that is the
account's setting, applied by the caller.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

from publicsuffixlist import PublicSuffixList

__all__ = ["SenderProblem", "check_sender"]

_PSL = PublicSuffixList()
_LISTED = 5  # sending domains named in a reason before "and N more"
_MAX_DOMAIN = 253  # characters in the longest DNS name


@dataclass(frozen=True, slots=True)
class SenderProblem:
    """One address the message may not use, and why, in words for the customer."""

    address: str
    reason: str


def check_sender(
    *,
    mail_from: str,
    header_from: str,
    authorised_domains: Sequence[str],
    authorised_senders: Sequence[str],
    sending_domains: Sequence[str],
) -> list[SenderProblem]:
    """Every way the envelope sender and header From break the rules; empty if none.

    ``mail_from`` is ``""`` for the null reverse-path (a bounce), which has no
    domain to judge.
    """
    problems: list[SenderProblem] = []
    if authorised_domains or authorised_senders:
        senders = {_split(sender) for sender in authorised_senders}
        domains = {_ascii_domain(domain) for domain in authorised_domains}
        checked = [("From", header_from)]
        if mail_from:
            checked.insert(0, ("envelope sender", mail_from))
        for role, address in checked:
            local, domain = _split(address)
            if domain not in domains and (local, domain) not in senders:
                problems.append(
                    SenderProblem(
                        address,
                        f"{role} <{address}> is not an authorised sender of this SMTP user",
                    )
                )
    if not sending_domains:
        problems.append(
            SenderProblem(header_from, "account has no sending domain; add one before sending")
        )
        return problems
    own = [_ascii_domain(domain) for domain in sending_domains]
    if mail_from:
        domain = _split(mail_from)[1]
        if not any(domain == sending or domain.endswith("." + sending) for sending in own):
            problems.append(
                SenderProblem(
                    mail_from,
                    f"envelope sender <{mail_from}> is not at a sending domain of the account "
                    f"or a subdomain of one ({_listing(sending_domains)})",
                )
            )
    from_domain = _split(header_from)[1]
    organisation = _organisational_domain(from_domain)
    if not any(
        from_domain == sending
        or (organisation is not None and organisation == _organisational_domain(sending))
        for sending in own
    ):
        problems.append(
            SenderProblem(
                header_from,
                f"From <{header_from}> is not aligned with any sending domain of the account "
                f"({_listing(sending_domains)})",
            )
        )
    return problems


def _split(address: str) -> tuple[str, str]:
    """The lower-cased local part and the A-label domain of ``local@domain``.

    A domain longer than any DNS name becomes ``""``, which matches nothing,
    so that a hostile From value cannot fill the domain caches with megabytes.
    """
    local, _, domain = address.rpartition("@")
    return local.lower(), _ascii_domain(domain) if len(domain) <= _MAX_DOMAIN else ""


@lru_cache(maxsize=4096)
def _ascii_domain(domain: str) -> str:
    """The lower-case A-label form; a name IDNA cannot encode stays as written, lower-cased.

    Such a name is no sending domain (those are validated when added), so it
    simply matches nothing.
    """
    lowered = domain.lower()
    if lowered.isascii():
        return lowered
    try:
        return lowered.encode("idna").decode("ascii")
    except UnicodeError:
        return lowered


@lru_cache(maxsize=4096)
def _organisational_domain(domain: str) -> str | None:
    """The registrable domain (RFC 7489 section 3.2); None for a public suffix or literal."""
    if domain.startswith("["):
        return None
    result: str | None = _PSL.privatesuffix(domain)
    return result


def _listing(domains: Sequence[str]) -> str:
    """Name the sending domains, but not so many that the SMTP reply becomes a page."""
    shown = ", ".join(domains[:_LISTED])
    if len(domains) > _LISTED:
        shown += f" and {len(domains) - _LISTED} more"
    return shown
