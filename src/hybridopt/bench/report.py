"""The report of `hybridopt bench`: a bench record (what `results.json` holds, summaries included) as
RESULTS.md (the command, the setting, the design document's claims, one table per task, the ternary gap,
costs and plots), the three plots beside it, and the few lines the terminal shows.

Pure functions of the record, except `write_report`, which writes the files; the bench recipe
(`hybridopt.recipes.bench`) runs the arms and builds the record.
"""

from __future__ import annotations

import math
from pathlib import Path

from hybridopt.bench import plots as bench_plots
from hybridopt.bench.arms import BASELINE, HYBRID, HYBRIDS, REFERENCE
from hybridopt.bench.stats import MIN_SEEDS, verdict
from hybridopt.bench.tasks import Budget, MLPTask
from hybridopt.config import BENCH_PRESETS
from hybridopt.fileio import atomic_write


def write_report(record: dict, out: Path) -> None:
    """The plots and RESULTS.md of a bench record (as `results.json` holds it, summaries included)."""
    steps = {name: t["steps"] for name, t in record["tasks"].items() if name in record["summaries"]}
    bench_plots.curves(record["runs"], record["summaries"], out / "curves.png")
    bench_plots.robustness(record["summaries"], out / "lr_robustness.png")
    bench_plots.steps_to_target(record["summaries"], steps, out / "steps_to_target.png")
    text = format_results(record)
    atomic_write(out / "RESULTS.md", lambda tmp: Path(tmp).write_text(text))


def _f(x: float | None, digits: int = 4) -> str:
    if x is None:
        return "not reached"
    return "diverged" if not math.isfinite(x) else f"{x:.{digits}f}"


def _span(span: list | tuple | None, width: float) -> str:
    return "none" if span is None else f"{width:.2f} ({span[0]:g}..{span[1]:g})"


def _pct(new: float | None, old: float | None) -> str:
    if new is None or old is None or not (math.isfinite(new) and math.isfinite(old)) or old == 0:
        return "n/a"
    return f"{(old - new) / old * 100:+.1f}%"


def _verdict(v: int | None) -> str:
    return f"n/a (< {MIN_SEEDS} seeds)" if v is None else {-1: "better", 0: "tie", 1: "worse"}[v]


def _steps(v: float | None) -> str:
    return "not reached" if v is None else f"{v:g}"


