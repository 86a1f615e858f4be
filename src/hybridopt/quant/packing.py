"""Low-bit weight packing for the export format: pure functions from tensors to uint8 buffers.

Two layouts, both flattening the input in row-major (C) order and both returning a 1-D uint8
tensor that the exporter writes to safetensors next to the original shape:

* Ternary (1.58-bit, stored at 1.6 bits/weight): values `q` in {-1, 0, 1} become trits
  `t = q + 1` in {0, 1, 2}; five trits share a byte as the base-3 number
  `t0 + 3*t1 + 9*t2 + 27*t3 + 81*t4` (at most 242, since 3^5 = 243 <= 256). The tail is padded
  with trit 0 (value -1), so `n` values take `ceil(n / 5)` bytes.
* `bits`-bit codes, bits in {1, 2, 4, 8}: unsigned codes in [0, 2^bits - 1], `8 / bits` per
  byte, little-endian within the byte (the first code in the lowest bits). The tail is padded
  with code 0, so `n` codes take `ceil(n * bits / 8)` bytes. Signed integers in
  [-2^(bits-1), 2^(bits-1) - 1] are stored as the offset codes `q + 2^(bits-1)`; 1-bit signs
  {-1, +1} as bit 0 for -1 and bit 1 for +1.

Unpacking needs the value count `numel` (the product of the stored shape) and rejects a buffer
of any other length than the packing would produce, so a truncated file is an error, not noise.
"""

from __future__ import annotations

import math

import torch

from hybridopt.quant.bits import TERNARY

PACKED_INT_BITS = (1, 2, 4, 8)  # widths stored as plain bit fields (ternary is packed 5 trits per byte)
SIGNED_BITS = (2, 4, 8)


def _codes(x: torch.Tensor, lo: int, hi: int, what: str) -> torch.Tensor:
    """Flatten `x` to int64 after checking it holds only integers in `[lo, hi]`."""
    flat = x.detach().reshape(-1)
    if flat.is_complex():
        raise ValueError(f"{what} must be real integers, got dtype {flat.dtype}")
    if flat.is_floating_point():
        ok = (flat >= lo) & (flat <= hi) & (flat == flat.round())  # NaN fails every test
    else:
        flat = flat.to(torch.int64)  # compare in int64: uint8 >= -1 would wrap around
        ok = (flat >= lo) & (flat <= hi)
    if not bool(ok.all()):
        bad = flat[~ok][0].item()
        raise ValueError(f"{what} must be integers in [{lo}, {hi}], got {bad}")
    return flat.to(torch.int64)


def _check_bits(bits: int, allowed: tuple[int, ...]) -> None:
    if isinstance(bits, bool) or not isinstance(bits, int) or bits not in allowed:
        raise ValueError(f"unsupported bit width {bits!r}; expected one of {allowed}")


def _check_buffer(packed: torch.Tensor, numel: int, bits: float) -> torch.Tensor:
    """Flatten `packed`, checking its dtype and that it is exactly as long as `numel` needs."""
    if packed.dtype != torch.uint8:
        raise ValueError(f"packed buffer must be uint8, got {packed.dtype}")
    expected = packed_nbytes(numel, bits)
    flat = packed.reshape(-1)
    if flat.numel() < expected:
        raise ValueError(
            f"packed buffer is truncated: {flat.numel()} bytes, {expected} needed for {numel} values"
        )
    if flat.numel() > expected:
        raise ValueError(
            f"packed buffer has {flat.numel()} bytes, expected exactly {expected} for {numel} values"
        )
    return flat


