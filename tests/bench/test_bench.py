"""`hybridopt bench`: the arms, the run loop on the mlp task, and the command end to end (quick preset)."""

from __future__ import annotations

import dataclasses
import json
import math
import re
import subprocess
import sys

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from hybridopt.bench.arms import (ARMS, REPLAYED, BuildContext, Float32Muon, ReplayedMultiplierHybrid,
                                  newton_schulz_float32)
from hybridopt.bench.tasks import Budget, MLPTask, run_arm
from hybridopt.config import BENCH_ARMS
from hybridopt.errors import UserError
from hybridopt.models.modeling import hidden_matrices


def _tiny_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)  # its initial weights, and what the test draws next, the same on every run
    return LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                        num_attention_heads=2, max_position_embeddings=16))


def test_arms_cover_the_config_choices_and_scale_their_grids():
    assert list(ARMS) == BENCH_ARMS
    grid = [1e-4, 1e-3, 1e-2]
    assert ARMS["adamw_cosine"].grid(grid) == grid
    assert ARMS["sgd"].grid(grid) == [0.01, 0.1, 1.0]
    assert ARMS["prodigy"].grid(grid) == [0.1, 1.0, 10.0]  # d_coef, centred on Prodigy's default
    assert {len(a.grid(grid)) for a in ARMS.values()} == {3}


def test_muon_gets_the_hidden_matrices_and_adamw_the_rest():
    model = _tiny_llama()
    hidden, rest = hidden_matrices(model)
    names = {id(p): n for n, p in model.named_parameters()}
    assert sorted(names[id(p)] for p in hidden) == sorted(
        n for n, p in model.named_parameters() if p.dim() == 2 and "embed" not in n and "lm_head" not in n)
    assert {names[id(p)] for p in rest} >= {"model.embed_tokens.weight", "lm_head.weight", "model.norm.weight"}
    muon, adamw = ARMS["muon"].build(model, 1e-3, BuildContext(10, 1))
    in_muon = {id(p) for g in muon.param_groups for p in g["params"]}
    in_adamw = {id(p) for g in adamw.param_groups for p in g["params"]}
    assert not in_muon & in_adamw and in_muon | in_adamw == {id(p) for p in model.parameters()}


def test_the_ablations_take_apart_distill_hybrids_defaults():
    """hybrid_frozen, hybrid_no_trust and hybrid_random are hybrid_muon (`distill --hybrid`) with one part off."""
    model = _tiny_llama()
    ctx = BuildContext(10, 1, replay_multipliers=[1.0], seed=0)
    (full,) = ARMS[REPLAYED].build(model, 1e-3, ctx)
    assert REPLAYED == "hybrid_muon" and full.base_name == "muon"
    groups = lambda opt: [({id(p) for p in g["params"]}, g["orthogonalize"]) for g in opt.param_groups]  # noqa: E731
    off = {"hybrid_frozen": ("use_controller",), "hybrid_no_trust": ("use_trust_region",),
           "hybrid_random": ("use_controller", "learn_scale")}
    for name, parts in off.items():
        (opt,) = ARMS[name].build(model, 1e-3, ctx)
        assert opt.base_name == "muon" and groups(opt) == groups(full), name
        for attr in ("use_trust_region", "use_controller", "learn_scale", "radius_start"):
            assert getattr(opt, attr) == (False if attr in parts else getattr(full, attr)), (name, attr)


def test_muon_orthogonalises_only_the_mlp_tasks_hidden_matrix():
    """The mlp network names its input and output layers (as transformers models do), so the muon arms give
    them AdamW's step, as Muon is meant to be used; the other arms' models are unchanged."""
    task = MLPTask(Budget(steps=1, batch_size=8, seq_len=0), torch.device("cpu"))
    model = task.new_model(0)
    hidden, rest = hidden_matrices(model)
    assert [tuple(p.shape) for p in hidden] == [(256, 256)]
    assert sorted(tuple(p.shape) for p in rest if p.dim() == 2) == [(10, 256), (256, 32)]
    torch.manual_seed(0)
    plain = torch.nn.Sequential(*[type(m)(*m.normalized_shape) if isinstance(m, torch.nn.LayerNorm) else
                                  torch.nn.GELU() if isinstance(m, torch.nn.GELU) else
                                  torch.nn.Linear(m.in_features, m.out_features) for m in model])
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), plain.parameters()))  # same start as before


