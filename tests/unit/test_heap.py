"""The collector settings a started server runs with."""

from __future__ import annotations

import gc
import weakref
from collections.abc import Iterator

import pytest

from postlane import heap


@pytest.fixture
def restored() -> Iterator[None]:
    before = gc.get_threshold()
    try:
        yield
    finally:
        gc.unfreeze()
        gc.set_threshold(*before)


@pytest.mark.usefixtures("restored")
def test_settle_freezes_what_exists_and_raises_the_thresholds() -> None:
    kept = [[] for _ in range(3)]  # tracked containers that exist at start
    gc.unfreeze()
    heap.settle()
    assert gc.get_freeze_count() > len(kept)
    assert gc.get_threshold() == (heap.YOUNG_THRESHOLD, heap.OLDER_THRESHOLD, heap.OLDER_THRESHOLD)


@pytest.mark.usefixtures("restored")
def test_cycles_made_after_settling_are_collected_without_being_asked() -> None:
    heap.settle()

    class Node:
        other: object

    a, b = Node(), Node()
    a.other, b.other = b, a
    gone = weakref.ref(a)
    del a, b
    held = [[] for _ in range(heap.YOUNG_THRESHOLD * 2)]  # net allocations past the threshold
    assert gone() is None
    assert len(held) == heap.YOUNG_THRESHOLD * 2
