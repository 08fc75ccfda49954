"""The account's attachment policy: zip all attachments, unzip attached archives, or neither.

OMICard's SMTP settings page offers exactly these (see the reference README):
(a) compress all attachments into one archive with a configured file name
and an optional password, blank meaning none; (b) unpack archive attachments
and attach the unpacked files instead; (c) off. Postlane encrypts a
password-protected archive with AES-256 (WinZip AE-2, via pyzipper): the old
ZipCrypto scheme is broken, and 7-Zip, WinZip, macOS and current Windows open
AES archives.

Body text and inline images (a Content-ID part of multipart/related, shown
through ``cid:``) are never touched; what counts as an attachment is
:func:`postlane.render.content.is_attachment`. File names keep non-ASCII
characters: they are read with RFC 2231 and RFC 2047 decoding, written with
RFC 2231, and stored in the archive with its UTF-8 name flag.

Unpacking is bounded per copy of a message, over all its archives together:
at most :data:`MAX_UNZIPPED_FILES` files and :data:`MAX_UNZIPPED_BYTES`
bytes, and no more bytes than :data:`MAX_UNZIP_RATIO` times the message's own
size (never less than :data:`UNZIP_RATIO_FLOOR`). Per-archive caps alone let
a 561 KB message of many small zip bombs become a 574 MB copy, and each
recipient gets a copy of its own, so the work must be bounded by what the
sender sent. The ratio is far above what ordinary content compresses by
(text and CSV seldom pass 10:1), so it binds on little but repeated padding,
i.e. bombs; the floor keeps it from refusing a small archive of text. An
archive that does not fit in what is left is attached as it was, as is any
archive not unpacked: the recipient still gets what the sender sent, and
nothing is lost but the convenience.
"""

from __future__ import annotations

import contextlib
import io
import logging
import lzma
import mimetypes
import re
import zlib
from dataclasses import dataclass
from datetime import datetime
from email.headerregistry import DateHeader
from email.message import EmailMessage, MIMEPart
from typing import Final

import pyzipper

from postlane.errors import InvalidInput
from postlane.render.content import (
    POLICY,
    children,
    header_section,
    is_attachment,
    leaves,
    message_bytes,
    parent_map,
    parse_message,
)

__all__ = [
    "ATTACHMENT_POLICIES",
    "DEFAULT_ARCHIVE_NAME",
    "MAX_UNZIPPED_BYTES",
    "MAX_UNZIPPED_FILES",
    "MAX_UNZIP_RATIO",
    "UNZIP_RATIO_FLOOR",
    "apply_attachment_policy",
]

ATTACHMENT_POLICIES: Final = ("off", "zip", "unzip")
DEFAULT_ARCHIVE_NAME: Final = "attachments.zip"
MAX_UNZIPPED_BYTES: Final = 50 * 1024 * 1024
"""Bytes unpacked into one copy, all archives together: more is a zip bomb or too big to mail."""
MAX_UNZIPPED_FILES: Final = 100
"""Files unpacked into one copy, all archives together: nobody reads 100 attachments."""
MAX_UNZIP_RATIO: Final = 100
"""Bytes unpacked per byte of the message, so a small message cannot make a big copy."""
UNZIP_RATIO_FLOOR: Final = 1024 * 1024
"""What :data:`MAX_UNZIP_RATIO` allows at least, so a small archive of text is still unpacked."""

log = logging.getLogger(__name__)

_ZIP_TYPES: Final = frozenset(
    ("application/zip", "application/x-zip", "application/x-zip-compressed")
)
_ZIP_EPOCH: Final = (1980, 1, 1, 0, 0, 0)  # the earliest time a zip entry can hold
_FILE_MODE: Final = 0o644 << 16  # rw-r--r--, so unpacked files are not executable
_ENCRYPTED_FLAG: Final = 0x1  # general purpose bit 0
_UTF8_NAME_FLAG: Final = 0x800  # general purpose bit 11
# Common attachment types Python 3.11's built-in table lacks.
_MORE_TYPES: Final = {
    ".docx": "application/vnd.openxmlformats-officedocument.wordprocessingml.document",
    ".xlsx": "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet",
    ".pptx": "application/vnd.openxmlformats-officedocument.presentationml.presentation",
    ".odt": "application/vnd.oasis.opendocument.text",
    ".ods": "application/vnd.oasis.opendocument.spreadsheet",
    ".odp": "application/vnd.oasis.opendocument.presentation",
    ".rtf": "application/rtf",
    ".msg": "application/vnd.ms-outlook",
    ".ics": "text/calendar",
    ".md": "text/markdown",
    ".webp": "image/webp",
    ".m4a": "audio/mp4",
    ".7z": "application/x-7z-compressed",
    ".rar": "application/vnd.rar",
    ".gz": "application/gzip",
}


