"""Kubernetes quantities (``2Gi``, ``512Mi``, ``1.5G``, ``1e9``) and Go durations (``5m``).

The apiserver only checks their shape; the operator needs numbers. Parsing follows
``k8s.io/apimachinery/pkg/api/resource`` so a value means the same to kubectl and to us.
"""

from __future__ import annotations

import re
from decimal import Context, Decimal, Inexact, localcontext
from typing import Annotated, Any

from pydantic import GetCoreSchemaHandler, GetJsonSchemaHandler
from pydantic.json_schema import JsonSchemaValue
from pydantic_core import core_schema

#: Kubernetes' ``resource.Quantity`` shape with bounded digits: at most 20 digits on either
#: side of the point and an integer exponent of at most two digits. Kubernetes' own pattern
#: lets ``1e100000000`` through, and the apiserver's CEL ``quantity()`` then computes
#: 10^100000000 (minutes of CPU per field); no VM size needs more than 10^99.
QUANTITY_PATTERN = (
    r"^(\+|-)?(([0-9]{1,20}(\.[0-9]{0,20})?)|(\.[0-9]{1,20}))"
    r"(([KMGTPE]i)|[numkMGTPE]|([eE](\+|-)?[0-9]{1,2}))?$"
)
_QUANTITY_RE = re.compile(QUANTITY_PATTERN.removesuffix("$"))
#: Kubernetes' unbounded shape, only to tell "too many digits" from "not a quantity".
_KUBERNETES_QUANTITY_RE = re.compile(
    r"[+-]?([0-9]+(\.[0-9]*)?|\.[0-9]+)([KMGTPE]i|[numkMGTPE]|[eE][+-]?([0-9]+(\.[0-9]*)?|\.[0-9]+))?"
)

_BINARY = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60}
_DECIMAL = {
    "n": Decimal("1e-9"),
    "u": Decimal("1e-6"),
    "m": Decimal("1e-3"),
    "": Decimal(1),
    "k": Decimal(10**3),
    "M": Decimal(10**6),
    "G": Decimal(10**9),
    "T": Decimal(10**12),
    "P": Decimal(10**15),
    "E": Decimal(10**18),
}
_SPLIT_RE = re.compile(r"([+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+))(.*)")
#: Enough precision for 20+20 digits times 2^60 or 10^99 without rounding.
_EXACT = Context(prec=200, Emax=999, Emin=-999)


class QuantityError(ValueError):
    """A string that is not a Kubernetes quantity."""


