"""The teacher-logit cache (`--teacher_topk K`): what it costs in quality, what it saves in time.

    python benchmarks/teacher_cache.py quality [--ks 8 32 128] [--tails bucket] [--seeds 0 1 2] [--epochs 20]
    python benchmarks/teacher_cache.py speed [--steps 8]

quality: the default run (default teacher, data and student, no baseline) with the live teacher and
    with cached top-k targets for each K and tail treatment (`--teacher_tail`), for each seed; validation
    loss of the student, the cache's size and build time. Runs already in teacher_cache_quality.json (same
    epochs) are kept, not repeated, so arms can be added later. K = V (the whole vocabulary) is not run here: it is 4096 x 6 bytes per token (13 GB for
    the embedded corpus), and tests/data/test_teacher_cache.py shows it reproduces the live run.
speed: one training step (student forward + backward + AdamW step, batch 16 x 128) with the live teacher
    and with the cache, interleaved so machine noise hits both, medians, as a ratio; on the default
    teacher and on a wide random teacher (768 hidden, 12 layers, 32,000-token vocabulary).

Writes `teacher_cache_quality.json` / `teacher_cache_speed.json` and a markdown table beside them.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import LlamaConfig

from hybridopt.config import DistillConfig
from hybridopt.data.splits import corpus_documents, token_splits
from hybridopt.data.blocks import TokenBlocks
from hybridopt.models.modeling import build_model, load_teacher
from hybridopt.recipes.distill import run_distill
from hybridopt.reporting import Reporter
from hybridopt.training.default_teacher import ensure_default_teacher
from hybridopt.data.teacher_cache import build_cache
from hybridopt.training.objectives import objective_for
from hybridopt.training.trainer import Trainer

from common import RESULTS_DIR, default_student_config  # benchmarks/common.py, beside this script

QUIET = Reporter(quiet=True)


def default_teacher_and_train() -> tuple[torch.nn.Module, TokenBlocks]:
    """The default teacher and the training blocks of the embedded corpus, as `hybridopt distill` makes them."""
    teacher, tokenizer = load_teacher(ensure_default_teacher(QUIET), torch.device("cpu"))
    cfg = DistillConfig()
    train, _ = token_splits(corpus_documents([])[0], tokenizer, cfg.seq_len, cfg.val_fraction)
    return teacher, train


def quality(args) -> None:
    out = Path(args.out)
    runs = out / "runs" / "teacher-cache"
    path = out / "teacher_cache_quality.json"
    saved = json.loads(path.read_text()) if path.exists() else {}
    # (a file from before the epochs were recorded holds default-length runs)
    rows = [r for r in saved.get("runs", []) if saved.get("epochs", DistillConfig().epochs) == args.epochs]
    arms = [(None, "bucket")] + [(k, tail) for tail in args.tails for k in args.ks]
    for seed in args.seeds:
        for k, tail in arms:
            if any(r["k"] == k and r.get("tail", "bucket") == tail and r["seed"] == seed for r in rows):
                continue
            start = time.perf_counter()
            name = f"k{k}-{tail}" if k else "live"
            run_dir = runs / f"{name}-seed{seed}"
            shutil.rmtree(run_dir, ignore_errors=True)
            cfg = DistillConfig(epochs=args.epochs, baseline=False, seed=seed, teacher_topk=k,
                                teacher_tail=tail, out=str(run_dir))
            res = run_distill(cfg, QUIET)
            wall = time.perf_counter() - start
            rows.append({"k": k, "tail": tail, "seed": seed, "val_loss": res["student"]["loss"],
                         "train_seconds": res["student"]["train_seconds"], "wall_seconds": wall})
            print(f"{name} seed {seed}: val loss {res['student']['loss']:.4f}, "
                  f"train {res['student']['train_seconds']:.0f} s", file=sys.stderr)
            path.write_text(json.dumps({**saved, "epochs": args.epochs, "runs": rows}, indent=2))
    # Cache size and build time, measured cold for each K (in a scratch folder, so nothing is reused).
    sizes = {int(k): v for k, v in saved.get("caches", {}).items()}
    ks = sorted({k for k, _ in arms if k})
    missing = [k for k in ks if k not in sizes]
    mass = {int(k): v for k, v in saved.get("topk_mass", {}).items()}
    if missing or any(k not in mass for k in ks):
        teacher, train = default_teacher_and_train()
        mass = topk_mass(teacher, train, ks)
    if missing:
        cfg = DistillConfig()
        with tempfile.TemporaryDirectory() as tmp:
            for k in missing:
                start = time.perf_counter()
                cache = build_cache(teacher, train, k, cfg.temperature, Path(tmp) / f"k{k}.safetensors",
                                    cfg.batch_size, torch.device("cpu"), QUIET)
                sizes[k] = {"bytes": cache.nbytes, "bytes_per_token": cache.nbytes / train.num_tokens,
                            "build_seconds": time.perf_counter() - start, "tokens": train.num_tokens}
    path.write_text(json.dumps({"epochs": args.epochs, "runs": rows, "caches": sizes, "topk_mass": mass,
                                "threads": torch.get_num_threads()}, indent=2))
    live = {r["seed"]: r["val_loss"] for r in rows if r["k"] is None}
    lines = ["| teacher targets | teacher mass in the top-k | val loss per seed | mean | mean gap to live "
             "| cache size | build time |", "|---|---|---|---|---|---|---|"]
    present = sorted({(r["k"] or 0, r.get("tail", "bucket")) for r in rows})
    for k, tail in present:
        mine = sorted((r for r in rows if (r["k"] or 0) == k and r.get("tail", "bucket") == tail),
                      key=lambda r: r["seed"])
        vals = [r["val_loss"] for r in mine]
        gaps = [r["val_loss"] - live[r["seed"]] for r in mine if r["seed"] in live]
        size = f"{sizes[k]['bytes'] / 2**20:.0f} MiB ({sizes[k]['bytes_per_token']:.0f} B/token)" if k else "-"
        build = f"{sizes[k]['build_seconds']:.0f} s" if k else "-"
        label = f"top-{k} cache, {tail} tail" if k else "live teacher"
        share = f"{mass[k]:.3f}" if k else "1"
        lines.append(f"| {label} | {share} | {', '.join(f'{v:.4f}' for v in vals)} | {statistics.mean(vals):.4f} | "
                     f"{statistics.mean(gaps):+.4f} | {size} | {build} |")
    spread = max(live.values()) - min(live.values())
    lines.append(f"\nSeed spread of the live teacher (max - min over seeds {sorted(live)}): {spread:.4f}")
    (out / "teacher_cache_quality.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


@torch.no_grad()
def topk_mass(teacher: torch.nn.Module, train: TokenBlocks, ks: list[int], blocks: int = 16) -> dict[int, float]:
    """Mean probability mass of the teacher's top-k tokens at the default KD temperature, over the first
    `blocks` training blocks: how much of the distribution the cache keeps exactly."""
    cfg = DistillConfig()
    logits = teacher(input_ids=train.batch(list(range(blocks)))[0]).logits  # (B, T, V)
    cumulative = torch.softmax(logits / cfg.temperature, -1).sort(-1, descending=True).values.cumsum(-1)
    return {k: float(cumulative[..., k - 1].mean()) for k in ks}


def _step_times(trainer: Trainer, indices: list[list[int]]) -> list[float]:
    times = []
    for idx in indices:
        t0 = time.perf_counter()
        loss, _ = trainer.batch_loss(idx)
        loss.backward()
        trainer.optimizer.step()
        trainer.optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
    return times


def _speed_case(name: str, teacher, train: TokenBlocks, student_config: LlamaConfig, k: int, steps: int,
                tmp: Path) -> dict:
    cfg = DistillConfig(teacher_topk=k)
    start = time.perf_counter()
    cache = build_cache(teacher, train, k, cfg.temperature, tmp / f"{name}.safetensors", cfg.batch_size,
                        torch.device("cpu"), QUIET)
    build = time.perf_counter() - start
    trainers = {}
    for arm, c in (("live", None), ("cached", cache)):
        model = build_model(student_config, 0)
        trainers[arm] = Trainer(cfg, model, train, train, tmp / arm, torch.device("cpu"),
                                objective_for(teacher, c, cfg.alpha, cfg.temperature), reporter=QUIET)
    g = torch.Generator().manual_seed(0)
    batches = [torch.randperm(len(train), generator=g)[: cfg.batch_size].tolist() for _ in range(steps + 1)]
    times = {"live": [], "cached": []}
    for arm in times:  # warm-up
        _step_times(trainers[arm], batches[:1])
    for b in batches[1:]:  # interleaved: the same machine noise for both
        for arm in times:
            times[arm] += _step_times(trainers[arm], [b])
    live, cached = statistics.median(times["live"]), statistics.median(times["cached"])
    row = {"case": name, "k": k, "live_step_s": live, "cached_step_s": cached, "speedup": live / cached,
           "cache_build_s": build, "blocks": len(train), "cache_bytes": cache.nbytes,
           "teacher_parameters": sum(p.numel() for p in teacher.parameters()), "steps": steps}
    print(f"{name}: live {live:.3f} s/step, cached {cached:.3f} s/step, {live / cached:.2f}x", file=sys.stderr)
    return row


def speed(args) -> None:
    out = Path(args.out)
    teacher, train = default_teacher_and_train()
    cfg = DistillConfig()
    subset = TokenBlocks(train.stream[: 64 * cfg.seq_len + 1], cfg.seq_len)  # 64 blocks: enough for the steps
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        rows.append(_speed_case("default teacher (5.5M, vocab 4096)", teacher, subset, default_student_config(),
                                args.k, args.steps, Path(tmp)))
        vocab = 32000
        wide = build_model(LlamaConfig(vocab_size=vocab, hidden_size=768, intermediate_size=2048,
                                       num_hidden_layers=12, num_attention_heads=12, num_key_value_heads=12,
                                       max_position_embeddings=512), seed=0).eval().requires_grad_(False)
        stream = torch.randint(0, vocab, (64 * cfg.seq_len + 1,), generator=torch.Generator().manual_seed(1))
        student = default_student_config()
        student.vocab_size = vocab
        rows.append(_speed_case("wide random teacher (768 x 12, vocab 32000)", wide,
                                TokenBlocks(stream, cfg.seq_len), student, args.k, args.steps, Path(tmp)))
    (out / "teacher_cache_speed.json").write_text(json.dumps({"rows": rows, "threads": torch.get_num_threads()},
                                                              indent=2))
    lines = ["| teacher | live step | cached step | speedup | cache build (64 blocks) |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['case']} | {r['live_step_s']:.3f} s | {r['cached_step_s']:.3f} s | "
                     f"{r['speedup']:.2f}x | {r['cache_build_s']:.1f} s |")
    (out / "teacher_cache_speed.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="what", required=True)
    q = sub.add_parser("quality", help="validation loss: live teacher vs cached top-k, several seeds")
    q.add_argument("--ks", type=int, nargs="+", default=[8, 32, 128])
    q.add_argument("--tails", nargs="+", default=["bucket"], choices=["bucket", "uniform"])
    q.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    q.add_argument("--epochs", type=int, default=20)
    s = sub.add_parser("speed", help="training-step time: live teacher vs cache, as a ratio")
    s.add_argument("--k", type=int, default=32)
    s.add_argument("--steps", type=int, default=8)
    for p in (q, s):
        p.add_argument("--out", default=str(RESULTS_DIR))
    args = parser.parse_args()
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    Path(args.out).mkdir(parents=True, exist_ok=True)
    quality(args) if args.what == "quality" else speed(args)


if __name__ == "__main__":
    main()
