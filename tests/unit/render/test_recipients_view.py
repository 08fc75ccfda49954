"""Each copy's To, Cc and Bcc: OMICard X-ListOption keep-To (1) and keep-Cc (2), Bcc never."""

from __future__ import annotations

import email.policy
from email.headerregistry import Address
from email.message import EmailMessage
from email.parser import BytesParser

import pytest

from postlane.errors import InvalidInput
from postlane.render.recipients_view import view_for, without_bcc

BODY = b"Line one\r\nLine two\r\n"


def message(*headers: tuple[str, str], body: bytes = BODY) -> bytes:
    """A message with exactly these header lines, in order, and ``body``."""
    lines = b"".join(f"{name}: {value}\r\n".encode() for name, value in headers)
    return lines + b"\r\n" + body


def headers_of(data: bytes) -> EmailMessage:
    parsed = BytesParser(policy=email.policy.default).parsebytes(data)
    assert isinstance(parsed, EmailMessage)
    return parsed


def addresses(data: bytes, name: str) -> list[tuple[str, str]]:
    header = headers_of(data)[name]
    return [(a.display_name, a.addr_spec) for a in header.addresses]


def header_names(data: bytes) -> list[str]:
    return [name for name, _ in headers_of(data).items()]


MANY = message(
    ("From", "shop@example.com"),
    ("To", '"Ann" <ann@example.org>, bob@example.net'),
    ("Cc", "Carol <carol@example.org>"),
    ("Subject", "Offer"),
    ("Bcc", "Dave <dave@example.com>"),
)


def test_single_recipient_already_in_to_is_returned_as_is() -> None:
    data = message(("From", "a@example.com"), ("To", "Ann <ann@example.org>"), ("Subject", "Hi"))
    assert view_for(data, "ann@example.org", keep_to=False, keep_cc=False) is data


def test_fast_path_compares_addresses_ignoring_case() -> None:
    data = message(("From", "a@example.com"), ("To", "ANN@Example.org"))
    assert view_for(data, "ann@example.org", keep_to=False, keep_cc=False) is data


def test_keep_to_and_keep_cc_without_bcc_is_returned_as_is() -> None:
    data = message(
        ("From", "a@example.com"), ("To", "x@example.org, y@example.org"), ("Cc", "z@e.org")
    )
    assert view_for(data, "y@example.org", keep_to=True, keep_cc=True) is data


def test_to_shows_only_the_recipient_with_the_display_name_given() -> None:
    view = view_for(MANY, "ann@example.org", keep_to=False, keep_cc=False)
    assert addresses(view, "To") == [("Ann", "ann@example.org")]
    assert view.endswith(b"\r\n\r\n" + BODY)


def test_recipient_without_display_name_gets_a_bare_address() -> None:
    view = view_for(MANY, "bob@example.net", keep_to=False, keep_cc=False)
    assert b"\r\nTo: bob@example.net\r\n" in view


def test_new_to_takes_the_place_of_the_old_one_and_other_fields_stay_byte_for_byte() -> None:
    view = view_for(MANY, "bob@example.net", keep_to=False, keep_cc=False)
    assert view == message(
        ("From", "shop@example.com"),
        ("To", "bob@example.net"),
        ("Subject", "Offer"),
    )


def test_cc_is_removed_unless_kept() -> None:
    dropped = view_for(MANY, "ann@example.org", keep_to=False, keep_cc=False)
    kept = view_for(MANY, "ann@example.org", keep_to=False, keep_cc=True)
    assert "Cc" not in header_names(dropped)
    assert addresses(kept, "Cc") == [("Carol", "carol@example.org")]


def test_keep_to_leaves_the_original_to() -> None:
    view = view_for(MANY, "bob@example.net", keep_to=True, keep_cc=False)
    assert addresses(view, "To") == [("Ann", "ann@example.org"), ("", "bob@example.net")]
    assert "Cc" not in header_names(view)


@pytest.mark.parametrize(("keep_to", "keep_cc"), [(False, False), (True, False), (True, True)])
def test_bcc_is_always_removed(keep_to: bool, keep_cc: bool) -> None:
    view = view_for(MANY, "dave@example.com", keep_to=keep_to, keep_cc=keep_cc)
    assert "Bcc" not in header_names(view)
    if keep_to:  # the original To does not name dave, so nothing may
        assert b"dave@" not in view


@pytest.mark.parametrize(("keep_to", "keep_cc"), [(False, False), (True, True)])
def test_resent_bcc_is_always_removed(keep_to: bool, keep_cc: bool) -> None:
    data = message(
        ("From", "a@example.com"),
        ("To", "ann@example.org"),
        ("Resent-Bcc", "hidden@example.net"),
        ("Subject", "S"),
    )
    view = view_for(data, "ann@example.org", keep_to=keep_to, keep_cc=keep_cc)
    assert view == message(("From", "a@example.com"), ("To", "ann@example.org"), ("Subject", "S"))