class Quantity:
    """An exact Kubernetes quantity; keeps the user's text so nothing is rewritten."""

    __slots__ = ("text", "value")

    def __init__(self, text: str | int) -> None:
        # Not stripped: the apiserver refuses " 128Mi\n", so offline validation must too.
        self.text = str(text)
        if len(self.text) > 64:
            raise QuantityError("a quantity is at most 64 characters")
        self.value = parse_quantity(self.text)

    @property
    def bytes(self) -> int:
        """The value as whole bytes, rounded up like Kubernetes' ``Value()``."""
        integral = self.value.to_integral_value(rounding="ROUND_CEILING")
        return int(integral)

    @property
    def mebibytes(self) -> int:
        """Whole MiB, rounded up: libvirt's ``<memory unit='MiB'>`` granularity."""
        return -(-self.bytes // 2**20)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Quantity):
            return self.value == other.value
        return NotImplemented

    def __hash__(self) -> int:
        return hash(self.value)

    def __str__(self) -> str:
        return self.text

    def __repr__(self) -> str:
        return f"Quantity({self.text!r})"

    @classmethod
    def __get_pydantic_core_schema__(
        cls, source: Any, handler: GetCoreSchemaHandler
    ) -> core_schema.CoreSchema:
        def validate(raw: Any) -> Quantity:
            if isinstance(raw, Quantity):
                return raw
            if not isinstance(raw, str):
                raise QuantityError(
                    'must be a quantity string such as 512Mi, 2Gi or "1073741824" (quoted)'
                )
            return cls(raw)

        return core_schema.no_info_plain_validator_function(
            validate, serialization=core_schema.to_string_ser_schema()
        )

    @classmethod
    def __get_pydantic_json_schema__(
        cls, schema: core_schema.CoreSchema, handler: GetJsonSchemaHandler
    ) -> JsonSchemaValue:
        # A string, not Kubernetes' int-or-string: CEL's cost estimator treats int-or-string
        # as unbounded, and the size rules (with their pattern guard) would not fit the budget.
        return {"type": "string", "pattern": QUANTITY_PATTERN, "maxLength": 64}


def parse_quantity(text: str) -> Decimal:
    """Parse a Kubernetes quantity into an exact Decimal."""
    if not _QUANTITY_RE.fullmatch(text):
        if _KUBERNETES_QUANTITY_RE.fullmatch(text):
            raise QuantityError(
                f"{text[:24]!r}... has too many digits for a quantity (at most 20 before and "
                "20 after the point, and an exponent of at most 2 digits)"
            )
        raise QuantityError(f"{text!r} is not a quantity (examples: 512Mi, 2Gi, 1.5G, 1e9)")
    match = _SPLIT_RE.fullmatch(text)
    if match is None:  # pragma: no cover - the pattern above already guarantees it
        raise QuantityError(f"{text!r} is not a quantity")
    number, suffix = match.groups()
    # The pattern bounds every value to < 10^120; the context is sized for that, and any
    # arithmetic trouble (there should be none) is still a refusal, never a crash.
    try:
        with localcontext(_EXACT) as ctx:
            ctx.traps[Inexact] = True
            mantissa = Decimal(number)
            if suffix in _BINARY:
                return mantissa * _BINARY[suffix]
            if suffix in _DECIMAL:
                return mantissa * _DECIMAL[suffix]
            return mantissa.scaleb(int(suffix[1:]))  # e/E exponent form
    except ArithmeticError as exc:
        raise QuantityError(f"{text!r} is not a quantity: {exc.__class__.__name__}") from exc


#: Go ``time.ParseDuration`` syntax, as used by ``metav1.Duration`` (``90s``, ``5m``, ``1h30m``).
#: Each number has at most 6 digits before the point (999999h is 114 years), so no duration
#: that fits in 32 characters overflows a timedelta added to now (``999999999999h`` did).
DURATION_PATTERN = r"^([0-9]{1,6}(\.[0-9]{1,9})?(ns|us|µs|ms|s|m|h))+$"
_DURATION_PART_RE = re.compile(r"([0-9]+(?:\.[0-9]+)?)(ns|us|µs|ms|s|m|h)")
_DURATION_RE = re.compile(DURATION_PATTERN.removesuffix("$"))
_DURATION_UNITS = {
    "ns": 1e-9,
    "us": 1e-6,
    "µs": 1e-6,
    "ms": 1e-3,
    "s": 1.0,
    "m": 60.0,
    "h": 3600.0,
}


def parse_duration(text: str) -> float:
    """Seconds in a Go duration string; the shape is checked by the CRD pattern too."""
    if len(text) > 32 or not _DURATION_RE.fullmatch(text):
        if re.fullmatch(r"([0-9]+(\.[0-9]+)?(ns|us|µs|ms|s|m|h))+", text):
            raise ValueError(
                f"{text[:40]!r} is too long for a duration (at most 32 characters and "
                "6 digits per number, e.g. 720h)"
            )
        raise ValueError(f"{text!r} is not a duration (examples: 90s, 5m, 1h30m)")
    return sum(float(n) * _DURATION_UNITS[u] for n, u in _DURATION_PART_RE.findall(text))


def _check_duration(value: str) -> str:
    parse_duration(value)
    return value


class _DurationMarker:
    @classmethod
    def __get_pydantic_core_schema__(
        cls, source: Any, handler: GetCoreSchemaHandler
    ) -> core_schema.CoreSchema:
        return core_schema.no_info_after_validator_function(
            _check_duration, core_schema.str_schema()
        )

    @classmethod
    def __get_pydantic_json_schema__(
        cls, schema: core_schema.CoreSchema, handler: GetJsonSchemaHandler
    ) -> JsonSchemaValue:
        return {"type": "string", "pattern": DURATION_PATTERN, "maxLength": 32}


Duration = Annotated[str, _DurationMarker]


_BINARY_UNITS = ("Ki", "Mi", "Gi", "Ti", "Pi", "Ei")


def format_bytes(count: int) -> str:
    """Bytes as a Kubernetes quantity people read: ``19.3Gi``, ``512Mi``, ``900``."""
    if count < 1024:
        return str(count)
    value = float(count)
    index = -1
    while value >= 1024 and index < len(_BINARY_UNITS) - 1:
        value /= 1024
        index += 1
    text = f"{value:.1f}".removesuffix(".0")
    return f"{text}{_BINARY_UNITS[index]}"
