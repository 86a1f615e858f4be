"""Data-parallel training (torchrun, DistributedDataParallel, gloo on CPU): N steps of global batch B on 2
processes are N steps of batch B in one process, for AdamW and the hybrid optimizer; resuming puts every
rank back on the same batches; the per-rank slices partition each global batch, in the training step itself."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file
from transformers import LlamaConfig

from conftest import tiny_distill_args
from hybridopt.config import TrainConfig
from hybridopt.data.blocks import TokenBlocks
from hybridopt.training.distributed import DistEnv, gathered, shard_fsdp
from hybridopt.errors import UserError
from hybridopt.models.modeling import build_model
from hybridopt.reporting import Reporter
from hybridopt.training.trainer import Trainer
from hybridopt.utils import seed_everything

# The hybrid setting makes the trust region clip (radius 1e-3 of the weights' norm) and the controller
# move the multiplier, so the test covers the optimizer's decisions, not only Adam's arithmetic.
SETTINGS = {
    "adamw": {},
    "hybrid": {"hybrid": True, "controller": True, "trust_radius": 1e-3, "controller_lr": 0.05},  # all of it on
    # FSDP2: the student sharded over the two ranks (one process: the same optimizer unsharded). Muon needs whole
    # matrices, so the sharded hybrid runs over Adam and Schedule-Free.
    "fsdp_adamw": {"fsdp": True},
    "fsdp_hybrid": {"fsdp": True, "hybrid": True, "hybrid_base": "adam", "controller": True, "trust_radius": 1e-3,
                    "controller_lr": 0.05},
    "fsdp_hybrid_sf": {"fsdp": True, "hybrid": True, "hybrid_base": "schedulefree", "trust_radius": 1e-3},
}


MODEL = dict(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
             num_key_value_heads=2, max_position_embeddings=16)


pytestmark = pytest.mark.usefixtures("one_thread")  # as `_train` in the spawned ranks


class _RecordedBlocks(TokenBlocks):
    """Training blocks that record the indices of every batch read from them: what a training step trained on."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.batches: list[list[int]] = []

    def batch(self, indices):
        self.batches.append([int(i) for i in indices])
        return super().batch(indices)


def _spawn(fn, args: tuple, nprocs: int, timeout: float = 300.0) -> None:
    """`mp.spawn(fn, args, nprocs)` with a deadline (it took about 25 s on 2 CPU cores): a rank left waiting on
    a collective is killed, and the test fails instead of hanging the suite."""
    context = mp.spawn(fn, args=args, nprocs=nprocs, join=False)
    deadline = time.monotonic() + timeout
    while not context.join(timeout=max(deadline - time.monotonic(), 0.1)):
        if time.monotonic() >= deadline:
            for process in context.processes:
                process.kill()
                process.join(10)
            pytest.fail(f"the {nprocs} spawned ranks did not finish within {timeout:.0f} s")


