"""The one exception hierarchy of Postlane.

Every error Postlane raises on purpose derives from :class:`PostlaneError`, so
callers (the CLI, the SMTP server, the HTTP API) can turn any of them into a
clear one-line message without catching unrelated bugs::

    PostlaneError
    ├── ConfigError            a setting is missing or invalid
    ├── InvalidInput           a value from outside (CLI argument, API field) is malformed
    ├── NotFound               the named account, user, domain or message does not exist
    ├── AlreadyExists          the name is taken
    ├── StoreError             the database refused or failed an operation
    │   └── CommitFailed       an intake commit did not become durable
    ├── SecretError            a stored secret cannot be decrypted (wrong key?)
    ├── OptionError            a per-message option header is malformed
    └── MessageRejected        a submitted message breaks a rule (carries the SMTP reply)
"""

from __future__ import annotations


class PostlaneError(Exception):
    """Base of every error Postlane raises on purpose."""


class ConfigError(PostlaneError):
    """A setting is missing or invalid; the message names the key and value."""


class InvalidInput(PostlaneError):
    """A value given from outside is malformed; the message says which and why."""


class NotFound(PostlaneError):
    """The named object does not exist."""


class AlreadyExists(PostlaneError):
    """An object with that name exists already."""


class StoreError(PostlaneError):
    """The database refused or failed an operation."""


class CommitFailed(StoreError):
    """An intake transaction did not commit; nothing of it was kept."""


class SecretError(PostlaneError):
    """A stored secret could not be decrypted with the configured key."""


class OptionError(PostlaneError):
    """A per-message option header has a malformed value.

    ``header`` names the header so the SMTP reply can say which one.
    """

    def __init__(self, header: str, problem: str) -> None:
        super().__init__(f"{header}: {problem}")
        self.header = header
        self.problem = problem


class MessageRejected(PostlaneError):
    """A submitted message breaks a rule; carries the SMTP reply to give."""

    def __init__(self, code: int, enhanced: str, text: str) -> None:
        super().__init__(f"{code} {enhanced} {text}")
        self.code = code
        self.enhanced = enhanced
        self.text = text
