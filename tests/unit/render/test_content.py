"""Content job options (X-JobOption 8, 512, 2048, 262144, 268435456, 536870912)."""

from __future__ import annotations

import email.policy
from email.message import EmailMessage, MIMEPart
from email.parser import BytesParser

import pytest

from postlane.errors import InvalidInput
from postlane.options.model import SendOptions
from postlane.render.content import (
    apply_content_options,
    html_to_text,
    read_text,
    text_to_html,
    write_text,
)

PNG = b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4
PDF = b"%PDF-1.4\n" + bytes(range(256)) * 4

PAGE = """<!DOCTYPE html>
<html><head><title>  Spring
  sale </title><style>p { color: red }</style></head>
<body><h1>Spring sale</h1>
<p>Hello&nbsp;<b>friend</b>,   see
<a href="https://shop.example.com/sale?a=1&amp;b=2">our offers</a>.</p>
<script>alert("x")</script>
<ul><li>One</li><li>Two</li></ul>
<p><img src="cid:logo" alt="Logo"></p>
</body></html>
"""


def parse(data: bytes) -> EmailMessage:
    parsed = BytesParser(policy=email.policy.default).parsebytes(data)
    assert isinstance(parsed, EmailMessage)
    return parsed


def text_of(part: EmailMessage) -> str:
    content = part.get_content()
    assert isinstance(content, str)
    return content.replace("\r\n", "\n")


def structure(part: EmailMessage, depth: int = 0) -> list[str]:
    """The MIME tree as indented content types, to compare shapes."""
    lines = ["  " * depth + part.get_content_type()]
    if part.get_content_maintype() == "multipart":
        for child in part.iter_parts():
            assert isinstance(child, EmailMessage)
            lines.extend(structure(child, depth + 1))
    return lines


def html_message(html: str = PAGE, *, subject: str = "Original") -> EmailMessage:
    message = EmailMessage(policy=email.policy.SMTP)
    message["From"] = '"Shop" <shop@example.com>'
    message["To"] = "ann@example.org"
    message["Subject"] = subject
    message.set_content(html, subtype="html")
    return message


def rich_message() -> EmailMessage:
    """mixed[related[html, inline image], pdf attachment], the usual newsletter shape."""
    message = html_message()
    message.add_related(PNG, "image", "png", cid="<logo>", filename="logo.png")
    message.add_attachment(PDF, maintype="application", subtype="pdf", filename="terms.pdf")
    return message


def text_message(text: str, *, charset: str = "utf-8", cte: str | None = None) -> EmailMessage:
    message = EmailMessage(policy=email.policy.SMTP)
    message["From"] = "shop@example.com"
    message["To"] = "ann@example.org"
    message["Subject"] = "Note"
    message.set_content(text, charset=charset, cte=cte)
    return message


@pytest.mark.parametrize(
    "message", [html_message().as_bytes(), rich_message().as_bytes(), b"not even mime"]
)
def test_no_content_option_returns_the_message_itself(message: bytes) -> None:
    options = SendOptions(archive_copy=True, keep_to=True, track_opens=True)
    assert apply_content_options(message, options) is message


def test_option_with_nothing_to_act_on_returns_the_message_itself() -> None:
    data = text_message("just text\n").as_bytes()
    options = SendOptions(html_to_text=True, subject_from_html_title=True, convert_to_utf8=True)
    assert apply_content_options(data, options) is data


# html_to_text (8) ----------------------------------------------------------


def test_html_to_text_reads_like_a_plain_text_mail() -> None:
    assert html_to_text(PAGE) == (
        "Spring sale\n"
        "\n"
        "Hello\xa0friend, see our offers (https://shop.example.com/sale?a=1&b=2).\n"
        "\n"
        "- One\n"
        "- Two\n"
        "\n"
        "Logo\n"
    )


