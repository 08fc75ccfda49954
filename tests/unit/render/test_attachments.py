"""Attachment policy: zip all attachments (optionally AES-encrypted), unzip attached zips, off."""

from __future__ import annotations

import email.policy
import io
import zipfile
from email.message import EmailMessage
from email.parser import BytesParser

import pytest
import pyzipper

from postlane.errors import InvalidInput
from postlane.render import attachments
from postlane.render.attachments import apply_attachment_policy

PNG = b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4
PDF = b"%PDF-1.4\n" + bytes(range(256)) * 8
CSV = "名前,金額\nAnn,12\n".encode()
REPORT_NAME = "報告 résumé.pdf"


def parse(data: bytes) -> EmailMessage:
    parsed = BytesParser(policy=email.policy.default).parsebytes(data)
    assert isinstance(parsed, EmailMessage)
    return parsed


def structure(part: EmailMessage, depth: int = 0) -> list[str]:
    lines = ["  " * depth + part.get_content_type()]
    if part.get_content_maintype() == "multipart":
        for child in part.iter_parts():
            assert isinstance(child, EmailMessage)
            lines.extend(structure(child, depth + 1))
    return lines


def newsletter() -> EmailMessage:
    """mixed[alternative[text, related[html, inline png]], pdf, csv]."""
    message = EmailMessage(policy=email.policy.SMTP)
    message["From"] = "shop@example.com"
    message["To"] = "ann@example.org"
    message["Subject"] = "Ihr Bericht"
    message["Date"] = "Tue, 05 Mar 2024 14:30:15 +0800"
    message.set_content("Grüße, see attached.\n", cte="quoted-printable")
    message.add_alternative('<p>Grüße <img src="cid:logo"></p>\n', subtype="html")
    html = message.get_body(preferencelist=("html",))
    assert html is not None
    html.add_related(PNG, "image", "png", cid="<logo>", filename="logo.png")
    message.add_attachment(PDF, maintype="application", subtype="pdf", filename=REPORT_NAME)
    message.add_attachment(CSV, maintype="text", subtype="csv", filename="data.csv")
    return message


def zip_bytes(*files: tuple[str, bytes], password: bytes | None = None) -> bytes:
    buffer = io.BytesIO()
    with pyzipper.AESZipFile(buffer, "w", compression=pyzipper.ZIP_DEFLATED) as archive:
        if password is not None:
            archive.setpassword(password)
            archive.setencryption(pyzipper.WZ_AES, nbits=256)
        for name, content in files:
            archive.writestr(name, content)
    return buffer.getvalue()


def with_zip(archive: bytes, filename: str = "bundle.zip") -> EmailMessage:
    message = EmailMessage(policy=email.policy.SMTP)
    message["From"] = "shop@example.com"
    message["To"] = "ann@example.org"
    message["Subject"] = "Files"
    message.set_content("Files attached.\n")
    message.add_attachment(archive, maintype="application", subtype="zip", filename=filename)
    return message


def attached(data: bytes) -> list[EmailMessage]:
    found = []
    for part in parse(data).iter_attachments():
        assert isinstance(part, EmailMessage)
        found.append(part)
    return found


def content_of(part: EmailMessage) -> bytes:
    data = part.get_payload(decode=True)
    assert isinstance(data, bytes)
    return data


# off and fast paths ---------------------------------------------------------------


@pytest.mark.parametrize("policy", ["off", "zip", "unzip"])
def test_single_part_message_is_returned_as_is(policy: str) -> None:
    data = b"From: a@example.com\r\nSubject: s\r\n\r\nplain body\r\n"
    assert apply_attachment_policy(data, policy, archive_name="a.zip", password=None) is data


def test_off_returns_the_message_itself() -> None:
    data = newsletter().as_bytes()
    assert apply_attachment_policy(data, "off", archive_name="x", password="pw") is data


@pytest.mark.parametrize("policy", ["zip", "unzip"])
def test_no_attachments_returns_the_message_itself(policy: str) -> None:
    message = newsletter()
    message.set_payload([next(message.iter_parts())])  # keep only the body
    data = message.as_bytes()
    assert apply_attachment_policy(data, policy, archive_name="a.zip", password=None) is data


def test_unknown_policy_is_invalid_input() -> None:
    with pytest.raises(InvalidInput, match="expected one of off, zip, unzip"):
        apply_attachment_policy(b"x", "compress", archive_name="a.zip", password=None)