def _assert_ranks_split_the_batches(batches: list[list[int]], rank_batches: list[list[list[int]]]) -> None:
    """At every step each rank trained on its own half of the single-process run's batch: the halves are
    disjoint, and together they are that batch."""
    assert len(batches) == 6 and all(len(b) == 8 for b in batches), batches  # 2 epochs x 3 steps of batch 8
    assert all(len(r) == len(batches) for r in rank_batches), rank_batches
    for step, (batch, *slices) in enumerate(zip(batches, *rank_batches), 1):
        assert [len(s) for s in slices] == [4, 4], (step, slices)
        assert not set(slices[0]) & set(slices[1]), f"step {step}: the ranks trained on the same blocks {slices}"
        assert sorted(sum(slices, [])) == sorted(batch), f"step {step}: {slices} is not the batch {batch}"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _train(out: Path, setting: str, dist: DistEnv, stop_after_epoch: int | None = None,
           resume: bool = False, device: str = "cpu") -> dict:
    """A 1-layer, 16-wide Llama trained 2 epochs x 3 steps of batch 8 on a fixed random token stream."""
    torch.set_num_threads(1)
    out.mkdir(parents=True, exist_ok=True)
    options = dict(SETTINGS[setting])
    fsdp = options.pop("fsdp", False) and dist.active
    cfg = TrainConfig(epochs=2, max_steps_per_epoch=3, batch_size=8, seq_len=8, lr=1e-2, eval_every=1, seed=3,
                      device="cpu", **options)
    config = LlamaConfig(**MODEL)
    stream = torch.randint(32, (600,), generator=torch.Generator().manual_seed(0))
    train, val = _RecordedBlocks(stream[:500], cfg.seq_len), TokenBlocks(stream[500:], cfg.seq_len, "validation")
    seed_everything(cfg.seed)  # as the recipe: the controller's initial weights come from the global RNG
    device = dist.device(torch.device(device))
    model = build_model(config, cfg.seed).to(device)
    if dist.rank == 1:  # rank 1's random history differs, as when rank 0 alone trained the default teacher
        torch.rand(3)
    trainer = Trainer(cfg, model, train, val, out, device, reporter=Reporter(quiet=True), dist=dist, fsdp=fsdp)
    trainer.setup(resume=resume)
    trainer.train(stop_after_epoch)
    model = trainer.unshard()  # under FSDP: the whole weights, on every rank
    assert not fsdp or type(model).__name__ == "LlamaForCausalLM"  # an ordinary module again
    summary = trainer.optimizer.summary() if cfg.hybrid else {}
    return {"params": {k: v.detach().cpu().clone().contiguous() for k, v in model.state_dict().items()},
            "summary": summary, "history": trainer.history, "batches": train.batches}


SCENARIOS = {"adamw": ("adamw", None), "hybrid": ("hybrid", None), "hybrid_resumed": ("hybrid", 1),
             "fsdp_adamw": ("fsdp_adamw", None), "fsdp_hybrid": ("fsdp_hybrid", None),
             "fsdp_hybrid_sf": ("fsdp_hybrid_sf", None), "fsdp_hybrid_resumed": ("fsdp_hybrid", 1),
             "fsdp_hybrid_first_epoch": ("fsdp_hybrid", "stop")}  # resumed by one process, in the test


def _worker(rank: int, world: int, port: int, out: str, device: str = "cpu") -> None:
    """One rank of the 2-process job: every scenario in turn (one spawn: starting processes is the slow part)."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    dist = DistEnv.from_env()
    dist.init(dist.device(torch.device(device)))
    try:
        for scenario, (setting, resume_at) in SCENARIOS.items():
            run = Path(out) / scenario
            if resume_at == "stop":  # the first epoch only: another number of processes resumes it
                result = _train(run, setting, dist, stop_after_epoch=1, device=device)
            elif resume_at is not None:  # stop after an epoch (checkpointed), then resume from rank 0's checkpoint
                first = _train(run, setting, dist, stop_after_epoch=resume_at, device=device)
                result = _train(run, setting, dist, resume=True, device=device)
                result["batches"] = first["batches"] + result["batches"]
            else:
                result = _train(run, setting, dist, device=device)
            save_file(result["params"], str(run / f"rank{rank}.safetensors"))
            (run / f"rank{rank}.json").write_text(json.dumps({k: result[k] for k in ("summary", "history", "batches")}))
    finally:
        dist.teardown()


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> dict[str, list[dict]]:
    """Each scenario's parameters, optimizer summary and history on ranks 0 and 1 of a 2-process gloo job."""
    out = tmp_path_factory.mktemp("ddp")
    _spawn(_worker, (2, _free_port(), str(out)), 2)
    return {name: [{"params": load_file(str(out / name / f"rank{r}.safetensors")), "folder": out / name,
                    **json.loads((out / name / f"rank{r}.json").read_text())} for r in range(2)]
            for name in SCENARIOS}


def _initial(name: str) -> torch.Tensor:
    """The initial value of parameter `name` of the test's model."""
    return build_model(LlamaConfig(**MODEL), 3).state_dict()[name]