@pytest.mark.parametrize(
    ("markup", "text"),
    [
        ('<a href="https://x.example/">https://x.example/</a>', "https://x.example/\n"),
        ('<a href="mailto:ann@x.example">ann@x.example</a>', "ann@x.example\n"),
        ('<a href="mailto:ann@x.example">Mail Ann</a>', "Mail Ann (mailto:ann@x.example)\n"),
        ('<a href="#top">Top</a>', "Top\n"),
        ('<a href="https://x.example/"><img src="a.png"></a>', "https://x.example/\n"),
        ("<ol><li>a</li><li>b</li></ol>", "1. a\n2. b\n"),
        ("<ul><li>a<ul><li>b</li></ul></li><li>c</li></ul>", "- a\n  - b\n- c\n"),
        ("<p>x</p><ul><li>a</li></ul><p>y</p>", "x\n\n- a\n\ny\n"),
        ("<pre>  keep\n    this</pre>after", "  keep\n    this\n\nafter\n"),
        ("line<br>break<br/>again", "line\nbreak\nagain\n"),
        ("<table><tr><td>a</td><td>b</td></tr><tr><td>c</td><td>d</td></tr></table>", "a b\nc d\n"),
        ("<p>one</p><p></p><p></p><p>two</p>", "one\n\ntwo\n"),
        ("a<hr>b", "a\n\n----------------------------------------\n\nb\n"),
        ("<head><title>T</title><body>text", "text\n"),
        ("Fish &amp; chips &lt;3 &#169;", "Fish & chips <3 ©\n"),
        ("", ""),
    ],
)
def test_html_to_text_cases(markup: str, text: str) -> None:
    assert html_to_text(markup) == text


def test_single_part_html_becomes_alternative_with_text_first() -> None:
    source = html_message()
    result = parse(apply_content_options(source.as_bytes(), SendOptions(html_to_text=True)))
    assert structure(result) == ["multipart/alternative", "  text/plain", "  text/html"]
    plain, html = list(result.iter_parts())
    assert isinstance(plain, EmailMessage) and isinstance(html, EmailMessage)
    assert text_of(plain).startswith("Spring sale\n\nHello")
    assert plain.get_content_charset() == "utf-8"
    assert text_of(html) == PAGE
    assert result["Subject"] == "Original"
    assert result["From"].addresses[0].display_name == "Shop"
    assert result["MIME-Version"] == "1.0"


def test_text_alternative_wraps_html_with_its_inline_images_and_keeps_attachments() -> None:
    result = parse(apply_content_options(rich_message().as_bytes(), SendOptions(html_to_text=True)))
    assert structure(result) == [
        "multipart/mixed",
        "  multipart/alternative",
        "    text/plain",
        "    multipart/related",
        "      text/html",
        "      image/png",
        "  application/pdf",
    ]
    image = next(p for p in result.walk() if p.get_content_type() == "image/png")
    pdf = next(p for p in result.walk() if p.get_content_type() == "application/pdf")
    assert image.get_content() == PNG and image["Content-ID"] == "<logo>"
    assert pdf.get_content() == PDF and pdf.get_filename() == "terms.pdf"


def test_alternative_with_only_html_gets_text_inserted_first() -> None:
    message = html_message("<p>Hi</p>")
    message.make_alternative()
    assert structure(message) == ["multipart/alternative", "  text/html"]
    result = parse(apply_content_options(message.as_bytes(), SendOptions(html_to_text=True)))
    assert structure(result) == ["multipart/alternative", "  text/plain", "  text/html"]


def test_existing_text_alternative_is_kept_and_nothing_changes() -> None:
    message = text_message("Hi\n")
    message.add_alternative("<p>Hi</p>", subtype="html")
    data = message.as_bytes()
    assert apply_content_options(data, SendOptions(html_to_text=True)) is data


# text_to_html (262144) --------------------------------------------------------


