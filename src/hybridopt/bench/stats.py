"""The statistics of `hybridopt bench`: medians with bootstrap intervals over seeds, the learning-rate
robustness of an arm over its grid, and steps to a target loss (MLCommons AlgoPerf's time-to-result).

Pure functions over plain lists of floats; a diverged run's loss is `math.inf` and counts as the worst.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence


def median(values: Sequence[float]) -> float:
    """The median (the mean of the two middle values for an even count); inf when most values are inf."""
    s = sorted(values)
    if not s:
        raise ValueError("median of no values")
    mid = len(s) // 2
    return s[mid] if len(s) % 2 else (s[mid - 1] + s[mid]) / 2


def bootstrap_interval(values: Sequence[float], level: float = 0.95, resamples: int = 2000,
                       seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of the median of `values` (resampled with replacement)."""
    if not values:
        raise ValueError("bootstrap of no values")
    rng = random.Random(seed)
    n = len(values)
    meds = sorted(median([values[rng.randrange(n)] for _ in range(n)]) for _ in range(resamples))
    lo = meds[int(math.floor((1 - level) / 2 * (resamples - 1)))]
    hi = meds[int(math.ceil((1 + level) / 2 * (resamples - 1)))]
    return lo, hi


def separated(a: tuple[float, float], b: tuple[float, float]) -> int:
    """-1 when interval `a` lies wholly below `b` (a wins on a loss), 1 when wholly above, 0 when they overlap."""
    if a[1] < b[0]:
        return -1
    if a[0] > b[1]:
        return 1
    return 0


def within_range(lrs: Sequence[float], losses: Sequence[float], reference: float,
                 tolerance: float) -> tuple[float, float] | None:
    """The widest run of consecutive grid points (sorted by lr) whose loss is within `tolerance` (relative)
    of `reference`, as (lowest lr, highest lr); None when no point is.

    A grid point inside a good stretch that fails breaks it: robustness is the lr range a user can pick
    from without a bad surprise, not the spread of scattered good points.
    """
    pairs = sorted(zip(lrs, losses))
    bound = reference * (1 + tolerance)
    best, start = None, None
    for i, (_, loss) in enumerate(pairs + [(math.nan, math.inf)]):
        if loss <= bound:
            start = i if start is None else start
            continue
        if start is not None:
            if best is None or (i - 1 - start) > (best[1] - best[0]):
                best = (start, i - 1)
            start = None
    return None if best is None else (pairs[best[0]][0], pairs[best[1]][0])


def decades(span: tuple[float, float] | None) -> float:
    """Width of an lr range in decades (log10 of its ratio); 0 for one point, 0 for None too."""
    return 0.0 if span is None else math.log10(span[1] / span[0])


def steps_to_target(steps: Sequence[int], losses: Sequence[float], target: float) -> int | None:
    """The first evaluated step whose loss is at or below `target`; None when never reached."""
    for step, loss in zip(steps, losses):
        if loss <= target:
            return step
    return None


def interpolate(steps: Sequence[int], losses: Sequence[float], at: float) -> float:
    """The loss curve at step `at`, linear between evaluations (the budget fraction where the target is read)."""
    if at <= steps[0]:
        return losses[0]
    for (s0, l0), (s1, l1) in zip(zip(steps, losses), zip(steps[1:], losses[1:])):
        if s0 <= at <= s1:
            return l0 + (l1 - l0) * (at - s0) / (s1 - s0)
    return losses[-1]


def log_grid(low: float, high: float, points: int) -> list[float]:
    """`points` learning rates evenly spaced in log scale from `low` to `high`, rounded to 3 significant digits."""
    if points < 2 or not 0 < low < high:
        raise ValueError(f"a log grid needs 0 < low < high and at least 2 points, got {low}, {high}, {points}")
    step = (math.log10(high) - math.log10(low)) / (points - 1)
    return [float(f"{10 ** (math.log10(low) + i * step):.3g}") for i in range(points)]