# zip ---------------------------------------------------------------------------


def test_zip_replaces_all_attachments_with_one_archive_and_leaves_the_body() -> None:
    source = newsletter()
    result = apply_attachment_policy(
        source.as_bytes(), "zip", archive_name="Unterlagen.zip", password=None
    )
    assert structure(parse(result)) == [
        "multipart/mixed",
        "  multipart/alternative",
        "    text/plain",
        "    multipart/related",
        "      text/html",
        "      image/png",
        "  application/zip",
    ]
    (archive_part,) = attached(result)
    assert archive_part.get_filename() == "Unterlagen.zip"
    assert archive_part.get_content_disposition() == "attachment"
    with zipfile.ZipFile(io.BytesIO(content_of(archive_part))) as archive:
        assert archive.namelist() == [REPORT_NAME, "data.csv"]
        assert archive.read(REPORT_NAME) == PDF
        assert archive.read("data.csv") == CSV
        assert archive.getinfo("data.csv").date_time == (2024, 3, 5, 14, 30, 14)
    original_body = next(source.iter_parts()).as_bytes(policy=email.policy.SMTP)
    assert original_body in result  # body and inline image byte for byte


def test_zip_with_password_is_aes_256_and_opens_with_the_password() -> None:
    result = apply_attachment_policy(
        newsletter().as_bytes(), "zip", archive_name="secure", password="s3cret pässword"
    )
    (archive_part,) = attached(result)
    assert archive_part.get_filename() == "secure.zip"
    content = content_of(archive_part)
    with pyzipper.AESZipFile(io.BytesIO(content)) as archive:
        info = archive.getinfo(REPORT_NAME)
        assert info.flag_bits & 0x1  # encrypted
        assert info.wz_aes_vendor_id == b"AE"  # WinZip AES ...
        assert info.wz_aes_strength == 3  # ... with a 256-bit key
        with pytest.raises(RuntimeError, match="requires a password"):
            archive.read(REPORT_NAME)
        archive.setpassword("s3cret pässword".encode())
        assert archive.read(REPORT_NAME) == PDF
        assert archive.read("data.csv") == CSV
    with pyzipper.AESZipFile(io.BytesIO(content)) as archive:
        archive.setpassword(b"wrong")
        with pytest.raises(RuntimeError, match="Bad password"):
            archive.read("data.csv")


def test_empty_password_means_no_encryption() -> None:
    result = apply_attachment_policy(
        newsletter().as_bytes(), "zip", archive_name="a.zip", password=""
    )
    with zipfile.ZipFile(io.BytesIO(content_of(attached(result)[0]))) as archive:
        assert archive.read("data.csv") == CSV


def test_non_ascii_archive_name_is_written_with_rfc2231() -> None:
    result = apply_attachment_policy(
        newsletter().as_bytes(), "zip", archive_name="附件 Übersicht.zip", password=None
    )
    zip_headers = result.split(b"Content-Type: application/zip")[1].split(b"\r\n\r\n")[0]
    assert zip_headers.isascii()
    assert b"filename*=utf-8''%E9%99%84%E4%BB%B6%20%C3%9Cbersicht.zip" in zip_headers
    assert attached(result)[0].get_filename() == "附件 Übersicht.zip"


@pytest.mark.parametrize(
    ("configured", "written"),
    [
        ("", "attachments.zip"),
        ("  ", "attachments.zip"),
        ("../../etc/x", "x.zip"),
        ("A.ZIP", "A.ZIP"),
    ],
)
def test_archive_name_is_cleaned(configured: str, written: str) -> None:
    result = apply_attachment_policy(
        newsletter().as_bytes(), "zip", archive_name=configured, password=None
    )
    assert attached(result)[0].get_filename() == written


def test_zip_member_names_are_unique_and_safe() -> None:
    message = with_zip(b"one", filename="..\\..\\evil/notes.txt")
    message.add_attachment(
        b"two", maintype="application", subtype="octet-stream", filename="NOTES.txt"
    )
    message.add_attachment(b"three", maintype="application", subtype="pdf")
    result = apply_attachment_policy(message.as_bytes(), "zip", archive_name="a", password=None)
    with zipfile.ZipFile(io.BytesIO(content_of(attached(result)[0]))) as archive:
        assert archive.namelist() == ["notes.txt", "NOTES (2).txt", "attachment-3.pdf"]
        assert archive.read("NOTES (2).txt") == b"two"


