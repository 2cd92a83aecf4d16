"""parse_duration / format_duration: the duration syntax of topology files."""

from __future__ import annotations

import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from controlplane.topology.durations import format_duration, parse_duration

CONFIG_EXAMPLES = ["1s", "500ms", "1m30s", "0.25s"]


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("1s", 1.0),
        ("500ms", 0.5),
        ("1m30s", 90.0),
        ("0.25s", 0.25),
        ("0s", 0.0),
        ("2h", 7200.0),
        ("100us", 0.0001),
        ("1h2m3s", 3723.0),
        ("1s500ms", 1.5),
        ("  3s\n", 3.0),
    ],
)
def test_parse_duration(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(1.0, "1s"), (0.5, "500ms"), (90.0, "90s"), (0.25, "250ms"), (1.5, "1500ms"), (0.0, "0s"), (3, "3s")],
)
def test_format_duration(seconds: float, text: str) -> None:
    assert format_duration(seconds) == text


@pytest.mark.parametrize("text", CONFIG_EXAMPLES)
def test_config_examples_round_trip(text: str) -> None:
    seconds = parse_duration(text)
    assert parse_duration(format_duration(seconds)) == seconds


@pytest.mark.parametrize(
    ("one", "other"),
    [("9ms", "0.009s"), ("1500ms", "1.5s"), ("1m30s", "90s"), ("10us", "0.00001s"), ("1h", "60m")],
)
def test_equivalent_spellings_parse_to_the_same_float(one: str, other: str) -> None:
    assert parse_duration(one) == parse_duration(other)


@pytest.mark.parametrize("seconds", [1e-05, 1e-07, 0.009, 1.2345678, 1234567.891, 1e20])
def test_format_duration_never_uses_an_exponent(seconds: float) -> None:
    text = format_duration(seconds)
    assert re.fullmatch(r"\d+(\.\d+)?(ms|s)", text), text
    assert parse_duration(text) == seconds


@given(st.floats(min_value=0, max_value=1e12, allow_nan=False, allow_infinity=False))
def test_any_duration_round_trips(seconds: float) -> None:
    text = format_duration(seconds)
    assert re.fullmatch(r"\d+(\.\d+)?(ms|s)", text), text
    assert parse_duration(text) == seconds


@given(st.integers(min_value=0, max_value=10**9), st.sampled_from([("us", 10**6), ("ms", 10**3)]))
def test_integer_sub_second_units_are_exact(count: int, unit: tuple[str, int]) -> None:
    suffix, per_second = unit
    assert parse_duration(f"{count}{suffix}") == count / per_second


@pytest.mark.parametrize(
    "junk",
    ["", "   ", "1", "s", "1 s", "1sec", "1S", "-1s", "+1s", "1.s", ".5s", "1e3s", "1s junk", "ms1", "1s-", "abc"],
)
def test_junk_is_a_value_error(junk: str) -> None:
    with pytest.raises(ValueError, match="duration"):
        parse_duration(junk)


def test_error_quotes_the_text() -> None:
    with pytest.raises(ValueError, match=re.escape("'5 minutes'")):
        parse_duration("5 minutes")