def _type_table() -> mimetypes.MimeTypes:
    """Python's built-in table plus :data:`_MORE_TYPES`, never the host's /etc/mime.types.

    The guess must not depend on which machine runs the delivery worker.
    """
    table = mimetypes.MimeTypes()
    for extension, content_type in _MORE_TYPES.items():
        table.add_type(content_type, extension)
    return table


_TYPES: Final = _type_table()
_UNSAFE_NAME_CHARS: Final = re.compile(r"[\x00-\x1f\x7f]")
_DEFAULT_MEMBER_NAME: Final = "file.bin"
# What an archive from outside is known to raise while being listed or unpacked.
_ARCHIVE_ERRORS: Final = (
    pyzipper.BadZipFile,
    zlib.error,
    lzma.LZMAError,
    EOFError,
    NotImplementedError,  # a compression method zipfile does not have (Deflate64, ...)
    OSError,
    RuntimeError,
    ValueError,
)


def apply_attachment_policy(
    message: bytes, policy: str, *, archive_name: str, password: str | None
) -> bytes:
    """``message`` with the account's attachment ``policy`` applied.

    ``"off"`` returns ``message`` itself. ``"zip"`` replaces every attachment
    with one application/zip attachment named ``archive_name`` (".zip" added
    if missing, :data:`DEFAULT_ARCHIVE_NAME` if blank), AES-256 encrypted
    when ``password`` is neither None nor empty; the archive takes the first
    attachment's place. ``"unzip"`` replaces each attached zip archive with
    the files in it, as separate attachments in its place, folders
    flattened. An archive that cannot be unpacked safely (encrypted, corrupt,
    empty, or more than is left of the copy's budget: see the module's
    docstring) is left attached as it is, so the recipient still gets what
    the sender sent. Archives inside archives are not unpacked.

    Returns ``message`` itself when there is nothing to change; a message
    that is not multipart is returned so without being parsed, because a
    single-part message has no attachments beside a body.
    """
    if policy not in ATTACHMENT_POLICIES:
        raise InvalidInput(
            f"attachment policy {policy!r}: expected one of {', '.join(ATTACHMENT_POLICIES)}"
        )
    if policy == "off" or not _is_multipart(message):
        return message
    tree = parse_message(message)
    if policy == "zip":
        changed = _zip_attachments(tree, archive_name, password or None)
    else:
        changed = _unzip_attachments(tree, _Budget.for_message(len(message)))
    return message_bytes(tree) if changed else message


def _is_multipart(message: bytes) -> bool:
    for field in header_section(message).fields:
        if field.name.lower() == "content-type":
            return field.value.lstrip().lower().startswith("multipart/")
    return False


def _zip_attachments(tree: EmailMessage, archive_name: str, password: str | None) -> bool:
    attached = [
        (part, parent)
        for part, parent in leaves(tree)
        if parent is not None and is_attachment(part, parent)
    ]
    if not attached:
        return False
    names: set[str] = set()
    files = [
        (_unique(_file_name(part, number), names), _file_content(part))
        for number, (part, _) in enumerate(attached, start=1)
    ]
    archive = _archive(files, password, _zip_time(tree))
    first, first_parent = attached[0]
    siblings = children(first_parent)
    siblings[_index(siblings, first)] = _attachment(archive, _archive_file_name(archive_name))
    parents = parent_map(tree)
    for part, parent in attached[1:]:
        _remove(part, parent, parents)
    return True