@pytest.mark.parametrize("setting", sorted(SETTINGS))
def test_two_ranks_take_the_single_process_steps(tmp_path, two_ranks, setting):
    single = _train(tmp_path, setting, DistEnv())
    ranks = two_ranks[setting]
    assert [n for n, p in single["params"].items() if not torch.equal(p, _initial(n))], "training changed nothing"
    for name, expected in single["params"].items():
        for r in ranks:
            torch.testing.assert_close(r["params"][name], expected, rtol=1e-4, atol=1e-6, msg=f"{setting} {name}")
        assert torch.equal(ranks[0]["params"][name], ranks[1]["params"][name]), f"ranks differ on {name}"
    _assert_ranks_split_the_batches(single["batches"], [r["batches"] for r in ranks])
    for r in ranks:
        assert [h["loss"] for h in r["history"]] == pytest.approx([h["loss"] for h in single["history"]], rel=1e-5)
        assert [h["val_loss"] for h in r["history"]] == pytest.approx([h["val_loss"] for h in single["history"]],
                                                                      rel=1e-5)
    if SETTINGS[setting].get("hybrid"):
        s = single["summary"]
        assert s["constraint_activation_rate"] > 0, "the trust region never clipped"
        assert s["lr_multiplier"] != 1.0 or not SETTINGS[setting].get("controller"), "the controller never moved"
        for r in ranks:
            assert r["summary"]["lr_multiplier"] == pytest.approx(s["lr_multiplier"], rel=1e-5)
            assert r["summary"]["constraint_activation_rate"] == s["constraint_activation_rate"]


@pytest.mark.parametrize("setting", ["hybrid", "fsdp_hybrid"])
def test_two_ranks_resume_onto_the_same_batches(tmp_path, two_ranks, setting):
    """A run stopped after an epoch and resumed by the same two ranks (data-parallel, or sharded with FSDP): the
    single-process run's weights, each rank on its half of every batch before and after the resume."""
    single = _train(tmp_path, setting, DistEnv())
    ranks = two_ranks[f"{setting}_resumed"]
    for name, expected in single["params"].items():
        torch.testing.assert_close(ranks[0]["params"][name], expected, rtol=1e-4, atol=1e-6, msg=name)
        assert torch.equal(ranks[0]["params"][name], ranks[1]["params"][name]), f"ranks differ on {name}"
    _assert_ranks_split_the_batches(single["batches"], [r["batches"] for r in ranks])


def test_a_sharded_checkpoint_resumes_in_one_process(tmp_path, two_ranks):
    """The checkpoint of a 2-rank FSDP run holds whole tensors (rank 0 gathered them): one process resumes it
    unsharded and ends where the single-process run ends."""
    single = _train(tmp_path / "single", "fsdp_hybrid", DistEnv())
    run = two_ranks["fsdp_hybrid_first_epoch"][0]["folder"]
    saved = torch.load(run / "checkpoint.pt", weights_only=True)
    assert saved["position"]["epoch"] == 1
    assert all(type(t) is torch.Tensor for t in saved["model"].values())  # whole tensors, not DTensors
    shapes = {k: tuple(v.shape) for k, v in build_model(LlamaConfig(**MODEL), 3).state_dict().items()}
    assert {k: tuple(v.shape) for k, v in saved["model"].items()} == shapes
    moments = [st["exp_avg"] for st in saved["optimizer"]["state"].values()]
    assert sorted(tuple(m.shape) for m in moments) == sorted(shapes.values())  # Adam's, whole, for every tensor
    resumed = _train(run, "fsdp_hybrid", DistEnv(), resume=True)
    for name, expected in single["params"].items():
        torch.testing.assert_close(resumed["params"][name], expected, rtol=1e-4, atol=1e-6, msg=name)


def _wrapped_adamw_steps(model: torch.nn.Module, batches: list[torch.Tensor], dist: DistEnv) -> dict:
    """5 steps of `hybrid(AdamW)` (trust-region clips, controller) on `model`, each rank on its slice of each
    batch, the loss averaged over ranks; the whole parameters after them, and the wrapper's counters."""
    from hybridopt.optim.wrapper import hybrid

    opt = hybrid(torch.optim.AdamW(model.parameters(), lr=1e-2), trust_radius=0.045, controller=True)
    for tokens in batches:
        local = tokens[dist.slice(list(range(len(tokens))))]
        loss = model(input_ids=local, labels=local).loss
        loss.backward()
        opt.step(loss=dist.mean(loss.item())[0])
        opt.zero_grad()
    state = opt.state_dict()  # reads the last trust ratio back
    return {"params": {k: v.detach().clone() for k, v in gathered(model.state_dict()).items()},
            "scale": opt.scale, "clipped": state["hybrid"]["state"]["clipped_steps"]}


