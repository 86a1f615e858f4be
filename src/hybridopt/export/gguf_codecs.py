"""GGUF block codecs: llama.cpp's quantized tensor types, encoded exactly and decoded again.

    type    block  one block holds                      holds our ... exactly (d = our float16 scale s)
    Q1_0    128    d, 128 sign bits: +-d                1-bit (1.125 bits/weight)
    TQ1_0   256    d, 256 trits, 5 per byte: -d, 0, d   ternary and 1-bit (1.6875)
    TQ2_0   256    d, 256 2-bit codes: (c - 1) d        the same (2.0625), faster kernels
    Q4_0    32     d, 32 nibbles: (c - 8) d             4-bit; 2-bit with d = s / 2, codes 2q + 1 (4.5)
    Q8_0    32     d, 32 int8: c d                      8-bit and every narrower width (8.5)
    F16 / F32                                           what is left (F32 always)

`encode` writes `levels * scale` in one type, or refuses when the type cannot hold it exactly; the scale
must be constant over a block. `gguf.quants`' TQ quantizers take each block's absmax as its scale, not our
absmean one, so the blocks are built here: the trits come from quantizing the integer levels (absmax 1, or 0
for an all-zero block) and each block's `d` is then overwritten with our scale. `dequantize` reads a tensor
back as llama.cpp does (`gguf.quants.dequantize`; Q1_0, which the gguf package cannot decode, by
`_dequantize_q1_0`, a port of ggml's `dequantize_row_q1_0`).
"""

from __future__ import annotations

import gguf
import numpy as np

# Widening order: a layer a type cannot hold exactly tries the next one.
LADDER = ("q1_0", "tq1_0", "tq2_0", "q4_0", "q8_0", "f16", "f32")
BLOCK = {"q1_0": 128, "tq1_0": 256, "tq2_0": 256, "q4_0": 32, "q8_0": 32}
_Q1_0_BYTES = 2 + 128 // 8  # gguf knows Q1_0's id and size; its quants module cannot encode or decode it


def qtype(kind: str) -> gguf.GGMLQuantizationType:
    return getattr(gguf.GGMLQuantizationType, kind.upper())


def _block_scales(scale: np.ndarray, block: int) -> np.ndarray | None:
    """One scale per `block` consecutive weights of each row, or None if a block spans two scales."""
    blocks = scale.reshape(-1, block)
    return blocks[:, 0] if bool((blocks == blocks[:, :1]).all()) else None


def _f16_exact(d: np.ndarray) -> bool:
    return bool((d.astype(np.float16).astype(np.float32) == d).all())


def encode(levels: np.ndarray, scale: np.ndarray, kind: str) -> np.ndarray | None:
    """`levels * scale` (both `(out, in)` float32) in `kind`, or None if `kind` cannot hold it exactly.

    Returns float16/float32 `(out, in)`, or uint8 `(out, bytes per row)` blocks for the quantized types
    (what `GGUFWriter.add_tensor(..., raw_dtype=...)` takes).
    """
    out_f, in_f = levels.shape
    if kind == "f32":
        return levels * scale
    if kind == "f16":
        w = levels * scale
        return w.astype(np.float16) if _f16_exact(w) else None
    block = BLOCK[kind]
    if in_f % block:
        return None
    d = _block_scales(scale, block)
    if d is None:
        return None
    # Integer codes m with levels = m / k: k = 2 for the mid-rise 2-bit grid (levels +-1/2, +-3/2), else 1.
    k = 1.0 if bool((levels == np.round(levels)).all()) else 2.0
    m, d = levels * k, d / k
    allowed = {"q1_0": (-1.0, 1.0), "tq1_0": (-1.0, 0.0, 1.0), "tq2_0": (-1.0, 0.0, 1.0)}.get(kind)
    lo, hi = (-8, 7) if kind == "q4_0" else (-128, 127)
    if allowed is not None and not bool(np.isin(m, allowed).all()):
        return None
    if not bool((m == np.round(m)).all()) or m.min() < lo or m.max() > hi or not _f16_exact(d):
        return None
    head = d.astype(np.float16).view(np.uint8).reshape(-1, 2)  # every block's d, as ggml_half
    if kind == "q1_0":  # d, then bit j % 8 of byte j // 8 set for +d
        bits = np.packbits((m.reshape(-1, block) > 0).astype(np.uint8), axis=1, bitorder="little")
        return np.concatenate([head, bits], axis=1).reshape(out_f, -1)
    if kind.startswith("tq"):
        # Each block's absmax is 1 (or 0), so gguf.quants writes exactly these trits; d (the block's last
        # two bytes) is then replaced by ours.
        blocks = gguf.quants.quantize(m.astype(np.float32), qtype(kind)).reshape(-1, gguf.GGML_QUANT_SIZES[qtype(kind)][1])
        blocks[:, -2:] = head
        return blocks.reshape(out_f, -1)
    m = m.astype(np.int8).reshape(-1, block)
    if kind == "q8_0":  # d, then 32 int8
        return np.concatenate([head, m.view(np.uint8)], axis=1).reshape(out_f, -1)
    nib = (m + 8).astype(np.uint8)  # Q4_0: d, then byte j holds element j (low nibble) and j + 16 (high)
    return np.concatenate([head, nib[:, :16] | (nib[:, 16:] << 4)], axis=1).reshape(out_f, -1)


def _dequantize_q1_0(data: np.ndarray) -> np.ndarray:
    """Q1_0 blocks -> float32 values: ggml's `dequantize_row_q1_0` (`bit ? d : -d`)."""
    blocks = data.reshape(-1, _Q1_0_BYTES)
    d = blocks[:, :2].copy().view(np.float16).astype(np.float32)  # (n_blocks, 1)
    bits = np.unpackbits(blocks[:, 2:], axis=1, bitorder="little").astype(np.float32)  # (n_blocks, 128)
    return np.where(bits > 0, d, -d).reshape(data.shape[0], -1)


def dequantize(data: np.ndarray, kind: str) -> np.ndarray:
    """What llama.cpp reads from a tensor of `kind` stored as `data`: float32 `(rows, row length)`."""
    if kind in ("f16", "f32"):
        return data.astype(np.float32)
    if kind == "q1_0":
        return _dequantize_q1_0(data)
    return gguf.quants.dequantize(data, qtype(kind)).astype(np.float32)
