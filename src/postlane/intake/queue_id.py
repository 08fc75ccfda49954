"""Queue ids: made before the commit so the 250 reply can quote them.

A database sequence would need a round trip before the grouped commit; a
random id needs none. The first 48 bits are the time in milliseconds, so ids
sort by arrival (useful in logs and listings); 32 random bits follow, so two
nodes accepting in the same millisecond do not collide in practice. Crockford
base32 keeps them short, unambiguous when read aloud, and case-insensitive.
"""

from __future__ import annotations

import os
import threading
import time

_ALPHABET = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
_lock = threading.Lock()
_last = 0


def new_queue_id(now_ms: int | None = None) -> str:
    """A 16-character id: 48 bits of milliseconds, 32 random bits.

    Within one millisecond of one process ids strictly increase (a value not
    above the previous one becomes the previous one plus one), so a burst
    cannot repeat an id; across processes the random bits keep them apart.
    """
    global _last
    stamp = int(time.time() * 1000) if now_ms is None else now_ms
    value = ((stamp & (2**48 - 1)) << 32) | int.from_bytes(os.urandom(4), "big")
    with _lock:
        if value <= _last and value >> 32 == _last >> 32:
            value = _last + 1
        _last = value
    chars = []
    for _ in range(16):
        chars.append(_ALPHABET[value & 31])
        value >>= 5
    return "".join(reversed(chars))
