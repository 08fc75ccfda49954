"""Job options that change a message's content, and the MIME helpers the render steps share.

The options (OMICard X-JobOption bits, appendix A of its manual) depend only on
the stored message and its SendOptions, never on the recipient, so a delivery
worker can apply them once per message and reuse the result for every copy:

- ``html_to_text`` (8): add a text/plain alternative made from the HTML body;
- ``convert_to_utf8`` (512): re-encode body text declared in another charset;
- ``subject_from_html_title`` (2048): take the Subject from the HTML <title>;
- ``text_to_html`` (262144): add an HTML alternative made from the text body;
- ``delivery_receipt`` (268435456): ``Return-Receipt-To``, the header Outlook
  reads for a delivery receipt;
- ``read_receipt`` (536870912): ``Disposition-Notification-To`` (RFC 8098).

``archive_copy`` (128) is no content change: the worker keeps the copy.

The shared helpers (parse, serialise, walk the leaves, tell body text from
attachments, read and write a text part's decoded text) live here because
every content step needs the same answers to "which parts are the body" and
"how does this part's text come out and go back in": decoding the transfer
encoding, then the charset, and on the way back choosing a transfer encoding
that keeps the part 7-bit clean unless it already was 8-bit.
"""

from __future__ import annotations

import base64
import codecs
import email.policy
import html
import quopri
import re
from collections.abc import Iterator
from email.headerregistry import AddressHeader
from email.message import EmailMessage, MIMEPart
from email.parser import BytesParser
from html.parser import HTMLParser
from typing import Final, cast

from postlane.errors import InvalidInput, MessageRejected
from postlane.intake.headers import HeaderSection, parse_header_section
from postlane.options.model import SendOptions

__all__ = [
    "POLICY",
    "apply_content_options",
    "body_text_parts",
    "children",
    "header_section",
    "html_to_text",
    "is_attachment",
    "leaves",
    "message_bytes",
    "new_text_part",
    "one_line",
    "parent_map",
    "parse_message",
    "read_text",
    "text_to_html",
    "write_text",
]

POLICY: Final = email.policy.SMTP.clone(refold_source="none")
"""CRLF line endings, RFC 2047 for new non-ASCII headers, and every header the
step did not set written back exactly as it came (no refolding)."""

_MAX_LINE: Final = 998  # RFC 5322 section 2.1.1: a line MUST NOT be longer
_BODY_SUBTYPES: Final = frozenset(("plain", "html"))
_ASCII_NAMES: Final = frozenset(("ascii", "us-ascii"))
# Every separator str.splitlines() knows: the email package refuses a header
# value that splits into more than one line by that rule, not only CR and LF.
_LINE_SEPARATORS: Final = re.compile(r"[\r\n\v\f\x1c-\x1e\x85\u2028\u2029]+")
# Codecs Python files as text encodings that still cannot carry a body part:
# "undefined" refuses all input, and the IDNA codecs, being for host names,
# refuse the surrogateescape handler the round trip relies on.
_UNFIT_CODECS: Final = frozenset(("undefined", "idna", "punycode"))


def parse_message(message: bytes) -> EmailMessage:
    """The MIME tree of ``message``; parts are EmailMessage objects under :data:`POLICY`."""
    parsed = BytesParser(policy=POLICY).parsebytes(message)
    if not isinstance(parsed, EmailMessage):  # always true under POLICY; narrows for mypy
        raise TypeError("POLICY must build EmailMessage objects")
    return parsed


def message_bytes(message: EmailMessage) -> bytes:
    """``message`` serialised for SMTP: CRLF, unchanged headers as they came."""
    return message.as_bytes(policy=POLICY)


def one_line(text: str) -> str:
    """``text`` with each run of line separators made one space, fit to be a header value.

    A value from outside (a recipient variable, a template's output, an HTML
    <title>) may hold any of the separators :meth:`str.splitlines` knows; the
    email package refuses such a header outright, and a CR or LF that got
    through would start a new header field. A space keeps the words apart.
    """
    return _LINE_SEPARATORS.sub(" ", text)


