"""Tokens per second of the training loop on 1 and on 2 processes (DistributedDataParallel, gloo, CPU).

    OMP_NUM_THREADS=1 python benchmarks/ddp_scaling.py [--steps 12] [--repeats 3] [--hybrid]

The default student (benchmarks/common.py) trains on a fixed random token stream with the Trainer that
`hybridopt distill` uses (no teacher: the student's step is what data parallelism splits), batch 16 of 128
tokens, one thread per process, for `--steps` steps; 1 and 2 processes alternate `--repeats` times in the same
session, and the ratio of the median tokens/s is reported. Timing covers the training steps only (the
Trainer's own clock), not process start, evaluation or checkpoints. Writes
benchmarks/results/ddp_scaling.json.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.multiprocessing as mp

from common import default_student_config
from hybridopt.config import TrainConfig
from hybridopt.data.blocks import TokenBlocks
from hybridopt.training.distributed import DistEnv
from hybridopt.models.modeling import build_model
from hybridopt.reporting import Reporter
from hybridopt.training.trainer import Trainer
from hybridopt.utils import seed_everything

RESULTS = Path(__file__).parent / "results" / "ddp_scaling.json"


def _run(rank: int, world: int, port: int, out: str, steps: int, hybrid: bool) -> None:
    torch.set_num_threads(1)
    if world > 1:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                          LOCAL_RANK=str(rank))
    dist = DistEnv.from_env() if world > 1 else DistEnv()
    dist.init(torch.device("cpu"))
    try:
        cfg = TrainConfig(epochs=1, max_steps_per_epoch=steps, batch_size=16, seq_len=128, seed=0, device="cpu",
                          hybrid=hybrid)
        config = default_student_config()
        stream = torch.randint(config.vocab_size, (200_000,), generator=torch.Generator().manual_seed(0))
        train = TokenBlocks(stream[:190_000], cfg.seq_len)
        val = TokenBlocks(stream[190_000:192_000], cfg.seq_len, "validation")
        seed_everything(cfg.seed)
        trainer = Trainer(cfg, build_model(config, cfg.seed), train, val, Path(out), torch.device("cpu"),
                          reporter=Reporter(quiet=True), dist=dist)
        trainer.setup()
        trainer.train()
        if dist.is_main:
            tokens = trainer.global_step * cfg.batch_size * cfg.seq_len
            (Path(out) / "timing.json").write_text(json.dumps({"tokens": tokens, "seconds": trainer.elapsed}))
    finally:
        dist.teardown()


def measure(world: int, steps: int, hybrid: bool) -> float:
    """Tokens per second of one run on `world` processes."""
    with tempfile.TemporaryDirectory() as out:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if world == 1:
            _run(0, 1, port, out, steps, hybrid)
        else:
            mp.spawn(_run, args=(world, port, out, steps, hybrid), nprocs=world, join=True)
        t = json.loads((Path(out) / "timing.json").read_text())
    return t["tokens"] / t["seconds"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--hybrid", action="store_true", help="the hybrid optimizer instead of AdamW")
    args = parser.parse_args()
    runs: dict[int, list[float]] = {1: [], 2: []}
    load_before = os.getloadavg()[0]
    for _ in range(args.repeats):
        for world in (1, 2):
            runs[world].append(measure(world, args.steps, args.hybrid))
            print(f"{world} process(es): {runs[world][-1]:,.0f} tokens/s", flush=True)
    median = {w: statistics.median(v) for w, v in runs.items()}
    result = {
        "command": "OMP_NUM_THREADS=1 python benchmarks/ddp_scaling.py"
                   + f" --steps {args.steps} --repeats {args.repeats}" + (" --hybrid" if args.hybrid else ""),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": f"{os.cpu_count()} CPU cores, shared with other work (loaded)",
        "load_average_1min": {"before": load_before, "after": os.getloadavg()[0]},
        "optimizer": "hybrid" if args.hybrid else "adamw", "batch": 16, "seq_len": 128, "steps": args.steps,
        "tokens_per_s": {str(w): v for w, v in runs.items()},
        "median_tokens_per_s": {str(w): v for w, v in median.items()},
        "ratio_2_over_1": median[2] / median[1],
        "torch": torch.__version__,
    }
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(f"2 processes / 1 process: {result['ratio_2_over_1']:.2f}x tokens/s (medians of {args.repeats}); "
          f"written to {RESULTS}")


if __name__ == "__main__":
    main()
