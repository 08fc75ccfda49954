"""Which leased recipients a message's X-ListOption and its account's lists keep from being sent.

The OMICard list bits (parsed into :class:`~postlane.options.model.SendOptions`):

===== ======================= =============================================
bit   option                  a recipient row is filtered when
===== ======================= =============================================
64    ``remove_duplicates``   another row of the same message has the same
                              address (case-insensitive) and a lower id
32    ``remove_unsubscribed`` its address is on the ``unsubscribe`` list
128   ``remove_blacklisted``  its address is on the ``blocklist``
512   ``remove_bounced``      its address is on the ``returned`` list
65536 ``bypass_list_filters`` never: no filter applies, not even the
                              suppression list or duplicates
===== ======================= =============================================

Without 65536 the account's suppression list (``hard_bounce``,
``complaint``, ``manual``; see :mod:`postlane.store.suppressions`) always
applies. The checks run in a fixed order — duplicate, suppression list, then
the optional list the address is on — and the first that matches is the
``suppressed`` event's reason, so a duplicate of a hard-bounced address is
reported as a duplicate, the cheaper fact that needs no list to explain.

Duplicates are filtered at delivery, not at intake: intake stores every RCPT
TO as it came (what the client sent is the record), and the choice to drop
repeats belongs to the message's options, which delivery reads anyway. The
first row (lowest id) is the one sent; its later twins are filtered even if
the first was held or cancelled by an operator, because the message asked
for the address once.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Final

from postlane.options.model import SendOptions
from postlane.store.suppressions import applies_always, fold

__all__ = ["DUPLICATE", "OPTIONAL", "Filtered", "duplicates", "filter_row"]

#: The event reason of a filtered duplicate.
DUPLICATE: Final = "duplicate recipient of this message"

#: Each optional list (a reason of :data:`~postlane.store.suppressions.OPTIONAL_LISTS`):
#: whether a message asks for it, and the event reason.
OPTIONAL: Final[Mapping[str, tuple[Callable[[SendOptions], bool], str]]] = {
    "unsubscribe": (
        lambda options: options.remove_unsubscribed,
        "address unsubscribed (X-ListOption 32)",
    ),
    "blocklist": (
        lambda options: options.remove_blacklisted,
        "address is on the account's blocklist (X-ListOption 128)",
    ),
    "returned": (
        lambda options: options.remove_bounced,
        "earlier mail to this address came back (X-ListOption 512)",
    ),
}


@dataclass(frozen=True, slots=True)
class Filtered:
    """Why a row is not sent: ``reason`` for people, ``filter`` for programs.

    ``filter`` is ``duplicate`` or the list's reason (``hard_bounce``,
    ``unsubscribe``, ...): what a report groups suppressed rows by.
    """

    reason: str
    filter: str


def duplicates(recipients: Iterable[tuple[int, str]]) -> dict[str, int]:
    """For each address a message has more than once: its folded form -> the lowest row id.

    Only repeated addresses are kept, so the map of a 100,000-recipient
    campaign without repeats is empty and costs nothing to remember.
    """
    rows = list(recipients)
    counts = Counter(fold(address) for _, address in rows)
    first: dict[str, int] = {}
    for row_id, address in rows:
        key = fold(address)
        if counts[key] > 1 and (key not in first or row_id < first[key]):
            first[key] = row_id
    return first


def filter_row(
    options: SendOptions,
    *,
    row_id: int,
    address: str,
    duplicates: Mapping[str, int],
    listed: str | None,
) -> Filtered | None:
    """Why the row must not be sent, or None to send it.

    ``duplicates`` is the message's map from :func:`duplicates`; ``listed``
    the reason the address is on one of the account's lists (None if on
    none).
    """
    if options.bypass_list_filters:
        return None
    if options.remove_duplicates and duplicates.get(fold(address), row_id) != row_id:
        return Filtered(DUPLICATE, "duplicate")
    if listed is None:
        return None
    if applies_always(listed):
        return Filtered(f"address is on the account's suppression list ({listed})", listed)
    asks, reason = OPTIONAL[listed]
    if asks(options):
        return Filtered(reason, listed)
    return None
