"""Prometheus metrics, all defined in one place so their names stay consistent.

Operators alert on these (authentication failures, rejected messages, commit
latency), so every metric has a stable name, a unit in its name, and labels
with few values: never an address, user name or IP.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

SMTP_CONNECTIONS = Counter(
    "postlane_smtp_connections_total", "SMTP connections accepted", ["listener"]
)
SMTP_SESSIONS_ACTIVE = Gauge("postlane_smtp_sessions_active", "SMTP sessions currently open")
SMTP_AUTH_FAILURES = Counter(
    "postlane_smtp_auth_failures_total", "Failed SMTP AUTH attempts", ["reason"]
)
SMTP_MESSAGES_ACCEPTED = Counter(
    "postlane_smtp_messages_accepted_total", "Messages accepted (250) over SMTP"
)
SMTP_MESSAGES_REJECTED = Counter(
    "postlane_smtp_messages_rejected_total", "Messages refused after DATA", ["reason"]
)
SMTP_MESSAGE_BYTES = Counter("postlane_smtp_message_bytes_total", "Bytes of accepted messages")
SMTP_MESSAGE_SIZE = Histogram(
    "postlane_smtp_message_size_bytes",
    "Size of accepted messages",
    buckets=(1024, 4096, 16384, 65536, 262144, 1048576, 4194304, 16777216, 67108864),
)
COMMIT_BATCH_SIZE = Histogram(
    "postlane_intake_commit_batch_messages",
    "Messages written by one grouped intake commit",
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512),
)
COMMIT_SECONDS = Histogram(
    "postlane_intake_commit_seconds",
    "Duration of one grouped intake commit, fsync included",
    buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 1.0),
)
COMMIT_FAILURES = Counter("postlane_intake_commit_failures_total", "Intake commits that failed")
