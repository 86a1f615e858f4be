"""The bench's statistics, on numbers worked out by hand."""

from __future__ import annotations

import math

import pytest

from hybridopt.bench.stats import (bootstrap_interval, decades, interpolate, log_grid, median, separated,
                                   steps_to_target, summarize, within_range)


def test_median_odd_even_and_inf():
    assert median([3.0, 1.0, 2.0]) == 2.0
    assert median([4.0, 1.0, 2.0, 3.0]) == 2.5
    assert median([1.0, math.inf, math.inf]) == math.inf  # most runs diverged: the point is diverged


def test_bootstrap_interval_brackets_the_median_and_collapses_on_equal_values():
    values = [1.0, 1.1, 1.2, 1.3, 5.0]
    lo, hi = bootstrap_interval(values)
    assert lo <= median(values) <= hi
    assert lo >= 1.0 and hi <= 5.0 and lo < hi
    assert bootstrap_interval([2.0, 2.0, 2.0]) == (2.0, 2.0)
    assert bootstrap_interval(values, seed=3) == bootstrap_interval(values, seed=3)  # reproducible


def test_separated_only_when_intervals_do_not_overlap():
    assert separated((1.0, 2.0), (2.5, 3.0)) == -1
    assert separated((2.5, 3.0), (1.0, 2.0)) == 1
    assert separated((1.0, 2.6), (2.5, 3.0)) == 0


def test_within_range_takes_the_widest_unbroken_stretch():
    lrs = [1e-4, 1e-3, 1e-2, 1e-1, 1.0]
    # 1e-4 is good alone, 1e-2..1 are good together; 1e-3 breaks the stretch.
    losses = [1.00, 1.50, 1.005, 1.009, 1.0099]
    assert within_range(lrs, losses, 1.0, 0.01) == (1e-2, 1.0)
    assert decades(within_range(lrs, losses, 1.0, 0.01)) == pytest.approx(2.0)
    assert within_range(lrs, [2.0] * 5, 1.0, 0.01) is None
    assert decades(None) == 0.0
    assert within_range(lrs, [1.0, math.inf, math.inf, math.inf, math.inf], 1.0, 0.05) == (1e-4, 1e-4)


def test_steps_to_target_and_interpolation():
    steps, losses = [0, 10, 20, 30], [8.0, 6.0, 5.0, 4.5]
    assert steps_to_target(steps, losses, 5.0) == 20
    assert steps_to_target(steps, losses, 4.0) is None
    assert interpolate(steps, losses, 24) == pytest.approx(5.0 - 0.5 * 4 / 10)
    assert interpolate(steps, losses, 100) == 4.5


def test_log_grid_spans_the_decades_evenly():
    assert log_grid(1e-4, 1e-1, 4) == [1e-4, 1e-3, 1e-2, 1e-1]
    assert log_grid(1e-4, 1e-1, 7)[1] == 0.000316
    with pytest.raises(ValueError, match="at least 2 points"):
        log_grid(1e-4, 1e-1, 1)


def _run(arm, lr, seed, curve, final, seconds=10.0):
    return {"task": "t", "arm": arm, "lr": lr, "seed": seed, "steps": [0, 50, 100], "curve": curve,
            "final_loss": final, "seconds": seconds, "train_loss": [0.0] * 100}


def test_summarize_fixes_the_target_from_the_reference_and_judges_every_arm():
    runs = []
    for seed, jitter in enumerate((0.0, 0.01, -0.01)):
        # reference: best at lr 1e-3; its curve at 80% of 100 steps is 4.0 + 0.6 * (1 - 0.6) = 4.24 (+ jitter)
        runs.append(_run("ref", 1e-3, seed, [6.0, 4.6 + jitter, 4.0 + jitter], 4.0 + jitter))
        runs.append(_run("ref", 1e-2, seed, [6.0, 5.0, 4.8], 4.8))
        # fast: reaches the target by step 50 and ends lower; diverges at its high lr
        runs.append(_run("fast", 1e-3, seed, [6.0, 4.2 + jitter, 3.9 + jitter], 3.9 + jitter, seconds=20.0))
        runs.append(_run("fast", 1e-2, seed, [6.0, 9.0, math.inf], math.inf))
    s = summarize(runs, steps=100, reference="ref")
    assert s["target"] == pytest.approx(4.24)
    assert s["best_any"] == pytest.approx(3.9)
    ref, fast = s["arms"]["ref"], s["arms"]["fast"]
    assert (ref["best_lr"], ref["worst_lr"], fast["best_lr"], fast["worst_lr"]) == (1e-3, 1e-2, 1e-3, 1e-2)
    assert ref["steps_to_target"] == 100 and fast["steps_to_target"] == 50
    assert fast["seconds_to_target"] == pytest.approx(20.0 / 100 * 50)
    assert fast["vs_reference"] == -1 and ref["vs_reference"] == 0
    assert fast["worst"] == math.inf
    assert ref["worst_vs_best_any"] == pytest.approx(4.8 / 3.9 - 1)
    assert fast["within_1pct"] == (1e-3, 1e-3) and ref["within_1pct"] is None
    assert ref["within_5pct"] == (1e-3, 1e-3)  # 4.0 <= 3.9 * 1.05


def test_no_verdict_with_fewer_than_three_seeds():
    runs = [_run("ref", 1e-3, s, [6.0, 5.0, 4.0 + 0.01 * s], 4.0 + 0.01 * s) for s in range(3)]
    runs += [_run("one", 1e-3, 0, [6.0, 4.0, 3.0], 3.0)]  # one seed: a degenerate interval far below
    s = summarize(runs, steps=100, reference="ref")
    assert s["arms"]["one"]["vs_reference"] is None and s["arms"]["ref"]["vs_reference"] == 0
