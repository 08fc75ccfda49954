"""Traffic shaping: rules parsing, destination keys, connection limits, the token bucket and
the adaptive rate, all with a fake clock."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from postlane.config import Settings
from postlane.delivery.shaping import (
    MIN_RATE,
    THROTTLE_COOLDOWN,
    Rules,
    Shaper,
    load_rules,
    parse_rules,
)
from postlane.errors import InvalidInput

RULES = """
[default]
max_connections = 2
messages_per_connection = 10
messages_per_minute = 60

[[rule]]
name = "gmail"
mx = ["*.google.com", "*.googlemail.com"]
max_connections = 3
messages_per_connection = 100
messages_per_minute = 120

[[rule]]
name = "exact"
mx = ["MX.Exact.Example."]
messages_per_minute = 6
"""


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def shaper(text: str = RULES) -> tuple[Shaper, Clock]:
    clock = Clock()
    return Shaper(parse_rules(text), clock=clock), clock


# -- rules -----------------------------------------------------------------------------------------


def test_parses_default_and_rules_and_inherits_missing_limits() -> None:
    rules = parse_rules(RULES)
    assert rules.default.max_connections == 2
    assert [rule.name for rule in rules.rules] == ["gmail", "exact"]
    gmail = rules.rules[0]
    assert gmail.mx == ("*.google.com", "*.googlemail.com")
    assert gmail.messages_per_minute == 120.0
    exact = rules.rules[1]
    assert exact.mx == ("mx.exact.example",)  # lowercased, trailing dot dropped
    assert exact.max_connections == 2 and exact.messages_per_connection == 10  # the default's
    assert exact.messages_per_minute == 6.0


def test_shipped_rules_load_and_cover_the_big_providers() -> None:
    rules = load_rules()
    assert {rule.name for rule in rules.rules} >= {"gmail", "outlook", "yahoo"}
    shaper = Shaper(rules)
    assert shaper.destination("example.com", ["alt1.aspmx.l.google.com"]) == "gmail"
    assert shaper.destination("x.com", ["x-com.mail.protection.outlook.com"]) == "outlook"
    assert shaper.destination("yahoo.com", ["mta5.am0.yahoodns.net"]) == "yahoo"
    assert shaper.destination("Small.Example", ["mx.small.example"]) == "small.example"


def test_rules_file_from_settings(tmp_path: Path) -> None:
    path = tmp_path / "rules.toml"
    path.write_text(RULES)
    settings = Settings(hostname="h.example", delivery={"shaping_rules": path})
    assert settings.delivery.shaping_rules == path
    assert load_rules(path).rules[0].name == "gmail"
    broken = tmp_path / "broken.toml"
    broken.write_text("[default]\nmax_connections = 0\n")
    with pytest.raises(ValueError, match="max_connections"):
        Settings(hostname="h.example", delivery={"shaping_rules": broken})
    with pytest.raises(InvalidInput, match="cannot read"):
        load_rules(tmp_path / "missing.toml")


_DEFAULT = "[default]\nmax_connections = 1\nmessages_per_connection = 1\nmessages_per_minute = 1\n"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("not toml [", "not valid TOML"),
        ("[[rule]]\nname = 'a'\nmx = ['x.example']\n", "a \\[default\\] table is required"),
        ("[default]\nmax_connections = 1\nmessages_per_minute = 1\n", "messages_per_connection"),
        (_DEFAULT.replace("max_connections = 1", "max_connections = 0"), "max_connections"),
        (_DEFAULT.replace("max_connections = 1", "max_connections = true"), "max_connections"),
        (_DEFAULT.replace("minute = 1", "minute = 0.5"), "messages_per_minute"),
        (_DEFAULT.replace("minute = 1", "minute = nan"), "messages_per_minute"),
        (_DEFAULT.replace("minute = 1", "minute = inf"), "finite"),
        (_DEFAULT + "burst = 3\n", "\\[default\\]: unknown key.*burst"),
        (_DEFAULT + "[other]\n", "unknown top-level"),
        (_DEFAULT + "[[rule]]\nmx = ['a.example']\n", "rule #1: 'name' is required"),
        (_DEFAULT + "[[rule]]\nname = 'g.mail'\nmx = ['a.example']\n", "rule 'g.mail'.*dot"),
        (_DEFAULT + "[[rule]]\nname = 'g'\n", "rule 'g': 'mx'"),
        (_DEFAULT + "[[rule]]\nname = 'g'\nmx = []\n", "rule 'g': 'mx'"),
        (_DEFAULT + "[[rule]]\nname = 'g'\nmx = [3]\n", "rule 'g': 'mx' entry 3"),
        (_DEFAULT + "[[rule]]\nname = 'g'\nmx = ['a.*.example']\n", "rule 'g': 'mx' entry"),
        (_DEFAULT + "[[rule]]\nname = 'g'\nmx = ['*.']\n", "rule 'g': 'mx' entry"),
        (
            _DEFAULT + "[[rule]]\nname = 'g'\nmx = ['a.example']\nmessages_per_minute = 'x'\n",
            "rule 'g': 'messages_per_minute'",
        ),
        (
            _DEFAULT + "[[rule]]\nname = 'g'\nmx = ['a.example']\nmax_conections = 2\n",
            "rule 'g': unknown key.*max_conections",
        ),
        (
            _DEFAULT + "[[rule]]\nname = 'g'\nmx = ['a.example']\n" * 2,
            "rule 'g': 'name' is used twice",
        ),
        ("rule = 3\n" + _DEFAULT, "array of tables"),
    ],
)
def test_invalid_rules_name_the_rule_and_key(text: str, message: str) -> None:
    with pytest.raises(InvalidInput, match=message):
        parse_rules(text, source="rules.toml")


# -- destinations ---------------------------------------------------------------------------------


def test_destination_is_the_provider_when_an_mx_host_matches() -> None:
    s, _ = shaper()
    assert s.destination("customer.example", ["ASPMX.L.GOOGLE.COM."]) == "gmail"
    assert s.destination("other.example", ["mx.other.example", "alt.googlemail.com"]) == "gmail"
    assert s.destination("x.example", ["mx.exact.example"]) == "exact"
    assert s.destination("x.example", ["sub.mx.exact.example"]) == "x.example"  # exact: only it
    assert s.destination("x.example", ["google.com"]) == "x.example"  # *.google.com: below only
    assert s.destination("X.Example.", ["mx.x.example"]) == "x.example"
    assert s.messages_per_connection("gmail") == 100
    assert s.messages_per_connection("x.example") == 10  # a domain gets the default


# -- connections ----------------------------------------------------------------------------------


def test_connection_limit_is_per_destination_and_first_come_first_served() -> None:
    s, _ = shaper()
    order: list[str] = []

    async def scenario() -> None:
        await s.acquire_connection("x.example")
        await s.acquire_connection("x.example")
        await s.acquire_connection("y.example")  # another destination is not held up
        assert s.open_connections("x.example") == 2

        async def third(name: str) -> None:
            async with s.connection("x.example"):
                order.append(name)

        waiting = [asyncio.create_task(third("a")), asyncio.create_task(third("b"))]
        await asyncio.sleep(0)
        assert order == [] and s.open_connections("x.example") == 2
        s.release_connection("x.example")
        await asyncio.gather(*waiting)
        assert order == ["a", "b"]
        assert s.open_connections("x.example") == 1
        s.release_connection("x.example")
        assert s.open_connections("x.example") == 0

    asyncio.run(scenario())
    with pytest.raises(RuntimeError):
        s.release_connection("x.example")


def test_cancelled_waiter_holds_no_connection() -> None:
    s, _ = shaper()

    async def scenario() -> None:
        await s.acquire_connection("x.example")
        await s.acquire_connection("x.example")
        waiter = asyncio.create_task(s.acquire_connection("x.example"))
        await asyncio.sleep(0)
        waiter.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiter
        s.release_connection("x.example")
        assert s.open_connections("x.example") == 1
        await asyncio.wait_for(s.acquire_connection("x.example"), 1)  # the place is free
        assert s.open_connections("x.example") == 2

    asyncio.run(scenario())


# -- the token bucket -----------------------------------------------------------------------------


def test_bucket_grants_a_ten_second_burst_then_refills_at_the_rate() -> None:
    s, clock = shaper()
    # gmail: 120/min = 2/s, bucket holds 10 s worth = 20.
    assert s.take("gmail", 25) == 20
    assert s.take("gmail", 1) == 0
    assert s.next_slot("gmail") == pytest.approx(0.5)
    assert s.next_slot("gmail", 3) == pytest.approx(2.0)  # the fourth slot from now
    clock.advance(1.0)
    assert s.next_slot("gmail") == 0.0
    assert s.take("gmail", 5) == 2
    clock.advance(3600)
    assert s.take("gmail", 100) == 20  # never more than the burst, however long idle


def test_slow_destination_bucket_holds_at_least_one_message() -> None:
    s, clock = shaper()
    assert s.take("exact", 3) == 1  # 6/min: 10 s worth is one message
    assert s.next_slot("exact") == pytest.approx(10.0)
    clock.advance(9.0)
    assert s.take("exact", 1) == 0
    assert s.next_slot("exact") == pytest.approx(1.0)
    clock.advance(1.0)
    assert s.take("exact", 1) == 1
    assert s.take("x.example", 0) == 0


# -- slow-down and recovery -----------------------------------------------------------------------


def test_throttled_halves_the_rate_once_per_cooldown_and_empties_the_bucket() -> None:
    s, clock = shaper()
    s.throttled("gmail")
    assert s.current_rate("gmail") == 60.0
    assert s.take("gmail", 1) == 0
    assert s.next_slot("gmail") == pytest.approx(1.0)  # one message at 60/min
    s.throttled("gmail")  # the same event, reported by another reply
    assert s.current_rate("gmail") == 60.0
    clock.advance(THROTTLE_COOLDOWN)
    s.throttled("gmail")
    assert s.current_rate("gmail") == 30.0
    for _ in range(20):
        clock.advance(THROTTLE_COOLDOWN)
        s.throttled("gmail")
    assert s.current_rate("gmail") == MIN_RATE
    assert s.current_rate("x.example") == 60.0  # others are not affected


def test_succeeded_recovers_ten_percent_of_the_configured_rate_per_minute() -> None:
    s, clock = shaper()
    s.throttled("gmail")  # 120 -> 60
    s.succeeded("gmail")
    assert s.current_rate("gmail") == 60.0  # not a full minute yet
    clock.advance(59)
    s.succeeded("gmail")
    assert s.current_rate("gmail") == 60.0
    clock.advance(1)
    s.succeeded("gmail")
    assert s.current_rate("gmail") == pytest.approx(72.0)
    clock.advance(30)
    s.succeeded("gmail")
    assert s.current_rate("gmail") == pytest.approx(72.0)  # half a minute does not count yet
    clock.advance(30 + 120)
    s.succeeded("gmail")
    assert s.current_rate("gmail") == pytest.approx(108.0)  # three minutes in all: +3 x 12
    clock.advance(3600)
    s.succeeded("gmail")
    assert s.current_rate("gmail") == 120.0  # never above the configured rate
    s.succeeded("never.seen")  # nothing to recover


def test_idle_destinations_are_forgotten(monkeypatch: pytest.MonkeyPatch) -> None:
    import postlane.delivery.shaping as shaping

    monkeypatch.setattr(shaping, "_MAX_TRACKED", 3)
    s = Shaper(Rules(parse_rules(RULES).default), clock=Clock())
    s.take("busy.example", 1)
    for name in ("a.example", "b.example", "c.example", "d.example"):
        s.next_slot(name)
    assert "busy.example" in s._states  # its bucket is not full: remembered
    assert len(s._states) <= 4
