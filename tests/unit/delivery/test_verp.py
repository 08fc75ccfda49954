from __future__ import annotations

import hmac
import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from postlane.delivery import verp
from postlane.errors import InvalidInput

KEY = b"k" * 32
OTHER_KEY = b"o" * 32
DOMAIN = "bounce.example.com"
MAX_ID = 2**64 - 1


def local_part(address: str) -> str:
    return address.rpartition("@")[0]


@pytest.mark.parametrize("recipient_id", [0, 1, 31, 32, 12345, 2**31, 2**63 - 1, MAX_ID])
def test_round_trip(recipient_id: int) -> None:
    address = verp.encode(recipient_id, key=KEY, domain=DOMAIN)
    assert verp.decode(address, key=KEY) == recipient_id


@given(st.integers(min_value=0, max_value=MAX_ID))
def test_every_id_round_trips_in_a_short_lower_case_address(recipient_id: int) -> None:
    address = verp.encode(recipient_id, key=KEY, domain=DOMAIN)
    assert re.fullmatch(r"b-[a-z2-7]+-[a-z2-7]{16}@bounce\.example\.com", address)
    assert len(local_part(address)) <= 32 < 64
    assert verp.decode(address, key=KEY) == recipient_id


def test_the_form_of_an_address() -> None:
    address = verp.encode(33, key=KEY, domain=DOMAIN)
    assert address.startswith("b-bb-")  # 33 = 1*32 + 1 in base 32 ("a" is 0)
    assert address.endswith("@bounce.example.com")
    assert verp.encode(33, key=KEY, domain=DOMAIN) == address  # deterministic


def test_the_domain_is_normalised() -> None:
    address = verp.encode(7, key=KEY, domain="Bounce.Example.COM.")
    assert address.endswith("@bounce.example.com")


def test_a_bad_domain_is_refused() -> None:
    with pytest.raises(InvalidInput, match="invalid domain"):
        verp.encode(7, key=KEY, domain="not a domain")


@pytest.mark.parametrize("recipient_id", [-1, MAX_ID + 1])
def test_ids_outside_64_bits_are_refused(recipient_id: int) -> None:
    with pytest.raises(ValueError, match="outside 0 to 2"):
        verp.encode(recipient_id, key=KEY, domain=DOMAIN)


def test_short_keys_are_refused() -> None:
    with pytest.raises(ValueError, match="at least 16 bytes"):
        verp.encode(1, key=b"short", domain=DOMAIN)
    with pytest.raises(ValueError, match="at least 16 bytes"):
        verp.decode("b-b-aaaaaaaaaaaaaaaa@x.example", key=b"")


def test_case_folded_by_a_remote_mta() -> None:
    address = verp.encode(987654321, key=KEY, domain=DOMAIN)
    assert verp.decode(address.upper(), key=KEY) == 987654321


def test_angle_brackets_and_spaces_are_accepted() -> None:
    address = verp.encode(42, key=KEY, domain=DOMAIN)
    assert verp.decode(f" <{address}> ", key=KEY) == 42


def test_any_domain_is_accepted() -> None:
    address = verp.encode(42, key=KEY, domain=DOMAIN)
    assert verp.decode(local_part(address) + "@other-bounce.example.net", key=KEY) == 42


def test_another_key_does_not_decode() -> None:
    address = verp.encode(42, key=KEY, domain=DOMAIN)
    assert verp.decode(address, key=OTHER_KEY) is None
    assert verp.encode(42, key=OTHER_KEY, domain=DOMAIN) != address


def test_a_changed_id_with_the_old_tag_is_refused() -> None:
    address = verp.encode(42, key=KEY, domain=DOMAIN)
    _, id_text, tag = local_part(address).split("-")
    forged = f"b-{'b' + id_text}-{tag}@{DOMAIN}"
    assert verp.decode(forged, key=KEY) is None


def test_a_changed_tag_is_refused() -> None:
    address = verp.encode(42, key=KEY, domain=DOMAIN)
    local = local_part(address)
    flipped = local[:-1] + ("a" if local[-1] != "a" else "b")
    assert verp.decode(f"{flipped}@{DOMAIN}", key=KEY) is None


def test_leading_zero_digits_are_not_another_spelling() -> None:
    address = verp.encode(42, key=KEY, domain=DOMAIN)
    _, id_text, tag = local_part(address).split("-")
    assert verp.decode(f"b-a{id_text}-{tag}@{DOMAIN}", key=KEY) is None


def test_ids_beyond_64_bits_are_refused_even_with_a_valid_tag() -> None:
    # 13 base-32 digits hold 65 bits: "q" (16) first is 2**64, one past the range.
    id_text = "q" + "a" * 12
    address = f"b-{id_text}-{verp._tag(id_text, KEY)}@{DOMAIN}"
    assert verp.decode(address, key=KEY) is None
    below = "p" + "7" * 12  # 2**64 - 1, the largest id
    assert verp.decode(f"b-{below}-{verp._tag(below, KEY)}@{DOMAIN}", key=KEY) == MAX_ID


@pytest.mark.parametrize(
    "address",
    [
        "",
        "alice@example.com",
        "b-ab-cd@bounce.example.com",
        "b-b-aaaaaaaaaaaaaaaa",  # no domain
        "b-b-aaaaaaaaaaaaaaaa@",
        "c-b-aaaaaaaaaaaaaaaa@bounce.example.com",
        "b-b-aaaaaaaaaaaaaaa1@bounce.example.com",  # 1 is not base 32
        "b-b-aaaaaaaaaaaaaaaaa@bounce.example.com",  # tag too long
        "b-" + "b" * 14 + "-aaaaaaaaaaaaaaaa@bounce.example.com",  # id too long
        "b-b-aaaaaaaaaaaaaaaa+tag@bounce.example.com",
        "b-\u212a-aaaaaaaaaaaaaaaa@bounce.example.com",  # KELVIN SIGN folds to "k"
        "postmaster",
    ],
)
def test_addresses_that_are_not_ours(address: str) -> None:
    assert verp.decode(address, key=KEY) is None


def test_tags_are_compared_in_constant_time(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[str, str]] = []
    compare_digest = hmac.compare_digest

    def spy(a: str, b: str) -> bool:
        calls.append((a, b))
        return compare_digest(a, b)

    monkeypatch.setattr(verp.hmac, "compare_digest", spy)
    address = verp.encode(42, key=KEY, domain=DOMAIN)
    assert verp.decode(address, key=KEY) == 42
    assert len(calls) == 1


@pytest.mark.parametrize(
    ("recipient_id", "address"),
    [
        (0, "b-a-rajn2bey7lertdbx@bounce.example.com"),
        (31, "b-7-fmhpiookrvbv35vq@bounce.example.com"),
        (12345, "b-mbz-4el5e6lynekwbegx@bounce.example.com"),
        (2**64 - 1, "b-p777777777777-ydi4z3px5zigg6qa@bounce.example.com"),
    ],
)
def test_return_paths_already_sent_stay_valid(recipient_id: int, address: str) -> None:
    """Known answers: bounces to copies sent by earlier versions must still decode."""
    key = b"k" * 32
    assert verp.encode(recipient_id, key=key, domain="bounce.example.com") == address
    assert verp.decode(address, key=key) == recipient_id