def header_section(message: bytes) -> HeaderSection:
    """The header fields of ``message`` without parsing its MIME body.

    The stored message passed intake, whose parser this is, so an error here
    means the caller handed over something else: the copy cannot be rendered.
    """
    try:
        return parse_header_section(message)
    except MessageRejected as exc:
        raise InvalidInput(f"the stored message is malformed: {exc.text}") from None


def children(part: MIMEPart) -> list[MIMEPart]:
    """The live list of a multipart's subparts: changing the list changes the part."""
    payload = part.get_payload()
    if not isinstance(payload, list):
        raise TypeError(f"{part.get_content_type()} has no subparts")
    return cast("list[MIMEPart]", payload)


def parent_map(message: MIMEPart) -> dict[int, MIMEPart]:
    """``id(part) -> its multipart parent`` for every part below ``message``.

    Keyed by ``id()``: a part is a place in the tree, and two parts with the
    same content are two places. Attached messages (message/rfc822) are not
    entered: what is inside them is theirs.
    """
    parents: dict[int, MIMEPart] = {}
    stack = [message]
    while stack:
        node = stack.pop()
        if node.get_content_maintype() == "multipart" and node.is_multipart():
            for child in children(node):
                parents[id(child)] = node
                stack.append(child)
    return parents


def leaves(message: MIMEPart) -> Iterator[tuple[MIMEPart, MIMEPart | None]]:
    """Every non-multipart part in document order, with its parent (None at the top).

    Like :func:`parent_map`, does not descend into attached messages: an
    attached message is one leaf, as a mail client shows it.
    """
    stack: list[tuple[MIMEPart, MIMEPart | None]] = [(message, None)]
    while stack:
        node, parent = stack.pop()
        if node.get_content_maintype() == "multipart" and node.is_multipart():
            stack.extend((child, node) for child in reversed(children(node)))
        else:
            yield node, parent


def is_attachment(part: MIMEPart, parent: MIMEPart | None) -> bool:
    """Whether a mail client shows ``part`` as an attached file rather than as the body.

    A part with a Content-ID inside multipart/related is an inline resource
    the HTML shows through ``cid:``, whatever its disposition says (Python's
    ``add_related(..., filename=...)`` marks such images "attachment"):
    taking it away would break the page. Otherwise an explicit
    ``Content-Disposition: attachment`` decides, and without a disposition a
    non-text part with a file name is an attachment too (many clients omit
    the header).
    """
    related = parent is not None and parent.get_content_type() == "multipart/related"
    if related and part["Content-ID"] is not None:
        return False
    disposition = part.get_content_disposition()
    if disposition == "attachment":
        return True
    if disposition == "inline" or part.get_content_maintype() == "text":
        return False
    return part.get_filename() is not None


def body_text_parts(message: MIMEPart) -> Iterator[MIMEPart]:
    """The text/plain and text/html parts that make up the body, not attached text files."""
    for part, parent in leaves(message):
        if (
            part.get_content_maintype() == "text"
            and part.get_content_subtype() in _BODY_SUBTYPES
            and not is_attachment(part, parent)
        ):
            yield part


def read_text(part: MIMEPart) -> str:
    """The text of ``part``: transfer encoding undone, then decoded from its charset.

    Bytes the charset cannot decode become lone surrogates
    (``surrogateescape``), so :func:`write_text` puts them back byte for byte:
    a body declared us-ascii that really holds UTF-8 survives unharmed. An
    unknown charset is read as ASCII the same way for the same reason.

    Raises :class:`~postlane.errors.InvalidInput` when the bytes are not
    text in the declared charset even so (an odd byte count in UTF-16, a
    broken UTF-7 sequence): the handler can only carry bytes above 0x7F.
    """
    data = part.get_payload(decode=True)
    if not isinstance(data, bytes):  # only multiparts and attached messages decode to None
        raise TypeError(f"a {part.get_content_type()} part has no text")
    charset = part.get_content_charset() or "us-ascii"
    try:
        return data.decode(_codec(charset) or "ascii", "surrogateescape")
    except UnicodeDecodeError as exc:
        raise InvalidInput(
            f"a {part.get_content_type()} part is not valid {charset}: {exc.reason}"
        ) from None