# ---------------------------------------------------------------------------- one task's summary
def summarize(runs: list[dict], steps: int, reference: str, target_fraction: float = 0.8) -> dict:
    """The tables of one task from its runs (dicts with task, arm, lr, seed, steps, curve, final_loss,
    seconds, train_loss).

    Per arm: every grid point's median final loss and interval; the best and the worst point; the lr ranges
    within 1% and 5% of the best loss of any arm; steps and seconds to the target at its best point. The
    target is fixed from `reference` (tuned AdamW) before any arm is judged: its median curve at
    `target_fraction` of the step budget, at its best grid point.
    """
    arms: dict[str, dict] = {}
    for r in runs:
        a = arms.setdefault(r["arm"], {"points": {}})
        a["points"].setdefault(r["lr"], []).append(r)
    for a in arms.values():
        a["grid"] = sorted(a["points"])
        a["median"] = {lr: median([r["final_loss"] for r in rs]) for lr, rs in a["points"].items()}
        a["interval"] = {lr: bootstrap_interval([r["final_loss"] for r in rs]) for lr, rs in a["points"].items()}
        a["best_lr"] = min(a["grid"], key=lambda lr: (a["median"][lr], lr))
        a["worst_lr"] = max(a["grid"], key=lambda lr: (a["median"][lr], -lr))
    best_any = min(a["median"][a["best_lr"]] for a in arms.values())
    target = None
    if reference in arms:
        ref = arms[reference]["points"][arms[reference]["best_lr"]]
        target = median([interpolate(r["steps"], r["curve"], target_fraction * steps) for r in ref])
    out = {"best_any": best_any, "target": target, "target_fraction": target_fraction, "arms": {}}
    for name, a in arms.items():
        best_runs = a["points"][a["best_lr"]]
        to_target = [steps_to_target(r["steps"], r["curve"], target) if target is not None else None
                     for r in best_runs]
        reached = [s for s in to_target if s is not None]
        seconds = [r["seconds"] / max(1, len(r["train_loss"])) * s
                   for r, s in zip(best_runs, to_target) if s is not None]
        finals = [r["final_loss"] for r in best_runs]
        spans = {tol: within_range(a["grid"], [a["median"][lr] for lr in a["grid"]], best_any, tol)
                 for tol in (0.01, 0.05)}
        out["arms"][name] = {
            "grid": a["grid"],
            "median_by_lr": [a["median"][lr] for lr in a["grid"]],
            "interval_by_lr": [list(a["interval"][lr]) for lr in a["grid"]],
            "best_lr": a["best_lr"], "best": a["median"][a["best_lr"]], "best_interval": list(a["interval"][a["best_lr"]]),
            "worst_lr": a["worst_lr"], "worst": a["median"][a["worst_lr"]],
            "worst_vs_best_any": a["median"][a["worst_lr"]] / best_any - 1,
            "within_1pct": spans[0.01], "within_1pct_decades": decades(spans[0.01]),
            "within_5pct": spans[0.05], "within_5pct_decades": decades(spans[0.05]),
            "steps_to_target": median(reached) if len(reached) * 2 > len(to_target) else None,
            "reached": f"{len(reached)}/{len(to_target)}",
            "seconds_to_target": median(seconds) if len(reached) * 2 > len(to_target) else None,
            "final_at_best": median(finals), "final_interval": bootstrap_interval(finals),
            "seeds": len(best_runs),
        }
    if reference in out["arms"]:
        ref = out["arms"][reference]
        for s in out["arms"].values():
            s["vs_reference"] = verdict(s, ref)
    return out


MIN_SEEDS = 3  # fewer seeds make no interval worth judging by


def verdict(a: dict, b: dict) -> int | None:
    """`separated` on two arms' final-loss intervals; None when either has fewer than MIN_SEEDS seeds."""
    if min(a["seeds"], b["seeds"]) < MIN_SEEDS:
        return None
    return separated(tuple(a["final_interval"]), tuple(b["final_interval"]))
