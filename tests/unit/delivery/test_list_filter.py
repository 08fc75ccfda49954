"""The list filter: which rows X-ListOption and the account's lists keep from being sent."""

from __future__ import annotations

from datetime import UTC
from typing import Any

import pytest

from postlane.delivery.list_filter import DUPLICATE, OPTIONAL, Filtered, duplicates, filter_row
from postlane.options import SendOptions, from_headers
from postlane.store.suppressions import OPTIONAL_LISTS, SUPPRESSION_LIST

NO_DUPLICATES: dict[str, int] = {}


def options(list_option: int | None = None, **fields: Any) -> SendOptions:
    """Options as intake makes them: from an X-ListOption header, or given fields."""
    if list_option is None:
        return SendOptions(**fields)
    parsed = from_headers([("X-ListOption", str(list_option))], tz=UTC)
    return SendOptions().layer(parsed.partial)


def verdict(
    opts: SendOptions,
    listed: str | None = None,
    *,
    row_id: int = 7,
    address: str = "bob@example.org",
    dupes: dict[str, int] = NO_DUPLICATES,
) -> Filtered | None:
    return filter_row(opts, row_id=row_id, address=address, duplicates=dupes, listed=listed)


def test_every_optional_list_of_the_store_has_its_option() -> None:
    assert set(OPTIONAL) == set(OPTIONAL_LISTS)


@pytest.mark.parametrize("reason", SUPPRESSION_LIST)
def test_the_suppression_list_applies_without_any_bit(reason: str) -> None:
    expected = Filtered(f"address is on the account's suppression list ({reason})", reason)
    assert verdict(options(), reason) == expected
    assert verdict(options(32 | 64 | 128 | 512), reason) == expected


def test_an_unknown_stored_reason_counts_as_the_suppression_list() -> None:
    assert verdict(options(), "bounce") == Filtered(
        "address is on the account's suppression list (bounce)", "bounce"
    )


@pytest.mark.parametrize(
    ("reason", "bit", "event"),
    [
        ("unsubscribe", 32, "address unsubscribed (X-ListOption 32)"),
        ("blocklist", 128, "address is on the account's blocklist (X-ListOption 128)"),
        ("returned", 512, "earlier mail to this address came back (X-ListOption 512)"),
    ],
)
def test_each_optional_list_filters_only_when_its_bit_is_set(
    reason: str, bit: int, event: str
) -> None:
    assert OPTIONAL_LISTS[reason] == bit
    assert verdict(options(bit), reason) == Filtered(event, reason)
    assert verdict(options(), reason) is None
    others = (32 | 64 | 128 | 512) & ~bit
    assert verdict(options(others), reason) is None  # another list's bit does not apply it
    assert verdict(options(bit), None) is None  # the bit alone filters no unlisted address


def test_duplicates_are_filtered_only_with_64() -> None:
    dupes = duplicates([(3, "Bob@Example.org"), (5, "ann@example.org"), (7, "bob@example.org")])
    assert dupes == {"bob@example.org": 3}
    first = {"row_id": 3, "address": "Bob@Example.org", "dupes": dupes}
    later = {"row_id": 7, "address": "bob@example.org", "dupes": dupes}
    assert verdict(options(64), **first) is None
    assert verdict(options(64), **later) == Filtered(DUPLICATE, "duplicate")
    assert verdict(options(), **later) is None
    assert verdict(options(32 | 128 | 512), **later) is None
    assert verdict(options(64), row_id=5, address="ann@example.org", dupes=dupes) is None


def test_a_duplicate_is_reported_before_the_list_it_is_on() -> None:
    dupes = {"bob@example.org": 3}
    assert verdict(options(64), "hard_bounce", dupes=dupes) == Filtered(DUPLICATE, "duplicate")
    first = verdict(options(64), "hard_bounce", row_id=3, dupes=dupes)
    assert first is not None and first.filter == "hard_bounce"


@pytest.mark.parametrize("reason", [*SUPPRESSION_LIST, *OPTIONAL_LISTS])
def test_65536_bypasses_every_filter(reason: str) -> None:
    dupes = {"bob@example.org": 3}
    everything = options(32 | 64 | 128 | 512 | 65536)
    assert everything.bypass_list_filters
    assert verdict(everything, reason, dupes=dupes) is None
    assert verdict(options(bypass_list_filters=True), reason, dupes=dupes) is None


def test_duplicates_keeps_only_repeated_addresses_with_their_lowest_id() -> None:
    assert duplicates([]) == {}
    assert duplicates([(1, "a@x.org"), (2, "b@x.org")]) == {}
    rows = [(9, "a@x.org"), (4, "A@X.ORG"), (6, "a@x.org"), (2, "ÉLODIE@x.fr"), (1, "élodie@x.fr")]
    assert duplicates(rows) == {"a@x.org": 4, "élodie@x.fr": 1}