def test_attachment_without_disposition_but_with_a_name_is_zipped_inline_image_is_not() -> None:
    raw = (
        b"From: a@example.com\r\nMIME-Version: 1.0\r\n"
        b'Content-Type: multipart/mixed; boundary="m"\r\n\r\n'
        b'--m\r\nContent-Type: multipart/related; boundary="r"\r\n\r\n'
        b'--r\r\nContent-Type: text/html\r\n\r\n<img src="cid:i1">\r\n'
        b'--r\r\nContent-Type: image/gif; name="i.gif"\r\nContent-ID: <i1>\r\n'
        b"Content-Transfer-Encoding: base64\r\n\r\nR0lGODlh\r\n--r--\r\n"
        b'--m\r\nContent-Type: application/pdf; name="plan.pdf"\r\n'
        b"Content-Transfer-Encoding: base64\r\n\r\nJVBERg==\r\n"
        b'--m\r\nContent-Type: text/plain; name="readme.txt"\r\n\r\nbody-ish text\r\n'
        b"--m--\r\n"
    )
    result = apply_attachment_policy(raw, "zip", archive_name="a.zip", password=None)
    assert b"R0lGODlh" in result
    assert b"body-ish text" in result
    zipped = [p for p in parse(result).walk() if p.get_content_type() == "application/zip"]
    assert len(zipped) == 1
    with zipfile.ZipFile(io.BytesIO(content_of(zipped[0]))) as archive:
        assert archive.namelist() == ["plan.pdf"]
        assert archive.read("plan.pdf") == b"%PDF"


def test_attached_message_is_zipped_as_eml() -> None:
    inner = EmailMessage(policy=email.policy.SMTP)
    inner["Subject"] = "forwarded"
    inner.set_content("inner body\n")
    message = EmailMessage(policy=email.policy.SMTP)
    message["From"] = "a@example.com"
    message.set_content("see the forwarded message\n")
    message.add_attachment(inner)
    result = apply_attachment_policy(message.as_bytes(), "zip", archive_name="a", password=None)
    with zipfile.ZipFile(io.BytesIO(content_of(attached(result)[0]))) as archive:
        (name,) = archive.namelist()
        assert name == "attachment-1.eml"
        assert b"Subject: forwarded" in archive.read(name)


def test_attachments_in_a_nested_multipart_leave_no_empty_multipart() -> None:
    raw = (
        b"From: a@example.com\r\nMIME-Version: 1.0\r\n"
        b'Content-Type: multipart/mixed; boundary="m"\r\n\r\n'
        b"--m\r\nContent-Type: text/plain\r\n\r\nbody\r\n"
        b"--m\r\nContent-Type: application/pdf\r\n"
        b'Content-Disposition: attachment; filename="a.pdf"\r\n\r\nA\r\n'
        b'--m\r\nContent-Type: multipart/mixed; boundary="n"\r\n\r\n'
        b"--n\r\nContent-Type: application/pdf\r\n"
        b'Content-Disposition: attachment; filename="b.pdf"\r\n\r\nB\r\n'
        b"--n--\r\n--m--\r\n"
    )
    result = apply_attachment_policy(raw, "zip", archive_name="a", password=None)
    assert structure(parse(result)) == ["multipart/mixed", "  text/plain", "  application/zip"]


# unzip --------------------------------------------------------------------------


def test_unzip_replaces_the_zip_with_its_files() -> None:
    archive = zip_bytes(("docs/報告.pdf", PDF), ("data.csv", CSV), ("docs/", b""))
    result = apply_attachment_policy(
        with_zip(archive).as_bytes(), "unzip", archive_name="", password=None
    )
    assert structure(parse(result)) == [
        "multipart/mixed",
        "  text/plain",
        "  application/pdf",
        "  text/csv",
    ]
    pdf, csv = attached(result)
    assert pdf.get_filename() == "報告.pdf" and content_of(pdf) == PDF
    assert csv.get_filename() == "data.csv" and content_of(csv) == CSV
    assert pdf.get_content_disposition() == "attachment"
    assert b"filename*=utf-8''%E5%A0%B1%E5%91%8A.pdf" in result


