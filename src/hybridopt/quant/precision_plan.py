r"""Sensitivity-clustered mixed precision: which quantized layer gets which bit width.

1. Sensitivity. For every quantizable linear layer l and candidate width b, the Fisher-weighted
   quantization error

       S_l(b) = \sum_i F_ii (w_i - Q_b(w_i))^2,     F_ii = E[g_i^2]

   with the diagonal Fisher estimated from squared gradients of the training loss on a few
   calibration batches (the second-order term of the loss change a perturbation w -> Q_b(w) causes).
2. Clusters. Layers are grouped by k-means (faiss) on their log-sensitivity-per-weight vectors
   (log S_l(b) / n_l over the candidate widths): layers in a group react alike to quantization and
   gain about as much per extra bit.
3. Budget. One width per group, minimising \sum_groups \sum_{l in group} S_l(b_group) subject to
   the average stored bits per weight staying within the budget. Solved exactly by dynamic
   programming over the Pareto front of (bits, sensitivity); the same solver without groups gives the
   per-layer optimum, and the plan reports its gap to it.
4. In context (`method="measured"`). The sum in 3 treats each layer's error as independent, and on a
   trained student it is not: raising one layer of an all-ternary model to 8 bits can raise the loss.
   So every assignment of widths to the groups that fits the budget (the lowest-error ones and every
   uniform one, at most `MAX_MEASURED`) is applied to the model and its loss measured on the
   calibration batches; the lowest wins.

Bits are counted as stored: packed ternary is 8/5 = 1.6 bits per weight (5 trits per byte), b-bit is
b bits; the float16 scales add 16 bits per group of inputs whatever the width, reported separately.
An average of 1.58 (the design document's target) therefore means every layer ternary.
"""

from __future__ import annotations

import itertools
import json
import math
import random
from dataclasses import asdict, dataclass, field
from fractions import Fraction
from typing import Callable, Iterable

import numpy as np
import torch

from hybridopt.kmeans import kmeans
from hybridopt.quant.bits import SUPPORTED_BITS, TERNARY, bits_name
from hybridopt.quant.quantizers import quantize_dequantize

CANDIDATE_BITS = (TERNARY, 2.0, 4.0, 8.0)
PLAN_METHODS = ("measured", "sensitivity", "random")
KMEANS_RESTARTS = 16
MAX_MEASURED = 64  # assignments measured in context, at most
_MAX_ENUMERATED = 4**8  # beyond this many assignments, only the neighbours of the lowest-error one


def stored_bits(bits: float) -> Fraction:
    """Bits per weight the packed export stores for codes of this width (ternary: 8/5)."""
    return Fraction(8, 5) if bits == TERNARY else Fraction(int(bits))


def mix_name(layer_bits: dict[str, float]) -> str:
    """How many layers get each width: "ternary x12, 4-bit x2"."""
    widths = list(layer_bits.values())
    return ", ".join(f"{bits_name(b)} x{widths.count(b)}" for b in sorted(set(widths)))


def candidate_bits(floor: float) -> tuple[float, ...]:
    """Candidate widths at or above the run's base width (ternary, 2, 4, 8; plus 1 for 1-bit runs)."""
    return tuple(b for b in SUPPORTED_BITS if b >= floor and (b in CANDIDATE_BITS or b == floor))


