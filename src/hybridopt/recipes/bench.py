"""`hybridopt bench`: every optimizer arm on the same tasks, learning-rate grid and seeds.

    run_bench(BenchConfig(quick=True))   # -> the output folder

Writes into `--out`: `results.json` (every run: task, arm, lr, seed, per-step training losses, validation
curve, final loss, wall time, threads; the summaries, costs, config and versions; rewritten after every run,
so an interrupted bench keeps what it measured), `RESULTS.md` (the tables, the command at the top) and three
PNG plots. `--workers N` runs N at a time in worker processes of one thread each. The arms are in
`hybridopt.bench.arms`, the tasks and the training loop in `hybridopt.bench.tasks`, the statistics in
`hybridopt.bench.stats`, RESULTS.md and the plots in `hybridopt.bench.report`.
"""

from __future__ import annotations

import contextlib
import json
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

from hybridopt.bench.arms import ARMS, REFERENCE, REPLAYED
from hybridopt.bench.report import format_headline, write_report
from hybridopt.bench.stats import log_grid, summarize
from hybridopt.bench.tasks import Budget, DistillTask, MLPTask, measure_costs, run_arm
from hybridopt.fileio import atomic_write
from hybridopt.config import BenchConfig
from hybridopt.errors import UserError, for_flag
from hybridopt.training.layout import RUNS_ROOT, OutputRefused, check_output, claim_output, lock_run, occupied
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
    _open_output(out, cfg)  # refused before the tasks load a teacher
    with for_flag("--device"):
        device = resolve_device(cfg.device)
    started = time.time()
    tasks = _tasks(cfg, device, reporter)
    with for_flag("--resume" if cfg.resume else "--out", OutputRefused):
        lock = lock_run(out)  # one bench writes a folder at a time
    try:
        return _bench(cfg, reporter, command, out, device, started, tasks)
    finally:
        lock.close()


def _bench(cfg: BenchConfig, reporter: Reporter, command: str | None, out: Path, device: torch.device,
           started: float, tasks: list) -> Path:
    """`run_bench` once this process holds the lock on `out`."""
    previous, sessions = _open_output(out, cfg)  # again, under the lock: a bench beside this one may have written there
    if cfg.resume:
        _check_same_teachers(out, tasks)
    claim_output(out, "bench")
    grid = log_grid(cfg.lr_min, cfg.lr_max, cfg.grid_points)
    names = cfg.arms or list(ARMS)
    arms = sorted((ARMS[a] for a in names), key=lambda a: a.name == "hybrid_random")  # after REPLAYED
    # The cheapest task first, then seed by seed: a bench stopped early holds whole tasks and whole seeds.
    order = sorted(tasks, key=lambda t: t.name != "mlp")
    plan = [(t.name, a.name, lr, seed) for t in order for seed in range(cfg.seeds) for a in arms for lr in a.grid(grid)]
    reporter.line(f"Bench ({cfg.preset} preset): {len(tasks)} tasks x {len(arms)} arms x {cfg.grid_points} grid "
                  f"points x {cfg.seeds} seeds = {len(plan)} runs; {cfg.steps} steps of {cfg.batch_size} x "
                  f"{cfg.seq_len} tokens per LM run, {cfg.mlp_steps} steps per mlp run; {cfg.workers} at a time; "
                  f"writing to {out}")
    record = _new_record(cfg, command, device, grid, arms, tasks)
    done = {_key(r): r for r in previous}
    record["runs"] = [done[key] for key in plan if key in done]
    kept = len(record["runs"])
    if done:
        reporter.line(f"Resuming: {len(record['runs'])} of {len(plan)} runs are already in {out / 'results.json'}")
    stopped = _run_remaining(cfg, device, tasks, arms, plan, done, record, out, reporter)
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
    _save(record, out)
    write_report(record, out)
    reporter.line(format_headline(record))
    reporter.line(f"Wrote {out / 'results.json'}, {out / 'RESULTS.md'} and 3 plots")
    if stopped is not None:
        raise stopped
    return out


