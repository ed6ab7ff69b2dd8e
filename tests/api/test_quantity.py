from __future__ import annotations

from decimal import Decimal

import pytest
from hypothesis import given
from hypothesis import strategies as st

from virtfleet.api.quantity import (
    Quantity,
    QuantityError,
    format_bytes,
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


# --- hostile quantities and durations (security issue, item 1 and 7) -------------------


@pytest.mark.parametrize(
    "text", ["1e100000000", "1e999999999", "1e5000", "1e100", "1" * 21, "0." + "1" * 21]
)
def test_too_many_digits_are_refused_with_a_readable_message(text: str) -> None:
    with pytest.raises(QuantityError, match="too many digits"):
        Quantity(text)


def test_the_largest_bounded_quantity_is_exact() -> None:
    assert Quantity("99999999999999999999.99999999999999999999Ei").bytes > 10**38
    assert Quantity("1e99").bytes == 10**99
    assert Quantity("1e-99").bytes == 1


@pytest.mark.parametrize("text", [" 128Mi\n", "128Mi\n", " 128Mi", "128Mi "])
def test_whitespace_is_refused_like_the_apiserver_does(text: str) -> None:
    with pytest.raises(QuantityError, match="not a quantity"):
        Quantity(text)


@pytest.mark.parametrize("text", ["5m\n", " 5m", "999999999999h", "9999999s", "1h" * 17])
def test_hostile_durations_are_refused(text: str) -> None:
    with pytest.raises(ValueError, match="duration"):
        parse_duration(text)


def test_the_longest_duration_fits_a_timedelta_from_now() -> None:
    from datetime import UTC, datetime, timedelta

    longest = "999999h" * 4  # 28 characters, within the 32 allowed
    assert datetime.now(UTC) + timedelta(seconds=parse_duration(longest)) > datetime.now(UTC)


@given(st.text(max_size=64))
def test_any_text_is_a_quantity_or_a_quantity_error(text: str) -> None:
    try:
        quantity = Quantity(text)
    except QuantityError:
        return
    assert abs(quantity.value) < Decimal(10) ** 120
    assert isinstance(quantity.bytes, int)


@given(st.from_regex(r"[+-]?[0-9]{1,30}(\.[0-9]{0,30})?([eE][+-]?[0-9]{1,12})?", fullmatch=True))
def test_any_number_shaped_text_is_a_quantity_or_a_quantity_error(text: str) -> None:
    refusal: QuantityError | None = None
    try:
        Quantity(text)
    except QuantityError as exc:
        refusal = exc
    assert refusal is None or "quantity" in str(refusal)


@pytest.mark.parametrize(
    ("count", "text"),
    [(0, "0"), (900, "900"), (1024, "1Ki"), (1536, "1.5Ki"), (512 * 2**20, "512Mi"),
     (int(19.3 * 2**30), "19.3Gi"), (24 * 2**30, "24Gi"), (2**70, "1024Ei")],
)  # fmt: skip
def test_bytes_for_people_are_quantities(count: int, text: str) -> None:
    assert format_bytes(count) == text
    # What people read is a quantity Kubernetes accepts, within rounding of the bytes.
    assert abs(parse_quantity(text) - count) <= max(count, 1) * 0.05
