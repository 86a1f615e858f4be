import math
import random

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hybridopt.quant.packing import (
    pack_bits,
    pack_sign,
    pack_signed,
    pack_ternary,
    packed_nbytes,
    unpack_bits,
    unpack_sign,
    unpack_signed,
    unpack_ternary,
)

# Slow references written from the format spec with plain Python lists.


def _ref_pack_ternary(values: list[int]) -> list[int]:
    trits = [v + 1 for v in values]
    while len(trits) % 5:
        trits.append(0)  # padding trit 0
    out = []
    for start in range(0, len(trits), 5):
        byte = 0
        for i in range(5):
            byte += trits[start + i] * 3**i
        out.append(byte)
    return out


def _ref_pack_bits(codes: list[int], bits: int) -> list[int]:
    per = 8 // bits
    codes = codes + [0] * (-len(codes) % per)
    out = []
    for start in range(0, len(codes), per):
        byte = 0
        for i in range(per):
            byte |= codes[start + i] << (i * bits)
        out.append(byte)
    return out


def _shape_for(n: int, rng: random.Random) -> tuple[int, ...]:
    """A random shape with `n` elements (1-D, or 2-D/3-D when `n` factors)."""
    divisors = [d for d in range(1, n + 1) if n % d == 0] or [1]
    d = rng.choice(divisors)
    if n == 0:
        return rng.choice([(0,), (0, 3), (2, 0, 4)])
    return rng.choice([(n,), (d, n // d), (1, d, n // d)])


sizes = st.integers(min_value=0, max_value=200)
seeds = st.integers(min_value=0, max_value=2**31 - 1)
dtypes = st.sampled_from([torch.int8, torch.int32, torch.int64, torch.float32, torch.bfloat16])


@settings(max_examples=60, deadline=None)
@given(n=sizes, seed=seeds, dtype=dtypes)
def test_ternary_matches_reference_and_round_trips(n, seed, dtype):
    rng = random.Random(seed)
    values = [rng.choice([-1, 0, 1]) for _ in range(n)]
    q = torch.tensor(values, dtype=dtype).reshape(_shape_for(n, rng))
    packed = pack_ternary(q)
    assert packed.dtype == torch.uint8 and packed.dim() == 1
    assert packed.tolist() == _ref_pack_ternary(values)
    assert packed.numel() == math.ceil(n / 5) == packed_nbytes(n, 1.58)
    out = unpack_ternary(packed, n)
    assert out.dtype == torch.int8 and out.shape == (n,)
    assert torch.equal(out.reshape(q.shape), q.to(torch.int8))


@settings(max_examples=80, deadline=None)
@given(n=sizes, seed=seeds, bits=st.sampled_from([1, 2, 4, 8]))
def test_bits_match_reference_and_round_trip(n, seed, bits):
    rng = random.Random(seed)
    codes = [rng.randrange(2**bits) for _ in range(n)]
    v = torch.tensor(codes, dtype=torch.int64).reshape(_shape_for(n, rng))
    packed = pack_bits(v, bits)
    assert packed.dtype == torch.uint8 and packed.dim() == 1
    assert packed.tolist() == _ref_pack_bits(codes, bits)
    assert packed.numel() == math.ceil(n * bits / 8) == packed_nbytes(n, bits)
    out = unpack_bits(packed, bits, n)
    assert out.dtype == torch.uint8 and out.tolist() == codes
    assert torch.equal(out.reshape(v.shape), v.to(torch.uint8))


@settings(max_examples=60, deadline=None)
@given(n=sizes, seed=seeds, bits=st.sampled_from([2, 4, 8]))
def test_signed_matches_offset_reference_and_round_trips(n, seed, bits):
    rng = random.Random(seed)
    half = 2 ** (bits - 1)
    values = [rng.randrange(-half, half) for _ in range(n)]
    q = torch.tensor(values, dtype=torch.float32).reshape(_shape_for(n, rng))
    packed = pack_signed(q, bits)
    assert packed.tolist() == _ref_pack_bits([v + half for v in values], bits)
    out = unpack_signed(packed, bits, n)
    assert out.dtype == torch.int8 and out.tolist() == values


@settings(max_examples=60, deadline=None)
@given(n=sizes, seed=seeds)
def test_sign_matches_reference_and_round_trips(n, seed):
    rng = random.Random(seed)
    values = [rng.choice([-1, 1]) for _ in range(n)]
    q = torch.tensor(values, dtype=torch.float16).reshape(_shape_for(n, rng))
    packed = pack_sign(q)
    assert packed.tolist() == _ref_pack_bits([1 if v > 0 else 0 for v in values], 1)
    out = unpack_sign(packed, n)
    assert out.dtype == torch.int8 and out.tolist() == values


def test_known_bytes_and_lengths():
    assert pack_ternary(torch.tensor([1, 0, -1, 1, 1])).tolist() == [2 + 3 + 0 + 54 + 162]
    assert pack_ternary(torch.ones(5)).tolist() == [242]
    assert pack_ternary(torch.zeros(6)).numel() == 2
    assert pack_ternary(torch.zeros(5)).numel() == 1
    assert pack_bits(torch.tensor([1, 2, 3, 0]), 2).tolist() == [1 | 2 << 2 | 3 << 4]
    assert pack_bits(torch.tensor([0xA, 0x5, 0xF]), 4).tolist() == [0x5A, 0x0F]
    assert pack_bits(torch.ones(9, dtype=torch.uint8), 1).tolist() == [255, 1]
    assert pack_sign(torch.ones(9)).numel() == 2
    assert pack_signed(torch.tensor([-8, 7]), 4).tolist() == [0 | 15 << 4]
    for bits, n, expected in [(1, 9, 2), (2, 5, 2), (4, 3, 2), (8, 3, 3), (1.58, 6, 2), (1.58, 0, 0)]:
        assert packed_nbytes(n, bits) == expected


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda: pack_ternary(torch.tensor([0, 2])), 'got 2$'),
        (lambda: pack_ternary(torch.tensor([0.5])), 'got 0.5$'),
        (lambda: pack_ternary(torch.tensor([float("nan")])), 'got nan$'),
        (lambda: pack_ternary(torch.tensor([255], dtype=torch.uint8)), 'got 255$'),  # must not wrap to -1
        (lambda: pack_bits(torch.tensor([4]), 2), 'got 4$'),
        (lambda: pack_bits(torch.tensor([-1]), 8), 'got -1$'),
        (lambda: pack_bits(torch.tensor([256]), 8), 'got 256$'),
        (lambda: pack_bits(torch.tensor([0]), 3), 'unsupported bit width 3;'),
        (lambda: pack_bits(torch.tensor([0]), 2.0), 'unsupported bit width 2.0;'),
        (lambda: pack_signed(torch.tensor([8]), 4), 'got 8$'),
        (lambda: pack_signed(torch.tensor([-3]), 2), 'got -3$'),
        (lambda: pack_signed(torch.tensor([0]), 1), 'unsupported bit width 1;'),
        (lambda: pack_sign(torch.tensor([1, 0, -1])), 'must be -1 or \\+1, got 0'),
        (lambda: pack_sign(torch.tensor([2])), 'got 2$'),
        (lambda: unpack_bits(torch.zeros(1, dtype=torch.uint8), 3, 2), 'unsupported bit width 3;'),
        (lambda: unpack_signed(torch.zeros(1, dtype=torch.uint8), 1, 2), 'unsupported bit width 1;'),
        (lambda: packed_nbytes(4, 3), 'unsupported bit width 3;'),
        (lambda: packed_nbytes(-1, 8), 'numel must be a non-negative int, got -1'),
    ],
)
def test_out_of_range_and_bad_widths_raise(call, match):
    with pytest.raises(ValueError, match=match):
        call()