def test_unzipped_office_files_get_their_content_types() -> None:
    archive = zip_bytes(("plan.docx", b"PK docx"), ("budget.xlsx", b"PK xlsx"), ("raw", b"?"))
    result = apply_attachment_policy(
        with_zip(archive).as_bytes(), "unzip", archive_name="", password=None
    )
    assert [p.get_content_type() for p in attached(result)] == [
        "application/vnd.openxmlformats-officedocument.wordprocessingml.document",
        "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet",
        "application/octet-stream",
    ]


def test_unzip_reads_utf8_names_written_without_the_utf8_flag() -> None:
    # zipfile flags every non-ASCII name it writes, so write an ASCII name of
    # the same length and put the UTF-8 bytes in its place, as old tools do.
    utf8 = "Grüße.txt".encode()
    placeholder = b"Gr1234e.txt"
    assert len(placeholder) == len(utf8)
    archive = zip_bytes((placeholder.decode(), b"content")).replace(placeholder, utf8)
    result = apply_attachment_policy(
        with_zip(archive).as_bytes(), "unzip", archive_name="", password=None
    )
    assert [part.get_filename() for part in attached(result)] == ["Grüße.txt"]


def test_unzip_recognises_a_zip_by_name_even_as_octet_stream() -> None:
    message = EmailMessage(policy=email.policy.SMTP)
    message["From"] = "a@example.com"
    message.set_content("x\n")
    archive = zip_bytes(("a.txt", b"A"), ("b.txt", b"B"))
    message.add_attachment(
        archive, maintype="application", subtype="octet-stream", filename="X.ZIP"
    )
    result = apply_attachment_policy(message.as_bytes(), "unzip", archive_name="", password=None)
    assert [p.get_filename() for p in attached(result)] == ["a.txt", "b.txt"]


def test_other_attachments_stay_when_unzipping() -> None:
    message = with_zip(zip_bytes(("a.txt", b"A")))
    message.add_attachment(PDF, maintype="application", subtype="pdf", filename="keep.pdf")
    result = apply_attachment_policy(message.as_bytes(), "unzip", archive_name="", password=None)
    assert [p.get_filename() for p in attached(result)] == ["a.txt", "keep.pdf"]


@pytest.mark.parametrize(
    "archive",
    [
        pytest.param(zip_bytes(("a.txt", b"secret"), password=b"pw"), id="encrypted"),
        pytest.param(b"PK\x03\x04 this is not really a zip", id="corrupt"),
        pytest.param(zip_bytes(), id="empty"),
        pytest.param(zip_bytes(("only-a-folder/", b"")), id="folders only"),
        pytest.param(
            zip_bytes(*((f"f{n}.txt", b"x") for n in range(101))), id="more than 100 files"
        ),
    ],
)
def test_zips_that_cannot_be_unpacked_safely_stay_as_they_are(archive: bytes) -> None:
    data = with_zip(archive).as_bytes()
    assert apply_attachment_policy(data, "unzip", archive_name="", password=None) is data


