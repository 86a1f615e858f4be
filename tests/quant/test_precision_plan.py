"""Mixed precision: the budget solver (never over budget, optimal by brute force), sensitivities, plans."""

import copy
import itertools
import math
from fractions import Fraction

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hybridopt.quant.precision_plan import (PrecisionPlan, build_plan, candidate_bits, fisher_diagonal, in_context_loss,
                                      measured_candidates, sensitivity, solve_budget, stored_bits)
from hybridopt.quant.qat import QATConfig, quantize_

options_st = st.lists(st.lists(st.tuples(st.integers(0, 40), st.floats(0, 100)), min_size=1, max_size=4),
                      min_size=1, max_size=5)


@settings(max_examples=150, deadline=None)
@given(options=options_st, budget=st.integers(0, 150))
def test_solver_matches_brute_force_and_never_exceeds_the_budget(options, budget):
    feasible = [(sum(o[j][1] for o, j in zip(options, ch)), ch)
                for ch in itertools.product(*[range(len(o)) for o in options])
                if sum(o[j][0] for o, j in zip(options, ch)) <= budget]
    if not feasible:
        with pytest.raises(ValueError, match="no assignment fits"):
            solve_budget(options, budget)
        return
    choice, err = solve_budget(options, budget)
    assert sum(o[j][0] for o, j in zip(options, choice)) <= budget
    assert err == pytest.approx(sum(o[j][1] for o, j in zip(options, choice)))
    assert err == pytest.approx(min(e for e, _ in feasible), abs=1e-9)


def test_stored_bits_count_packed_ternary_honestly():
    assert stored_bits(1.58) == Fraction(8, 5)
    assert [stored_bits(b) for b in (1.0, 2.0, 4.0, 8.0)] == [1, 2, 4, 8]
    assert candidate_bits(1.58) == (1.58, 2.0, 4.0, 8.0)
    assert candidate_bits(1.0) == (1.0, 1.58, 2.0, 4.0, 8.0)
    assert candidate_bits(4.0) == (4.0, 8.0)


def test_sensitivity_is_fisher_weighted_quantization_error():
    torch.manual_seed(0)
    w = torch.randn(8, 16)
    assert sensitivity(w, torch.zeros_like(w), 1.58, None) == 0.0
    ones = sensitivity(w, torch.ones_like(w), 1.58, None)
    assert ones > sensitivity(w, torch.ones_like(w), 4.0, None) > sensitivity(w, torch.ones_like(w), 8.0, None) > 0
    fisher = torch.zeros_like(w)
    fisher[0] = 1.0  # only the first row matters
    from hybridopt.quant.quantizers import dequantize_weight, quantize_weight

    q, s = quantize_weight(w, 1.58)
    assert sensitivity(w, fisher, 1.58, None) == pytest.approx(float((w - dequantize_weight(q, s))[0].pow(2).sum()))


def test_fisher_diagonal_is_the_mean_squared_gradient():
    torch.manual_seed(0)
    lin = torch.nn.Sequential(torch.nn.Linear(4, 3))
    batches = [torch.randn(5, 4) for _ in range(3)]
    fisher = fisher_diagonal(lin, ["0"], batches, lambda x: lin(x).pow(2).sum())
    assert lin[0].weight.grad is None  # gradients cleared: the training step is not disturbed
    grads = []
    for x in batches:
        lin.zero_grad()
        lin(x).pow(2).sum().backward()
        grads.append(lin[0].weight.grad.clone())
    assert torch.allclose(fisher["0"], torch.stack(grads).pow(2).mean(0))


def _table(n_layers=8, seed=0):
    """Synthetic sensitivities: layer l is 10^(l/2) times as sensitive; error falls ~4x per extra bit."""
    g = torch.Generator().manual_seed(seed)
    table, numel = {}, {}
    for i in range(n_layers):
        base = 10 ** (i / 2) * (1 + 0.1 * float(torch.rand((), generator=g)))
        table[f"l{i}"] = {1.58: base, 2.0: base * 0.8, 4.0: base * 0.05, 8.0: base * 0.0002}
        numel[f"l{i}"] = 256 * (1 + i % 2)
    return table, numel


