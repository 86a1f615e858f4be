"""`hybridopt distill` end to end: teacher, data, student, optional no-teacher baseline, report."""

from __future__ import annotations

import json
import time
from dataclasses import asdict, fields, replace
from pathlib import Path

import torch

from hybridopt.checkpoint import CHECKPOINT_NAME, atomic_write
from hybridopt.clustering import DataClusters, cluster_data, format_cluster_report
from hybridopt.config import DistillConfig
from hybridopt.errors import UserError
from hybridopt.export import export_packed
from hybridopt.hybrid_optimization import format_summary
from hybridopt.modeling import build_model, context_length, load_teacher, num_parameters, student_config, vocab_size
from hybridopt.recipes.data import corpus_documents, token_splits
from hybridopt.precision_plan import PrecisionPlan, plan_for_model
from hybridopt.qat import QATConfig, check_group_size, quantizable_linears, quantize_
from hybridopt.recipes.distill import DistillRecipe, evaluate_lm
from hybridopt.recipes.quant_report import format_report, quantization_report, save_report
from hybridopt.recipes.teacher import ensure_default_teacher
from hybridopt.utils import cache_dir, resolve_device, seed_everything

RUNS_ROOT = Path("hybridopt-runs")
RUN_CONFIG = "run_config.json"
RESULTS = "results.json"
PLAN_NAME = "precision_plan.json"


def resolve_out_dir(cfg: DistillConfig) -> tuple[Path, bool, DistillConfig]:
    """Pick the run folder; on `--resume`, load that run's saved config (it wins over flags).

    Returns:
        `(out_dir, resuming, config)`.
    """
    if cfg.resume:
        if cfg.resume == "latest":
            runs = sorted(p for p in RUNS_ROOT.glob("distill-*") if (p / RUN_CONFIG).is_file())
            if not runs:
                raise UserError(f"--resume found no run under '{RUNS_ROOT}'; pass the run folder: --resume DIR")
            out = runs[-1]
        else:
            out = Path(cfg.resume)
        if not (out / RUN_CONFIG).is_file():
            raise UserError(f"--resume '{out}' is not a hybridopt run folder (no {RUN_CONFIG})")
        saved = json.loads((out / RUN_CONFIG).read_text())
        names = {f.name for f in fields(DistillConfig)}
        saved = DistillConfig(**{k: v for k, v in saved.items() if k in names and k != "resume"})
        saved.device = cfg.device if cfg.device != "auto" else saved.device
        return out, True, saved
    out = Path(cfg.out) if cfg.out else RUNS_ROOT / time.strftime("distill-%Y%m%d-%H%M%S")
    if out.exists() and any(out.iterdir()):
        if (out / RUN_CONFIG).exists() or (out / CHECKPOINT_NAME).exists():
            raise UserError(f"--out '{out}' already holds a run; continue it with --resume {out} or choose another --out")
        raise UserError(f"--out '{out}' exists and is not empty; choose another --out")
    return out, False, cfg


