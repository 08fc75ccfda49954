"""Frames between intake processes and the commit process, however the stream is cut."""

from __future__ import annotations

import pickle
import struct
from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest

from postlane.errors import InvalidInput
from postlane.intake.commit_wire import FrameReader, encode, message_fields, message_from_fields
from postlane.store.intake import NewMessage, NewRecipient

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


def _message() -> NewMessage:
    now = datetime(2026, 11, 24, 15, 0, tzinfo=UTC)
    return NewMessage(
        id="06H0X1D8C5K8B6M8",
        account_id=3,
        smtp_user_id=7,
        mail_from="news@shop.example",
        header_from="news@shop.example",
        message_id_header="<1@shop.example>",
        subject="Hello",
        raw=b"Subject: Hello\r\n\r\n\xe9t\xe9\r\n",
        options={"tags": ["a"], "priority": 1},
        client_ip="192.0.2.1",
        tls="TLSv1.3 TLS_AES_256_GCM_SHA384",
        received_at=now,
        dedupe_key="ab" * 32,
        recipients=(
            NewRecipient("a@x.test", "x.test", 1, now, now + timedelta(days=3)),
            NewRecipient(
                "b@y.test", "y.test", 1, now + timedelta(hours=1), now + timedelta(days=1)
            ),
        ),
        event_data={"session": "S1", "size": 25},
        event_type="inbound",
        alerts=("From not allowed",),
    )


def test_a_message_crosses_the_wire_unchanged() -> None:
    message = _message()
    (item,) = FrameReader().feed(encode((9, message_fields(message))))
    assert item[0] == 9
    assert message_from_fields(item[1]) == message
    assert message_from_fields(message_fields(replace(message, recipients=()))).recipients == ()


@pytest.mark.parametrize(
    "fields",
    [("too", "short"), None, (*message_fields(_message())[:-4], ("not a recipient",), {}, "x", ())],
)
def test_fields_that_are_not_a_message_are_refused_by_name(fields: object) -> None:
    with pytest.raises(InvalidInput, match="commit request does not hold a message"):
        message_from_fields(fields)