def _wrapper_worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    dist = DistEnv.from_env()
    dist.init(torch.device("cpu"))
    try:
        model = shard_fsdp(build_model(LlamaConfig(**MODEL), 3), torch.device("cpu"))
        result = _wrapped_adamw_steps(model, _wrapper_batches(), dist)
        if rank == 0:
            save_file(result.pop("params"), str(Path(out) / "params.safetensors"))
            (Path(out) / "counters.json").write_text(json.dumps(result))
        # rank 1 once left the group while rank 0 was still writing, and gloo aborted it ("terminate called
        # without an active exception", in a CI run): both leave together
        torch.distributed.barrier()
    finally:
        dist.teardown()


def _wrapper_batches() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(5)
    return [torch.randint(32, (8, 8), generator=g) for _ in range(5)]


def test_the_wrapper_over_sharded_parameters_takes_the_one_process_steps(tmp_path):
    """`hybrid(AdamW)` over an FSDP2-sharded model on 2 gloo ranks: its norms and hypergradient dot products are
    reduced over the shards, so the steps, clips and learned scale are the one-process run's."""
    torch.set_num_threads(1)
    _spawn(_wrapper_worker, (2, _free_port(), str(tmp_path)), 2)
    single = _wrapped_adamw_steps(build_model(LlamaConfig(**MODEL), 3), _wrapper_batches(), DistEnv())
    sharded, counters = load_file(str(tmp_path / "params.safetensors")), json.loads((tmp_path / "counters.json").read_text())
    assert 0 < single["clipped"] < 5 and counters["clipped"] == single["clipped"]  # the same steps clipped
    assert counters["scale"] == pytest.approx(single["scale"], rel=1e-5) and single["scale"] != 1.0
    for name, expected in single["params"].items():
        torch.testing.assert_close(sharded[name], expected, rtol=1e-4, atol=1e-6, msg=name)


def test_rank_slices_partition_every_global_batch():
    batch = list(range(100, 112))
    slices = [DistEnv(rank, 3, rank).slice(batch) for rank in range(3)]
    assert [len(s) for s in slices] == [4, 4, 4]
    assert sum(slices, []) == batch  # disjoint, in order, nothing dropped
    with pytest.raises(UserError, match="--batch_size 12 does not split into 5 equal per-process slices"):
        DistEnv(0, 5, 0).check_batch(12)


def test_torchrun_environment_is_read():
    assert DistEnv.from_env({}) == DistEnv(0, 1, 0)
    assert DistEnv.from_env({"RANK": "1", "WORLD_SIZE": "4", "LOCAL_RANK": "1"}) == DistEnv(1, 4, 1)
    with pytest.raises(UserError, match="RANK 4 and WORLD_SIZE 4 are not a valid process group"):
        DistEnv.from_env({"RANK": "4", "WORLD_SIZE": "4", "LOCAL_RANK": "0"})


