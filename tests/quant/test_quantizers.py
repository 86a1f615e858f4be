"""Quantizers against slow reference versions written from the formulas, and STE gradients."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hybridopt.quant.quantizers import (
    TERNARY, canonical_bits, code_offset, dequantize_weight, fake_quantize_activations, fake_quantize_weight, quantize_weight,
    relative_error)


def _fp16(x: float) -> float:
    return float(torch.tensor(max(x, 2.0**-14)).half())


def reference_quantize(w: list[list[float]], bits: float, group: int) -> list[list[float]]:
    """Q(W) element by element, with Python floats (scales rounded to float16 as the export stores them)."""
    out = []
    for row in w:
        qrow = []
        for g in range(0, len(row), group):
            chunk = row[g:g + group]
            if bits in (1.0, TERNARY):
                s = _fp16(sum(abs(v) for v in chunk) / len(chunk))
            elif bits == 2.0:
                s = _fp16(max(abs(v) for v in chunk) / 2)
            else:
                s = _fp16(max(abs(v) for v in chunk) / (2 ** (int(bits) - 1) - 1))
            for v in chunk:
                if bits == 1.0:
                    q = 1.0 if v >= 0 else -1.0
                elif bits == TERNARY:
                    q = max(-1.0, min(1.0, float(round(v / (s + 1e-5)))))
                elif bits == 2.0:
                    q = max(-2.0, min(1.0, float(round(v / s - 0.5)))) + 0.5
                else:
                    qmax = 2 ** (int(bits) - 1) - 1
                    q = max(-qmax - 1.0, min(float(qmax), float(round(v / s))))
                qrow.append(q * s)
        out.append(qrow)
    return out


@settings(max_examples=40, deadline=None)
@given(bits=st.sampled_from([1.0, TERNARY, 2.0, 4.0, 8.0]), rows=st.integers(1, 6), groups=st.integers(1, 3),
       group=st.sampled_from([1, 3, 8]), per_channel=st.booleans(), seed=st.integers(0, 2**31 - 1))
def test_matches_reference(bits, rows, groups, group, per_channel, seed):
    w = torch.randn(rows, groups * group, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).float()
    g = None if per_channel else group
    q, scale = quantize_weight(w, bits, g)
    want = torch.tensor(reference_quantize(w.tolist(), bits, g or w.shape[1]))
    # torch.round and Python's round both round half to even; values on a tie are vanishingly rare here.
    torch.testing.assert_close(dequantize_weight(q, scale, code_offset(bits)), want, rtol=0, atol=1e-6)


def test_levels_and_scales():
    w = torch.randn(16, 64, generator=torch.Generator().manual_seed(0))
    assert set(quantize_weight(w, 1)[0].unique().tolist()) == {-1, 1}
    assert set(quantize_weight(w, TERNARY)[0].unique().tolist()) <= {-1, 0, 1}
    assert quantize_weight(w, 4)[0].abs().max() <= 8
    assert set(quantize_weight(w, 2)[0].unique().tolist()) == {-2, -1, 0, 1}
    # 2-bit levels are symmetric (-3s/2, -s/2, s/2, 3s/2): no row is biased to one sign.
    torch.testing.assert_close(fake_quantize_weight(-w, 2), -fake_quantize_weight(w, 2))
    q, s = quantize_weight(w, TERNARY, group_size=16)
    assert s.shape == (16, 4) and torch.equal(s, s.half().float())
    torch.testing.assert_close(quantize_weight(w, TERNARY)[1][:, 0], w.abs().mean(1).half().float())


def test_more_bits_less_error():
    w = torch.randn(64, 256, generator=torch.Generator().manual_seed(0))
    errors = [relative_error(w, b) for b in (1, TERNARY, 2, 4, 8)]
    assert errors == sorted(errors, reverse=True)
    assert errors[-1] < 0.01


def test_canonical_bits():
    assert canonical_bits(math.log2(3)) == TERNARY and canonical_bits(1.58) == TERNARY
    with pytest.raises(ValueError, match="unsupported"):
        canonical_bits(3)


def test_ste_gradient_is_the_gradient_at_the_quantized_weight():
    """d/dW of L(Q(W)) under STE equals dL/dW' evaluated at W' = Q(W)."""
    torch.manual_seed(0)
    w = torch.randn(8, 16, requires_grad=True)
    x = torch.randn(4, 16)
    (torch.nn.functional.linear(x, fake_quantize_weight(w, TERNARY)) ** 2).sum().backward()
    wq = fake_quantize_weight(w, TERNARY).detach().requires_grad_(True)
    (torch.nn.functional.linear(x, wq) ** 2).sum().backward()
    assert w.grad.abs().sum() > 0
    torch.testing.assert_close(w.grad, wq.grad)


def test_activation_quantization_is_8_bit_per_token_with_ste():
    x = torch.randn(3, 5, 32, generator=torch.Generator().manual_seed(0)).requires_grad_(True)
    xq = fake_quantize_activations(x, 8)
    scale = 127 / x.detach().abs().amax(-1, keepdim=True)
    codes = xq.detach() * scale
    torch.testing.assert_close(codes, codes.round(), rtol=0, atol=1e-3)
    assert codes.abs().max() <= 127.001
    xq.sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x))