def run_distill(cfg: DistillConfig, stop_after_epoch: int | None = None) -> dict:
    """Distil a teacher into a student; train the no-teacher baseline; save and report.

    Args:
        cfg: the run config (flags).
        stop_after_epoch: stop both runs after this many epochs, checkpointed, as an interruption would.

    Returns:
        The results dictionary also written to `<out>/results.json`.
    """
    out, resuming, cfg = resolve_out_dir(cfg)
    device = resolve_device(cfg.device)
    seed_everything(cfg.seed)
    # Cheap checks of user input first, before any long work (the default teacher trains for minutes).
    if cfg.teacher:
        teacher_dir = Path(cfg.teacher)
        teacher, tokenizer = load_teacher(teacher_dir, device)
    docs, desc = corpus_documents(cfg.data)
    if not cfg.teacher:
        teacher_dir = ensure_default_teacher()
        teacher, tokenizer = load_teacher(teacher_dir, device)
    ctx = context_length(teacher.config)
    if ctx is not None and cfg.seq_len > ctx:
        raise UserError(f"--seq_len {cfg.seq_len} exceeds the teacher's context length {ctx}; use --seq_len {ctx} or less")

    train, val = token_splits(docs, tokenizer, cfg.seq_len, cfg.val_fraction)
    if len(train) < cfg.batch_size:
        raise UserError(f"the training split has {len(train)} sequences, fewer than --batch_size {cfg.batch_size}; "
                        "add text or lower --batch_size or --seq_len")
    out.mkdir(parents=True, exist_ok=True)
    config_dict = {**asdict(cfg), "resume": None, "out": str(out), "teacher_path": str(teacher_dir)}
    if not resuming:
        atomic_write(out / RUN_CONFIG, lambda tmp: Path(tmp).write_text(json.dumps(config_dict, indent=2)))

    s_config = student_config(teacher.config, vocab_size(teacher), cfg, tokenizer, max_positions=ctx or cfg.seq_len)
    student = build_model(s_config, cfg.seed).to(device)
    qcfg = quant_config(cfg)
    if qcfg:  # PTQ and plans quantize after training starts: find bad sizes now, not after training
        try:
            check_group_size(student, qcfg)
        except ValueError as e:
            raise UserError(str(e)) from None
        n_layers = len(quantizable_linears(student, qcfg.include_head))
        if cfg.param_clusters and cfg.param_clusters > n_layers:
            raise UserError(f"--param_clusters {cfg.param_clusters} exceeds the {n_layers} quantized layers; "
                            f"ask for at most {n_layers}")
    print(f"Teacher: {teacher_dir} ({num_parameters(teacher) / 1e6:.2f}M parameters)")
    print(f"Student: Llama, {num_parameters(student) / 1e6:.2f}M parameters, {cfg.student_layers} layers x "
          f"{cfg.student_hidden} hidden, vocab {s_config.vocab_size}")
    print(f"Data: {desc}; {train.num_tokens:,} training tokens, {val.num_tokens:,} validation tokens, "
          f"sequences of {cfg.seq_len}")
    if qcfg and cfg.qat and not cfg.param_clusters:
        apply_quantization(student, qcfg, announce="quantization-aware training")
    clusters = None
    if cfg.data_clusters:
        clusters = cluster_data(teacher, train, val, cfg.data_clusters, cfg.seed, cfg.batch_size, device,
                                cache_dir() / "clusters")
        print(format_cluster_report(clusters, train, tokenizer, sampling=cfg.cluster_sampling, batch_size=cfg.batch_size))
        print(f"Cluster sampling: {cfg.cluster_sampling}")
    teacher_eval = evaluate_lm(teacher, val, cfg.batch_size, device, clusters.val_labels if clusters else None,
                               clusters.num_clusters if clusters else None)
    print(f"Teacher validation loss {teacher_eval['loss']:.4f}, perplexity {teacher_eval['ppl']:.2f}")

    metrics = Path(cfg.metrics_out) if cfg.metrics_out else out / "metrics.csv"
    recipe = DistillRecipe(cfg, student, train, val, out, device, teacher=teacher, alpha=cfg.alpha,
                           temperature=cfg.temperature, metrics_path=metrics if cfg.save_metrics else None,
                           config_dict=config_dict, **_cluster_args(cfg, clusters))
    recipe.setup(resume=resuming and (out / CHECKPOINT_NAME).exists())
    print(f"Distilling: {cfg.epochs} epochs x {recipe.steps_per_epoch} steps, batch {cfg.batch_size}, "
          f"alpha {cfg.alpha}, temperature {cfg.temperature}")
    plan = _train(recipe, cfg, qcfg, out, stop_after_epoch)
    recipe.cleanup()
    if recipe.epoch < cfg.epochs:
        return {"interrupted_at_epoch": recipe.epoch}
    if qcfg and not cfg.qat:
        if cfg.param_clusters:
            plan = _plan(recipe, cfg, qcfg, out)
        apply_quantization(student, _with_plan(qcfg, plan), announce="post-training quantization")
    student_eval = recipe.evaluate()
    if cfg.hybrid:
        print(format_summary(recipe.optimizer.summary(), final_loss=recipe.history[-1]["loss"]))
    student.save_pretrained(out / "student", safe_serialization=True)
    tokenizer.save_pretrained(out / "student")

    quant_report = _export(student, tokenizer, qcfg, cfg, out, val, device, plan) if qcfg else None
    results = {
        "teacher": {**teacher_eval, "path": str(teacher_dir), "parameters": num_parameters(teacher)},
        "student": {**student_eval, "parameters": num_parameters(student), "path": str(out / "student"),
                    "steps": recipe.global_step, "skipped_steps": recipe.skipped_steps,
                    "train_seconds": recipe.elapsed, "history": recipe.history,
                    **({"hybrid": recipe.optimizer.summary()} if cfg.hybrid else {})},
        "config": config_dict,
    }
    if quant_report:
        results["quantization"] = quant_report
    if plan:
        results["precision_plan"] = asdict(plan)
    if clusters is not None:
        results["data_clusters"] = {"k": clusters.num_clusters, "sizes": clusters.sizes.tolist(),
                                    "seconds": clusters.seconds, "sampling": cfg.cluster_sampling,
                                    "teacher_val_loss_clusters": teacher_eval["cluster_loss"]}
    if cfg.baseline:
        baseline = _run_baseline(cfg, s_config, qcfg, train, val, out, device, resuming, metrics, config_dict,
                                 stop_after_epoch, clusters, plan)
        if baseline is None:
            return {"interrupted_at_epoch": stop_after_epoch}
        results["baseline"] = baseline

    print_report(results)
    atomic_write(out / RESULTS, lambda tmp: Path(tmp).write_text(json.dumps(results, indent=2)))
    print(f"Student saved to {out / 'student'}; results in {out / RESULTS}")
    return results