def test_text_to_html_escapes_keeps_paragraphs_and_links_urls() -> None:
    page = text_to_html("Tom & <Jerry>\nsecond line\n\nSee https://x.example/a?b=1&c=2.\n")
    assert "<p>Tom &amp; &lt;Jerry&gt;<br>\nsecond line</p>" in page
    assert (
        '<p>See <a href="https://x.example/a?b=1&amp;c=2">https://x.example/a?b=1&amp;c=2</a>.</p>'
        in page
    )
    assert page.startswith("<!DOCTYPE html>") and '<meta charset="utf-8">' in page


def test_text_message_gets_an_html_alternative_after_the_text() -> None:
    data = text_message("Grüße\n\nhttps://x.example/\n", cte="quoted-printable").as_bytes()
    result = parse(apply_content_options(data, SendOptions(text_to_html=True)))
    assert structure(result) == ["multipart/alternative", "  text/plain", "  text/html"]
    plain, html = list(result.iter_parts())
    assert isinstance(plain, EmailMessage) and isinstance(html, EmailMessage)
    assert text_of(plain) == "Grüße\n\nhttps://x.example/\n"
    assert "<p>Grüße</p>" in text_of(html)
    assert html["Content-Transfer-Encoding"] == "quoted-printable"


def test_text_to_html_leaves_a_message_that_has_html() -> None:
    data = rich_message().as_bytes()
    assert apply_content_options(data, SendOptions(text_to_html=True)) is data


def test_both_directions_asked_adds_only_what_is_missing() -> None:
    options = SendOptions(html_to_text=True, text_to_html=True)
    result = parse(apply_content_options(html_message().as_bytes(), options))
    assert structure(result) == ["multipart/alternative", "  text/plain", "  text/html"]


# convert_to_utf8 (512) ---------------------------------------------------------


def test_latin1_quoted_printable_text_is_re_encoded_to_utf8() -> None:
    data = text_message("Schöne Grüße\n", charset="iso-8859-1", cte="quoted-printable").as_bytes()
    assert b"Sch=F6ne" in data
    result = parse(apply_content_options(data, SendOptions(convert_to_utf8=True)))
    assert result.get_content_charset() == "utf-8"
    assert result["Content-Transfer-Encoding"] == "quoted-printable"
    assert text_of(result) == "Schöne Grüße\n"
    assert b"Sch=C3=B6ne" in result.as_bytes()


def test_big5_base64_html_is_re_encoded_and_its_meta_charset_follows() -> None:
    page = '<html><head><meta http-equiv="Content-Type" content="text/html; charset=big5">'
    page += "</head><body><p>你好世界</p></body></html>\n"
    message = html_message(page)
    message.set_content(page, subtype="html", charset="big5", cte="base64")
    result = parse(apply_content_options(message.as_bytes(), SendOptions(convert_to_utf8=True)))
    assert result.get_content_charset() == "utf-8"
    assert result["Content-Transfer-Encoding"] == "base64"
    assert text_of(result) == page.replace("charset=big5", "charset=utf-8")


def test_attached_text_files_keep_their_charset() -> None:
    message = text_message("body\n", charset="iso-8859-1", cte="quoted-printable")
    message.add_attachment(
        "Grüße\n".encode("iso-8859-1"), maintype="text", subtype="plain", filename="a.txt"
    )
    attachment = next(message.iter_attachments())
    attachment.set_param("charset", "iso-8859-1")
    result = parse(apply_content_options(message.as_bytes(), SendOptions(convert_to_utf8=True)))
    body, attached = list(result.iter_parts())
    assert body.get_content_charset() == "utf-8"
    assert attached.get_content_charset() == "iso-8859-1"
    assert attached.get_payload(decode=True) == "Grüße\n".encode("iso-8859-1")


def test_part_in_an_unknown_charset_is_not_relabelled() -> None:
    raw = (
        b"From: a@example.com\r\nContent-Type: text/plain; charset=x-unknown\r\n"
        b"Content-Transfer-Encoding: 8bit\r\n\r\ncaf\xe9\r\n"
    )
    assert apply_content_options(raw, SendOptions(convert_to_utf8=True)) is raw


# subject_from_html_title (2048) --------------------------------------------------


