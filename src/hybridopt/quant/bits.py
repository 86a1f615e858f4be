"""Weight bit widths: the supported ones, their canonical values and their names (no torch here, so the
CLI can validate `--bits` without loading it)."""

from __future__ import annotations

import math

TERNARY = 1.58  # three levels, log2(3) = 1.585 bits; stored 5 per byte (1.6 bits)
SUPPORTED_BITS = (1.0, TERNARY, 2.0, 4.0, 8.0)


def canonical_bits(bits: float) -> float:
    """Map 1.58, 1.585 or log2(3) to `TERNARY`; reject unsupported widths.

    Raises:
        ValueError: `bits` is not 1, 1.58, 2, 4 or 8.
    """
    if math.isclose(bits, TERNARY, abs_tol=0.01):
        return TERNARY
    if float(bits) not in SUPPORTED_BITS:
        raise ValueError(f"unsupported weight bit width {bits}; choose 1, 1.58 (ternary), 2, 4 or 8")
    return float(bits)


def bits_name(bits: float, long: bool = False) -> str:
    """A width as printed: "ternary" (long: "ternary (1.58-bit)"), "4-bit"."""
    if canonical_bits(bits) == TERNARY:
        return f"ternary ({TERNARY}-bit)" if long else "ternary"
    return f"{bits:g}-bit"
