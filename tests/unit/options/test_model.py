"""SendOptions: defaults, immutability, validation of partials, layering, JSON round trip."""

from __future__ import annotations

import dataclasses
import json
from datetime import UTC, datetime, timedelta, timezone
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given
from hypothesis import strategies as st

from postlane.errors import InvalidInput
from postlane.options import SendOptions, validate_partial

TAIPEI = ZoneInfo("Asia/Taipei")


def test_defaults_ask_for_nothing() -> None:
    options = SendOptions()
    assert options.tags == ()
    assert options.scheduled_at is None
    assert options.priority is None
    assert options.track_opens is None
    assert options.track_clicks is None
    assert options.test_mode is False
    assert options.keep_to is False
    assert dict(options.variables) == {}
    assert dict(options.raw_masks) == {}
    assert options.unhandled == ()


def test_is_frozen_deeply() -> None:
    source: dict[str, Any] = {"plan": {"items": [1, 2]}}
    options = SendOptions(variables=source, recipient_variables={"a@x.example": {"n": 1}})
    with pytest.raises(dataclasses.FrozenInstanceError):
        options.job_name = "x"  # type: ignore[misc]
    with pytest.raises(TypeError):
        options.variables["plan"] = 1  # type: ignore[index]
    with pytest.raises(TypeError):
        options.variables["plan"]["items"] = []
    with pytest.raises(TypeError):
        options.recipient_variables["a@x.example"]["n"] = 2  # type: ignore[index]
    assert options.variables["plan"]["items"] == (1, 2)
    source["plan"]["items"].append(3)
    assert options.variables["plan"]["items"] == (1, 2)


def test_equality_compares_values() -> None:
    assert SendOptions(variables={"a": [1]}) == SendOptions(variables={"a": (1,)})
    assert SendOptions(tags=("a",)) != SendOptions(tags=("b",))


def test_times_are_normalised_to_utc() -> None:
    options = SendOptions(scheduled_at=datetime(2024, 5, 1, 9, 0, tzinfo=TAIPEI))
    assert options.scheduled_at == datetime(2024, 5, 1, 1, 0, tzinfo=UTC)
    assert options.scheduled_at.tzinfo is UTC


def test_naive_time_is_refused() -> None:
    with pytest.raises(InvalidInput, match="scheduled_at"):
        SendOptions(scheduled_at=datetime(2024, 5, 1, 9, 0))


def test_duplicate_tags_are_dropped_keeping_order() -> None:
    assert SendOptions(tags=("b", "a", "b")).tags == ("b", "a")


def test_to_json_is_json_safe() -> None:
    options = SendOptions(
        scheduled_at=datetime(2024, 5, 1, 1, 0, tzinfo=UTC),
        tags=("a",),
        variables={"x": [1, {"y": None}]},
        raw_masks={"X-LinkOption": 64},
    )
    data = options.to_json()
    assert json.loads(json.dumps(data)) == data
    assert data["scheduled_at"] == "2024-05-01T01:00:00+00:00"
    assert data["tags"] == ["a"]
    assert data["variables"] == {"x": [1, {"y": None}]}
    assert data["raw_masks"] == {"X-LinkOption": 64}
    assert set(data) == {f.name for f in dataclasses.fields(SendOptions)}


def test_from_json_fills_defaults_and_refuses_unknown_keys() -> None:
    assert SendOptions.from_json({}) == SendOptions()
    assert SendOptions.from_json({"priority": 2}) == SendOptions(priority=2)
    with pytest.raises(InvalidInput, match="colour: not a send option"):
        SendOptions.from_json({"colour": "red"})


_json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(), inner, max_size=3),
    max_leaves=8,
)
_json_objects = st.dictionaries(st.text(), _json_values, max_size=3)
_times = st.none() | st.datetimes(
    min_value=datetime(1970, 1, 1), max_value=datetime(2200, 1, 1), timezones=st.timezones()
)
_optional_text = st.none() | st.text()
_optional_bool = st.none() | st.booleans()

_options = st.builds(
    SendOptions,
    job_name=_optional_text,
    ref_number=_optional_text,
    tags=st.lists(st.text(), max_size=3).map(tuple),
    scheduled_at=_times,
    expires_at=_times,
    priority=st.none() | st.integers(1, 5),
    track_opens=_optional_bool,
    track_clicks=_optional_bool,
    track_mailto_links=_optional_bool,
    test_mode=st.booleans(),
    require_tls=st.booleans(),
    recipient_variables=st.dictionaries(st.emails(), _json_objects, max_size=2),
    variables=_json_objects,
    template=_optional_text,
    template_variables=_json_objects,
    callback_url=st.none() | st.just("https://hooks.example.com/postlane?x=1"),
    callback_format=st.none() | st.sampled_from(["native", "mailgun", "bloomreach"]),
    keep_to=st.booleans(),
    archive_copy=st.booleans(),
    read_receipt=st.booleans(),
    launch_type=_optional_text,
    raw_masks=st.dictionaries(st.text(), st.integers(0, 2**32 - 1), max_size=3),
    unhandled=st.lists(st.text(), max_size=3).map(tuple),
)


@given(_options)
def test_json_round_trip_is_exact(options: SendOptions) -> None:
    wire = json.dumps(options.to_json())
    assert SendOptions.from_json(json.loads(wire)) == options


