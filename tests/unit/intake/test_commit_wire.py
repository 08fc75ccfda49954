"""Frames between intake processes and the commit process, however the stream is cut."""

from __future__ import annotations

import pickle
import struct
from datetime import UTC, datetime

import pytest

from postlane.errors import InvalidInput
from postlane.intake.commit_wire import FrameReader, encode

ITEMS = [
    (1, b"x" * 10_000, datetime(2026, 11, 24, 15, 0, tzinfo=UTC)),
    (2, "é", None),
    (3, {"options": [1, 2]}, ()),
]


def test_frames_come_back_as_they_were_sent() -> None:
    reader = FrameReader()
    assert reader.feed(b"".join(encode(item) for item in ITEMS)) == ITEMS
    assert reader.pending == 0


def test_a_stream_fed_byte_by_byte_yields_each_item_once_complete() -> None:
    stream = b"".join(encode(item) for item in ITEMS)
    reader = FrameReader()
    seen = []
    for i in range(len(stream)):
        seen.extend(reader.feed(stream[i : i + 1]))
    assert seen == ITEMS
    assert reader.pending == 0


def test_a_partial_frame_waits_for_its_rest() -> None:
    frame = encode(ITEMS[0])
    reader = FrameReader()
    assert reader.feed(frame[:3]) == []  # not even the length yet
    assert reader.feed(frame[3:-1]) == []
    assert reader.pending == len(frame) - 1
    assert reader.feed(frame[-1:]) == [ITEMS[0]]


def test_a_length_beyond_the_limit_is_refused_before_waiting_for_it() -> None:
    reader = FrameReader(max_frame=100)
    with pytest.raises(InvalidInput, match="commit frame of 101 bytes is longer than 100"):
        reader.feed(struct.pack(">I", 101))


def test_a_frame_that_is_not_a_pickle_raises() -> None:
    reader = FrameReader()
    with pytest.raises(pickle.UnpicklingError):
        reader.feed(struct.pack(">I", 3) + b"abc")