def _distill(args: list[str], nproc: int) -> subprocess.CompletedProcess:
    """`hybridopt distill` in one process, or under torchrun with `nproc` processes on this machine."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    launch = [sys.executable, "-m", "hybridopt"]
    if nproc > 1:
        launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
                  "-m", "hybridopt"]
    return subprocess.run(launch + args, capture_output=True, text=True, env=env, timeout=600)


@pytest.mark.slow
def test_torchrun_distill_matches_one_process(tmp_path, tiny_teacher, corpus_file):
    extra = ("--hybrid", "--data_clusters", "8", "--no-baseline")
    one = _distill(tiny_distill_args(tiny_teacher, corpus_file, tmp_path / "one", *extra), 1)
    two = _distill(tiny_distill_args(tiny_teacher, corpus_file, tmp_path / "two", *extra), 2)
    assert one.returncode == 0, one.stderr
    assert two.returncode == 0, two.stderr
    epochs = [line for line in two.stdout.splitlines() if line.startswith("Epoch ")]
    assert [line.split(",")[0] for line in epochs] == ["Epoch 1", "Epoch 2", "Epoch 3"]  # each once: rank 0 prints
    assert "batch 8 (2 processes x 4)" in two.stdout
    val = [json.loads((tmp_path / run / "results.json").read_text())["student"]["loss"] for run in ("one", "two")]
    assert val[1] == pytest.approx(val[0], abs=1e-3)
    hist = [json.loads((tmp_path / run / "results.json").read_text())["student"]["history"] for run in ("one", "two")]
    assert [h["loss"] for h in hist[1]] == pytest.approx([h["loss"] for h in hist[0]], abs=1e-3)


@pytest.mark.slow
def test_torchrun_precision_plan_matches_one_process(tmp_path, tiny_teacher, corpus_file):
    """--param_clusters under torchrun: rank 0 measures the plan after the full-precision epoch, every rank
    quantizes with it, and the run goes on as the one-process run does."""
    extra = ("--ternary", "--qat", "--param_clusters", "2", "--avg_bits", "3", "--no-baseline")
    one = _distill(tiny_distill_args(tiny_teacher, corpus_file, tmp_path / "one", *extra), 1)
    two = _distill(tiny_distill_args(tiny_teacher, corpus_file, tmp_path / "two", *extra), 2)
    assert one.returncode == 0, one.stderr
    assert two.returncode == 0, two.stderr
    plans = [json.loads((tmp_path / run / "precision_plan.json").read_text()) for run in ("one", "two")]
    assert plans[1]["layer_bits"] == plans[0]["layer_bits"] and len(set(plans[0]["layer_bits"].values())) == 2
    assert two.stdout.count("Replaced ") == 1  # printed once, by rank 0
    hist = [json.loads((tmp_path / run / "results.json").read_text())["student"]["history"] for run in ("one", "two")]
    assert [h["loss"] for h in hist[1]] == pytest.approx([h["loss"] for h in hist[0]], abs=1e-3)


@pytest.mark.slow
def _assert_close_but_a_few(actual: torch.Tensor, expected: torch.Tensor, name: str) -> None:
    """Every element to torch.testing's default tolerance for its dtype but at most 4 in 10,000, and those within
    1e-4: Adam divides a gradient by its running RMS, so where a rare token's embedding gradient nearly cancels,
    the sharded run's other summation order moves its step by a visible fraction (one element of 32,768 by
    2.1e-5 measured, 7e-6 before the hybrid over Adam became the wrapper over torch's AdamW)."""
    rtol, atol = {torch.float16: (1e-3, 1e-5), torch.bfloat16: (1.6e-2, 1e-5)}.get(actual.dtype, (1.3e-6, 1e-5))
    close = torch.isclose(actual.float(), expected.float(), rtol=rtol, atol=atol)
    assert (~close).sum() <= 4e-4 * close.numel(), (name, int((~close).sum()))
    torch.testing.assert_close(actual, expected, rtol=0, atol=1e-4, msg=name)


