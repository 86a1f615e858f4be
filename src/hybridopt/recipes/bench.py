"""`hybridopt bench`: every optimizer arm on the same tasks, learning-rate grid and seeds.

    run_bench(BenchConfig(quick=True))   # -> the output folder

Writes into `--out`: `results.json` (every run: task, arm, lr, seed, per-step training losses, validation
curve, final loss, wall time, threads; the summaries, costs, config and versions; rewritten after every run,
so an interrupted bench keeps what it measured), `RESULTS.md` (the tables, the command at the top) and three
PNG plots. `--workers N` runs N at a time in worker processes of one thread each. The arms are in
`hybridopt.bench.arms`, the tasks and the training loop in `hybridopt.bench.tasks`, the statistics in
`hybridopt.bench.stats`.
"""

from __future__ import annotations

import contextlib
import json
import math
import multiprocessing
import platform
import resource
import shlex
import signal
import time
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import asdict
from importlib import metadata
from pathlib import Path

import torch

from hybridopt.bench import plots as bench_plots
from hybridopt.bench.arms import ARMS, BASELINE, HYBRID, HYBRIDS, REFERENCE, REPLAYED
from hybridopt.bench.stats import MIN_SEEDS, log_grid, summarize, verdict
from hybridopt.bench.tasks import Budget, DistillTask, MLPTask, measure_costs, run_arm
from hybridopt.fileio import atomic_write
from hybridopt.config import BENCH_PRESETS, BenchConfig
from hybridopt.errors import UserError, for_flag
from hybridopt.training.layout import RUNS_ROOT, OutputRefused, check_output, claim_output, occupied
from hybridopt.reporting import Reporter
from hybridopt.training.trainer import StopOnSignal, StopRequested
from hybridopt.utils import resolve_device