def _task_table(name: str, s: dict, t: dict) -> list[str]:
    lines = [f"## Task `{name}`", "", t["description"] + ".",
             f"{t['steps']} steps per run, batch {t['batch_size']}" + (f" x {t['seq_len']} tokens" if t["seq_len"] else "") + ".",
             ""]
    if s["target"] is not None:
        lines.append(f"Target validation loss **{s['target']:.4f}**: what {REFERENCE} at its best grid point reaches "
                     f"(median over seeds) at {s['target_fraction']:.0%} of the step budget, fixed before any arm "
                     "is compared. Best final loss of any arm at any grid point: "
                     f"**{s['best_any']:.4f}**.")
    if t.get("teacher_val_loss") is not None:
        lines.append(f"The teacher's validation loss: {t['teacher_val_loss']:.4f}.")
    lines += ["", "| arm | best lr | final loss at best lr [95% CI] | ppl | vs AdamW | worst lr | worst final | "
                  "worst vs best of any arm | within 1% (decades, lr range) | within 5% | steps to target | "
                  "seconds to target |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for arm, a in s["arms"].items():
        ci = a["final_interval"]
        ppl = math.exp(a["final_at_best"]) if math.isfinite(a["final_at_best"]) and a["final_at_best"] < 50 else math.inf
        lines.append(
            f"| {arm} | {a['best_lr']:g} | {_f(a['final_at_best'])} [{_f(ci[0])}, {_f(ci[1])}] | {_f(ppl, 2)} | "
            f"{_verdict(a.get('vs_reference', 0)) if arm != REFERENCE else 'reference'} | {a['worst_lr']:g} | "
            f"{_f(a['worst'])} | {'+' if math.isfinite(a['worst_vs_best_any']) else ''}"
            f"{a['worst_vs_best_any'] * 100 if math.isfinite(a['worst_vs_best_any']) else math.inf:.1f}% | "
            f"{_span(a['within_1pct'], a['within_1pct_decades'])} | {_span(a['within_5pct'], a['within_5pct_decades'])} | "
            f"{_steps(a['steps_to_target'])} ({a['reached']}) | "
            f"{_f(a['seconds_to_target'], 1)} |")
    lines += ["", "Final loss by grid point (median over seeds; `-` diverged):", "",
              "| arm | " + " | ".join(f"point {i + 1}" for i in range(len(next(iter(s['arms'].values()))['grid']))) + " |",
              "|---|" + "---|" * len(next(iter(s["arms"].values()))["grid"])]
    for arm, a in s["arms"].items():
        cells = [f"{lr:g}: {v:.4f}" if math.isfinite(v) else f"{lr:g}: -" for lr, v in zip(a["grid"], a["median_by_lr"])]
        lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    return lines + [""]


def _gap_table(record: dict) -> list[str]:
    s = record["summaries"]
    if "distill" not in s or "distill_ternary" not in s:
        return []
    lines = ["## Ternary minus full precision", "", "Each arm at its own best grid point in each task.", "",
             "| arm | FP final | ternary final | gap |", "|---|---|---|---|"]
    for arm, a in s["distill"]["arms"].items():
        b = s["distill_ternary"]["arms"].get(arm)
        if b is None:
            continue
        gap = b["final_at_best"] - a["final_at_best"]
        lines.append(f"| {arm} | {_f(a['final_at_best'])} | {_f(b['final_at_best'])} | {_f(gap)} |")
    return lines + [""]


def _claims(record: dict) -> list[str]:
    s = record["summaries"]

    def arm(task, name):
        return s.get(task, {}).get("arms", {}).get(name)

    def faster(task, new, old):
        a, b = arm(task, new), arm(task, old)
        if a is None or b is None:
            return "not run"
        sa, sb = a["steps_to_target"], b["steps_to_target"]
        if sa is None:
            return f"{new} did not reach the target" + ("" if sb is None else f" ({old}: {sb} steps)")
        if sb is None:
            return f"{new} {sa} steps; {old} did not reach the target"
        return f"{new} {sa} vs {old} {sb} steps to target: {(sb - sa) / sb * 100:+.0f}% fewer"

    def lower(task, new, old):
        a, b = arm(task, new), arm(task, old)
        if a is None or b is None:
            return "not run"
        return (f"{new} {_f(a['final_at_best'])} vs {old} {_f(b['final_at_best'])}: "
                f"{_pct(a['final_at_best'], b['final_at_best'])} lower ({_verdict(verdict(a, b))} by the intervals)")

    def gap(name):
        a, b = arm("distill", name), arm("distill_ternary", name)
        return None if a is None or b is None else b["final_at_best"] - a["final_at_best"]

    g_h, g_b = gap("hybrid_sgd"), gap(BASELINE)
    g_ha, g_r = gap(HYBRID), gap(REFERENCE)
    quant = "not run" if g_h is None or g_b is None else (
        f"ternary-minus-FP loss gap: hybrid_sgd {_f(g_h)} vs sgd {_f(g_b)} ({_pct(g_h, g_b)} lower)"
        + ("" if g_ha is None or g_r is None else f"; {HYBRID} {_f(g_ha)} vs {REFERENCE} {_f(g_r)} ({_pct(g_ha, g_r)} lower)"))
    cmd = record["command"]
    return [
        "## The design document's claims", "",
        "| claim | measured here | command |", "|---|---|---|",
        f"| 35% faster convergence (standard training: 85 -> 55 steps) | {faster('distill', 'hybrid_sgd', BASELINE)}; "
        f"{faster('distill', HYBRID, REFERENCE)} | `{cmd}` |",
        f"| 30-37% faster with QAT / 1.58-bit (95 -> 60 steps) | {faster('distill_ternary', 'hybrid_sgd', BASELINE)}; "
        f"{faster('distill_ternary', HYBRID, REFERENCE)} | `{cmd}` |",
        f"| 15% lower final loss (0.450 -> 0.382) | {lower('distill', 'hybrid_sgd', BASELINE)}; "
        f"{lower('distill', HYBRID, REFERENCE)} | `{cmd}` |",
        f"| 33% lower quantization error (0.18 -> 0.12) | {quant} | `{cmd}` |",
        "",
    ]


def _losses(record: dict) -> list[str]:
    """Plain sentences: where each hybrid (distill --hybrid, over Schedule-Free and over Adam) is worse than,
    ties or beats tuned AdamW."""
    lines = ["## Where the hybrid stands", ""]
    for task, s in record["summaries"].items():
        for name in HYBRIDS:
            h, r = s["arms"].get(name), s["arms"].get(REFERENCE)
            if h is None or r is None:
                continue
            word = {-1: "beats", 0: "ties (the intervals overlap)", 1: "loses to",
                    None: f"cannot yet be judged (fewer than {MIN_SEEDS} seeds) against"}[verdict(h, r)]
            lines.append(f"- `{task}`: {name} {word} tuned {REFERENCE} in final loss at equal steps "
                         f"({_f(h['final_at_best'])} vs {_f(r['final_at_best'])}); steps to target "
                         f"{_steps(h['steps_to_target'])} vs {_steps(r['steps_to_target'])}; its worst grid "
                         f"point ends {h['worst_vs_best_any'] * 100:+.1f}% from the best of any arm (the tuning-free "
                         f"goal asks within 5%); within-1% range {h['within_1pct_decades']:.2f} decades vs "
                         f"{r['within_1pct_decades']:.2f} for AdamW.")
            better = [n for n, a in s["arms"].items() if n != name and verdict(a, h) == -1]
            if better:
                lines.append(f"  Arms with a final loss whose interval lies wholly below {name}'s: {', '.join(better)}.")
    return lines + [""]


def _cost_table(record: dict) -> list[str]:
    c = record.get("costs")
    if not c:
        return []
    lines = ["## Cost", "", c["note"], "",
             "| arm | optimizer step / AdamW (foreach) | training step / AdamW | optimizer state (MB) |",
             "|---|---|---|---|"]
    for arm, v in c["arms"].items():
        lines.append(f"| {arm} | {v['optimizer_step_ratio']:.2f}x | {v['train_step_ratio']:.3f}x | "
                     f"{v['state_mb']:.1f} |")
    p = c.get("pipeline")
    if p:
        lines += ["", f"- `distill`'s training step (the Trainer: live teacher, KD loss, clipping, AdamW, schedule, "
                      f"metrics) against a minimal hand-written loop (teacher forward + student forward/backward + "
                      f"AdamW) on the same batches: **{p['tokens_per_s_ratio']:.3f}x** the loop's tokens/s "
                      f"({p['trainer_tokens_per_s']:.0f} vs {p['loop_tokens_per_s']:.0f} tokens/s)."]
    q = c.get("qat")
    if q:
        lines.append(f"- Ternary QAT step over full-precision step (same loop, cached teacher logits): "
                     f"**{q['ratio']:.2f}x**.")
    lines.append(f"- Peak resident memory of the bench process: {record['peak_rss_mb']:.0f} MB.")
    return lines + [""]


def _sessions_note(record: dict) -> str:
    """For a resumed bench: which session ran how many runs (costs are measured by the last)."""
    sessions = record.get("sessions", [])
    if len(sessions) < 2:
        return ""
    parts = [f"`{x['command']}`, {x['runs']} runs in {(x['wall_s'] or 0) / 60:.1f} min" for x in sessions]
    return f" in {len(sessions)} sessions ({'; '.join(parts)}; the costs below are from the last)"


def format_results(record: dict) -> str:
    """RESULTS.md: the command, the setting, the claims, one table per task, the gap, costs and plots."""
    cfg, v = record["config"], record["versions"]
    threads = (f"{record['workers']} worker processes of 1 thread each" if record.get("workers", 1) > 1
               else f"{v['torch_threads']} threads")
    lines = ["# hybridopt bench results", "", "Produced by:", "", "```", record["command"], "```", "",
             f"Preset `{record['preset']}`: {cfg['grid_points']} grid points per arm, {cfg['seeds']} seeds per point, "
             f"Adam-type grid {', '.join(f'{x:g}' for x in record['adam_grid'])} (SGD arms x100; Prodigy's d_coef "
             f"centred on 1). Device {record['device']}, {threads}; torch {v['torch']}, "
             f"transformers {v['transformers']}, schedulefree {v['schedulefree']}, prodigyopt {v['prodigyopt']}. "
             f"Wall time {record['wall_s'] / 60:.1f} min{_sessions_note(record)}.",
             *([] if "interrupted_after_runs" not in record else [
                 "", f"**Partial**: interrupted after {record['interrupted_after_runs']} of {record['planned_runs']} "
                     "runs; the tables summarise the runs that finished (fewer seeds where a grid point is short)."]),
             *([] if "muon" not in record["arms"] or record["device"] != "cpu" else [
                 "", "On this CPU the `muon` arm runs torch.optim.Muon with its Newton-Schulz orthogonalisation in "
                     "float32 instead of bfloat16 (`Float32Muon`: bfloat16 is about 30x slower on CPUs without "
                     "bfloat16 matrix units)."]),
             "", "Medians over seeds with bootstrap 95% intervals; a difference is called better or worse only when "
                 "the intervals do not overlap. Validation loss in nats per token (per example for mlp). The loss "
                 f"curves use the first validation blocks ({BENCH_PRESETS['default']['curve_blocks']} in the default "
                 f"preset), final losses the first {Budget.final_blocks} (all {MLPTask.n_val} points for mlp). A run is "
                 "stopped as diverged when its loss is not finite or exceeds 3x its starting loss.", ""]
    lines += _claims(record)
    lines += _losses(record)
    for name, s in record["summaries"].items():
        lines += _task_table(name, s, record["tasks"][name])
    lines += _gap_table(record)
    lines += _cost_table(record)
    lines += ["## Plots", "", "![validation loss curves](curves.png)", "",
              "![final loss against learning rate](lr_robustness.png)", "",
              "![steps to target](steps_to_target.png)", ""]
    return "\n".join(lines)


def format_headline(record: dict) -> str:
    """A few lines for the terminal: per task, the best arm and where the hybrid stands."""
    lines = []
    for task, s in record["summaries"].items():
        best = min(s["arms"].items(), key=lambda kv: kv[1]["best"])
        h, r = s["arms"].get(HYBRID), s["arms"].get(REFERENCE)
        line = f"{task}: best {best[0]} {_f(best[1]['best'])} at {best[1]['best_lr']:g}"
        if h and r:
            line += (f"; {HYBRID} {_f(h['final_at_best'])} vs {REFERENCE} {_f(r['final_at_best'])} "
                     f"({_verdict(verdict(h, r))}), steps to target {_steps(h['steps_to_target'])} vs "
                     f"{_steps(r['steps_to_target'])}")
        lines.append(line)
    return "\n".join(lines)
