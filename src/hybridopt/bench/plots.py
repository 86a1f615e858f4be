"""The plots of `hybridopt bench`: loss curves with seed bands, final loss against learning rate, and steps
to the target, one panel per task."""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from hybridopt.bench.arms import ARMS, HYBRIDS  # noqa: E402
from hybridopt.bench.stats import median  # noqa: E402


def _colors(arms: list[str]) -> dict[str, tuple]:
    """tab20's ten dark shades in turn to the hybrids `distill --hybrid` runs, the other arms and the SGD arms
    (dashed), its light ones to whatever is left and to the ablations."""
    cmap = plt.get_cmap("tab20")
    ablation = {a for a in arms if a in ARMS and ARMS[a].description.startswith("ablation")}
    rank = lambda a: (a in ablation, a not in HYBRIDS, a.startswith("sgd") or a == "hybrid_sgd")  # noqa: E731
    ranked = sorted(arms, key=rank)  # stable: the given order within each rank
    return {a: cmap((2 * i) % 20 + (2 * i) // 20 % 2) for i, a in enumerate(ranked)}


def _width(arm: str) -> float:
    """The hybrids `distill --hybrid` runs (HYBRIDS) drawn thicker."""
    return 2.4 if arm in HYBRIDS else 1.2


def _panels(n: int, height: float):
    fig, axes = plt.subplots(1, n, figsize=(6.5 * n, height), squeeze=False)
    return fig, axes[0]


def _label(ax, title: str, xlabel: str, ylabel: str | None = None, grid_axis: str = "both") -> None:
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    if ylabel:
        ax.set_ylabel(ylabel)
    ax.grid(axis=grid_axis, alpha=0.3)


def _save(fig, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _style(arm: str) -> str:
    return "-" if arm.startswith("hybrid") else "--" if arm.startswith("sgd") else ":"


def curves(runs: list[dict], summaries: dict[str, dict], path: Path) -> None:
    """Validation loss (curve subset) against steps, each arm at its best grid point: median and min-max band."""
    tasks = list(summaries)
    fig, axes = _panels(len(tasks), 4.8)
    arms = list(dict.fromkeys(r["arm"] for r in runs))
    color = _colors(arms)
    for ax, task in zip(axes, tasks):
        s = summaries[task]
        for arm in arms:
            if arm not in s["arms"]:
                continue
            best = [r for r in runs if r["task"] == task and r["arm"] == arm and r["lr"] == s["arms"][arm]["best_lr"]]
            n = min(len(r["curve"]) for r in best)
            if n < 2:
                continue
            steps = best[0]["steps"][:n]
            cols = [[r["curve"][i] for r in best] for i in range(n)]
            ax.plot(steps, [median(c) for c in cols], _style(arm), color=color[arm], lw=_width(arm),
                    label=f"{arm} ({s['arms'][arm]['best_lr']:g})")
            ax.fill_between(steps, [min(c) for c in cols], [max(c) for c in cols], color=color[arm], alpha=0.12)
        if s["target"] is not None:
            ax.axhline(s["target"], color="k", lw=0.8, ls="-.", label="target")
        finite = [v for r in runs if r["task"] == task for v in r["curve"][1:] if math.isfinite(v)]
        if finite:
            low = min(finite)
            ax.set_ylim(low - 0.05 * abs(low), low + 1.5 * (median(finite) - low) + 0.1)
        _label(ax, f"{task}: validation loss, best lr per arm", "step", "validation loss (nats)")
    axes[-1].legend(fontsize=7, loc="upper right", ncol=2)
    _save(fig, path)


def robustness(summaries: dict[str, dict], path: Path) -> None:
    """Median final validation loss against the grid value (log x), per arm; diverged points at the top."""
    tasks = list(summaries)
    fig, axes = _panels(len(tasks), 4.8)
    arms = list(dict.fromkeys(a for s in summaries.values() for a in s["arms"]))
    color = _colors(arms)
    for ax, task in zip(axes, tasks):
        s = summaries[task]
        finite = [v for a in s["arms"].values() for v in a["median_by_lr"] if math.isfinite(v)]
        top = max(finite) if finite else 1.0
        for arm, a in s["arms"].items():
            # Grid position, not value: Prodigy's d_coef and SGD's x100 rates share the Adam grid's positions.
            xs = list(range(len(a["grid"])))
            ys = [v if math.isfinite(v) else top * 1.02 for v in a["median_by_lr"]]
            ax.plot(xs, ys, _style(arm), marker="o", ms=3, color=color[arm], lw=_width(arm), label=arm)
        ax.axhline(s["best_any"] * 1.01, color="k", lw=0.7, ls="-.", label="best of any arm +1%")
        ax.axhline(s["best_any"] * 1.05, color="gray", lw=0.7, ls=":", label="+5%")
        grid = next(iter(s["arms"].values()))["grid"]
        ax.set_xticks(range(len(grid)))
        ax.set_xticklabels([f"{v:g}" for v in _adam_grid(s)], rotation=30)
        _label(ax, f"{task}: final loss against learning rate (diverged at top)",
               "Adam-type lr (SGD: x100; Prodigy: d_coef centred on 1)", "median final validation loss")
    axes[-1].legend(fontsize=7, loc="upper center", ncol=2)
    _save(fig, path)


def _adam_grid(summary: dict) -> list[float]:
    for name in ("adamw_cosine", "hybrid_adam", "schedulefree_adamw", "muon"):
        if name in summary["arms"]:
            return summary["arms"][name]["grid"]
    return next(iter(summary["arms"].values()))["grid"]


def steps_to_target(summaries: dict[str, dict], steps: dict[str, int], path: Path) -> None:
    """Median steps to the target at each arm's best grid point; hatched bars did not reach it."""
    tasks = list(summaries)
    fig, axes = _panels(len(tasks), 4.5)
    for ax, task in zip(axes, tasks):
        s = summaries[task]
        names = list(s["arms"])
        values = [s["arms"][a]["steps_to_target"] for a in names]
        bars = ax.barh(names, [v if v is not None else steps[task] for v in values],
                       color=["tab:blue" if a.startswith("hybrid") else "tab:gray" for a in names])
        for bar, v in zip(bars, values):
            if v is None:
                bar.set_hatch("//")
                bar.set_alpha(0.35)
        ax.invert_yaxis()
        target = "not set (no reference run yet)" if s["target"] is None else f"{s['target']:.3f}"
        _label(ax, f"{task}: steps to target {target} (hatched: not reached)", "steps (median over seeds, best lr)",
               grid_axis="x")
    _save(fig, path)