def write_text(part: MIMEPart, text: str, charset: str | None = None) -> None:
    """Make ``text`` the content of ``part``, in ``charset`` (default: the part's own).

    When the text has characters that charset cannot hold (a recipient's
    name in a Latin-1 body, say), the part becomes UTF-8 instead. The part's
    transfer encoding is kept if it is base64 or quoted-printable; a 7bit or
    8bit part whose new bytes no longer fit (8-bit data in a 7bit part, a
    line over 998 bytes) becomes quoted-printable, which every receiver takes.
    """
    declared = (charset or part.get_content_charset() or "us-ascii").lower()
    codec = _codec(declared)
    try:
        data = text.encode(codec or "ascii", "surrogateescape")
    except UnicodeEncodeError:
        if codec is None:
            raise InvalidInput(
                f"cannot add non-ASCII text to a part in the unknown charset {declared!r}"
            ) from None
        declared = "utf-8"
        data = text.encode("utf-8", "surrogateescape")
    # A US-ASCII part may go without the parameter (RFC 2045 section 5.2); others need it.
    labelled = declared not in _ASCII_NAMES or part.get_param("charset") is not None
    if labelled and part.get_content_charset() != declared:
        part.set_param("charset", declared, replace=True)
    cte = str(part.get("Content-Transfer-Encoding", "7bit")).strip().lower()
    if cte not in ("base64", "quoted-printable") and _needs_encoding(data, eight_bit=cte != "7bit"):
        cte = "quoted-printable"
    lines = data.replace(b"\r\n", b"\n")
    if cte == "base64":
        payload = base64.encodebytes(lines.replace(b"\n", b"\r\n")).decode("ascii")
    elif cte == "quoted-printable":
        payload = quopri.encodestring(lines).decode("ascii")
    else:
        payload = lines.decode("ascii", "surrogateescape")
    part.set_payload(payload)
    if "Content-Transfer-Encoding" in part:
        part.replace_header("Content-Transfer-Encoding", cte)
    elif cte != "7bit":
        part["Content-Transfer-Encoding"] = cte


def _codec(charset: str) -> str | None:
    """Python's codec name for a MIME charset, or None when it names no usable text codec.

    ``codecs.lookup`` also finds bytes-to-bytes and str-to-str codecs
    (``hex``, ``base64``, ``zlib``, ``rot13``), which ``bytes.decode``
    refuses with a LookupError: a charset parameter naming one is as
    meaningless as an unknown name, and is treated the same way.
    """
    try:
        info = codecs.lookup(charset)
    except LookupError:
        return None
    if not info._is_text_encoding or info.name in _UNFIT_CODECS:
        return None
    return info.name


def _needs_encoding(data: bytes, *, eight_bit: bool) -> bool:
    if not eight_bit and not data.isascii():
        return True
    return any(len(line) > _MAX_LINE for line in data.split(b"\n"))


def new_text_part(text: str, subtype: str) -> MIMEPart:
    """A UTF-8 body part: 7bit when the text allows it, else the shorter transfer encoding.

    Quoted-printable writes a non-ASCII byte in three, base64 every byte in
    4/3: for mostly-ASCII text (German, French) quoted-printable is shorter
    and stays readable in the source; once more than a sixth of the bytes are
    non-ASCII (Chinese, Greek), base64 is shorter.
    """
    part = MIMEPart(policy=POLICY)
    part["Content-Type"] = f"text/{subtype}"
    data = text.encode("utf-8", "surrogateescape")
    if 6 * sum(byte > 0x7F for byte in data) > len(data):
        part["Content-Transfer-Encoding"] = "base64"
    write_text(part, text, "utf-8")
    return part


