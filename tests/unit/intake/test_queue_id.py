"""Queue ids: 16 characters of Crockford base32, sortable by time, unique."""

from __future__ import annotations

import re
import time

import pytest

from postlane.intake import queue_id as queue_id_module
from postlane.intake.queue_id import new_queue_id

CROCKFORD = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
SHAPE = re.compile(r"[0-9A-HJKMNP-TV-Z]{16}")


def decode(text: str) -> int:
    value = 0
    for char in text:
        value = value * 32 + CROCKFORD.index(char)
    return value


def test_sixteen_characters_of_crockford_base32() -> None:
    for _ in range(1000):
        made = new_queue_id()
        assert SHAPE.fullmatch(made), made
        assert not set(made) & set("ILOU")


def test_the_first_48_bits_are_the_milliseconds() -> None:
    stamp = 1_714_550_400_123
    assert decode(new_queue_id(stamp)) >> 32 == stamp
    before = int(time.time() * 1000)
    made = new_queue_id()
    after = int(time.time() * 1000)
    assert before <= decode(made) >> 32 <= after


def test_the_last_32_bits_are_random() -> None:
    stamp = 1_714_550_400_123
    tails = {decode(new_queue_id(stamp)) & 0xFFFFFFFF for _ in range(200)}
    assert len(tails) > 190
    assert all(new_queue_id(stamp)[:9] == new_queue_id(stamp)[:9] for _ in range(10))


@pytest.mark.parametrize("stamp", [0, 1, 1_714_550_400_123, 2**48 - 2])
def test_ids_sort_by_time_as_text(stamp: int) -> None:
    earlier = [new_queue_id(stamp) for _ in range(50)]
    later = [new_queue_id(stamp + 1) for _ in range(50)]
    assert max(earlier) < min(later)


def test_ids_made_over_time_sort_in_order() -> None:
    made = []
    for _ in range(5):
        made.append(new_queue_id())
        time.sleep(0.002)
    assert made == sorted(made)


def test_the_alphabet_sorts_like_the_values() -> None:
    assert list(CROCKFORD) == sorted(CROCKFORD)
    assert queue_id_module._ALPHABET == CROCKFORD


def test_unique_over_100k_calls() -> None:
    made = [new_queue_id() for _ in range(100_000)]
    assert len(set(made)) == len(made)


def test_ids_made_in_one_process_in_one_millisecond_are_distinct(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(queue_id_module.os, "urandom", lambda n: b"\x5a" * n)
    stamp = 1_714_550_400_123
    assert new_queue_id(stamp) != new_queue_id(stamp)