def _versions() -> dict:
    v = {"python": platform.python_version(), "platform": platform.platform(), "machine": platform.machine(),
         "torch_threads": torch.get_num_threads()}
    for pkg in ("hybridopt", "torch", "transformers", "schedulefree", "prodigyopt", "faiss-cpu"):
        try:
            v[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            v[pkg] = None
    return v


def _tasks(cfg: BenchConfig, device: torch.device, reporter: Reporter) -> list:
    lm = Budget(cfg.steps, cfg.batch_size, cfg.seq_len, cfg.eval_every, cfg.curve_blocks)
    tasks, fp = [], None
    if "distill" in cfg.task or "distill_ternary" in cfg.task:
        with for_flag("--teacher/--data"):
            fp = DistillTask("distill", lm, cfg.teacher, cfg.data, device, reporter)
        if "distill" in cfg.task:
            tasks.append(fp)
        if "distill_ternary" in cfg.task:
            tasks.append(DistillTask("distill_ternary", lm, None, [], device, reporter, ternary=True, shared=fp))
    if "mlp" in cfg.task:
        eval_every = max(1, cfg.eval_every * cfg.mlp_steps // cfg.steps)
        tasks.append(MLPTask(Budget(cfg.mlp_steps, cfg.batch_size * 8, 0, eval_every, cfg.curve_blocks), device))
    return tasks


def _equivalent_command(cfg: BenchConfig) -> str:
    """`hybridopt bench` with the flags that differ from their defaults (for runs started from Python)."""
    defaults, words = BenchConfig(quick=cfg.quick, full=cfg.full), ["hybridopt", "bench"]
    words += ["--quick"] if cfg.quick else ["--full"] if cfg.full else []
    for name, value in asdict(cfg).items():
        if name in ("quick", "full") or value == getattr(defaults, name):
            continue
        if value is True:
            words.append(f"--{name}")
        elif isinstance(value, list):
            words += [f"--{name}", *map(str, value)]
        elif value is not None and value is not False:
            words += [f"--{name}", str(value)]
    return shlex.join(words)


def _identity(cfg: BenchConfig) -> dict:
    """The config without what a resumed bench may change (where and how it runs, where it writes)."""
    return {k: v for k, v in asdict(cfg).items() if k not in ("resume", "out", "device", "workers")}


def _previous_runs(out: Path, cfg: BenchConfig) -> tuple[list[dict], list[dict]]:
    """The finished runs of the bench in `out` and the sessions that ran them, after checking it is the same
    bench."""
    path = out / "results.json"
    if not path.is_file():
        raise UserError(f"--resume: '{out}' holds no bench (no results.json); start one with --out {out}")
    try:
        record = json.loads(path.read_text())
        saved, runs = record["config"], list(record["runs"])
        keys = {(r["task"], r["arm"], r["lr"], r["seed"]) for r in runs}
    except (ValueError, KeyError, TypeError) as e:
        raise UserError(f"--resume: '{path}' is not a readable bench record ({e!r}); start a new bench") from None
    if saved != _identity(cfg):
        changed = sorted(k for k in set(saved) | set(_identity(cfg)) if saved.get(k) != _identity(cfg).get(k))
        raise UserError(f"--resume: the bench in '{out}' ran with other settings ({', '.join(changed)}); "
                        "resume it with the same flags or start a new one")
    if len(keys) != len(runs):
        raise UserError(f"--resume: '{path}' lists a run twice; start a new bench")
    sessions = record.get("sessions") or [{"command": record.get("command"), "wall_s": record.get("wall_s"),
                                           "runs": len(runs)}]  # a record from before sessions were kept
    return runs, sessions


def run_bench(cfg: BenchConfig, reporter: Reporter | None = None, command: str | None = None) -> Path:
    """Run the bench; return the output folder. `command` is what RESULTS.md names as its producer
    (default: `hybridopt bench` with the config's non-default flags)."""
    reporter = reporter or Reporter()
    out = Path(cfg.out) if cfg.out else RUNS_ROOT / time.strftime("bench-%Y%m%d-%H%M%S")
    previous, sessions = _previous_runs(out, cfg) if cfg.resume else ([], [])
    if not cfg.resume:
        with for_flag("--out", OutputRefused):  # `.`, a file, a folder of yours
            check_output(out, "bench", legacy=("results.json",))
    if not cfg.resume and occupied(out):
        raise UserError(f"--out '{out}' exists and is not empty; choose another --out, or --resume a bench there")
    with for_flag("--device"):
        device = resolve_device(cfg.device)
    started = time.time()
    tasks = _tasks(cfg, device, reporter)
    claim_output(out, "bench")
    grid = log_grid(cfg.lr_min, cfg.lr_max, cfg.grid_points)
    names = cfg.arms or list(ARMS)
    arms = sorted((ARMS[a] for a in names), key=lambda a: a.name == "hybrid_random")  # after REPLAYED
    # The cheapest task first, then seed by seed: a bench stopped early holds whole tasks and whole seeds.
    order = sorted(tasks, key=lambda t: t.name != "mlp")
    plan = [(t.name, a.name, lr, seed) for t in order for seed in range(cfg.seeds) for a in arms for lr in a.grid(grid)]
    rank = {key: i for i, key in enumerate(plan)}
    reporter.line(f"Bench ({cfg.preset} preset): {len(tasks)} tasks x {len(arms)} arms x {cfg.grid_points} grid "
                  f"points x {cfg.seeds} seeds = {len(plan)} runs; {cfg.steps} steps of {cfg.batch_size} x "
                  f"{cfg.seq_len} tokens per LM run, {cfg.mlp_steps} steps per mlp run; {cfg.workers} at a time; "
                  f"writing to {out}")
    record = {"command": command or _equivalent_command(cfg), "config": _identity(cfg), "preset": cfg.preset, "versions": _versions(),
              "device": str(device), "workers": cfg.workers, "adam_grid": grid, "arms": [a.name for a in arms], "tasks": {}, "runs": []}
    for t in tasks:
        record["tasks"][t.name] = {"description": t.description, "steps": t.budget.steps,
                                   "batch_size": t.budget.batch_size, "seq_len": t.budget.seq_len,
                                   "teacher_val_loss": t.val_loss_teacher}

    done = {_key(r): r for r in previous}
    record["runs"] = [done[key] for key in plan if key in done]
    kept = len(record["runs"])
    if done:
        reporter.line(f"Resuming: {len(record['runs'])} of {len(plan)} runs are already in {out / 'results.json'}")
    if cfg.workers > 1 and any(a.clusters for a in arms):
        for t in tasks:  # the LM tasks cache their clusters on disk: make them once here, for the workers to read
            if isinstance(t, DistillTask):
                t.batches(0, True)

    def save() -> None:
        atomic_write(out / "results.json", lambda tmp: Path(tmp).write_text(json.dumps(record, indent=1)))

    def finished(run: dict) -> None:
        record["runs"].append(run)
        record["runs"].sort(key=lambda r: rank[_key(r)])  # plan order, whatever order the runs finish in
        save()
        bar.update(1)
        bar.set_postfix(task=run["task"], arm=run["arm"], lr=f"{run['lr']:g}", loss=f"{run['final_loss']:.4f}",
                        refresh=False)

    bar = reporter.progress(len(plan), len(record["runs"]), "bench runs")
    stopped = None
    try:
        # SIGINT or SIGTERM: start no more runs, finish the ones running (a second signal: stop at once)
        with StopOnSignal() as stop, _starter(cfg, device, tasks) as start:
            _run_plan([key for key in plan if key not in done], record["runs"], cfg.workers, start, finished, stop)
    except KeyboardInterrupt as e:  # Ctrl-C: report what was measured, then stop as interrupted
        stopped = e
        record["interrupted_after_runs"] = len(record["runs"])
        record["planned_runs"] = len(plan)
        reporter.warn(f"interrupted after {len(record['runs'])} of {len(plan)} runs; writing a partial report")
    finally:
        reporter.close_progress()
    tasks = [t for t in tasks if any(r["task"] == t.name for r in record["runs"])]
    if not tasks:
        raise stopped or UserError("no run finished")
    record["summaries"] = {t.name: summarize([r for r in record["runs"] if r["task"] == t.name], t.budget.steps,
                                             REFERENCE) for t in tasks}
    if not cfg.no_cost and stopped is None:
        reporter.line("Measuring costs (step-time ratios in one process, pipeline overhead)")
        record["costs"] = measure_costs(tasks[0], arms, *((2, 2) if cfg.quick else (5, 5)))
    record["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    record["sessions"] = sessions + [{"command": record["command"], "wall_s": time.time() - started,
                                      "runs": len(record["runs"]) - kept}]
    record["wall_s"] = sum(x["wall_s"] or 0.0 for x in record["sessions"])
    save()
    write_report(record, out)
    reporter.line(format_headline(record))
    reporter.line(f"Wrote {out / 'results.json'}, {out / 'RESULTS.md'} and 3 plots")
    if stopped is not None:
        raise stopped
    return out


# ---------------------------------------------------------------------------- running the plan
_WORKER_TASKS: dict = {}  # in a worker process: its own copy of the tasks, by name


def _key(run: dict) -> tuple:
    return run["task"], run["arm"], run["lr"], run["seed"]


def _run(task, arm: str, lr: float, seed: int, replay: list[float] | None) -> dict:
    """One run as results.json records it, with the intra-op threads it trained on."""
    result = asdict(run_arm(task, ARMS[arm], lr, seed, replay))
    result["threads"] = getattr(task, "threads", None) or torch.get_num_threads()
    return result


def _init_worker(cfg: BenchConfig, device: torch.device) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole process group; the main process decides
    torch.set_num_threads(1)  # `workers` runs share the cores; one thread each
    _WORKER_TASKS.update((t.name, t) for t in _tasks(cfg, device, Reporter(quiet=True)))


def _run_in_worker(task: str, arm: str, lr: float, seed: int, replay: list[float] | None) -> dict:
    return _run(_WORKER_TASKS[task], arm, lr, seed, replay)


@contextlib.contextmanager
def _starter(cfg: BenchConfig, device: torch.device, tasks: list):
    """`start(key, replay) -> Future` of a run's record: at once in this process (`--workers 1`), or in a pool
    of worker processes, each with its own tasks (the default teacher is cached by now: they only load it)."""
    if cfg.workers == 1:
        by_name = {t.name: t for t in tasks}

        def start(key: tuple, replay: list[float] | None) -> Future:
            future = Future()
            future.set_result(_run(by_name[key[0]], *key[1:], replay))
            return future

        yield start
        return
    # spawn, not fork: a forked torch (its thread pools, CUDA) is unsafe
    pool = ProcessPoolExecutor(cfg.workers, mp_context=multiprocessing.get_context("spawn"), initializer=_init_worker,
                               initargs=(cfg, device))
    try:
        yield lambda key, replay: pool.submit(_run_in_worker, *key, replay)
    except BaseException:  # an error or a second signal: stop the workers now, losing the runs in flight
        if hasattr(pool, "terminate_workers"):  # Python 3.14+
            pool.terminate_workers()
        else:
            for process in list(pool._processes.values()):
                process.terminate()
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    pool.shutdown()


def _run_plan(todo: list[tuple], runs: list[dict], workers: int, start, finished, stop: StopOnSignal) -> None:
    """Run the keys (task, arm, lr, seed) of `todo` in its order, at most `workers` at a time, passing each run's
    record to `finished` as it ends; `runs` holds the records so far. hybrid_random replays the multipliers of
    REPLAYED at its task, lr and seed, so it starts only once that run is in `runs`. After a signal, start no
    more runs and raise `StopRequested` when the running ones have ended."""
    running = {}
    while todo or running:
        if stop.signum is None:
            replays = {(r["task"], r["lr"], r["seed"]): r["lr_multiplier"] for r in runs if r["arm"] == REPLAYED}
            ready = [k for k in todo if k[1] != "hybrid_random" or (k[0], k[2], k[3]) in replays]
            for key in ready[: workers - len(running)]:
                todo.remove(key)
                running[start(key, replays.get((key[0], key[2], key[3])))] = key
        elif not running:
            raise StopRequested(stop.signum)
        assert running, f"nothing can start: {todo[0]} waits for a {REPLAYED} run that is not planned"
        ended, _ = wait(running, return_when=FIRST_COMPLETED)
        for future in ended:
            del running[future]
            finished(future.result())


# ---------------------------------------------------------------------------- reporting
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