def test_torchrun_fsdp_distill_of_a_ternary_teacher_matches_one_process(tmp_path, tiny_teacher, corpus_file):
    """`torchrun --nproc_per_node=2 -m hybridopt distill --fsdp --fsdp_teacher --student teacher --ternary --qat`:
    the student and the teacher sharded over two processes train as one process trains (losses, validation,
    the teacher's validation), and what it saves and
    exports (the HF student, the packed ternary file) is the one-process run's (codes equal, floats to their
    dtype's rounding: torch.testing's default tolerances). With the hybrid optimizer over Adam (AdamW under FSDP is
    covered at the Trainer above; about a minute a run here)."""
    def args(out, *more):
        return ["distill", "--teacher", str(tiny_teacher), "--data", str(corpus_file), "--out", str(out),
                "--student", "teacher", "--ternary", "--qat", "--no-baseline", "--seq_len", "32", "--batch_size", "8",
                "--epochs", "3", "--max_steps_per_epoch", "4", "--eval_every", "1", "--device", "cpu", "--hybrid",
                "--hybrid_base", "adam", *more]

    one = _distill(args(tmp_path / "one"), 1)
    two = _distill(args(tmp_path / "two", "--fsdp", "--fsdp_teacher"), 2)
    assert one.returncode == 0, one.stderr
    assert two.returncode == 0, two.stderr
    assert "batch 8 (2 processes x 4; student and teacher sharded)" in two.stdout  # their weights are DTensors
    results = [json.loads((tmp_path / run / "results.json").read_text()) for run in ("one", "two")]
    assert results[1]["teacher"]["loss"] == pytest.approx(results[0]["teacher"]["loss"], abs=1e-5)
    assert results[1]["teacher"]["parameters"] == results[0]["teacher"]["parameters"]  # counted whole
    assert results[1]["student"]["loss"] == pytest.approx(results[0]["student"]["loss"], abs=1e-4)
    losses = [[h["loss"] for h in r["student"]["history"]] for r in results]
    assert losses[1] == pytest.approx(losses[0], abs=1e-4) and losses[0][-1] < losses[0][0]
    assert results[1]["quantization"]["file_packed_bytes"] == results[0]["quantization"]["file_packed_bytes"]
    assert results[1]["quantization"]["val_loss_exported"] == pytest.approx(results[0]["quantization"]["val_loss_exported"],
                                                                          abs=1e-4)
    for name in ("student/model.safetensors", "export/model.packed.safetensors"):
        a, b = (load_file(str(tmp_path / run / name)) for run in ("one", "two"))
        assert a.keys() == b.keys(), name
        for key in a:
            if a[key].is_floating_point():  # float16: to its rounding
                _assert_close_but_a_few(b[key], a[key], f"{name} {key}")
            else:
                assert torch.equal(a[key], b[key]), f"{name} {key}: the packed codes differ"


@pytest.mark.parametrize("flags, message", [
    ([], "--fsdp shards the student over the processes torchrun starts; launch with torchrun"),
    (["--hybrid"], "--fsdp with --hybrid needs --hybrid_base adam or schedulefree: Muon orthogonalises whole"),
    (["--ternary", "--qat", "--param_clusters", "2"], "--fsdp cannot be combined with --param_clusters"),
    (["--compile"], "--fsdp cannot be combined with --compile"),
    (["--fsdp_teacher", "--data_clusters", "4"], "--fsdp_teacher cannot be combined with --data_clusters: rank 0"),
    (["--fsdp_teacher", "--teacher_topk"], "--fsdp_teacher cannot be combined with --teacher_topk: rank 0"),
    (["--fsdp_teacher", "--student", "teacher"], "--fsdp_teacher with --student teacher needs --no-baseline"),
])
def test_fsdp_refusals_are_one_sentence(tmp_path, capsys, flags, message):
    from hybridopt.cli import main

    assert main(["distill", "--fsdp", *flags, "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"hybridopt: error: {message}"), err
    assert err.count("\n") == 1 and not (tmp_path / "run").exists()


def test_torchrun_refusal_is_printed_once(tmp_path, tiny_teacher, corpus_file):
    """Rank 0's refusal reaches every rank (none waits forever), each exits 2, and the line is printed once."""
    run = _distill(tiny_distill_args(tiny_teacher, corpus_file, tmp_path / "run", "--batch_size", "7"), 2)
    line = ("hybridopt: error: --batch_size 7 does not split into 2 equal per-process slices; use a multiple of 2 "
            "(the global batch is what one step sees)")
    assert run.returncode != 0
    assert run.stderr.count("hybridopt: error") == 1 and line in run.stderr, run.stderr
    assert "exitcode  : 2" in run.stderr  # torchrun's summary of the failed workers
    assert not (tmp_path / "run").exists()


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA devices (nccl puts one rank on each)")
def test_two_gpus_take_the_one_gpu_steps(tmp_path):
    """The GPU path (nccl, cuda:LOCAL_RANK): never run where this was written (no GPU); written to be run."""
    _spawn(_worker, (2, _free_port(), str(tmp_path), "cuda"), 2)
    for setting in SETTINGS:
        single = _train(tmp_path / f"single-{setting}", setting, DistEnv(), device="cuda")
        ranks = [load_file(str(tmp_path / setting / f"rank{r}.safetensors")) for r in range(2)]
        for name, expected in single["params"].items():
            torch.testing.assert_close(ranks[0][name], expected, rtol=1e-4, atol=1e-5, msg=f"{setting} {name}")
            assert torch.equal(ranks[0][name], ranks[1][name]), f"ranks differ on {name}"