def apply_content_options(message: bytes, options: SendOptions) -> bytes:
    """``message`` with the content-changing job options of ``options`` applied.

    Returns ``message`` itself, unparsed, when none of them is asked, and
    also when they are asked but have nothing to act on (an HTML alternative
    is there already, say), so callers can tell "unchanged" by identity.
    The order matters: text is re-encoded before alternatives are made from it.
    """
    if not (
        options.convert_to_utf8
        or options.html_to_text
        or options.text_to_html
        or options.subject_from_html_title
        or options.delivery_receipt
        or options.read_receipt
    ):
        return message
    tree = parse_message(message)
    changed = False
    if options.convert_to_utf8:
        changed |= _convert_to_utf8(tree)
    if options.html_to_text:
        changed |= _add_text_alternative(tree)
    if options.text_to_html:
        changed |= _add_html_alternative(tree)
    if options.subject_from_html_title:
        changed |= _subject_from_title(tree)
    if options.delivery_receipt:
        changed |= _add_receipt_header(tree, "Return-Receipt-To")
    if options.read_receipt:
        changed |= _add_receipt_header(tree, "Disposition-Notification-To")
    return message_bytes(tree) if changed else message


def _convert_to_utf8(tree: EmailMessage) -> bool:
    """Re-encode body text in other charsets to UTF-8, the HTML's own <meta> included.

    Attached text files are left as they are: they are files, and their bytes
    are what the sender attached. Parts without a charset are US-ASCII, which
    is UTF-8 already. A part in a charset Python does not know is left as it
    is too: it cannot be decoded, and relabelling its bytes would garble it;
    so is a part whose bytes are not valid in its charset, for that reason.
    """
    changed = False
    for part in body_text_parts(tree):
        codec = _codec(part.get_content_charset() or "us-ascii")
        if codec is None or codec in ("utf-8", "ascii"):
            continue
        try:
            text = read_text(part)
        except InvalidInput:
            continue
        if part.get_content_subtype() == "html":
            text = _META_TAG.sub(_meta_charset_to_utf8, text)
        write_text(part, text, "utf-8")
        changed = True
    return changed


# A <meta> tag up to its ">" (or the end of an unclosed one), and the
# charset=... in it, both the HTML5 and the http-equiv form. Two patterns
# rather than one "<meta[^>]*?charset": a single pattern fails slowly at
# every "<meta" without a charset and is tried again from the next one,
# quadratic in a page of unclosed tags, where each tag match here consumes
# its text and the inner search only looks inside one tag.
_META_TAG: Final = re.compile(r"<meta\b[^>]*", re.IGNORECASE)
_META_CHARSET: Final = re.compile(r"(\bcharset\s*=\s*[\"']?)[\w.:-]+", re.IGNORECASE)


def _meta_charset_to_utf8(tag: re.Match[str]) -> str:
    return _META_CHARSET.sub(r"\g<1>utf-8", tag.group(0), count=1)


def _first_body_part(tree: EmailMessage, subtype: str) -> MIMEPart | None:
    return next((p for p in body_text_parts(tree) if p.get_content_subtype() == subtype), None)


def _alternative_slot(tree: EmailMessage, part: MIMEPart) -> tuple[MIMEPart, MIMEPart | None]:
    """Where an alternative to ``part`` belongs: (unit, the multipart/alternative holding it).

    The unit is what the new alternative stands beside: the part itself, or
    the multipart/related that holds it with its inline images. The second
    item is None when the unit is not in a multipart/alternative yet.
    """
    parents = parent_map(tree)
    unit = part
    parent = parents.get(id(part))
    if parent is not None and parent.get_content_type() == "multipart/related":
        unit, parent = parent, parents.get(id(parent))
    if parent is not None and parent.get_content_type() == "multipart/alternative":
        return unit, parent
    return unit, None