def _file_name(part: MIMEPart, number: int) -> str:
    """A safe file name for ``part`` in an archive: no folders, no control characters."""
    given = part.get_filename() or ""
    name = _UNSAFE_NAME_CHARS.sub("", given.replace("\\", "/").rsplit("/", 1)[-1]).strip()
    if name in ("", ".", ".."):
        extension = ".eml" if part.get_content_type() == "message/rfc822" else None
        extension = extension or _TYPES.guess_extension(part.get_content_type()) or ".bin"
        name = f"attachment-{number}{extension}"
    return name


def _unique(name: str, taken: set[str]) -> str:
    """``name``, or ``stem (2).ext`` and so on, so no archive member overwrites another."""
    stem, dot, extension = name.rpartition(".")
    if not dot or not stem:
        stem, extension = name, ""
    candidate, number = name, 1
    while candidate.casefold() in taken:
        number += 1
        candidate = f"{stem} ({number}){dot}{extension}"
    taken.add(candidate.casefold())
    return candidate


def _file_content(part: MIMEPart) -> bytes:
    """The bytes a recipient would save: decoded content, or an attached message as .eml."""
    if part.is_multipart():  # message/rfc822: the payload is the attached message
        inner = children(part)[0]
        return inner.as_bytes(policy=POLICY)
    content = part.get_payload(decode=True)
    return content if isinstance(content, bytes) else b""


def _zip_time(tree: EmailMessage) -> tuple[int, int, int, int, int, int]:
    """The message's Date as the archive entries' time (zip times have no zone).

    Taken from the message rather than the clock so the same message and
    settings give the same archive contents on every node and every retry.
    """
    header = tree.get("Date")
    when = header.datetime if isinstance(header, DateHeader) else None
    if not isinstance(when, datetime) or not 1980 <= when.year <= 2107:
        return _ZIP_EPOCH
    return (when.year, when.month, when.day, when.hour, when.minute, when.second)


def _archive(
    files: list[tuple[str, bytes]],
    password: str | None,
    when: tuple[int, int, int, int, int, int],
) -> bytes:
    buffer = io.BytesIO()
    with pyzipper.AESZipFile(buffer, "w", compression=pyzipper.ZIP_DEFLATED) as archive:
        if password is not None:
            archive.setpassword(password.encode("utf-8"))
            archive.setencryption(pyzipper.WZ_AES, nbits=256)
        for name, content in files:
            # The archive's own entry class: AESZipFile takes no plain ZipInfo.
            entry = archive.zipinfo_cls(name, date_time=when)
            entry.compress_type = pyzipper.ZIP_DEFLATED
            entry.external_attr = _FILE_MODE
            archive.writestr(entry, content)
    return buffer.getvalue()


def _archive_file_name(configured: str) -> str:
    name = _UNSAFE_NAME_CHARS.sub("", configured.replace("\\", "/").rsplit("/", 1)[-1]).strip()
    if name in ("", ".", ".."):
        return DEFAULT_ARCHIVE_NAME
    return name if name.lower().endswith(".zip") else f"{name}.zip"


def _attachment(content: bytes, file_name: str) -> MIMEPart:
    """A base64 attachment part; the content type is guessed from the file name."""
    content_type = _TYPES.guess_type(file_name, strict=False)[0] or "application/octet-stream"
    maintype, _, subtype = content_type.partition("/")
    part = MIMEPart(policy=POLICY)
    part.set_content(
        content,
        maintype=maintype,
        subtype=subtype,
        disposition="attachment",
        filename=file_name,
    )
    return part


def _index(siblings: list[MIMEPart], part: MIMEPart) -> int:
    """Where ``part`` itself is among ``siblings`` (equal parts elsewhere do not count)."""
    return next(number for number, sibling in enumerate(siblings) if sibling is part)


def _remove(part: MIMEPart, parent: MIMEPart, parents: dict[int, MIMEPart]) -> None:
    """Take ``part`` out of ``parent``, and a multipart left empty out of its own parent."""
    siblings = children(parent)
    del siblings[_index(siblings, part)]
    grandparent = parents.get(id(parent))
    if not siblings and grandparent is not None:
        _remove(parent, grandparent, parents)


