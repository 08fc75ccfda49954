"""DKIM private-key operations for the delivery worker, off its event loop, many per hop.

An RSA-2048 signature is about 0.26 ms here and the rest of a 10 KiB
copy's rendering about 0.08 ms (measured with the copies of bench/relay), so
signing is most of a copy's CPU. It is also the one step that runs without
Python's lock (OpenSSL, called by ``cryptography`` with the lock released),
so on threads it runs beside the event loop that composes and sends: the loop
renders copies up to their digests (:func:`postlane.render.dkim.prepare`)
and hands them here in batches, which keeps the cost of crossing to a thread
(a future, a wake-up of the loop) to one per batch instead of one per copy.

Measured with ``bench/relay --drain`` (delivery of a held backlog of 20,000
copies, 2 cores; docs/benchmarks.md): 1,410 and 1,463 msg/s with every copy
signed on the loop, 1,755 and 1,760 with two signing threads (and the
client's skipped line-end check), for 0.69-0.72 ms of CPU per copy either
way. By hand, on the same backlog: one signing thread gained nothing (the
loop renders a batch faster than one thread signs it, and then waits), two
gained about a fifth. End to end on 2 cores, where intake and delivery
share both cores, it moved nothing beyond the spread: the cores were busy
before.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

from postlane.render.dkim import Unsigned

__all__ = ["Signer"]


class Signer:
    """Signs batches of prepared copies on ``threads`` threads of its own.

    The threads start with the first batch and stop on :meth:`close`; a
    signer closed and used again starts new ones (a worker may be stopped and
    started again).
    """

    def __init__(self, threads: int) -> None:
        if threads < 1:
            raise ValueError(f"a signer needs at least one thread, not {threads}")
        self._threads = threads
        self._pool: ThreadPoolExecutor | None = None

    async def sign(self, batch: Sequence[Unsigned]) -> list[bytes]:
        """Each copy of ``batch`` signed, in order."""
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self._threads, thread_name_prefix="dkim-sign")
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, _sign_all, list(batch))

    def close(self) -> None:
        """Finish what was handed over, then stop the threads."""
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True)


def _sign_all(batch: list[Unsigned]) -> list[bytes]:
    return [unsigned.finish(unsigned.sign_all()) for unsigned in batch]