def test_subject_is_taken_from_the_html_title_rfc2047_encoded() -> None:
    page = "<html><head><title>Frühlings-Aktion 春季特賣</title></head><body>x</body></html>"
    data = html_message(page).as_bytes()
    result = apply_content_options(data, SendOptions(subject_from_html_title=True))
    subject_line = next(line for line in result.split(b"\r\n") if line.startswith(b"Subject:"))
    assert subject_line.isascii() and b"=?utf-8?" in subject_line
    assert parse(result)["Subject"] == "Frühlings-Aktion 春季特賣"


def test_title_whitespace_is_collapsed_and_a_missing_subject_is_added() -> None:
    message = html_message()
    del message["Subject"]
    result = parse(
        apply_content_options(message.as_bytes(), SendOptions(subject_from_html_title=True))
    )
    assert result["Subject"] == "Spring sale"


@pytest.mark.parametrize("page", ["<p>no title</p>", "<title>   </title><p>x</p>"])
def test_no_title_keeps_the_subject(page: str) -> None:
    data = html_message(page).as_bytes()
    assert apply_content_options(data, SendOptions(subject_from_html_title=True)) is data


# receipts (268435456, 536870912) ---------------------------------------------------


def test_delivery_and_read_receipts_go_to_the_from_address() -> None:
    data = text_message("x\n").as_bytes()
    options = SendOptions(delivery_receipt=True, read_receipt=True)
    result = parse(apply_content_options(data, options))
    assert result["Return-Receipt-To"] == "shop@example.com"
    assert result["Disposition-Notification-To"] == "shop@example.com"


def test_read_receipt_only_and_display_name_kept() -> None:
    data = html_message().as_bytes()
    result = parse(apply_content_options(data, SendOptions(read_receipt=True)))
    assert result["Disposition-Notification-To"] == "Shop <shop@example.com>"
    assert result["Return-Receipt-To"] is None


def test_receipt_header_the_sender_set_is_kept() -> None:
    message = text_message("x\n")
    message["Disposition-Notification-To"] = "receipts@example.com"
    data = message.as_bytes()
    assert apply_content_options(data, SendOptions(read_receipt=True)) is data


def test_receipt_without_from_is_invalid_input() -> None:
    message = text_message("x\n")
    del message["From"]
    with pytest.raises(InvalidInput, match="From"):
        apply_content_options(message.as_bytes(), SendOptions(delivery_receipt=True))


# read_text / write_text ------------------------------------------------------------


def part(body: bytes, content_type: str, cte: str) -> MIMEPart:
    parsed = BytesParser(policy=email.policy.default).parsebytes(
        f"Content-Type: {content_type}\r\nContent-Transfer-Encoding: {cte}\r\n\r\n".encode() + body
    )
    return parsed


def test_read_text_undoes_transfer_encoding_and_charset() -> None:
    assert read_text(
        part(b"Gr=FC=DFe=\r\n!", "text/plain; charset=iso-8859-1", "quoted-printable")
    ) == ("Grüße!")
    assert read_text(part(b"5L2g5aW9\r\n", "text/plain; charset=utf-8", "base64")) == "你好"


def test_unknown_charset_is_read_and_written_back_byte_for_byte() -> None:
    original = part(b"caf\xe9 %x%\r\n", "text/plain; charset=x-unknown", "8bit")
    text = read_text(original)
    write_text(original, text.replace("%x%", "ok"))
    assert original.as_bytes(policy=email.policy.SMTP).endswith(b"\r\n\r\ncaf\xe9 ok\r\n")
    with pytest.raises(InvalidInput, match="unknown charset 'x-unknown'"):
        write_text(original, "Zoë")


def test_write_text_breaks_overlong_lines_with_quoted_printable() -> None:
    target = part(b"short\r\n", "text/plain; charset=utf-8", "8bit")
    write_text(target, "x" * 2000 + "\n")
    assert target["Content-Transfer-Encoding"] == "quoted-printable"
    assert read_text(target).replace("\r\n", "\n") == "x" * 2000 + "\n"