def calibration_batches(num_items: int, batch_size: int, count: int, seed: int) -> list[list[int]]:
    """`count` batches of `batch_size` item indices, fixed by `seed` and drawn apart from any training order
    (a generator of their own, seeded `seed + 1`): what the sensitivities and the in-context loss are measured on."""
    order = torch.randperm(num_items, generator=torch.Generator().manual_seed(seed + 1)).tolist()
    B = min(batch_size, num_items)
    return [order[i * B : (i + 1) * B] for i in range(min(count, num_items // B))]


# --------------------------------------------------------------------------- sensitivity
def fisher_diagonal(model: torch.nn.Module, names: list[str], batches: Iterable,
                    loss_fn: Callable[[object], torch.Tensor]) -> dict[str, torch.Tensor]:
    """Mean squared gradient of `loss_fn(batch)` for the weight of every module in `names`."""
    weights = {n: model.get_submodule(n).weight for n in names}
    fisher = {n: torch.zeros_like(w, dtype=torch.float32) for n, w in weights.items()}
    count = 0
    for batch in batches:
        model.zero_grad(set_to_none=True)
        loss_fn(batch).backward()
        for n, w in weights.items():
            if w.grad is not None:
                fisher[n] += w.grad.detach().float().pow(2)
        count += 1
    model.zero_grad(set_to_none=True)
    return {n: f / max(count, 1) for n, f in fisher.items()}


def sensitivity(weight: torch.Tensor, fisher: torch.Tensor, bits: float, group_size: int | None) -> float:
    """`sum_i F_ii (w_i - Q_b(w_i))^2` for one layer."""
    err = weight.detach().float() - quantize_dequantize(weight, bits, group_size)
    return float((fisher * err.pow(2)).sum())


def sensitivity_table(model: torch.nn.Module, fisher: dict[str, torch.Tensor], bits: tuple[float, ...],
                      group_size: int | None) -> dict[str, dict[float, float]]:
    """`{layer: {bits: S_l(bits)}}` for every layer of `fisher`."""
    return {n: {b: sensitivity(model.get_submodule(n).weight, f, b, group_size) for b in bits}
            for n, f in fisher.items()}


# --------------------------------------------------------------------------- solver
def solve_budget(options: list[list[tuple[int, float]]], budget: int) -> tuple[list[int], float]:
    """Pick one option per item to minimise total error with total cost <= budget (exact).

    Args:
        options: per item, `(cost, error)` pairs; costs are non-negative integers.
        budget: the largest total cost allowed.

    Returns:
        `(choice, error)`: the option index chosen for each item, and the total error.

    Raises:
        ValueError: no choice fits the budget.

    Dynamic programming over the Pareto front of partial solutions: after each item, only the
    (cost, error) states not dominated by a cheaper-and-better one are kept, so the table stays small.
    """
    front: list[tuple[int, float, tuple[int, ...]]] = [(0, 0.0, ())]
    for opts in options:
        states = sorted(((c + oc, e + oe, ch + (j,)) for c, e, ch in front for j, (oc, oe) in enumerate(opts)
                         if c + oc <= budget), key=lambda s: (s[0], s[1]))
        front = []
        for s in states:
            if not front or s[1] < front[-1][1]:
                front.append(s)
        if not front:
            raise ValueError(f"no assignment fits the budget {budget}")
    best = min(front, key=lambda s: s[1])
    return list(best[2]), best[1]


def measured_candidates(options: list[list[tuple[int, float]]], budget: int, best: list[int],
                        limit: int = MAX_MEASURED) -> list[tuple[int, ...]]:
    """The choices worth measuring in context: every uniform choice (the same option index for every
    item) that fits the budget, then the lowest-error feasible choices, `limit` in all. Where there are
    too many choices to enumerate, the lowest-error one (`best`) and every feasible choice that differs
    from it in one item stand in for the latter."""
    cost = lambda ch: sum(o[j][0] for o, j in zip(options, ch))  # noqa: E731
    error = lambda ch: sum(o[j][1] for o, j in zip(options, ch))  # noqa: E731
    uniform = [(j,) * len(options) for j in range(min(len(o) for o in options))]
    uniform = [ch for ch in uniform if cost(ch) <= budget]
    if math.prod(len(o) for o in options) <= _MAX_ENUMERATED:
        others = itertools.product(*(range(len(o)) for o in options))
    else:
        others = [tuple(best)] + [tuple(best[:i]) + (j,) + tuple(best[i + 1:])
                                  for i, o in enumerate(options) for j in range(len(o)) if j != best[i]]
    rest = sorted((ch for ch in others if len(set(ch)) > 1 and cost(ch) <= budget), key=error)
    return uniform + rest[: max(limit - len(uniform), 0)]


def in_context_loss(model: torch.nn.Module, batches: Iterable, loss_fn: Callable[[object], torch.Tensor],
                    group_size: int | None) -> Callable[[dict[str, float]], float]:
    """A function that quantizes the named layers of `model` to the given widths, returns the mean of
    `loss_fn` over `batches`, and puts the full-precision weights back."""
    batches = list(batches)
    quantized: dict[tuple[str, float], torch.Tensor] = {}  # (layer, bits) -> Q_b(W), each computed once

    @torch.no_grad()
    def loss(layer_bits: dict[str, float]) -> float:
        weights = {n: model.get_submodule(n).weight for n in layer_bits}
        originals = {n: w.detach().clone() for n, w in weights.items()}
        was_training = model.training
        model.eval()
        try:
            for n, b in layer_bits.items():
                if (n, b) not in quantized:
                    quantized[n, b] = quantize_dequantize(originals[n], b, group_size)
                weights[n].copy_(quantized[n, b])
            return float(sum(float(loss_fn(batch)) for batch in batches) / max(len(batches), 1))
        finally:
            for n, w in weights.items():
                w.copy_(originals[n])
            model.train(was_training)

    return loss


# --------------------------------------------------------------------------- plan
@dataclass
class PrecisionPlan:
    """Bit width of every quantized layer, from sensitivity clusters under a bit budget.

    Attributes:
        layer_bits: `{layer name: bits}`.
        groups: layer names of each parameter cluster.
        group_bits: bit width of each cluster.
        avg_bits: requested average (nominal: 1.58 means ternary).
        budget_bits: the budget in stored bits per weight actually enforced.
        stored_bits: stored code bits per weight of the plan (scales excluded).
        scale_bits: float16 scale bits per weight (the same for every width).
        sensitivity: total Fisher-weighted error of the plan.
        optimum_sensitivity: the same for the best per-layer assignment (no clusters) under the budget.
        uniform_sensitivity: the same with every layer at the base width.
        method: "measured" (the assignment with the lowest loss in context), "sensitivity" (the one with
            the lowest Fisher-weighted error) or "random" (the sensitivity plan's widths shuffled, a control).
        layer_sensitivity: `{layer: {bits: S}}` the plan was solved from.
        measured_loss: with "measured", the plan's loss on the calibration batches, in context.
        fisher_choice_loss: the same for the assignment with the lowest Fisher-weighted error.
        uniform_loss: the same with every layer at the base width.
        measured_count: assignments measured.
    """

    layer_bits: dict[str, float]
    groups: list[list[str]]
    group_bits: list[float]
    avg_bits: float
    budget_bits: float
    stored_bits: float
    scale_bits: float
    sensitivity: float
    optimum_sensitivity: float
    uniform_sensitivity: float
    method: str = "sensitivity"
    layer_sensitivity: dict[str, dict[str, float]] = field(default_factory=dict)
    measured_loss: float | None = None
    fisher_choice_loss: float | None = None
    uniform_loss: float | None = None
    measured_count: int = 0

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> "PrecisionPlan":
        d = json.loads(text)
        return cls(**d)

    def format(self) -> str:
        """The block `distill` and `inspect` print."""
        gap = self.sensitivity / self.optimum_sensitivity - 1 if self.optimum_sensitivity > 0 else 0.0
        budget = f"budget {self.avg_bits:g} bits/weight"
        if self.budget_bits > self.avg_bits + 1e-9:
            budget += f", raised to {self.budget_bits:.2f} since packed ternary stores 1.6"
        groups = "width groups" if self.method == "random" else "parameter clusters"
        base = min(float(b) for b in next(iter(self.layer_sensitivity.values()))) if self.layer_sensitivity \
            else min(self.layer_bits.values())
        lines = [
            f"Precision plan ({self.method}, {len(self.groups)} {groups}, {budget}): {mix_name(self.layer_bits)}",
            f"  stored bits/weight {self.stored_bits:.3f} codes + {self.scale_bits:.3f} scales = "
            f"{self.stored_bits + self.scale_bits:.3f}",
            f"  Fisher-weighted error {self.sensitivity:.4g} (all {bits_name(base)}: "
            f"{self.uniform_sensitivity:.4g}; per-layer optimum {self.optimum_sensitivity:.4g}, gap {gap:+.1%})",
        ]
        if self.measured_loss is not None:
            lines.append(f"  calibration loss in context {self.measured_loss:.4f}, the lowest of {self.measured_count} "
                         f"assignments within budget (lowest Fisher-weighted error: {self.fisher_choice_loss:.4f}; "
                         f"all {bits_name(base)}: {self.uniform_loss:.4f})")
        for i, (names, b) in enumerate(zip(self.groups, self.group_bits)):
            short = ", ".join(n.removeprefix("model.") for n in names)
            lines.append(f"  {'group' if self.method == 'random' else 'cluster'} {i}: {bits_name(b):>8}  {short}")
        return "\n".join(lines)


def _costs(numel: dict[str, int], bits: tuple[float, ...], unit: Fraction) -> dict[str, list[int]]:
    return {n: [int(stored_bits(b) * c / unit) for b in bits] for n, c in numel.items()}


def build_plan(table: dict[str, dict[float, float]], numel: dict[str, int], num_clusters: int, avg_bits: float,
               scale_bits: float, seed: int = 0, method: str = "sensitivity",
               measure: Callable[[dict[str, float]], float] | None = None) -> PrecisionPlan:
    """Cluster layers by log-sensitivity and assign one width per cluster under the bit budget.

    Args:
        table: `{layer: {bits: sensitivity}}` (candidate widths in increasing order, the first the base).
        numel: weights per layer.
        num_clusters: parameter clusters K (at most the number of layers).
        avg_bits: nominal average bits per weight; the base width's nominal value means all-base.
        scale_bits: float16 scale bits per weight (reported only).
        seed: k-means seed, and the shuffle seed of `method="random"`.
        method: "measured", "sensitivity" or "random".
        measure: with "measured", the loss of the model with the given `{layer: bits}` applied
            (`in_context_loss`).
    """
    if method not in PLAN_METHODS:
        raise ValueError(f"unknown plan method {method!r}")
    if method == "measured" and measure is None:
        raise ValueError("the measured plan needs a measure function")
    names = list(table)
    bits = tuple(sorted(next(iter(table.values()))))
    base = bits[0]
    if avg_bits < base - 1e-9:
        raise ValueError(f"an average of {avg_bits:g} bits per weight is below the base width {base:g}")
    if num_clusters > len(names):
        raise ValueError(f"{num_clusters} parameter clusters exceed the {len(names)} quantized layers; "
                         f"ask for at most {len(names)}")
    # The budget in stored bits: the base width always fits (1.58 nominal -> 1.6 stored for ternary).
    budget_bits = max(Fraction(avg_bits).limit_denominator(1000), stored_bits(base))
    total = sum(numel.values())
    unit = Fraction(1, 5)  # every stored width is a multiple of 1/5 bit
    costs = _costs(numel, bits, unit)
    budget = int(budget_bits * total / unit)

    groups = _cluster_layers(table, numel, names, bits, num_clusters, seed)

    group_opts = [[(sum(costs[n][j] for n in g), sum(table[n][b] for n in g)) for j, b in enumerate(bits)]
                  for g in groups]
    choice, err = solve_budget(group_opts, budget)
    measured = {}
    if method == "measured":
        choice, err, measured = _measured_choice(group_opts, budget, choice, groups, bits, measure)
    group_bits = [bits[j] for j in choice]
    layer_bits = {n: b for g, b in zip(groups, group_bits) for n in g}
    _, optimum = solve_budget([[(costs[n][j], table[n][b]) for j, b in enumerate(bits)] for n in names], budget)
    if method == "random":
        layer_bits, groups, group_bits, err = _shuffled_widths(table, numel, names, layer_bits, seed)
    stored = float(sum(stored_bits(layer_bits[n]) * numel[n] for n in names) / total)
    return PrecisionPlan(
        layer_bits=layer_bits, groups=groups, group_bits=group_bits, avg_bits=avg_bits,
        budget_bits=float(budget_bits), stored_bits=stored, scale_bits=scale_bits, sensitivity=err,
        optimum_sensitivity=optimum, uniform_sensitivity=sum(table[n][base] for n in names), method=method,
        layer_sensitivity={n: {f"{b:g}": table[n][b] for b in bits} for n in names}, **measured,
    )


def _cluster_layers(table: dict[str, dict[float, float]], numel: dict[str, int], names: list[str],
                    bits: tuple[float, ...], num_clusters: int, seed: int) -> list[list[str]]:
    """The layers' parameter clusters by k-means on log-sensitivity per weight, in the layers' order."""
    # Per-weight sensitivity: layers grouped together then gain about as much per extra bit, which is
    # what makes one width per group close to the per-layer optimum.
    logs = np.log(np.array([[max(table[n][b] / numel[n], 1e-38) for b in bits] for n in names], dtype=np.float64))
    logs = logs - logs.mean(0, keepdims=True)
    # A few layers: restarts are cheap, and one k-means++ start often strands a cluster on an outlier.
    _, labels = kmeans(logs, num_clusters, seed, spherical=False, what="quantized layers", nredo=KMEANS_RESTARTS)
    groups = [[n for n, l in zip(names, labels) if l == g] for g in range(num_clusters)]
    groups = sorted((g for g in groups if g), key=lambda g: names.index(g[0]))
    return groups


def _measured_choice(group_opts: list[list[tuple[int, float]]], budget: int, choice: list[int],
                     groups: list[list[str]], bits: tuple[float, ...],
                     measure: Callable[[dict[str, float]], float]) -> tuple[list[int], float, dict]:
    """The `method="measured"` step: of the assignments within budget (`measured_candidates`, and `choice`, the
    lowest-error one), the one with the lowest loss in context; returns it, its Fisher-weighted error, and the
    losses `PrecisionPlan` records."""
    candidates = measured_candidates(group_opts, budget, choice)
    if tuple(choice) not in candidates:  # a tie in error the enumeration broke the other way
        candidates.append(tuple(choice))
    losses = [measure({n: bits[j] for g, j in zip(groups, ch) for n in g}) for ch in candidates]
    best = min(range(len(candidates)), key=losses.__getitem__)
    measured = {"measured_loss": losses[best], "measured_count": len(candidates),
                "fisher_choice_loss": losses[candidates.index(tuple(choice))],
                "uniform_loss": losses[candidates.index((0,) * len(groups))]}
    choice = list(candidates[best])
    err = sum(group_opts[g][j][1] for g, j in enumerate(choice))
    return choice, err, measured


def _shuffled_widths(table: dict[str, dict[float, float]], numel: dict[str, int], names: list[str],
                     layer_bits: dict[str, float], seed: int
                     ) -> tuple[dict[str, float], list[list[str]], list[float], float]:
    """The `method="random"` control: `(layer_bits, groups, group_bits, error)` with the same widths, shuffled
    among layers of the same size (same bits, random placement)."""
    rng = random.Random(seed)
    by_size: dict[int, list[str]] = {}
    for n in names:
        by_size.setdefault(numel[n], []).append(n)
    shuffled = {}
    for same in by_size.values():
        widths = [layer_bits[n] for n in same]
        rng.shuffle(widths)
        shuffled.update(zip(same, widths))
    layer_bits = {n: shuffled[n] for n in names}
    groups = [[n for n in names if layer_bits[n] == b] for b in sorted(set(layer_bits.values()))]
    group_bits = sorted(set(layer_bits.values()))
    err = sum(table[n][layer_bits[n]] for n in names)
    return layer_bits, groups, group_bits, err


def measure_layers(model: torch.nn.Module, names: list[str], batches: Iterable, loss_fn, base_bits: float,
                   group_size: int | None) -> tuple[dict[str, dict[float, float]], dict[str, int], float]:
    """Fisher on `batches`, then what `build_plan` needs: `(sensitivity table, weights per layer, scale bits
    per weight)`; measure once, plan at as many budgets as wanted."""
    fisher = fisher_diagonal(model, names, batches, loss_fn)
    table = sensitivity_table(model, fisher, candidate_bits(base_bits), group_size)
    numel = {n: model.get_submodule(n).weight.numel() for n in names}
    linears = [model.get_submodule(n) for n in names]
    scale_bits = sum(16 * m.out_features * m.in_features // (group_size or m.in_features) for m in linears)
    return table, numel, scale_bits / sum(numel.values())


def plan_for_model(model: torch.nn.Module, names: list[str], batches: Iterable, loss_fn, base_bits: float,
                   group_size: int | None, num_clusters: int, avg_bits: float | None, seed: int,
                   method: str = "measured", eval_fn: Callable[[object], torch.Tensor] | None = None) -> PrecisionPlan:
    """Measure the layers in `names` and plan (the pipeline's entry point).

    `loss_fn(batch)` is the objective the Fisher information is taken of; `eval_fn(batch)` (default
    `loss_fn`) the loss the "measured" method compares assignments by."""
    batches = list(batches)
    table, numel, scale_bits = measure_layers(model, names, batches, loss_fn, base_bits, group_size)
    measure = in_context_loss(model, batches, eval_fn or loss_fn, group_size) if method == "measured" else None
    return build_plan(table, numel, num_clusters, base_bits if avg_bits is None else avg_bits, scale_bits, seed,
                      method, measure)
