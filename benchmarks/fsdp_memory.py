"""Per-process memory of the training loop on 2 processes: DistributedDataParallel (every process holds the whole
student, its gradients and optimizer state) against FSDP2 (`--fsdp`: each holds a slice).

    OMP_NUM_THREADS=1 python benchmarks/fsdp_memory.py [--steps 4] [--hybrid]

The student is SmolLM2-135M's shape (30 layers, 576 wide, 49152-token vocabulary, tied embeddings: 134.5M
parameters), randomly initialised, trained by the Trainer `hybridopt distill` uses on a fixed random token
stream (no teacher: the teacher stays whole on every process under either mode and adds the same to both),
batch 4 of 64 tokens, one thread per process, gloo on CPU. Each mode runs in its own pair of processes, one
after the other. Per process it reports:

- `state_mb`: what this process holds for the student after training: its parameters (its slices under FSDP) and
  the optimizer's state (AdamW's two moments, or the hybrid's three buffers), counted from the tensors;
- `steps_peak_rss_mb`: the peak resident memory over the training steps (when the first step begins, the C
  allocator returns what was freed to the system (`malloc_trim`) and the kernel's high-water mark is reset; it
  is read when each later step begins: steps 1 to N-1, forward, backward and optimizer step, with whatever
  Python and torch hold meanwhile);
- `peak_rss_mb`: the process's peak resident memory over everything (`ru_maxrss`): the model built whole before
  it is sharded, and the end-of-epoch checkpoint, for which rank 0 gathers the whole student and optimizer state.

Writes benchmarks/results/fsdp_memory.json.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import resource
import socket
import tempfile
from pathlib import Path

import torch
import torch.multiprocessing as mp
from transformers import LlamaConfig

from common import RESULTS_DIR
from hybridopt.config import TrainConfig
from hybridopt.data.blocks import TokenBlocks
from hybridopt.models.modeling import build_model
from hybridopt.reporting import Reporter
from hybridopt.training.distributed import DistEnv
from hybridopt.training.trainer import Trainer, TrainerCallback
from hybridopt.utils import seed_everything

RESULTS = RESULTS_DIR / "fsdp_memory.json"
SMOLLM2_135M = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                    num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=2048,
                    tie_word_embeddings=True)


class StepMemory(TrainerCallback):
    """The resident-memory high-water mark over the training steps (Linux: /proc/self/clear_refs resets it)."""

    def __init__(self):
        self.peak_kb = 0

    def on_step_begin(self, step: int) -> None:
        if step == 1:  # hand back to the system what was freed before (the whole model, under FSDP), then reset
            ctypes.CDLL("libc.so.6").malloc_trim(0)
            Path("/proc/self/clear_refs").write_text("5")
        else:
            self.peak_kb = max(self.peak_kb, _status_kb("VmHWM"))


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def _local_bytes(t: torch.Tensor) -> int:
    t = t.to_local() if hasattr(t, "to_local") else t
    return t.numel() * t.element_size()


def _run(rank: int, world: int, port: int, out: str, steps: int, hybrid: bool, fsdp: bool) -> None:
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    dist = DistEnv.from_env()
    dist.init(torch.device("cpu"))
    try:
        cfg = TrainConfig(epochs=1, max_steps_per_epoch=steps, batch_size=4, seq_len=64, seed=0, device="cpu",
                          hybrid=hybrid, hybrid_base="adam", eval_every=10)
        config = LlamaConfig(**SMOLLM2_135M)
        stream = torch.randint(config.vocab_size, (20_000,), generator=torch.Generator().manual_seed(0))
        train, val = TokenBlocks(stream[:19_000], cfg.seq_len), TokenBlocks(stream[19_000:], cfg.seq_len, "validation")
        seed_everything(cfg.seed)
        model = build_model(config, cfg.seed)
        run = Path(out) / ("fsdp" if fsdp else "ddp")
        run.mkdir(parents=True, exist_ok=True)
        trainer = Trainer(cfg, model, train, val, run, torch.device("cpu"),
                          reporter=Reporter(quiet=True), dist=dist, fsdp=fsdp, callbacks=[memory := StepMemory()])
        trainer.setup()
        trainer.train()
        params = sum(_local_bytes(p) for p in model.parameters())
        state = sum(_local_bytes(v) for st in trainer.optimizer.state.values() for v in st.values()
                    if torch.is_tensor(v) and v.dim() > 0)
        row = {"rank": rank, "parameters": sum(p.numel() for p in model.parameters()) if not fsdp else None,
               "param_mb": params / 2**20, "optimizer_state_mb": state / 2**20, "state_mb": (params + state) / 2**20,
               "steps_peak_rss_mb": memory.peak_kb / 1024,
               "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
               "final_loss": trainer.history[-1]["loss"]}
        (Path(out) / f"{'fsdp' if fsdp else 'ddp'}-rank{rank}.json").write_text(json.dumps(row))
    finally:
        dist.teardown()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--hybrid", action="store_true", help="the hybrid optimizer over Adam instead of AdamW")
    args = parser.parse_args()
    result = {"student": "SmolLM2-135M shape, random init", "config": SMOLLM2_135M, "processes": 2,
              "steps": args.steps, "batch": "4 x 64 tokens", "optimizer": "hybrid over adam" if args.hybrid else "adamw",
              "torch": torch.__version__, "modes": {}}
    with tempfile.TemporaryDirectory() as out:
        for fsdp in (False, True):
            mp.spawn(_run, args=(2, _free_port(), out, args.steps, args.hybrid, fsdp), nprocs=2)
            name = "fsdp" if fsdp else "ddp"
            result["modes"][name] = [json.loads((Path(out) / f"{name}-rank{r}.json").read_text()) for r in range(2)]
    ddp, fsdp = (max(r["state_mb"] for r in result["modes"][m]) for m in ("ddp", "fsdp"))
    rss = [max(r["peak_rss_mb"] for r in result["modes"][m]) for m in ("ddp", "fsdp")]
    steps = [max(r["steps_peak_rss_mb"] for r in result["modes"][m]) for m in ("ddp", "fsdp")]
    result["state_ratio"], result["peak_rss_ratio"] = fsdp / ddp, rss[1] / rss[0]
    result["steps_peak_rss_ratio"] = steps[1] / steps[0]
    out = RESULTS if not args.hybrid else RESULTS.with_name("fsdp_memory_hybrid.json")
    out.write_text(json.dumps(result, indent=2) + "\n")
    for m in ("ddp", "fsdp"):
        for r in result["modes"][m]:
            print(f"{m:4s} rank {r['rank']}: parameters {r['param_mb']:.0f} MB + optimizer state "
                  f"{r['optimizer_state_mb']:.0f} MB = {r['state_mb']:.0f} MB held; peak RSS over the steps "
                  f"{r['steps_peak_rss_mb']:.0f} MB, over the run {r['peak_rss_mb']:.0f} MB; "
                  f"loss {r['final_loss']:.4f}")
    print(f"FSDP / DDP per process: held state {result['state_ratio']:.2f}x, peak RSS over the steps "
          f"{result['steps_peak_rss_ratio']:.2f}x, over the run {result['peak_rss_ratio']:.2f}x; "
          f"wrote {out}")


if __name__ == "__main__":
    main()