def test_hybrid_random_replays_exactly_the_given_multipliers_shuffled():
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 4)
    given = [0.5, 1.0, 2.0, 4.0]
    (opt,) = ARMS["hybrid_random"].build(model, 1e-3, BuildContext(4, 1, replay_multipliers=given, seed=1))
    assert isinstance(opt, ReplayedMultiplierHybrid)
    seen = []
    for _ in range(4):
        model(torch.randn(2, 4)).sum().backward()
        opt.step(loss=1.0)
        opt.zero_grad()
        seen.append(opt.lr_multiplier)
    assert sorted(seen) == given and seen != given  # a permutation, not the original order
    with pytest.raises(ValueError, match="run hybrid_muon first"):
        ARMS["hybrid_random"].build(model, 1e-3, BuildContext(4, 1))


def test_every_arm_trains_the_mlp_and_same_seed_means_same_start_and_batches():
    task = MLPTask(Budget(steps=40, batch_size=64, seq_len=0, eval_every=20, curve_blocks=16), torch.device("cpu"))
    a, b = task.new_model(3), task.new_model(3)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert list(task.batches(3, False)(5)) == list(task.batches(3, False)(5))
    replay = None
    for name, arm in ARMS.items():
        res = run_arm(task, arm, arm.grid([3e-3])[0], 0, replay)
        if name == REPLAYED:
            replay = res.lr_multiplier
            assert len(res.lr_multiplier) == 40
        assert res.steps == [0, 20, 40] and len(res.train_loss) == 40
        assert res.diverged_at is None and math.isfinite(res.final_loss), name
        assert res.curve[-1] < res.curve[0] - 0.05, f"{name} did not learn: {res.curve}"
        assert res.optimizer_state_bytes > 0, name


def test_muon_arm_trains_a_tiny_llama():
    torch.manual_seed(0)
    model = _tiny_llama()
    x = torch.randint(0, 64, (8, 16))
    opts = ARMS["muon"].build(model, 1e-2, BuildContext(10, 1))
    losses = []
    for _ in range(10):
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        for opt in opts:
            opt.step()
            opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.5, losses


@pytest.mark.parametrize("shape", [(48, 32), (32, 48)])
def test_float32_newton_schulz_is_torchs_orthogonalisation_without_bfloat16_rounding(shape):
    import torch.optim._muon as torch_muon

    torch.manual_seed(0)
    g = torch.randn(*shape)
    coefficients, steps, eps = (3.4445, -4.7750, 2.0315), 5, 1e-7
    ours = newton_schulz_float32(g, coefficients, steps, eps)
    theirs = torch_muon._zeropower_via_newtonschulz(g, coefficients, steps, eps).float()
    assert ours.dtype == torch.float32 and ours.shape == g.shape
    assert (ours - theirs).norm() / theirs.norm() < 0.03  # bfloat16's rounding, not another iteration
    s = torch.linalg.svdvals(ours)
    assert 0.5 < s.min() and s.max() < 1.5  # what Muon's quintic iteration gives: roughly orthogonal


