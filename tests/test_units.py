"""Durations: parsing operator input and printing Go's format."""

import pytest

from healthmesh import format_duration, parse_duration


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("30s", 30.0), ("250ms", 0.25), ("1m30s", 90.0), ("1.5s", 1.5), ("1h", 3600.0),
     ("500us", 0.0005)],
)
def test_parse_duration(text: str, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("bad", ["", "30", "s", "30sec", "-1s", "1s2", "ten seconds"])
def test_bad_durations_are_rejected(bad: str) -> None:
    with pytest.raises(ValueError, match="invalid duration"):
        parse_duration(bad)


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(30, "30s"), (0.25, "250ms"), (3723, "1h2m3s"), (90, "1m30s"), (0.000412, "412µs"),
     (0, "0s")],
)
def test_format_duration_matches_go(seconds: float, text: str) -> None:
    assert format_duration(seconds) == text
