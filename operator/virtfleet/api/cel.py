"""CEL rule texts that more than one API model needs."""

from __future__ import annotations

from virtfleet.api.quantity import QUANTITY_PATTERN, Quantity


def quantity_between(minimum: Quantity, maximum: Quantity) -> str:
    """One CEL rule per field, guarded by the bounded pattern.

    The apiserver runs CEL even when the field failed its pattern (only type errors stop
    it), so without the guard ``quantity('1e100000000')`` would compute the number. The
    field is a plain string (not int-or-string) so the cost estimator knows its length.
    """
    return (
        f"!self.size.matches(r'{QUANTITY_PATTERN}') || "
        f"(quantity(self.size).compareTo(quantity('{minimum.text}')) >= 0 && "
        f"quantity(self.size).compareTo(quantity('{maximum.text}')) <= 0)"
    )
