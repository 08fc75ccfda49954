"""Logging for a server that writes two lines for every message it accepts.

At thousands of messages a second, a write(2) per log line was a sixth of the
SMTP event loop's time (measured with py-spy under bench/ingest). Lines are
therefore collected in memory and written in batches, one flush of the
stream per batch (logging's StreamHandler would flush after every line): at
least every quarter second, at once for warnings and errors, and on
shutdown. A crash can lose the last quarter second of info lines; what was
accepted is in the database regardless, and errors are never held back.
"""

from __future__ import annotations

import asyncio
import logging
import logging.handlers
import sys
from typing import TextIO

FORMAT = "%(asctime)s %(levelname)s %(name)s %(message)s"
FLUSH_INTERVAL = 0.25


class _UnflushedStream(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes lines to its stream and leaves flushing it to the :class:`_Batch` in front."""

    def flush(self) -> None:
        pass

    def flush_stream(self) -> None:
        super().flush()


class _Batch(logging.handlers.MemoryHandler):
    """Hands its held lines to the stream, then flushes the stream once."""

    def flush(self) -> None:
        super().flush()
        if isinstance(self.target, _UnflushedStream):
            self.target.flush_stream()


def configure(level: str, stream: TextIO | None = None) -> logging.handlers.MemoryHandler:
    """Send Postlane's log to ``stream`` (stderr) through a batching buffer; returns the buffer."""
    target = _UnflushedStream(sys.stderr if stream is None else stream)
    target.setFormatter(logging.Formatter(FORMAT))
    buffer = _Batch(capacity=1024, flushLevel=logging.WARNING, target=target, flushOnClose=True)
    # What FORMAT does not print is not collected: finding the caller's frame
    # alone was 1.8% of the intake event loop's samples under bench/ingest
    # (the Logging HOWTO's "Optimization" section names these switches).
    logging._srcfile = None
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    root = logging.getLogger()
    root.handlers[:] = [buffer]
    root.setLevel(level.upper())
    return buffer


async def flush_periodically(buffer: logging.Handler) -> None:
    """Write buffered lines every FLUSH_INTERVAL seconds until cancelled."""
    try:
        while True:
            await asyncio.sleep(FLUSH_INTERVAL)
            buffer.flush()
    finally:
        buffer.flush()