def _has_alternative(alternative: MIMEPart, subtype: str) -> bool:
    for child in children(alternative):
        if child.get_content_type() == f"text/{subtype}":
            return True
        if child.get_content_type() == "multipart/related" and any(
            grandchild.get_content_type() == f"text/{subtype}" for grandchild in children(child)
        ):
            return True
    return False


def _add_alternative(tree: EmailMessage, source: MIMEPart, new: MIMEPart, *, first: bool) -> bool:
    """Put ``new`` beside ``source`` in a multipart/alternative, making one if needed.

    ``first``: the new part is the plainer one and goes before (RFC 2046
    section 5.1.4: alternatives run from plainest to richest).
    """
    subtype = new.get_content_subtype()
    unit, alternative = _alternative_slot(tree, source)
    if alternative is not None:
        if _has_alternative(alternative, subtype):
            return False
        siblings = children(alternative)
    else:
        # make_alternative moves the unit's Content-* headers and payload into
        # a new first subpart and turns the unit itself into the container, so
        # the unit keeps its place (and, at the top, the message's headers).
        unit.make_alternative()
        siblings = children(unit)
    siblings.insert(0 if first else len(siblings), new)
    return True


def _add_text_alternative(tree: EmailMessage) -> bool:
    source = _first_body_part(tree, "html")
    if source is None:
        return False
    text = html_to_text(read_text(source))
    return _add_alternative(tree, source, new_text_part(text, "plain"), first=True)


def _add_html_alternative(tree: EmailMessage) -> bool:
    source = _first_body_part(tree, "plain")
    if source is None or _first_body_part(tree, "html") is not None:
        return False
    page = text_to_html(read_text(source))
    return _add_alternative(tree, source, new_text_part(page, "html"), first=False)


def _subject_from_title(tree: EmailMessage) -> bool:
    source = _first_body_part(tree, "html")
    if source is None:
        return False
    reader = _HtmlReader(limit=0)  # only the title is wanted: build no text
    reader.feed(read_text(source))
    reader.close()
    title = reader.title
    if not title or title == str(tree.get("Subject", "")):
        return False
    if "Subject" in tree:
        tree.replace_header("Subject", title)
    else:
        tree["Subject"] = title
    return True


def _add_receipt_header(tree: EmailMessage, name: str) -> bool:
    """Ask for a receipt at the From address, unless the sender asked already."""
    if name in tree:
        return False
    sender = tree.get("From")
    if not isinstance(sender, AddressHeader) or not sender.addresses:
        raise InvalidInput(f"{name} needs a From address and the message has none")
    tree[name] = str(sender.addresses[0])
    return True


_PARAGRAPH_TAGS: Final = frozenset(
    (
        "address",
        "article",
        "aside",
        "blockquote",
        "dd",
        "div",
        "dl",
        "fieldset",
        "figure",
        "footer",
        "form",
        "h1",
        "h2",
        "h3",
        "h4",
        "h5",
        "h6",
        "header",
        "main",
        "nav",
        "p",
        "pre",
        "section",
        "table",
    )
)
_LINE_TAGS: Final = frozenset(("br", "dt", "tr", "caption"))
_HIDDEN_TAGS: Final = frozenset(("head", "script", "style", "template", "title"))
_SPACES: Final = re.compile(r"[ \t\n\r\f]+")  # HTML whitespace; a no-break space stays
_LINK_SCHEMES_HIDDEN: Final = ("#", "javascript:")
# Lists deeper than this are indented as this deep. Real mail nests lists a
# few levels; without a cap N nested lists with N items cost N*N characters.
_MAX_LIST_INDENT: Final = 10
# The text made from a page is at most this many characters, or this many
# times the page's length if more (see html_to_text), before _TRUNCATED.
_TEXT_FLOOR: Final = 1 << 20
_TEXT_FACTOR: Final = 2
_TRUNCATED: Final = "[...]"