def test_float32_muon_steps_as_torchs_muon_and_puts_torchs_function_back():
    import torch.optim._muon as torch_muon

    original = torch_muon._zeropower_via_newtonschulz
    models = [_tiny_llama() for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    opts = [torch.optim.Muon([p for p in m.parameters() if p.dim() == 2], lr=0.02) for m in models[:1]]
    opts.append(Float32Muon([p for p in models[1].parameters() if p.dim() == 2], lr=0.02))
    x = torch.randint(0, 64, (4, 16))
    before = [p.clone() for p in models[0].parameters()]
    for m, opt in zip(models, opts):
        m(input_ids=x, labels=x).loss.backward()
        opt.step()
    assert torch_muon._zeropower_via_newtonschulz is original
    moved = [(p - b).norm() for p, b in zip(models[0].parameters(), before)]
    differ = [(p - q).norm() for p, q in zip(models[0].parameters(), models[1].parameters())]
    assert sum(moved) > 0 and sum(differ) < 0.05 * sum(moved)
    assert sum(differ) > 0  # float32, not torch's bfloat16 step


def test_a_diverging_run_stops_and_scores_infinite():
    task = MLPTask(Budget(steps=60, batch_size=64, seq_len=0, eval_every=5, curve_blocks=16), torch.device("cpu"))
    res = run_arm(task, ARMS["sgd"], 1e4, 0)
    assert res.diverged_at is not None and res.diverged_at < 60
    assert res.final_loss == math.inf


def _bench(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "hybridopt", "bench", *args], capture_output=True, text=True,
                          timeout=1800)  # the quick bench took 263 s on 2 busy cores