@pytest.mark.parametrize("avg_bits", [1.58, 2.0, 2.5, 3.0, 4.0, 8.0])
def test_plan_stays_within_budget_and_beats_the_random_control(avg_bits):
    table, numel = _table()
    plan = build_plan(table, numel, 3, avg_bits, scale_bits=0.0625, seed=0)
    total = sum(numel.values())
    stored = sum(stored_bits(plan.layer_bits[n]) * numel[n] for n in numel) / total
    assert float(stored) == pytest.approx(plan.stored_bits)
    assert stored <= max(Fraction(avg_bits).limit_denominator(1000), Fraction(8, 5))
    assert len(plan.groups) == 3 and sorted(sum(plan.groups, [])) == sorted(table)
    assert all(len({plan.layer_bits[n] for n in g}) == 1 for g in plan.groups)
    assert plan.optimum_sensitivity <= plan.sensitivity + 1e-12 <= plan.uniform_sensitivity + 1e-12
    if avg_bits == 1.58:
        assert set(plan.layer_bits.values()) == {1.58}
    if avg_bits >= 3.0:
        assert plan.sensitivity < plan.uniform_sensitivity
    rand = build_plan(table, numel, 3, avg_bits, 0.0625, seed=0, method="random")
    assert rand.stored_bits == pytest.approx(plan.stored_bits)  # same bits, shuffled among same-size layers
    assert rand.sensitivity >= plan.sensitivity - 1e-12
    assert PrecisionPlan.from_json(plan.to_json()) == plan


def test_more_sensitive_layers_get_more_bits():
    table, numel = _table()
    plan = build_plan(table, numel, 4, 3.0, 0.0625, seed=0)
    by_layer = [plan.layer_bits[f"l{i}"] for i in range(8)]
    assert by_layer == sorted(by_layer)  # sensitivity grows with i
    assert by_layer[-1] > by_layer[0]


def test_plan_guards():
    table, numel = _table(3)
    with pytest.raises(ValueError, match="5 parameter clusters exceed the 3 quantized layers"):
        build_plan(table, numel, 5, 2.0, 0.0)
    with pytest.raises(ValueError, match="below the base width"):
        build_plan(table, numel, 2, 1.0, 0.0)


def test_plan_format_names_widths_budget_and_gap():
    table, numel = _table()
    text = build_plan(table, numel, 3, 3.0, 0.0625).format()
    assert "3 parameter clusters, budget 3 bits/weight" in text
    assert "per-layer optimum" in text and "gap" in text
    assert text.count("  cluster ") == 3
    assert not math.isnan(float(text.split("stored bits/weight ")[1].split()[0]))


def test_layer_clusters_follow_sensitivity_levels():
    # Per-weight log-sensitivity levels of the default student's 14 layers after one epoch: two
    # near-twins far below the rest (q/k of layer 0), two further below (q/k of layer 1), and a
    # spread bulk. A single k-means++ start used to give each twin its own cluster and leave the bulk whole.
    levels = {"q0": -32.1, "k0": -32.8, "v0": -28.1, "o0": -27.5, "gate0": -29.4, "up0": -29.6, "down0": -28.2,
              "q1": -39.6, "k1": -39.2, "v1": -27.9, "o1": -25.5, "gate1": -29.0, "up1": -29.4, "down1": -26.9}
    numel = {n: 131072 if n[:-1] in ("gate", "up", "down") else 65536 for n in levels}
    noise = {1.58: 1.0, 2.0: 0.65, 4.0: 0.058, 8.0: 0.00018}  # error of each width relative to ternary
    table = {n: {b: math.exp(lv) * numel[n] * r for b, r in noise.items()} for n, lv in levels.items()}
    plan = build_plan(table, numel, 4, 3.0, 0.0625, seed=0)
    group_of = {n: i for i, g in enumerate(plan.groups) for n in g}
    assert group_of["q0"] == group_of["k0"] and group_of["q1"] == group_of["k1"] != group_of["q0"]
    assert max(len(g) for g in plan.groups) <= 8