class _HtmlReader(HTMLParser):
    """Reads an HTML body into plain text and remembers its <title>.

    Text is laid out the way a reader expects: blocks are paragraphs, <br>
    and table rows are lines, list items are "- " or "1. " lines, whitespace
    collapses except in <pre>, links read "text (url)" so a text-only reader
    can still follow them, images say their alt text. What a browser does not
    show (head, script, style) is dropped.

    At most ``limit`` characters of text are made; what would come after is
    dropped and :attr:`truncated` set, while the title is still read.
    """

    def __init__(self, *, limit: int) -> None:
        super().__init__(convert_charrefs=True)
        self.title = ""
        self.truncated = False
        self._limit = limit
        self._size = 0  # characters in _out
        self._out: list[str] = []
        self._breaks = 0  # line breaks owed before the next text
        self._at_line_start = True
        self._hidden: list[str] = []
        self._in_title = False
        self._title: list[str] = []
        self._pre = 0
        self._link: tuple[str, int] | None = None  # href, index into _out where its text starts
        self._lists: list[list[int]] = []  # per open list: [next number] or [] for bullets

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "body":
            # A body start ends a head that was never closed.
            self._hidden = [name for name in self._hidden if name != "head"]
        if tag in _HIDDEN_TAGS:
            self._hidden.append(tag)
            self._in_title = self._in_title or tag == "title"
            return
        if self._hidden:
            return
        attributes = {name: value or "" for name, value in attrs}
        if tag in ("ul", "ol"):
            self._break(1 if self._lists else 2)  # a list inside a list is no new paragraph
            self._lists.append([1] if tag == "ol" else [])
        elif tag in _PARAGRAPH_TAGS:
            self._break(2)
            if tag == "pre":
                self._pre += 1
        elif tag in _LINE_TAGS:
            self._break(1)
        elif tag == "hr":
            self._break(2)
            self._emit("-" * 40)
            self._break(2)
        elif tag == "li":
            self._break(1)
            marker = "- "
            if self._lists and self._lists[-1]:
                marker = f"{self._lists[-1][0]}. "
                self._lists[-1][0] += 1
            depth = min(len(self._lists), _MAX_LIST_INDENT)
            self._emit("  " * max(depth - 1, 0) + marker)
        elif tag in ("td", "th"):
            if not self._at_line_start:
                self._emit(" ")
        elif tag == "img":
            alt = _SPACES.sub(" ", attributes.get("alt", "")).strip()
            if alt:
                self._text(alt)
        elif tag == "a":
            # Links do not nest: a browser ends an open link where the next
            # begins (HTML's "adoption agency"). That also keeps each link's
            # label apart from every other, so reading labels stays linear.
            self._close_link()
            self._link = (attributes.get("href", "").strip(), len(self._out))

    def handle_endtag(self, tag: str) -> None:
        if tag in _HIDDEN_TAGS:
            if tag in self._hidden:
                index = len(self._hidden) - 1 - self._hidden[::-1].index(tag)
                del self._hidden[index]
            if tag == "title":
                self._in_title = False
            return
        if self._hidden:
            return
        if tag in ("ul", "ol"):
            if self._lists:
                self._lists.pop()
            self._break(1 if self._lists else 2)
        elif tag in _PARAGRAPH_TAGS:
            if tag == "pre" and self._pre:
                self._pre -= 1
            self._break(2)
        elif tag in ("li", "tr"):
            self._break(1)
        elif tag == "a":
            self._close_link()

    def handle_data(self, data: str) -> None:
        if self._in_title:
            self._title.append(data)
        if self._hidden:
            return
        if self._pre:
            self._emit(data)
        else:
            self._text(data)

    def close(self) -> None:
        super().close()
        # The title becomes a Subject: no separator of any kind may stay in it.
        self.title = _SPACES.sub(" ", one_line("".join(self._title))).strip()

    def text(self) -> str:
        """The text read so far: trailing spaces trimmed, at most one blank line in a row.

        Text cut at the limit ends in a line of its own saying so, for a
        reader to know there is more (in the HTML alternative).
        """
        lines = [line.rstrip() for line in "".join(self._out).split("\n")]
        if self.truncated:
            lines += ["", _TRUNCATED]
        joined = re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip("\n")
        return joined + "\n" if joined else ""

    def _text(self, data: str) -> None:
        words = _SPACES.sub(" ", data)
        if self._at_line_start or (self._out and self._out[-1].endswith(" ")):
            words = words.lstrip(" ")
        if words:
            self._emit(words)

    def _emit(self, text: str) -> None:
        if self._breaks and self._out:
            self._append("\n" * self._breaks)
        self._breaks = 0
        self._append(text)
        self._at_line_start = text.endswith("\n")

    def _append(self, text: str) -> None:
        room = self._limit - self._size
        if len(text) > room:
            self.truncated = True
            text = text[:room]
        if text:
            self._out.append(text)
            self._size += len(text)

    def _break(self, lines: int) -> None:
        self._breaks = max(self._breaks, lines)
        self._at_line_start = True

    def _close_link(self) -> None:
        if self._link is not None:
            href, start = self._link
            self._link = None
            self._end_link(href, start)

    def _end_link(self, href: str, start: int) -> None:
        if not href or href.lower().startswith(_LINK_SCHEMES_HIDDEN):
            return
        label = _SPACES.sub(" ", "".join(self._out[start:])).strip()
        shown = href[len("mailto:") :] if href.lower().startswith("mailto:") else href
        if not label:
            self._text(href)
        elif label not in (href, shown):
            self._text(f" ({href})")