def test_bench_quick_runs_every_arm_on_every_task(tiny_teacher, corpus_file, tmp_path):
    out = tmp_path / "bench"
    r = _bench("--quick", "--teacher", str(tiny_teacher), "--data", str(corpus_file), "--out", str(out),
               "--device", "cpu", "--workers", "2",  # both cores of a CI machine
               "--seeds", "1")  # intervals are test_bench_stats's; this test holds every arm on every task
    assert r.returncode == 0, r.stderr[-3000:]
    record = json.loads((out / "results.json").read_text())
    runs = {(x["task"], x["arm"], x["lr"], x["seed"]) for x in record["runs"]}
    grid = record["adam_grid"]
    cpu_arms = list(ARMS.values())  # muon too: in float32 on a CPU
    expected = {(t, a.name, lr, s) for t in ("distill", "distill_ternary", "mlp") for a in cpu_arms
                for lr in a.grid(grid) for s in range(1)}
    assert runs == expected
    assert "`Float32Muon`" in (out / "RESULTS.md").read_text()
    text = (out / "RESULTS.md").read_text()
    assert text.splitlines()[5].startswith("hybridopt bench --quick")
    for task in ("distill", "distill_ternary", "mlp"):
        assert f"## Task `{task}`" in text
        assert set(record["summaries"][task]["arms"]) == {a.name for a in cpu_arms}
        for arm in cpu_arms:
            assert f"| {arm.name} | " in text
    assert "| 35% faster convergence" in text and "| 33% lower quantization error" in text
    assert set(record["costs"]["arms"]) == {a.name for a in cpu_arms} and record["costs"]["pipeline"]["tokens_per_s_ratio"] > 0
    for png in ("curves.png", "lr_robustness.png", "steps_to_target.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_refuses_bad_input_in_one_line(tmp_path, capsys):
    from hybridopt.cli import main

    (tmp_path / "mine.txt").write_text("keep me")
    for args, words in [(("--out", str(tmp_path)), "holds something hybridopt bench did not write"),
                        (("--quick", "--full"), "two presets"),
                        (("--arms", "hybrid_random"), "add hybrid_muon"),
                        (("--lr_min", "1", "--lr_max", "0.1"), "--lr_min"),
                        (("--resume",), "pass --out"),
                        (("--workers", "0"), "--workers must be at least 1"),
                        (("--resume", "--out", str(tmp_path)), "holds no bench")]:
        assert main(["bench", *args]) == 2, args
        err = capsys.readouterr().err
        assert words in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert (tmp_path / "mine.txt").read_text() == "keep me"


def test_an_interrupted_bench_reports_what_it_measured(tmp_path, monkeypatch):
    import hybridopt.recipes.bench as bench
    from hybridopt.config import BenchConfig
    from hybridopt.reporting import Reporter

    real, calls = bench.run_arm, []

    def stop_on_fourth(*args):
        calls.append(args)
        if len(calls) == 4:
            raise KeyboardInterrupt
        return real(*args)

    monkeypatch.setattr(bench, "run_arm", stop_on_fourth)
    cfg = BenchConfig(quick=True, task=["mlp"], arms=["adamw_cosine", "hybrid_adam"], mlp_steps=6, out=str(tmp_path / "b"),
                      workers=1)
    with pytest.raises(KeyboardInterrupt):
        bench.run_bench(cfg, Reporter(quiet=True))
    record = json.loads((tmp_path / "b" / "results.json").read_text())
    assert len(record["runs"]) == 3 and record["interrupted_after_runs"] == 3 and record["planned_runs"] == 8
    text = (tmp_path / "b" / "RESULTS.md").read_text()
    assert "**Partial**: interrupted after 3 of 8 runs" in text and "| hybrid_adam | " in text
    # --resume keeps the three finished runs and runs the other five; other settings are refused
    monkeypatch.setattr(bench, "run_arm", real)
    first = record["runs"]
    with pytest.raises(UserError, match="other settings .*mlp_steps"):
        bench.run_bench(dataclasses.replace(cfg, resume=True, mlp_steps=7), Reporter(quiet=True))
    bench.run_bench(dataclasses.replace(cfg, resume=True), Reporter(quiet=True))
    record = json.loads((tmp_path / "b" / "results.json").read_text())
    assert len(record["runs"]) == 8 and record["runs"][:3] == first and "interrupted_after_runs" not in record
    text = (tmp_path / "b" / "RESULTS.md").read_text()
    assert "**Partial**" not in text
    # both sessions are on record, each with the runs it ran, and the wall time is theirs together
    assert [x["runs"] for x in record["sessions"]] == [3, 5]
    assert record["wall_s"] == pytest.approx(sum(x["wall_s"] for x in record["sessions"]))
    assert re.search(r"in 2 sessions \(`[^`]+`, 3 runs in [\d.]+ min; `[^`]+`, 5 runs in [\d.]+ min;", text)


def test_resume_refuses_a_bench_whose_teacher_reads_another_loss(tiny_teacher, corpus_file, tmp_path):
    """A resumed bench whose teacher is not the record's (a default teacher that changed since) is refused
    before any run, naming both losses; the record is left as it was."""
    from hybridopt.config import BenchConfig
    from hybridopt.recipes.bench import run_bench
    from hybridopt.reporting import Reporter

    cfg = BenchConfig(quick=True, task=["distill"], arms=["adamw_cosine"], steps=2, teacher=str(tiny_teacher),
                      data=[str(corpus_file)], device="cpu", out=str(tmp_path / "b"), workers=1, no_cost=True)
    run_bench(cfg, Reporter(quiet=True))
    path = tmp_path / "b" / "results.json"
    record = json.loads(path.read_text())
    teacher = record["tasks"]["distill"]["teacher_val_loss"]
    record["tasks"]["distill"]["teacher_val_loss"] = teacher + 0.5  # as if another teacher had made it
    path.write_text(json.dumps(record))
    with pytest.raises(UserError, match=rf"ran task distill with a teacher whose validation loss was "
                                        rf"{teacher + 0.5:.4f}; this run's teacher reads {teacher:.4f}"):
        run_bench(dataclasses.replace(cfg, resume=True), Reporter(quiet=True))
    assert json.loads(path.read_text()) == record
    record["tasks"]["distill"]["teacher_val_loss"] = teacher + 0.01  # the same teacher on another CPU
    path.write_text(json.dumps(record))
    run_bench(dataclasses.replace(cfg, resume=True), Reporter(quiet=True))


def test_worker_processes_give_the_runs_of_one_process(tiny_teacher, corpus_file, tmp_path, monkeypatch, one_thread):
    from hybridopt.config import BenchConfig
    from hybridopt.recipes.bench import run_bench
    from hybridopt.reporting import Reporter

    # One intra-op thread everywhere, from process start (the spawned workers read the variable): with torch's
    # default thread count the serial path's float kernels round differently in the last bits (documented).
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    arms = ["adamw_cosine", "sgd_cosine_clusters", "hybrid_muon", "hybrid_random"]  # hybrid_random replays hybrid_muon
    records = {}
    for workers in (1, 2):
        cfg = BenchConfig(quick=True, task=["distill", "mlp"], arms=arms, steps=3, mlp_steps=12,
                          teacher=str(tiny_teacher), data=[str(corpus_file)], device="cpu",
                          out=str(tmp_path / str(workers)), workers=workers, no_cost=True)
        run_bench(cfg, Reporter(quiet=True))
        records[workers] = json.loads((tmp_path / str(workers) / "results.json").read_text())
    serial, parallel = ([{k: v for k, v in r.items() if k != "seconds"} for r in records[w]["runs"]] for w in (1, 2))
    assert len(serial) == 32 and parallel == serial  # the same runs, bit for bit, in the same (plan) order
    assert {r["threads"] for r in records[2]["runs"]} == {1} and records[2]["workers"] == 2


def test_hybrid_random_starts_after_its_hybrid_muon_and_a_signal_starts_nothing_more():
    from concurrent.futures import Future
    from types import SimpleNamespace

    from hybridopt.recipes.bench import _run_plan
    from hybridopt.training.trainer import StopRequested

    started, runs, stop = [], [], SimpleNamespace(signum=None)

    def start(key, replay):
        started.append((key, replay))
        future = Future()
        future.set_result({"task": key[0], "arm": key[1], "lr": key[2], "seed": key[3], "lr_multiplier": [key[2]]})
        return future

    todo = [("mlp", "hybrid_muon", 0.1, 0), ("mlp", "hybrid_random", 0.1, 0), ("mlp", "adamw_cosine", 0.1, 1)]
    _run_plan(list(todo), runs, 2, start, runs.append, stop)
    assert started == [(todo[0], None), (todo[2], None), (todo[1], [0.1])]  # skips ahead while hybrid_muon runs

    def stop_after_one(run):
        runs.append(run)
        stop.signum = 2

    started.clear()
    with pytest.raises(StopRequested):
        _run_plan([("mlp", "sgd", lr, 0) for lr in (1, 2, 3, 4)], runs, 2, start, stop_after_one, stop)
    assert len(started) == 2  # the two in flight finish; nothing more starts


def _os_state(pid: int) -> str:
    """A process's state letter from /proc (R, S, D, Z, ...), "gone" if it has none, "?" without /proc."""
    import os

    if not os.path.isdir("/proc"):
        return "?"
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "gone"


def test_an_error_stops_the_worker_processes_at_once():
    import multiprocessing
    import time

    from hybridopt.config import BenchConfig
    from hybridopt.recipes.bench import _starter

    before = set(multiprocessing.active_children())
    cfg = BenchConfig(quick=True, task=["mlp"], mlp_steps=100_000, workers=2)  # runs that would take minutes
    with pytest.raises(RuntimeError, match="stop"):
        with _starter(cfg, torch.device("cpu"), []) as start:
            futures = [start(("mlp", "adamw_cosine", 1e-3, seed), None) for seed in (0, 1)]
            time.sleep(0.5)
            workers = set(multiprocessing.active_children()) - before  # the pool's, running the runs
            raise RuntimeError("stop")
    for process in workers:
        process.join(timeout=10)
    alive = {p: _os_state(p.pid) for p in workers if p.is_alive()}
    for process in alive:  # so that a failure here does not wait minutes for the runs
        process.kill()
    # terminated, not left to finish their runs: none still running by the operating system's account (once in
    # CI a killed worker still read as alive to multiprocessing; the state is printed to tell a stale record
    # from a process that kept running)
    assert workers and not [state for state in alive.values() if state not in ("gone", "Z", "X")], alive
    assert all(f.cancelled() or f.exception(timeout=10) is not None for f in futures)
