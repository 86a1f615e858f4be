"""Quantization-aware training layer and the in-place module swap.

`quantize_(model, config)` replaces every `nn.Linear` inside the transformer blocks (attention
q/k/v/o and MLP gate/up/down) with `QATLinear`, sharing the original parameters, so the latent
full-precision weights keep training while the forward pass sees their quantized values.
Embeddings and the LM head stay in full precision unless `include_head` is set.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from hybridopt.quant.bits import TERNARY, bits_name, canonical_bits
from hybridopt.quant.quantizers import fake_quantize_activations, fake_quantize_weight


@dataclass
class QATConfig:
    """What to quantize and how.

    Attributes:
        bits: weight bits: 1, 1.58 (ternary), 2, 4 or 8.
        group_size: inputs per scale; None for one scale per output channel.
        act_bits: quantize the inputs of each QAT layer to this many bits per token (8), or None.
        include_head: also quantize the LM head.
        layer_bits: per-layer widths overriding `bits` (a mixed-precision plan), by module name.
    """

    bits: float = TERNARY
    group_size: int | None = None
    act_bits: int | None = None
    include_head: bool = False
    layer_bits: dict[str, float] | None = None

    def __post_init__(self):
        self.bits = canonical_bits(self.bits)
        if self.layer_bits:
            self.layer_bits = {n: canonical_bits(b) for n, b in self.layer_bits.items()}
        if self.act_bits not in (None, 8):
            raise ValueError(f"activation bits must be 8 or None, got {self.act_bits}")

    def describe(self) -> str:
        name = lambda b: bits_name(b, long=True)  # noqa: E731
        if self.layer_bits:
            widths = sorted(set(self.layer_bits.values()))
            mix = ", ".join(f"{name(b)} x{list(self.layer_bits.values()).count(b)}" for b in widths)
            first = (f"{name(widths[0])} weights (precision plan)" if len(widths) == 1
                     else f"mixed-precision weights ({mix})")
        else:
            first = f"{name(self.bits)} weights"
        parts = [first, f"per group of {self.group_size}" if self.group_size else "per output channel"]
        if self.act_bits:
            parts.append(f"{self.act_bits}-bit activations")
        return ", ".join(parts)


class QATLinear(nn.Linear):
    """`nn.Linear` whose forward uses fake-quantized weights (and optionally activations).

    `mix` (1 by default) blends the latent and the quantized weight, `W + mix * (Q(W) - W)`, for a quantization
    warmup from a pretrained model (0: full precision; the gradient reaches `W` unchanged either way).
    """

    mix: float = 1.0

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, bits: float = TERNARY,
                 group_size: int | None = None, act_bits: int | None = None, device=None, dtype=None):
        super().__init__(in_features, out_features, bias, device=device, dtype=dtype)
        self.bits = canonical_bits(bits)
        self.group_size = group_size
        self.act_bits = act_bits

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.act_bits:
            x = fake_quantize_activations(x, self.act_bits)
        w = fake_quantize_weight(self.weight, self.bits, self.group_size)
        if self.mix < 1.0:
            w = self.weight + self.mix * (w - self.weight)
        return F.linear(x, w, self.bias)

    @classmethod
    def from_linear(cls, linear: nn.Linear, config: QATConfig, bits: float | None = None) -> "QATLinear":
        """A QAT layer sharing `linear`'s parameters (no copy: optimizers keep working); `bits` overrides the config's."""
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.in_features, new.out_features = linear.in_features, linear.out_features
        new.weight, new.bias = linear.weight, linear.bias
        new.bits = canonical_bits(bits) if bits is not None else config.bits
        new.group_size, new.act_bits = config.group_size, config.act_bits
        return new

    def to_linear(self) -> nn.Linear:
        """A plain `nn.Linear` holding the dequantized weight `Q(W)` (activations not quantized)."""
        linear = nn.Linear(self.in_features, self.out_features, self.bias is not None,
                           device=self.weight.device, dtype=self.weight.dtype)
        with torch.no_grad():
            linear.weight.copy_(fake_quantize_weight(self.weight, self.bits, self.group_size))
            if self.bias is not None:
                linear.bias.copy_(self.bias)
        return linear

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, bits={self.bits}, group_size={self.group_size}, act_bits={self.act_bits}"


def quantizable_linears(model: nn.Module, include_head: bool = False) -> list[str]:
    """Names of the `nn.Linear` modules that QAT must cover: everything but the LM head, unless asked."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return [name for name, m in model.named_modules()
            if isinstance(m, nn.Linear) and (include_head or m is not head)]


def check_group_size(model: nn.Module, config: QATConfig) -> None:
    """Raise ValueError if `config.group_size` does not divide the input width of a layer QAT would cover."""
    if not config.group_size:
        return
    for name in quantizable_linears(model, config.include_head):
        width = model.get_submodule(name).in_features
        if width % config.group_size:
            raise ValueError(f"group size {config.group_size} does not divide the input width {width} of {name}")


def quantize_(model: nn.Module, config: QATConfig) -> list[str]:
    """Swap the quantizable linears of `model` for `QATLinear`, in place.

    Layers already swapped are left alone, unless `config.layer_bits` names them: then their width is
    updated (a precision plan applied to a QAT model).

    Returns:
        The names of the replaced modules.

    Raises:
        ValueError: a layer's input width is not divisible by `config.group_size`.
    """
    check_group_size(model, config)  # before any swap: a refused model is left as it was
    names = quantizable_linears(model, config.include_head)
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        linear = getattr(parent, child)
        bits = (config.layer_bits or {}).get(name)
        if isinstance(linear, QATLinear):
            if bits is not None:
                linear.bits = bits
            continue
        setattr(parent, child, QATLinear.from_linear(linear, config, bits))
    leftover = [n for n, m in model.named_modules() if type(m) is nn.Linear and n in names]
    assert not leftover, f"QAT left linears unquantized: {leftover}"
    return names


def set_quantization_mix(model: nn.Module, mix: float) -> None:
    """Blend every QAT layer's latent and quantized weights: 0 computes in full precision, 1 fully quantized."""
    if not 0.0 <= mix <= 1.0:
        raise ValueError(f"the quantization mix must lie in [0, 1], got {mix}")
    for layer in qat_layers(model).values():
        layer.mix = mix


def qat_layers(model: nn.Module) -> dict[str, QATLinear]:
    """The `QATLinear` modules of a model, by name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, QATLinear)}


class ActQuantLinear(nn.Linear):
    """A linear layer with already-quantized weights that quantizes its input per token (loaded exports)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, act_bits: int = 8,
                 device=None, dtype=None):
        super().__init__(in_features, out_features, bias, device=device, dtype=dtype)
        self.act_bits = act_bits

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(fake_quantize_activations(x, self.act_bits), self.weight, self.bias)