@pytest.mark.parametrize(
    "pack,unpack",
    [
        (pack_ternary, unpack_ternary),
        (lambda q: pack_bits(q + 1, 2), lambda p, n: unpack_bits(p, 2, n)),
        (lambda q: pack_signed(q, 4), lambda p, n: unpack_signed(p, 4, n)),
        (lambda q: pack_signed(q, 8), lambda p, n: unpack_signed(p, 8, n)),
        (lambda q: pack_sign(q.sign() + (q == 0)), unpack_sign),
    ],
)
def test_truncated_or_padded_buffer_raises(pack, unpack):
    q = torch.tensor([-1, 0, 1] * 7)  # 21 values: not a multiple of 5 or 8
    packed = pack(q)
    assert unpack(packed, q.numel()).numel() == q.numel()
    with pytest.raises(ValueError, match="truncated"):
        unpack(packed[:-1], q.numel())
    with pytest.raises(ValueError, match="truncated"):
        unpack(packed, q.numel() + 100)
    with pytest.raises(ValueError, match="expected exactly"):
        unpack(torch.cat([packed, packed[:1]]), q.numel())
    with pytest.raises(ValueError, match="must be uint8"):
        unpack(packed.to(torch.int8), q.numel())


def test_corrupt_ternary_byte_raises():
    with pytest.raises(ValueError, match="242"):
        unpack_ternary(torch.tensor([243], dtype=torch.uint8), 5)