def packed_nbytes(numel: int, bits: float) -> int:
    """Byte length of `numel` values packed at `bits` per value (1.58 means ternary).

    Args:
        numel: number of values, >= 0.
        bits: 1, 2, 4, 8, or 1.58 (also accepts log2(3) = 1.585) for ternary.

    Returns:
        `ceil(numel / 5)` for ternary, else `ceil(numel * bits / 8)`.
    """
    if isinstance(numel, bool) or not isinstance(numel, int) or numel < 0:
        raise ValueError(f"numel must be a non-negative int, got {numel!r}")
    if math.isclose(bits, TERNARY, abs_tol=0.01):
        return -(-numel // 5)
    if isinstance(bits, bool) or bits not in PACKED_INT_BITS:
        raise ValueError(f"unsupported bit width {bits!r}; expected one of {PACKED_INT_BITS} or 1.58")
    return -(-numel * int(bits) // 8)


# Ternary layout: five trits per byte, base 3, the first value in the least significant trit.
#
#   values  q0 q1 q2 q3 q4 | q5 q6 q7 q8 q9 | q10 (pad pad pad pad)
#   trits   t_i = q_i + 1 in {0, 1, 2}, padding trit = 0
#   byte    b = t0 + 3*t1 + 9*t2 + 27*t3 + 81*t4         (0..242)
#   unpack  t_i = (b // 3**i) % 3
_POW3 = (1, 3, 9, 27, 81)


def pack_ternary(q: torch.Tensor) -> torch.Tensor:
    """Pack values in {-1, 0, 1} (any shape, integer or float dtype) five to a byte.

    Returns:
        1-D uint8 tensor of length `ceil(q.numel() / 5)` on `q`'s device.
    """
    t = (_codes(q, -1, 1, "ternary values") + 1).to(torch.uint8)
    t = torch.nn.functional.pad(t, (0, (-t.numel()) % 5)).view(-1, 5)  # pad with trit 0
    out = torch.zeros(t.size(0), dtype=torch.uint8, device=t.device)
    for i, p in enumerate(_POW3):
        out += t[:, i] * p  # stays <= 242: no uint8 overflow
    return out


def unpack_ternary(packed: torch.Tensor, numel: int) -> torch.Tensor:
    """Inverse of `pack_ternary`: a 1-D int8 tensor of `numel` values in {-1, 0, 1}."""
    flat = _check_buffer(packed, numel, TERNARY)
    if bool((flat > 242).any()):
        raise ValueError("packed ternary buffer is corrupt: a byte exceeds 242 (3**5 - 1)")
    pow3 = torch.tensor(_POW3, dtype=torch.uint8, device=flat.device)
    trits = (flat.unsqueeze(-1) // pow3) % 3  # (nbytes, 5)
    return trits.reshape(-1)[:numel].to(torch.int8) - 1


# n-bit layout: 8 / bits codes per byte, little-endian within the byte (first code lowest).
#
#   1-bit  byte = c0 | c1 << 1 | c2 << 2 | ... | c7 << 7
#   2-bit  byte = c0 | c1 << 2 | c2 << 4 | c3 << 6
#                 bit  7 6 | 5 4 | 3 2 | 1 0
#                      c3  | c2  | c1  | c0
#   4-bit  byte = c0 | c1 << 4
#   8-bit  byte = c0
#   unpack c_i = (byte >> (i * bits)) & (2**bits - 1)


def pack_bits(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack unsigned codes in `[0, 2**bits - 1]` (any shape) at `bits` in {1, 2, 4, 8} each.

    Returns:
        1-D uint8 tensor of length `ceil(values.numel() * bits / 8)` on `values`' device.
    """
    _check_bits(bits, PACKED_INT_BITS)
    c = _codes(values, 0, 2**bits - 1, f"{bits}-bit codes").to(torch.uint8)
    per = 8 // bits
    c = torch.nn.functional.pad(c, (0, (-c.numel()) % per)).view(-1, per)  # pad with code 0
    out = torch.zeros(c.size(0), dtype=torch.uint8, device=c.device)
    for i in range(per):
        out |= c[:, i] << (i * bits)
    return out


def unpack_bits(packed: torch.Tensor, bits: int, numel: int) -> torch.Tensor:
    """Inverse of `pack_bits`: a 1-D uint8 tensor of `numel` codes."""
    _check_bits(bits, PACKED_INT_BITS)
    flat = _check_buffer(packed, numel, bits)
    shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=flat.device)
    codes = (flat.unsqueeze(-1) >> shifts) & (2**bits - 1)  # (nbytes, 8 / bits)
    return codes.reshape(-1)[:numel]


def pack_signed(q: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack signed integers in `[-2**(bits-1), 2**(bits-1) - 1]` as offset codes, bits in {2, 4, 8}."""
    _check_bits(bits, SIGNED_BITS)
    half = 2 ** (bits - 1)
    return pack_bits(_codes(q, -half, half - 1, f"signed {bits}-bit values") + half, bits)


def unpack_signed(packed: torch.Tensor, bits: int, numel: int) -> torch.Tensor:
    """Inverse of `pack_signed`: a 1-D int8 tensor of `numel` values."""
    _check_bits(bits, SIGNED_BITS)
    codes = unpack_bits(packed, bits, numel)
    return (codes.to(torch.int16) - 2 ** (bits - 1)).to(torch.int8)


def pack_sign(q: torch.Tensor) -> torch.Tensor:
    """Pack signs in {-1, +1} one bit each: bit 1 for +1, bit 0 for -1."""
    flat = _codes(q, -1, 1, "signs")
    if bool((flat == 0).any()):
        raise ValueError("signs must be -1 or +1, got 0")
    return pack_bits(flat > 0, 1)


def unpack_sign(packed: torch.Tensor, numel: int) -> torch.Tensor:
    """Inverse of `pack_sign`: a 1-D int8 tensor of `numel` values in {-1, +1}."""
    return unpack_bits(packed, 1, numel).to(torch.int8) * 2 - 1