TEACHER_TOLERANCE = 0.02  # nats/token: the same teacher on another CPU moves in the third decimal (RESULTS.md)


def _check_same_teachers(out: Path, tasks: list) -> None:
    """With `--resume`: each distillation task's teacher reads the validation loss the record's did, so a
    default teacher that changed since (a new hybridopt, or `HYBRIDOPT_CACHE` elsewhere) does not mix its runs
    with the earlier teacher's.

    Raises:
        UserError: a task's teacher reads another loss on the same blocks than the record's.
    """
    saved = json.loads((out / "results.json").read_text()).get("tasks", {})
    for task in tasks:
        before = (saved.get(task.name) or {}).get("teacher_val_loss")
        now = task.val_loss_teacher
        if before is not None and now is not None and abs(before - now) > TEACHER_TOLERANCE:
            raise UserError(f"--resume: the bench in '{out}' ran task {task.name} with a teacher whose validation loss "
                            f"was {before:.4f}; this run's teacher reads {now:.4f}, another teacher (did the default "
                            "teacher change?); resume with --teacher naming the record's teacher, or start a new bench")


def _open_output(out: Path, cfg: BenchConfig) -> tuple[list[dict], list[dict]]:
    """With `--resume`, the finished runs and sessions of the bench in `out`; else none, after checking that
    `out` may take a new bench."""
    previous, sessions = _previous_runs(out, cfg) if cfg.resume else ([], [])
    if not cfg.resume:
        with for_flag("--out", OutputRefused):  # `.`, a file, a folder of yours
            check_output(out, "bench", legacy=("results.json",))
    if not cfg.resume and occupied(out):
        raise UserError(f"--out '{out}' exists and is not empty; choose another --out, or --resume a bench there")
    return previous, sessions


def _new_record(cfg: BenchConfig, command: str | None, device: torch.device, grid: list[float], arms: list,
                tasks: list) -> dict:
    """What results.json holds before any run: the command, config, versions, grid, arms and tasks."""
    record = {"command": command or _equivalent_command(cfg), "config": _identity(cfg), "preset": cfg.preset, "versions": _versions(),
              "device": str(device), "workers": cfg.workers, "adam_grid": grid, "arms": [a.name for a in arms], "tasks": {}, "runs": []}
    for t in tasks:
        record["tasks"][t.name] = {"description": t.description, "steps": t.budget.steps,
                                   "batch_size": t.budget.batch_size, "seq_len": t.budget.seq_len,
                                   "teacher_val_loss": t.val_loss_teacher}
    return record


# ---------------------------------------------------------------------------- running the plan
def _save(record: dict, out: Path) -> None:
    atomic_write(out / "results.json", lambda tmp: Path(tmp).write_text(json.dumps(record, indent=1)))


def _run_remaining(cfg: BenchConfig, device: torch.device, tasks: list, arms: list, plan: list[tuple], done: dict,
                   record: dict, out: Path, reporter: Reporter) -> KeyboardInterrupt | None:
    """Run the keys of `plan` not in `done`, adding each run to `record` (in plan order) and saving it as it
    ends; returns the Ctrl-C that stopped the bench early, or None."""
    rank = {key: i for i, key in enumerate(plan)}
    if cfg.workers > 1 and any(a.clusters for a in arms):
        for t in tasks:  # the LM tasks cache their clusters on disk: make them once here, for the workers to read
            if isinstance(t, DistillTask):
                t.batches(0, True)

    def finished(run: dict) -> None:
        record["runs"].append(run)
        record["runs"].sort(key=lambda r: rank[_key(r)])  # plan order, whatever order the runs finish in
        _save(record, out)
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
    return stopped


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
    before = set(multiprocessing.active_children())
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
        # A worker the pool did not list when it was terminated was seen alive afterwards (Python 3.11, under
        # load): every process started since the pool was made is killed too.
        started = set(multiprocessing.active_children()) - before
        for process in started:
            process.kill()
        for process in started:  # gone before the error reaches the caller
            process.join(timeout=5)
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
