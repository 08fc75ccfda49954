"""How intake processes and the commit process talk: length-prefixed frames, sans-IO.

Each frame is a 4-byte big-endian length and a pickle. Pickle is safe here
only because both ends are Postlane processes of the same user: the socket
lives in the data directory with mode 0600, and the commit process also checks
the peer's uid (``SO_PEERCRED``) before it reads a byte of a frame. Pickle is
used because it is the fastest way CPython has to move a ``NewMessage`` (raw
bytes, datetimes, a dict of options) between processes; a text encoding would
cost more per message than the commit itself.

A request is ``(sequence, fields)``, the message's fields as plain tuples
(:func:`message_fields`): pickling the dataclasses themselves took 1.6 times
as long to write and twice as long to read (measured on a bench/ingest
message), and the commit process reads every one. An answer is ``(sequence, queue_id,
duplicate_of, error, stats)`` where ``error`` is ``None`` or the reason the
message was not committed, and ``stats`` is ``(messages, seconds,
failed_transactions)`` of the grouped commit on the first answer of each group
(the metrics count a group once) and ``None`` on the others. Sequence numbers
are the client's, so answers may come in any order.
"""

from __future__ import annotations

import pickle
import struct
from typing import Any, Final

from postlane.errors import InvalidInput
from postlane.store.intake import NewMessage, NewRecipient

MAX_FRAME: Final = 1 << 30  # above any message size intake accepts; a longer prefix is garbage
_LENGTH = struct.Struct(">I")


def encode(item: Any) -> bytes:
    """One frame: the pickled item behind its length."""
    payload = pickle.dumps(item, protocol=pickle.HIGHEST_PROTOCOL)
    return _LENGTH.pack(len(payload)) + payload


def message_fields(message: NewMessage) -> tuple[Any, ...]:
    """``message`` as a tuple of plain values, for :func:`encode`."""
    m = message
    return (
        m.id,
        m.account_id,
        m.smtp_user_id,
        m.mail_from,
        m.header_from,
        m.message_id_header,
        m.subject,
        m.raw,
        m.options,
        m.client_ip,
        m.tls,
        m.received_at,
        m.dedupe_key,
        tuple(
            (r.address, r.domain, r.priority, r.next_attempt_at, r.expires_at) for r in m.recipients
        ),
        m.event_data,
        m.event_type,
        m.alerts,
    )


def message_from_fields(fields: Any) -> NewMessage:
    """The message :func:`message_fields` flattened; InvalidInput if ``fields`` is not one."""
    try:
        (id_, account, user, mail_from, header_from, message_id, subject, raw, options) = fields[:9]
        (client_ip, tls, received_at, dedupe_key, recipients, data, kind, alerts) = fields[9:]
        return NewMessage(
            id=id_,
            account_id=account,
            smtp_user_id=user,
            mail_from=mail_from,
            header_from=header_from,
            message_id_header=message_id,
            subject=subject,
            raw=raw,
            options=options,
            client_ip=client_ip,
            tls=tls,
            received_at=received_at,
            dedupe_key=dedupe_key,
            recipients=tuple(NewRecipient(*r) for r in recipients),
            event_data=data,
            event_type=kind,
            alerts=alerts,
        )
    except (TypeError, ValueError) as exc:
        raise InvalidInput(f"commit request does not hold a message: {exc}") from exc


class FrameReader:
    """Turns a byte stream into the items framed in it, however the stream was split."""

    def __init__(self, max_frame: int = MAX_FRAME) -> None:
        self._buffer = bytearray()
        self._max = max_frame

    def feed(self, data: bytes) -> list[Any]:
        """The items completed by ``data``; raises InvalidInput on a frame too long to be ours."""
        buffer = self._buffer
        buffer += data
        items: list[Any] = []
        start = 0
        while len(buffer) - start >= 4:
            (length,) = _LENGTH.unpack_from(buffer, start)
            if length > self._max:
                raise InvalidInput(f"commit frame of {length} bytes is longer than {self._max}")
            end = start + 4 + length
            if len(buffer) < end:
                break
            items.append(pickle.loads(buffer[start + 4 : end]))  # noqa: S301 - see above
            start = end
        if start:
            del buffer[:start]
        return items

    @property
    def pending(self) -> int:
        """Bytes of a frame not yet complete."""
        return len(self._buffer)
