"""What `--compile` and `--autocast bfloat16` do to the training step's speed, as ratios to the plain step.

    python benchmarks/compile_speed.py [--steps 3] [--repeats 3] [--device cpu]

The default student (benchmarks/common.py), in full precision and as the ternary QAT student, trains with
the Trainer `hybridopt distill` uses (no teacher: the student's own step is what these flags change) on a
fixed random token stream, batch 16 of 128 tokens, AdamW. Four settings per student: eager float32,
compiled (`--compile`), eager under bfloat16 autocast (`--autocast bfloat16`), and both. Each setting
keeps its own model, so compilation happens once, in the warm-up steps (its time is reported apart); then
the settings take turns, `--steps` steps each per repeat, and the ratio of the median step time to the
eager float32 step is reported. Writes benchmarks/results/compile_speed.json and a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

from common import default_student_config
from hybridopt.config import TrainConfig
from hybridopt.data.blocks import TokenBlocks
from hybridopt.models.modeling import build_model
from hybridopt.quant.qat import QATConfig, quantize_
from hybridopt.reporting import Reporter
from hybridopt.training.trainer import Trainer
from hybridopt.utils import resolve_device, seed_everything

RESULTS = Path(__file__).parent / "results" / "compile_speed.json"
SETTINGS = {"eager float32": dict(compile=False, autocast="off"), "compiled": dict(compile=True, autocast="off"),
            "bfloat16 autocast": dict(compile=False, autocast="bfloat16"),
            "compiled + bfloat16 autocast": dict(compile=True, autocast="bfloat16")}
WARMUP_STEPS = 3  # compilation happens here (forward, backward, and a recompile for the second shapes seen)


def trainer(setting: dict, ternary: bool, device: torch.device, out: Path, data: TokenBlocks) -> Trainer:
    cfg = TrainConfig(epochs=1, batch_size=16, seq_len=128, seed=0, device=str(device), **setting)
    seed_everything(cfg.seed)
    model = build_model(default_student_config(), cfg.seed).to(device)
    if ternary:
        quantize_(model, QATConfig())
    return Trainer(cfg, model, data, data, out, device, reporter=Reporter(quiet=True))


def timed_steps(t: Trainer, batches: list[list[int]]) -> list[float]:
    params = [p for p in t.model.parameters() if p.requires_grad]
    times = []
    for indices in batches:
        start = time.perf_counter()
        t.train_step(indices, params)
        if t.device.type == "cuda":
            torch.cuda.synchronize(t.device)
        times.append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    device = resolve_device(args.device)
    config = default_student_config()
    stream = torch.randint(config.vocab_size, (200_000,), generator=torch.Generator().manual_seed(0))
    data = TokenBlocks(stream, 128)
    rng = torch.Generator().manual_seed(1)
    batch = lambda: torch.randint(len(data), (16,), generator=rng).tolist()  # noqa: E731
    result = {"command": f"python benchmarks/compile_speed.py --steps {args.steps} --repeats {args.repeats}"
                         + (f" --device {args.device}" if args.device != "cpu" else ""),
              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
              "device": torch.cuda.get_device_name(device) if device.type == "cuda" else
              f"cpu, {torch.get_num_threads()} threads, {os.cpu_count()} cores",
              "torch": torch.__version__, "batch": 16, "seq_len": 128, "students": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for student, ternary in (("full precision", False), ("ternary QAT", True)):
            trainers, warmup, times = {}, {}, {name: [] for name in SETTINGS}
            for name, setting in SETTINGS.items():
                trainers[name] = trainer(setting, ternary, device, Path(tmp) / name, data)
                warmup[name] = sum(timed_steps(trainers[name], [batch() for _ in range(WARMUP_STEPS)]))
            for _ in range(args.repeats):
                for name in SETTINGS:
                    times[name] += timed_steps(trainers[name], [batch() for _ in range(args.steps)])
            base = statistics.median(times["eager float32"])
            result["students"][student] = {
                name: {"median_step_s": statistics.median(t), "ratio_to_eager": statistics.median(t) / base,
                       "warmup_s": warmup[name]} for name, t in times.items()}
            for name, r in result["students"][student].items():
                print(f"{student:15s} {name:29s} {r['median_step_s'] * 1e3:8.1f} ms/step  {r['ratio_to_eager']:.2f}x "
                      f"eager  (first {WARMUP_STEPS} steps {r['warmup_s']:.1f} s)", flush=True)
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    lines = [f"Produced by `{result['command']}` on {result['device']} (torch {result['torch']}), {result['date']}.", "",
             "| student | setting | step (ms) | vs eager float32 | first 3 steps (s) |", "|---|---|---|---|---|"]
    for student, rows in result["students"].items():
        for name, r in rows.items():
            lines.append(f"| {student} | {name} | {r['median_step_s'] * 1e3:.1f} | {r['ratio_to_eager']:.2f}x | "
                         f"{r['warmup_s']:.1f} |")
    RESULTS.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print(f"written to {RESULTS} and {RESULTS.with_suffix('.md')}")


if __name__ == "__main__":
    main()
