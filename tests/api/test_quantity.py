from __future__ import annotations

from decimal import Decimal

import pytest
from hypothesis import given
from hypothesis import strategies as st

from virtfleet.api.quantity import (
    Quantity,
    QuantityError,
    parse_duration,
    parse_quantity,
)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2Gi", 2 * 2**30),
        ("512Mi", 512 * 2**20),
        ("1.5G", 1_500_000_000),
        ("1e9", 10**9),
        ("1E3", 1000),
        ("100", 100),
        ("128974848", 128974848),
        ("129e6", 129_000_000),
        ("123Mi", 123 * 2**20),
        ("0.5Ki", 512),
        (".5Ki", 512),
        ("1k", 1000),
        ("1500m", Decimal("1.5")),
        ("+1Gi", 2**30),
    ],
)
def test_parses_like_kubernetes(text: str, expected: int | Decimal) -> None:
    assert parse_quantity(text) == expected


@pytest.mark.parametrize("text", ["2GB", "Gi", "", "1.2.3", "one", "2 Gi", "1e", "1Kb", "--1"])
def test_refuses_what_kubernetes_refuses(text: str) -> None:
    with pytest.raises(QuantityError, match="not a quantity"):
        parse_quantity(text)


def test_bytes_round_up_fractions() -> None:
    assert Quantity("1500m").bytes == 2
    assert Quantity("1.5Ki").bytes == 1536


def test_mebibytes_round_up() -> None:
    assert Quantity("1Mi").mebibytes == 1
    assert Quantity("1049000").mebibytes == 2


def test_integers_are_quantities_and_text_is_kept() -> None:
    q = Quantity(1024)
    assert q.bytes == 1024
    assert str(q) == "1024"
    assert Quantity("1Ki") == q


@given(st.integers(min_value=0, max_value=2**40), st.sampled_from(["", "Ki", "Mi", "Gi"]))
def test_binary_suffixes_are_exact(number: int, suffix: str) -> None:
    factor = {"": 1, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30}[suffix]
    assert Quantity(f"{number}{suffix}").bytes == number * factor


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("90s", 90), ("5m", 300), ("1h30m", 5400), ("250ms", 0.25), ("1.5h", 5400)],
)
def test_durations(text: str, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["5", "5 minutes", "m", "-1s", ""])
def test_bad_durations(text: str) -> None:
    with pytest.raises(ValueError, match="not a duration"):
        parse_duration(text)