def test_validate_partial_normalises_to_json_data() -> None:
    clean = validate_partial(
        {
            "scheduled_at": "2024-05-01T09:00:00+08:00",
            "expires_at": datetime(2024, 5, 2, tzinfo=UTC),
            "tags": ("a", "b", "a"),
            "variables": {"k": (1, 2)},
            "track_opens": None,
        }
    )
    assert clean == {
        "scheduled_at": "2024-05-01T01:00:00+00:00",
        "expires_at": "2024-05-02T00:00:00+00:00",
        "tags": ["a", "b"],
        "variables": {"k": [1, 2]},
        "track_opens": None,
    }
    assert json.loads(json.dumps(clean)) == clean


def test_validated_partial_layers_like_the_original() -> None:
    partial = {
        "scheduled_at": datetime(2024, 5, 1, 9, tzinfo=TAIPEI),
        "recipient_variables": {"a@x.example": {"n": [1]}},
        "raw_masks": {"X-JobOption": 8},
    }
    assert SendOptions().layer(validate_partial(partial)) == SendOptions().layer(partial)


def test_validate_partial_keeps_only_given_keys() -> None:
    assert validate_partial({}) == {}
    assert validate_partial({"keep_cc": True}) == {"keep_cc": True}


@pytest.mark.parametrize("partial", [[], "x", None, 3])
def test_validate_partial_needs_an_object(partial: object) -> None:
    with pytest.raises(InvalidInput, match="must be an object"):
        validate_partial(partial)


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("job_name", 5),
        ("tags", "a"),
        ("tags", ["a", 1]),
        ("scheduled_at", 1714525200),
        ("scheduled_at", "tomorrow"),
        ("scheduled_at", "2024-05-01T09:00:00"),
        ("scheduled_at", "2024-05-01"),
        ("priority", 0),
        ("priority", 6),
        ("priority", True),
        ("priority", "1"),
        ("track_opens", "yes"),
        ("track_clicks", 1),
        ("test_mode", None),
        ("keep_to", "true"),
        ("recipient_variables", {"a@x.example": [1]}),
        ("recipient_variables", []),
        ("recipient_variables", {"ann": {}}),
        ("variables", [1]),
        ("variables", {"x": float("nan")}),
        ("variables", {"x": {1, 2}}),
        ("variables", {1: "x"}),
        ("template_variables", "{}"),
        ("callback_url", "ftp://example.com/"),
        ("callback_url", "/relative"),
        ("callback_format", "xml"),
        ("callback_format", "Mailgun"),
        ("raw_masks", {"X-JobOption": -1}),
        ("raw_masks", {"X-JobOption": 2**32}),
        ("raw_masks", {"X-JobOption": "8"}),
        ("raw_masks", [8]),
        ("unhandled", [None]),
    ],
)
def test_validate_partial_names_the_bad_key(key: str, value: object) -> None:
    with pytest.raises(InvalidInput, match=f"^{key}: "):
        validate_partial({key: value})


def test_validate_partial_refuses_deep_nesting() -> None:
    deep: Any = 1
    for _ in range(40):
        deep = [deep]
    with pytest.raises(InvalidInput, match="variables: nested deeper than 32 levels"):
        validate_partial({"variables": {"x": deep}})


def test_validate_partial_message_says_expected_and_got() -> None:
    with pytest.raises(InvalidInput, match=r"^keep_to: expected true or false, got string$"):
        validate_partial({"keep_to": "true"})


def test_layer_later_wins() -> None:
    base = SendOptions(job_name="account", priority=4, track_opens=True)
    layered = base.layer({"job_name": "user", "track_opens": None})
    assert layered.job_name == "user"
    assert layered.priority == 4
    assert layered.track_opens is None
    assert base.job_name == "account"


def test_layer_accumulates_tags_and_unhandled_and_merges_masks() -> None:
    base = SendOptions(
        tags=("a", "b"), unhandled=("one",), raw_masks={"X-JobOption": 8, "X-LinkOption": 64}
    )
    layered = base.layer(
        {"tags": ["b", "c"], "unhandled": ["one", "two"], "raw_masks": {"X-LinkOption": 128}}
    )
    assert layered.tags == ("a", "b", "c")
    assert layered.unhandled == ("one", "two")
    assert dict(layered.raw_masks) == {"X-JobOption": 8, "X-LinkOption": 128}


def test_layer_replaces_variables_rather_than_merging() -> None:
    layered = SendOptions(variables={"a": 1}).layer({"variables": {"b": 2}})
    assert dict(layered.variables) == {"b": 2}


def test_layers_account_then_user_then_headers() -> None:
    account = {"priority": 5, "track_clicks": True, "tags": ["acct"], "require_tls": True}
    user = {"priority": 3, "tags": ["user"], "callback_format": "mailgun"}
    headers = {"priority": 1, "tags": ["msg", "acct"], "track_clicks": False}
    options = SendOptions().layer(account).layer(user).layer(headers)
    assert options.priority == 1
    assert options.track_clicks is False
    assert options.require_tls is True
    assert options.callback_format == "mailgun"
    assert options.tags == ("acct", "user", "msg")


def test_layer_validates_the_partial() -> None:
    with pytest.raises(InvalidInput, match=r"^priority: "):
        SendOptions().layer({"priority": 9})
    with pytest.raises(InvalidInput, match="not a send option"):
        SendOptions().layer({"colour": "red"})


def test_layer_accepts_stored_json_times() -> None:
    layered = SendOptions().layer({"expires_at": "2024-05-01T09:00:00+08:00"})
    assert layered.expires_at == datetime(2024, 5, 1, 1, tzinfo=UTC)


def test_aware_time_in_any_zone_is_accepted() -> None:
    moment = datetime(2024, 5, 1, 12, tzinfo=timezone(timedelta(hours=-5)))
    assert SendOptions(scheduled_at=moment).scheduled_at == datetime(2024, 5, 1, 17, tzinfo=UTC)
