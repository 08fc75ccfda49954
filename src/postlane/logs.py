"""Logging for a server that writes two lines for every message it accepts.

At thousands of messages a second, a write(2) per log line was a sixth of the
SMTP event loop's time (measured with py-spy under bench/ingest). Lines are
therefore collected in memory and written in batches: at least every quarter
second, at once for warnings and errors, and on shutdown. A crash can lose
the last quarter second of info lines; what was accepted is in the database
regardless, and errors are never held back.
"""

from __future__ import annotations

import asyncio
import logging
import logging.handlers
import sys

FORMAT = "%(asctime)s %(levelname)s %(name)s %(message)s"
FLUSH_INTERVAL = 0.25


def configure(level: str) -> logging.handlers.MemoryHandler:
    """Send Postlane's log to stderr through a batching buffer; returns the buffer."""
    stream = logging.StreamHandler(sys.stderr)
    stream.setFormatter(logging.Formatter(FORMAT))
    buffer = logging.handlers.MemoryHandler(
        capacity=1024, flushLevel=logging.WARNING, target=stream, flushOnClose=True
    )
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