def test_folded_bcc_is_removed_with_its_continuation_lines() -> None:
    data = message(
        ("From", "a@example.com"),
        ("To", "ann@example.org"),
        ("Bcc", "one@example.net,\r\n two@example.net,\r\n\tthree@example.net"),
        ("Subject", "S"),
    )
    view = view_for(data, "ann@example.org", keep_to=True, keep_cc=True)
    assert view == message(("From", "a@example.com"), ("To", "ann@example.org"), ("Subject", "S"))


def test_without_bcc_removes_bcc_and_resent_bcc_and_nothing_else() -> None:
    data = message(
        ("From", "a@example.com"),
        ("BCC", "one@example.net,\r\n two@example.net"),
        ("To", "ann@example.org, bob@example.org"),
        ("Cc", "carol@example.org"),
        ("Resent-Bcc", "three@example.net"),
        ("Subject", "S"),
    )
    assert without_bcc(data) == message(
        ("From", "a@example.com"),
        ("To", "ann@example.org, bob@example.org"),
        ("Cc", "carol@example.org"),
        ("Subject", "S"),
    )


def test_without_bcc_returns_a_message_without_any_as_is() -> None:
    data = message(("From", "a@example.com"), ("To", "ann@example.org"), ("Cc", "c@example.org"))
    assert without_bcc(data) is data


def test_without_bcc_as_the_last_field_without_line_break() -> None:
    assert without_bcc(b"From: a@example.com\r\nBcc: b@example.org") == b"From: a@example.com\r\n"


def test_bcc_recipient_sees_itself_in_to_with_its_name() -> None:
    view = view_for(MANY, "dave@example.com", keep_to=False, keep_cc=False)
    assert addresses(view, "To") == [("Dave", "dave@example.com")]
    assert b"ann@" not in view and b"carol@" not in view


def test_cc_recipient_gets_its_cc_display_name_in_to() -> None:
    view = view_for(MANY, "carol@example.org", keep_to=False, keep_cc=True)
    assert addresses(view, "To") == [("Carol", "carol@example.org")]
    assert addresses(view, "Cc") == [("Carol", "carol@example.org")]


def test_non_ascii_display_name_is_rfc2047_encoded() -> None:
    data = EmailMessage(policy=email.policy.SMTP)
    data["From"] = "shop@example.com"
    data["To"] = [Address("Zoë Ünal", addr_spec="zoe@example.org"), Address("", "x", "e.org")]
    data.set_content("hi")
    view = view_for(data.as_bytes(), "zoe@example.org", keep_to=False, keep_cc=False)
    assert view.isascii()
    assert b"=?utf-8?" in view
    assert addresses(view, "To") == [("Zoë Ünal", "zoe@example.org")]


def test_folded_to_is_removed_with_its_continuation_lines() -> None:
    data = message(
        ("From", "a@example.com"),
        ("To", "one@example.org,\r\n two@example.org,\r\n\tthree@example.org"),
        ("Subject", "S"),
    )
    view = view_for(data, "two@example.org", keep_to=False, keep_cc=False)
    assert view == message(("From", "a@example.com"), ("To", "two@example.org"), ("Subject", "S"))


def test_several_to_fields_become_one() -> None:
    data = message(("To", "one@example.org"), ("From", "a@example.com"), ("To", "two@example.org"))
    view = view_for(data, "two@example.org", keep_to=False, keep_cc=False)
    assert view == message(("To", "two@example.org"), ("From", "a@example.com"))


def test_missing_to_is_added_at_the_end_of_the_header_section() -> None:
    data = message(("From", "a@example.com"), ("Bcc", "b@example.org"), ("Subject", "S"))
    view = view_for(data, "b@example.org", keep_to=False, keep_cc=False)
    assert view == message(("From", "a@example.com"), ("Subject", "S"), ("To", "b@example.org"))


def test_missing_to_added_after_a_last_field_without_line_break() -> None:
    data = b"From: a@example.com\r\nBcc: b@example.org"
    view = view_for(data, "b@example.org", keep_to=False, keep_cc=False)
    assert view == b"From: a@example.com\r\nTo: b@example.org\r\n"


def test_group_syntax_to_is_replaced() -> None:
    data = message(("From", "a@example.com"), ("To", "undisclosed-recipients:;"))
    view = view_for(data, "b@example.org", keep_to=False, keep_cc=False)
    assert addresses(view, "To") == [("", "b@example.org")]


def test_international_address_is_written_in_utf8() -> None:
    data = message(("From", "a@example.com"), ("To", "x@example.org, y@example.org"))
    view = view_for(data, "zoë@example.org", keep_to=False, keep_cc=False)
    assert "To: zoë@example.org\r\n".encode() in view


def test_body_is_never_parsed_or_changed() -> None:
    body = b"--not-really-mime\r\nContent-Type: text/html\r\n\r\n\xff\xfe raw bytes\r\n"
    data = message(("From", "a@example.com"), ("To", "x@example.org, y@example.org"), body=body)
    assert view_for(data, "y@example.org", keep_to=False, keep_cc=False).endswith(
        b"\r\n\r\n" + body
    )


def test_malformed_header_section_is_invalid_input() -> None:
    with pytest.raises(InvalidInput, match="malformed"):
        view_for(b"not a header\r\n\r\nbody", "a@example.org", keep_to=False, keep_cc=False)
