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
    one_line,
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
        (  # links do not nest: the next <a> ends the open one, as in a browser
            '<a href="https://a.example/">one<a href="https://b.example/">two</a>',
            "one (https://a.example/)two (https://b.example/)\n",
        ),
        ("Fish &amp; chips &lt;3 &#169;", "Fish & chips <3 ©\n"),
        ("", ""),
    ],
)
def test_html_to_text_cases(markup: str, text: str) -> None:
    assert html_to_text(markup) == text


def test_list_indentation_stops_at_ten_levels() -> None:
    markup = "".join(f"<ul><li>{level}" for level in range(1, 13))
    assert html_to_text(markup).splitlines() == [
        *("  " * (level - 1) + f"- {level}" for level in range(1, 11)),
        " " * 18 + "- 11",
        " " * 18 + "- 12",
    ]


def test_text_of_deeply_nested_lists_grows_linearly() -> None:
    # Indented by depth, n items at depth n made n*n characters (8 MB here).
    n = 2000
    lines = html_to_text("<ul>" * n + "<li>x" * n).splitlines()
    assert lines == [" " * 18 + "- x"] * n


@pytest.mark.timeout(60)
def test_text_of_nested_unclosed_links_is_read_in_linear_time() -> None:
    # Each </a> used to re-read the text of every link still open: minutes here.
    n = 100_000
    markup = '<a href="h">' * n + "x" + "</a>" * n
    assert html_to_text(markup) == "h" * (n - 1) + "x (h)\n"


def test_text_beyond_the_limit_is_cut_and_says_so() -> None:
    # 40,000 rules of 40 dashes: 1.7 MB of text from 160 kB, over the 1 MiB floor.
    text = html_to_text("<hr>" * 40_000)
    assert text.endswith("-\n\n[...]\n")  # cut where the limit falls
    assert 1_000_000 < len(text) <= (1 << 20) + len("\n\n[...]\n")
    # Above the floor the limit is twice the page, which real text stays under.
    page = "<p>" + "word " * 300_000 + "</p>"
    assert html_to_text(page) == ("word " * 300_000).strip() + "\n"


def test_cut_text_alternative_is_a_valid_part_beside_the_whole_html() -> None:
    page = "<p>Terms</p>" + "<hr>" * 40_000
    result = parse(
        apply_content_options(html_message(page).as_bytes(), SendOptions(html_to_text=True))
    )
    plain, html = list(result.iter_parts())
    assert isinstance(plain, EmailMessage) and isinstance(html, EmailMessage)
    assert text_of(plain).startswith("Terms\n\n" + "-" * 40)
    assert text_of(plain).endswith("\n\n[...]\n")
    assert text_of(html) == page + "\n"


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


@pytest.mark.parametrize(
    ("tags", "converted"),
    [
        ('<meta charset="iso-8859-1">', '<meta charset="utf-8">'),
        ("<META CHARSET=latin1 >", "<META CHARSET=utf-8 >"),
        (
            '<meta name="x" content="a>b"><meta http-equiv=refresh content="; charset=latin1">',
            '<meta name="x" content="a>b"><meta http-equiv=refresh content="; charset=utf-8">',
        ),
        ("<meta charset=''><metadata charset=latin1><p>charset=latin1</p>", None),
        ("<meta a=1 charset=latin1 charset=latin1>", "<meta a=1 charset=utf-8 charset=latin1>"),
    ],
)
def test_meta_charset_is_relabelled_in_each_meta_tag_only(tags: str, converted: str | None) -> None:
    message = html_message(f"<html><head>{tags}</head><body>café</body></html>\n")
    message.set_content(message.get_content(), subtype="html", charset="iso-8859-1")
    result = parse(apply_content_options(message.as_bytes(), SendOptions(convert_to_utf8=True)))
    assert text_of(result) == f"<html><head>{converted or tags}</head><body>café</body></html>\n"


@pytest.mark.timeout(60)
def test_meta_charset_in_a_page_of_unclosed_meta_tags_takes_linear_time() -> None:
    # Searched with "<meta[^>]*?charset", each "<meta" re-read the rest: minutes here.
    page = "<meta " * 100_000 + '><meta charset="iso-8859-1">é\n'
    message = html_message()
    message.set_content(page, subtype="html", charset="iso-8859-1")
    result = parse(apply_content_options(message.as_bytes(), SendOptions(convert_to_utf8=True)))
    assert result.get_content_charset() == "utf-8"
    assert text_of(result) == page.replace("iso-8859-1", "utf-8")


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


@pytest.mark.parametrize("charset", ["hex", "base64", "rot13", "zlib", "undefined", "idna"])
def test_charset_naming_a_codec_for_no_body_text_is_an_unknown_charset(charset: str) -> None:
    raw = (
        f"From: a@example.com\r\nContent-Type: text/plain; charset={charset}\r\n".encode()
        + b"Content-Transfer-Encoding: 8bit\r\n\r\ncaf\xe9 %x%\r\n"
    )
    assert apply_content_options(raw, SendOptions(convert_to_utf8=True)) is raw
    target = part(b"caf\xe9 %x%\r\n", f"text/plain; charset={charset}", "8bit")
    write_text(target, read_text(target).replace("%x%", "ok"))
    assert target.as_bytes(policy=email.policy.SMTP).endswith(b"\r\n\r\ncaf\xe9 ok\r\n")
    with pytest.raises(InvalidInput, match="unknown charset"):
        write_text(target, "Zoë")


def test_text_not_valid_in_its_charset_is_invalid_input_and_not_converted() -> None:
    raw = (
        b"From: a@example.com\r\nContent-Type: text/plain; charset=utf-16-le\r\n"
        b"Content-Transfer-Encoding: base64\r\n\r\nYQBi\r\n"  # "a\0b": an odd byte count
    )
    assert apply_content_options(raw, SendOptions(convert_to_utf8=True)) is raw
    with pytest.raises(InvalidInput, match="not valid utf-16-le"):
        read_text(part(b"YQBi\r\n", "text/plain; charset=utf-16-le", "base64"))


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


@pytest.mark.parametrize(
    "separator", ["\v", "\f", "\x1c", "\x1d", "\x1e", "\x85", "\u2028", "\u2029"]
)
def test_any_line_separator_in_the_title_becomes_a_space(separator: str) -> None:
    page = f"<title>Sale{separator}now {separator} on</title><p>x</p>"
    result = parse(
        apply_content_options(
            html_message(page).as_bytes(), SendOptions(subject_from_html_title=True)
        )
    )
    assert result["Subject"] == "Sale now on"


def test_one_line_replaces_each_run_of_line_separators_by_a_space() -> None:
    separators = "\r\n\v\f\x1c\x1d\x1e\x85\u2028\u2029"
    assert len(separators.splitlines(keepends=True)) == len(separators) - 1  # CRLF is one
    assert one_line(f"a{separators}b\rc\nd\te\x00f") == "a b c d\te\x00f"
    assert one_line("no break") == "no break"


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