@settings(max_examples=60, deadline=None)
@given(options=options_st, budget=st.integers(0, 150), limit=st.integers(1, 20))
def test_measured_candidates_fit_the_budget_and_include_every_uniform_choice(options, budget, limit):
    feasible = [ch for ch in itertools.product(*[range(len(o)) for o in options])
                if sum(o[j][0] for o, j in zip(options, ch)) <= budget]
    if not feasible:
        return
    best, _ = solve_budget(options, budget)
    cands = measured_candidates(options, budget, best, limit)
    assert len(set(cands)) == len(cands) and set(cands) <= set(feasible)
    uniform = [ch for ch in feasible if len(set(ch)) == 1]
    assert set(uniform) <= set(cands) and len(cands) <= max(limit, len(uniform))
    if len(feasible) <= limit:
        assert set(cands) == set(feasible)


def test_measured_candidates_fall_back_to_neighbours_of_the_best_when_there_are_too_many():
    options = [[(1, 4.0), (2, 1.0), (4, 0.1), (8, 0.0)]] * 9  # 4**9 choices: too many to enumerate
    best, _ = solve_budget(options, 20)
    cands = measured_candidates(options, 20, best, limit=1000)
    assert tuple(best) in cands and (0,) * 9 in cands and (1,) * 9 in cands
    assert all(sum(a != b for a, b in zip(ch, best)) <= 1 or len(set(ch)) == 1 for ch in cands)


def test_measured_plan_picks_the_lowest_measured_loss_not_the_lowest_fisher_error():
    table, numel = _table()
    fisher = build_plan(table, numel, 3, 3.0, 0.0625, seed=0)
    assert len(set(fisher.layer_bits.values())) > 1  # the Fisher-optimal plan mixes widths
    seen = []

    def interacting(layer_bits):
        """Losses that add up like the Fisher error, plus a penalty for every mixture of widths."""
        seen.append(dict(layer_bits))
        return sum(table[n][b] for n, b in layer_bits.items()) + 1e6 * (len(set(layer_bits.values())) > 1)

    plan = build_plan(table, numel, 3, 3.0, 0.0625, seed=0, method="measured", measure=interacting)
    measured = list(seen)
    assert plan.measured_count == len(measured) > 1  # one call per candidate
    assert len(set(plan.layer_bits.values())) == 1 and plan.stored_bits <= plan.budget_bits
    assert plan.measured_loss == min(interacting(b) for b in measured)
    assert plan.fisher_choice_loss == interacting(fisher.layer_bits) > plan.measured_loss
    assert plan.groups == fisher.groups
    # With losses that do add up, measuring agrees with the solver.
    additive = build_plan(table, numel, 3, 3.0, 0.0625, seed=0, method="measured",
                          measure=lambda lb: sum(table[n][b] for n, b in lb.items()))
    assert additive.layer_bits == fisher.layer_bits and additive.measured_loss == pytest.approx(fisher.sensitivity)
    assert "calibration loss in context" in plan.format() and PrecisionPlan.from_json(plan.to_json()) == plan
    with pytest.raises(ValueError, match="needs a measure function"):
        build_plan(table, numel, 3, 3.0, 0.0625, method="measured")


def test_in_context_loss_matches_the_quantized_model_and_restores_the_weights():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 8))
    batches = [torch.randn(4, 16) for _ in range(3)]
    loss_fn = lambda x: model(x).pow(2).mean()  # noqa: E731
    before = {k: v.clone() for k, v in model.state_dict().items()}
    measure = in_context_loss(model, batches, loss_fn, None)
    layer_bits = {"0": 1.58, "2": 4.0}
    got = measure(layer_bits)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert model.training and model[0].weight.grad is None
    quantized = copy.deepcopy(model)
    quantize_(quantized, QATConfig(bits=1.58, layer_bits=layer_bits))  # both linears, at their planned widths
    with torch.no_grad():
        want = sum(float(quantized(x).pow(2).mean()) for x in batches) / len(batches)
    assert got == pytest.approx(want, rel=1e-6)
    assert got != pytest.approx(measure({"0": 8.0, "2": 8.0}), rel=1e-4)  # the widths matter