def html_to_text(markup: str) -> str:
    """A plain-text rendering of an HTML body, for the text/plain alternative.

    The text is cut, and says so in a last line "[...]", beyond 1 Mi
    characters or twice the length of ``markup``, whichever is more. Text
    made from a real page is shorter than the page, its tags being dropped;
    only markup built to blow up (thousands of <hr>, list items with
    list markers) comes near, and the cap keeps what one copy of a message
    costs in proportion to the message. The floor leaves small pages,
    whatever they hold, whole.
    """
    reader = _HtmlReader(limit=max(_TEXT_FLOOR, _TEXT_FACTOR * len(markup)))
    reader.feed(markup)
    reader.close()
    return reader.text()


# An http(s) URL in running text; trailing punctuation is taken off afterwards.
_URL: Final = re.compile(r"https?://[^\s<>\"]+", re.IGNORECASE)
_URL_TRAILER: Final = ".,;:!?)]}'"


def text_to_html(text: str) -> str:
    """An HTML page showing ``text``: escaped, blank-line paragraphs, line breaks, live links.

    URLs become links so that click tracking, which works on HTML anchors, can
    see them.
    """
    normal = text.replace("\r\n", "\n").replace("\r", "\n").strip("\n")
    paragraphs = [p for p in re.split(r"\n[ \t]*\n", normal) if p.strip()]
    body = "\n".join(
        "<p>" + "<br>\n".join(_linked(line) for line in paragraph.split("\n")) + "</p>"
        for paragraph in paragraphs
    )
    return (
        '<!DOCTYPE html>\n<html>\n<head>\n<meta charset="utf-8">\n</head>\n'
        f"<body>\n{body}\n</body>\n</html>\n"
    )


def _linked(line: str) -> str:
    pieces: list[str] = []
    position = 0
    for found in _URL.finditer(line):
        url = found.group(0).rstrip(_URL_TRAILER)
        pieces.append(html.escape(line[position : found.start()]))
        shown = html.escape(url)
        pieces.append(f'<a href="{shown}">{shown}</a>')
        position = found.start() + len(url)
    pieces.append(html.escape(line[position:]))
    return "".join(pieces)