@dataclass
class _Budget:
    """What is left to unpack into one copy of a message, over all its archives."""

    bytes_left: int
    files_left: int

    @classmethod
    def for_message(cls, size: int) -> _Budget:
        allowed = max(UNZIP_RATIO_FLOOR, MAX_UNZIP_RATIO * size)
        return cls(bytes_left=min(MAX_UNZIPPED_BYTES, allowed), files_left=MAX_UNZIPPED_FILES)

    def take(self, files: int, size: int) -> bool:
        """Whether ``files`` files of ``size`` bytes fit; if they do, they are spent."""
        if files > self.files_left or size > self.bytes_left:
            return False
        self.files_left -= files
        self.bytes_left -= size
        return True


def _unzip_attachments(tree: EmailMessage, budget: _Budget) -> bool:
    changed = False
    for part, parent in list(leaves(tree)):
        if parent is None or not is_attachment(part, parent) or not _is_zip(part):
            continue
        content = part.get_payload(decode=True)
        files = _unpack(content, budget) if isinstance(content, bytes) else None
        if files is None:
            continue
        siblings = children(parent)
        index = _index(siblings, part)
        siblings[index : index + 1] = [_attachment(data, name) for name, data in files]
        changed = True
    return changed


def _is_zip(part: MIMEPart) -> bool:
    name = part.get_filename() or ""
    return part.get_content_type() in _ZIP_TYPES or name.lower().endswith(".zip")


def _unpack(content: bytes, budget: _Budget) -> list[tuple[str, bytes]] | None:
    """The files in a zip archive, or None when it is not to be unpacked.

    Checking the declared sizes before decompressing anything is enough:
    zipfile never returns more than an entry's declared size, decompressing
    no further than that, and an entry that lies about its size then fails
    its CRC check. The sizes are taken from ``budget`` before reading, so an
    archive that then fails still pays for the work it caused; otherwise
    many lying archives would each decompress a full budget's worth.

    Whatever else the archive makes zipfile raise also leaves it attached: a
    corrupt zip is the sender's file, not our failure, and must not fail the
    recipient. MemoryError is let through, as it says nothing about the file.
    """
    try:
        with pyzipper.AESZipFile(io.BytesIO(content)) as archive:
            entries = [
                entry
                for entry in archive.infolist()
                if not _is_folder(entry) and not entry.filename.startswith("__MACOSX/")
            ]
            if not entries:
                return None
            if any(entry.flag_bits & _ENCRYPTED_FLAG for entry in entries):
                return None  # encrypted: the password is the recipient's to know
            if not budget.take(len(entries), sum(entry.file_size for entry in entries)):
                return None
            files: list[tuple[str, bytes]] = [
                (_member_name(entry), archive.read(entry)) for entry in entries
            ]
    except _ARCHIVE_ERRORS:
        return None
    except MemoryError:
        raise
    except Exception:
        # Not one of the errors zipfile is known to raise: logged, so a fault
        # of ours would still show, but the copy goes out with the archive.
        log.warning("zip attachment left as it is: unexpected error reading it", exc_info=True)
        return None
    return files


def _is_folder(entry: pyzipper.ZipInfo) -> bool:
    """Whether ``entry`` is a folder, for any name.

    zipfile cuts a name at its first NUL, so one starting with NUL is empty,
    and pyzipper's ``is_dir`` then raises IndexError; such an entry is a file,
    named :data:`_DEFAULT_MEMBER_NAME` by :func:`_member_name`.
    """
    name: str = entry.filename
    return name.endswith("/")


def _member_name(entry: pyzipper.ZipInfo) -> str:
    """An archive member's file name without its folders.

    Names without the UTF-8 flag are read as CP437 by zipfile, as the zip
    specification says; many tools write UTF-8 without setting the flag, so
    such a name is read as UTF-8 when its bytes are valid UTF-8.
    """
    name: str = entry.filename
    if not entry.flag_bits & _UTF8_NAME_FLAG:
        with contextlib.suppress(UnicodeError):
            name = name.encode("cp437").decode("utf-8")
    base = _UNSAFE_NAME_CHARS.sub("", name.replace("\\", "/").rsplit("/", 1)[-1]).strip()
    return base or _DEFAULT_MEMBER_NAME
