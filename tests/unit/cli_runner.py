"""Running the postlane command in-process, for the CLI tests."""

from __future__ import annotations

from collections.abc import Callable

Run = Callable[..., tuple[int, str, str]]


def ok(result: tuple[int, str, str]) -> str:
    """The output of a command that must succeed."""
    code, out, err = result
    assert code == 0, err
    return out


def fails(result: tuple[int, str, str], message: str) -> None:
    """A command that must fail with exactly one line naming the problem, exit 1."""
    code, out, err = result
    assert code == 1, (code, out, err)
    assert message in err
    assert "Traceback" not in err + out
    assert len(err.strip().splitlines()) == 1, err