def _cluster_args(cfg: DistillConfig, clusters: DataClusters | None) -> dict:
    if clusters is None:
        return {}
    return {"train_clusters": clusters.labels, "val_clusters": clusters.val_labels, "sampling": cfg.cluster_sampling}


def _with_plan(qcfg: QATConfig, plan: PrecisionPlan | None) -> QATConfig:
    return replace(qcfg, layer_bits=plan.layer_bits) if plan else qcfg


def calibration_batches(num_items: int, cfg: DistillConfig) -> list[list[int]]:
    """The `--calibration_batches` training batches the precision plan measures: fixed by the seed, and
    drawn apart from the training order."""
    order = torch.randperm(num_items, generator=torch.Generator().manual_seed(cfg.seed + 1)).tolist()
    B = min(cfg.batch_size, num_items)
    return [order[i * B : (i + 1) * B] for i in range(min(cfg.calibration_batches, num_items // B))]


def _plan(recipe: DistillRecipe, cfg: DistillConfig, qcfg: QATConfig, out: Path | None) -> PrecisionPlan:
    """Measure layer sensitivities on calibration batches of the recipe's objective, and (--plan_method
    measured) the student's cross-entropy there under each candidate plan; solve, print, save the plan."""
    batches = calibration_batches(len(recipe.train_data), cfg)
    names = quantizable_linears(recipe.model, qcfg.include_head)
    # Calibration batches are drawn uniformly, so the plain objective (no sampler importance weights).
    plan = plan_for_model(recipe.model, names, batches, lambda b: recipe.batch_loss(b, weighted=False)[0], qcfg.bits,
                          qcfg.group_size, cfg.param_clusters, cfg.avg_bits, cfg.seed, cfg.plan_method,
                          eval_fn=recipe.batch_ce)
    print(plan.format())
    if out is not None:
        atomic_write(out / PLAN_NAME, lambda tmp: Path(tmp).write_text(plan.to_json()))
    return plan


def _train(recipe: DistillRecipe, cfg: DistillConfig, qcfg: QATConfig | None, out: Path | None,
           stop_after_epoch: int | None, plan: PrecisionPlan | None = None) -> PrecisionPlan | None:
    """Run the recipe's remaining epochs. With --param_clusters and --qat, the first --plan_after_epochs
    epochs train in full precision; then the plan is measured (or read back on resume, or given) and
    QAT continues with it. Returns the plan, if any."""
    if not (qcfg and cfg.qat and cfg.param_clusters):
        recipe.train(stop_after_epoch)
        return plan
    switch = cfg.plan_after_epochs
    if recipe.epoch < switch:
        recipe.train(switch if stop_after_epoch is None else min(switch, stop_after_epoch))
        if recipe.epoch < switch:
            return plan
    if plan is None and out is not None and (out / PLAN_NAME).is_file():
        plan = PrecisionPlan.from_json((out / PLAN_NAME).read_text())
    if plan is None:
        plan = _plan(recipe, cfg, qcfg, out)
    apply_quantization(recipe.model, _with_plan(qcfg, plan),
                       announce=None if recipe.prefix else f"quantization-aware training from epoch {switch + 1}")
    recipe.train(stop_after_epoch)
    return plan


def _export(student, tokenizer, qcfg: QATConfig, cfg: DistillConfig, out: Path, val, device,
            plan: PrecisionPlan | None = None) -> dict:
    """Write the packed student to `<out>/export/`, measure it, print and return the report."""
    export_dir = out / "export"
    path = export_packed(student, export_dir, tokenizer, getattr(torch, cfg.export_dtype), plan)
    report = quantization_report(student, out / "student", export_dir, val, cfg.batch_size, device,
                                 "QAT" if cfg.qat else "PTQ")
    save_report(report, export_dir)
    print(f"Exported the packed student to {path}")
    print(format_report(report))
    return report


def _run_baseline(cfg, s_config, qcfg, train, val, out, device, resuming, metrics, config_dict,
                  stop_after_epoch, clusters=None, plan=None) -> dict | None:
    """The same student, seed, data order, steps and quantization (precision plan included), without a
    teacher; None if interrupted."""
    baseline = build_model(s_config, cfg.seed).to(device)  # same initial weights as the student
    if qcfg and cfg.qat and not cfg.param_clusters:
        apply_quantization(baseline, qcfg)
    base_dir = out / "baseline"
    base_dir.mkdir(exist_ok=True)
    base_metrics = metrics.with_name(f"{metrics.stem}_baseline.csv") if cfg.save_metrics else None
    base = DistillRecipe(cfg, baseline, train, val, base_dir, device, teacher=None, metrics_path=base_metrics,
                         name="baseline", config_dict={**config_dict, "alpha": 1.0, "teacher_path": None},
                         **_cluster_args(cfg, clusters))
    base.setup(resume=resuming and (base_dir / CHECKPOINT_NAME).exists())
    print("Baseline: the same student without a teacher (cross-entropy only), same seed and steps")
    _train(base, cfg, qcfg, None, stop_after_epoch, plan)
    base.cleanup()
    if base.epoch < cfg.epochs:
        return None
    if qcfg and not cfg.qat:
        apply_quantization(baseline, _with_plan(qcfg, plan))
    return {**base.evaluate(), "steps": base.global_step, "train_seconds": base.elapsed, "history": base.history}


def quant_config(cfg: DistillConfig) -> QATConfig | None:
    """The quantization the flags ask for: --qat alone is 1-bit, --ternary 1.58-bit, --bits any width."""
    if cfg.weight_bits is None:
        return None
    return QATConfig(bits=cfg.weight_bits, group_size=cfg.group_size, act_bits=cfg.act_bits,
                     include_head=cfg.quantize_head)


def apply_quantization(model: torch.nn.Module, qcfg: QATConfig, announce: str | None = None) -> list[str]:
    """`quantize_` with user-facing errors; prints the "Replaced N Linear modules" line when `announce` is set."""
    try:
        names = quantize_(model, qcfg)
    except ValueError as e:
        raise UserError(str(e)) from None
    if announce:
        print(f"Replaced {len(names)} Linear modules with QATLinear ({qcfg.describe()}; {announce})")
    return names


def print_report(results: dict) -> None:
    """The validation table: teacher, distilled student and no-teacher student."""
    rows = [("teacher", results["teacher"]), ("student (distilled)", results["student"])]
    if "baseline" in results:
        rows.append(("student (no teacher)", results["baseline"]))
    tokens = results["student"]["tokens"]
    print(f"\nValidation on {tokens:,} held-out tokens:")
    print(f"  {'model':<22}{'loss':>10}{'perplexity':>12}")
    for name, r in rows:
        print(f"  {name:<22}{r['loss']:>10.4f}{r['ppl']:>12.2f}")
    if "baseline" in results:
        gain = results["baseline"]["loss"] - results["student"]["loss"]
        print(f"  distillation {'lowers' if gain > 0 else 'raises'} validation loss by {abs(gain):.4f} nats/token "
              "against the no-teacher student")
