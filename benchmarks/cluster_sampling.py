"""Measure cluster-aware sampling on the embedded default: gradient variance, clustering time, convergence.

    python benchmarks/cluster_sampling.py [--epochs 20] [--clusters 8] [--batches 64] [--seeds 0 1]
                                          [--out benchmarks/results]

Arms: plain shuffling (no clusters, the default run) and `--data_clusters K --cluster_sampling M` for
M in proportional, balanced, single, iid; each `hybridopt distill --epochs N --no-baseline --eval_every 1`,
same teacher and data, for every `--seed` (the seed sets the student's initialisation, the batches and
the k-means clusters). Reported:

* gradient variance: `E||g - mean g||^2` of the training objective's gradient over `--batches`
  batches of each mode, at three fixed students (initialisation, after 5 epochs of the plain run,
  the end of the plain run), as a ratio to `iid`;
* clustering time (teacher features + faiss k-means) against the plain run's training time;
* per seed, steps to reach that seed's plain run's final validation loss (validation every epoch);
  final losses as the mean and range over seeds.

Writes `cluster_sampling.json` and `cluster_sampling.md` under --out.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import time
from pathlib import Path

import torch

from hybridopt.training.checkpoint import load_checkpoint
from hybridopt.config import DistillConfig
from hybridopt.data.splits import corpus_documents, token_splits
from hybridopt.data.clusters import cluster_data
from hybridopt.models.modeling import build_model, context_length, load_teacher, student_config, vocab_size
from hybridopt.recipes.distill import run_distill
from hybridopt.reporting import Reporter
from hybridopt.data.sampler import SAMPLING_MODES, ClusterStratifiedBatchSampler
from hybridopt.training.default_teacher import ensure_default_teacher
from hybridopt.training.objectives import objective_for
from hybridopt.training.trainer import Trainer

from common import RESULTS_DIR  # benchmarks/common.py, beside this script


def gradient_variance(recipe: Trainer, sampler: ClusterStratifiedBatchSampler, batches: int) -> float:
    """Unbiased `E||g_i - mean g||^2` over `batches` batches drawn by `sampler`."""
    params = [p for p in recipe.model.parameters() if p.requires_grad]
    grads = []
    sampler.set_epoch(10_000)  # batches apart from any training epoch
    for step in range(batches):
        recipe.model.zero_grad(set_to_none=True)
        recipe.batch_loss(sampler.batch_at(step))[0].backward()
        grads.append(torch.cat([p.grad.flatten() for p in params]).double())
    g = torch.stack(grads)  # (batches, P)
    return float((g - g.mean(0)).pow(2).sum(1).sum() / (batches - 1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--clusters", type=int, default=8)
    parser.add_argument("--batches", type=int, default=64)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--out", default=str(RESULTS_DIR))
    args = parser.parse_args()
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    out = Path(args.out)
    runs = out / "runs" / "cluster-sampling"
    shutil.rmtree(runs, ignore_errors=True)
    runs.mkdir(parents=True)
    common = dict(epochs=args.epochs, baseline=False, eval_every=1)
    quiet = Reporter(quiet=True)

    # Per seed: the plain run (interrupted after 5 epochs to keep that checkpoint, then finished), then
    # every sampling mode. The gradient variance uses the first seed's plain checkpoints.
    arms = {}
    for seed in args.seeds:
        plain_dir = runs / f"plain-seed{seed}"
        start = time.perf_counter()
        run_distill(DistillConfig(out=str(plain_dir), seed=seed, **common), quiet, stop_after_epoch=5)
        if seed == args.seeds[0]:
            first_plain, mid_state = plain_dir, load_checkpoint(plain_dir)["model"]
        res = run_distill(DistillConfig(resume=str(plain_dir)), quiet)
        arms.setdefault("shuffled (no clusters)", []).append({"seed": seed, "res": res,
                                                              "wall": time.perf_counter() - start})
        print(f"seed {seed} plain: val loss {res['student']['loss']:.4f}", file=sys.stderr)
        for mode in SAMPLING_MODES:
            start = time.perf_counter()
            res = run_distill(DistillConfig(out=str(runs / f"{mode}-seed{seed}"), seed=seed,
                                            data_clusters=args.clusters, cluster_sampling=mode, **common), quiet)
            arms.setdefault(mode, []).append({"seed": seed, "res": res, "wall": time.perf_counter() - start})
            print(f"seed {seed} {mode}: val loss {res['student']['loss']:.4f}", file=sys.stderr)

    # Clustering time, measured cold (no cache) in this process.
    cfg = DistillConfig(data_clusters=args.clusters, seed=args.seeds[0], **common)
    device = torch.device("cpu")
    teacher, tokenizer = load_teacher(ensure_default_teacher(), device)
    docs, _ = corpus_documents([])
    train, val = token_splits(docs, tokenizer, cfg.seq_len, cfg.val_fraction)
    clusters = cluster_data(teacher, train, val, args.clusters, cfg.seed, cfg.batch_size, device, cache=None)

    # Gradient variance at three fixed students.
    s_config = student_config(teacher.config, vocab_size(teacher), cfg, tokenizer,
                              max_positions=context_length(teacher.config) or cfg.seq_len)
    final_state = load_checkpoint(first_plain)["model"]
    variance = {}
    for name, state in (("init", None), ("epoch 5", mid_state), (f"epoch {args.epochs}", final_state)):
        model = build_model(s_config, cfg.seed)
        if state is not None:
            model.load_state_dict(state)
        recipe = Trainer(cfg, model, train, val, runs / "scratch", device,
                         objective_for(teacher, alpha=cfg.alpha, temperature=cfg.temperature), reporter=quiet)
        variance[name] = {}
        for mode in SAMPLING_MODES:
            recipe.sampler = ClusterStratifiedBatchSampler(clusters.labels, cfg.batch_size, cfg.seed, mode)
            variance[name][mode] = gradient_variance(recipe, recipe.sampler, args.batches)
        print(f"gradient variance at {name}: {variance[name]}", file=sys.stderr)

    plains = {r["seed"]: r["res"]["student"] for r in arms["shuffled (no clusters)"]}
    plain = plains[args.seeds[0]]
    steps_per_epoch = plain["steps"] // args.epochs
    rows = []
    for arm, runs_ in arms.items():
        per_seed = []
        for r in runs_:
            hist, target = r["res"]["student"]["history"], plains[r["seed"]]["loss"]
            reached = next((h["step"] for h in hist if h.get("val_loss", float("inf")) <= target + 1e-12), None)
            per_seed.append({"seed": r["seed"], "val_loss": r["res"]["student"]["loss"], "target": target,
                             "steps_to_target": reached, "train_seconds": r["res"]["student"]["train_seconds"],
                             "wall_seconds": r["wall"], "val_curve": [h.get("val_loss") for h in hist],
                             "worst_cluster_val_loss": hist[-1].get("val_loss_worst_cluster"),
                             "cluster_spread": hist[-1].get("val_loss_cluster_spread")})
        rows.append({"arm": arm, "seeds": per_seed})
    result = {"epochs": args.epochs, "steps_per_epoch": steps_per_epoch, "clusters": args.clusters,
              "batches": args.batches, "seeds": args.seeds, "cluster_sizes": clusters.sizes.tolist(),
              "clustering_seconds": clusters.seconds, "plain_train_seconds": plain["train_seconds"],
              "gradient_variance": variance, "arms": rows}
    (out / "cluster_sampling.json").write_text(json.dumps(result, indent=2))

    lines = [f"Gradient variance of the training objective over {args.batches} batches, as a ratio to `iid`:", "",
             "| student | " + " | ".join(SAMPLING_MODES) + " |", "|---" * (len(SAMPLING_MODES) + 1) + "|"]
    for name, v in variance.items():
        lines.append(f"| {name} | " + " | ".join(f"{v[m] / v['iid']:.3f}" for m in SAMPLING_MODES) + " |")
    lines += ["", f"Clustering {len(clusters.labels):,} sequences into {args.clusters} clusters (sizes "
              f"{min(clusters.sizes)}-{max(clusters.sizes)}): {clusters.seconds:.1f} s, "
              f"{clusters.seconds / plain['train_seconds']:.1%} of the plain run's training time "
              f"({plain['train_seconds']:.0f} s); cached after the first run.", "",
              f"Over seeds {', '.join(map(str, args.seeds))} ({args.epochs} epochs x {steps_per_epoch} steps; "
              "target: the same seed's plain run's final validation loss):", "",
              "| sampling | final val loss, mean (range) | steps to target, per seed | worst-cluster val loss, mean "
              "| cluster spread, mean |", "|---|---|---|---|---|"]
    for r in rows:
        losses = [s["val_loss"] for s in r["seeds"]]
        reached = ", ".join("not reached" if s["steps_to_target"] is None else str(s["steps_to_target"])
                            for s in r["seeds"])
        worst = [s["worst_cluster_val_loss"] for s in r["seeds"] if s["worst_cluster_val_loss"] is not None]
        spread = [s["cluster_spread"] for s in r["seeds"] if s["cluster_spread"] is not None]
        lines.append(f"| {r['arm']} | {statistics.mean(losses):.4f} ({min(losses):.4f}-{max(losses):.4f}) | "
                     f"{reached} | {f'{statistics.mean(worst):.4f}' if worst else '-'} | "
                     f"{f'{statistics.mean(spread):.4f}' if spread else '-'} |")
    (out / "cluster_sampling.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