def test_zip_bigger_than_the_cap_unpacked_stays(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(attachments, "MAX_UNZIPPED_BYTES", 1000)
    fits = with_zip(zip_bytes(("a.bin", b"0" * 600), ("b.bin", b"0" * 400))).as_bytes()
    bomb = with_zip(zip_bytes(("a.bin", b"0" * 600), ("b.bin", b"0" * 401))).as_bytes()
    assert apply_attachment_policy(fits, "unzip", archive_name="", password=None) is not fits
    assert apply_attachment_policy(bomb, "unzip", archive_name="", password=None) is bomb


def test_zip_lying_about_its_size_is_left_as_it_is(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(attachments, "MAX_UNZIPPED_BYTES", 1000)
    archive = zip_bytes(("a.bin", b"0" * 5000))
    # Claim 10 bytes in both the local and the central header; the data inflates to 5000.
    honest = (5000).to_bytes(4, "little")
    lying = archive.replace(honest, (10).to_bytes(4, "little"))
    assert lying != archive
    data = with_zip(lying).as_bytes()
    assert apply_attachment_policy(data, "unzip", archive_name="", password=None) is data


# unzip: one budget per copy ---------------------------------------------------------


def with_zips(*archives: bytes) -> EmailMessage:
    message = with_zip(archives[0], "z0.zip")
    for number, archive in enumerate(archives[1:], start=1):
        message.add_attachment(
            archive, maintype="application", subtype="zip", filename=f"z{number}.zip"
        )
    return message


def unzip(data: bytes) -> bytes:
    return apply_attachment_policy(data, "unzip", archive_name="", password=None)


def test_unpacked_bytes_are_bounded_per_copy_and_later_archives_stay(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(attachments, "MAX_UNZIPPED_BYTES", 1000)
    archives = [zip_bytes((f"f{n}.bin", bytes([n]) * 400)) for n in range(5)]
    parts = attached(unzip(with_zips(*archives).as_bytes()))
    unpacked = [part for part in parts if part.get_content_type() != "application/zip"]
    assert [part.get_filename() for part in unpacked] == ["f0.bin", "f1.bin"]
    assert sum(len(content_of(part)) for part in unpacked) <= 1000
    kept = [part for part in parts if part.get_content_type() == "application/zip"]
    assert [part.get_filename() for part in kept] == ["z2.zip", "z3.zip", "z4.zip"]
    assert [content_of(part) for part in kept] == archives[2:]


def test_unpacked_files_are_bounded_per_copy(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(attachments, "MAX_UNZIPPED_FILES", 5)
    archives = [zip_bytes((f"a{n}.txt", b"a"), (f"b{n}.txt", b"b")) for n in range(4)]
    parts = attached(unzip(with_zips(*archives).as_bytes()))
    assert [part.get_filename() for part in parts] == [
        "a0.txt",
        "b0.txt",
        "a1.txt",
        "b1.txt",
        "z2.zip",
        "z3.zip",
    ]
    assert [content_of(part) for part in parts[4:]] == archives[2:]


def test_unpacked_bytes_are_bounded_by_the_message_size(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(attachments, "UNZIP_RATIO_FLOOR", 1000)
    padding = with_zip(zip_bytes(("pad.bin", b"\0" * 200_000))).as_bytes()
    assert len(padding) * attachments.MAX_UNZIP_RATIO < 200_000
    assert unzip(padding) is padding
    text = with_zip(zip_bytes(("notes.txt", b"meeting notes\n" * 100))).as_bytes()
    assert [part.get_filename() for part in attached(unzip(text))] == ["notes.txt"]


def test_an_archive_that_fails_still_spends_the_budget(monkeypatch: pytest.MonkeyPatch) -> None:
    """Else many archives lying about their size would each decompress a full budget."""
    monkeypatch.setattr(attachments, "MAX_UNZIPPED_BYTES", 1000)
    archive = zip_bytes(("a.bin", b"0" * 5000))
    lying = archive.replace((5000).to_bytes(4, "little"), (900).to_bytes(4, "little"))
    assert lying != archive
    data = with_zips(lying, zip_bytes(("b.bin", b"1" * 200))).as_bytes()
    assert unzip(data) is data


def empty_named(archive: bytes, name: bytes, *, local_header_too: bool) -> bytes:
    """``archive`` with ``name`` starting with NUL, which zipfile reads as an empty name."""
    blank = b"\0" + name[1:]
    if local_header_too:
        return archive.replace(name, blank)
    at = archive.rindex(name)  # the central directory's copy comes last
    return archive[:at] + blank + archive[at + len(name) :]


def test_member_with_an_empty_name_in_a_corrupt_zip_leaves_it_attached() -> None:
    corrupt = empty_named(
        zip_bytes(("a.txt", b"hello"), ("b.txt", b"world")), b"a.txt", local_header_too=False
    )
    data = with_zip(corrupt).as_bytes()
    assert unzip(data) is data


def test_member_with_an_empty_name_is_unpacked_under_a_default_name() -> None:
    archive = empty_named(zip_bytes(("a.txt", b"hello")), b"a.txt", local_header_too=True)
    parts = attached(unzip(with_zip(archive).as_bytes()))
    assert [(part.get_filename(), content_of(part)) for part in parts] == [("file.bin", b"hello")]


def test_unexpected_error_reading_a_zip_leaves_it_attached(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def broken(entry: object) -> bool:
        raise LookupError("a zipfile quirk")

    monkeypatch.setattr(attachments, "_is_folder", broken)
    data = with_zip(zip_bytes(("a.txt", b"hello"))).as_bytes()
    assert unzip(data) is data


def test_memory_error_reading_a_zip_is_not_swallowed(monkeypatch: pytest.MonkeyPatch) -> None:
    def exhausted(entry: object) -> bool:
        raise MemoryError

    monkeypatch.setattr(attachments, "_is_folder", exhausted)
    with pytest.raises(MemoryError):
        unzip(with_zip(zip_bytes(("a.txt", b"hello"))).as_bytes())
