"""`hybridopt distill`: the distillation recipe, one class that owns the run.

    recipe = DistillRecipe(cfg)        # the flags, as a DistillConfig
    recipe.setup()                     # run folder, teacher, data, student, clusters, the training loop
    recipe.train()                     # the epochs; with --param_clusters the precision plan in between
    recipe.evaluate()                  # post-training quantization if asked, validation
    recipe.save_checkpoint()           # student (HF format), packed export, quantization report
    recipe.cleanup()

`run_distill(cfg)` does all of it, then trains the no-teacher baseline (`recipe.baseline()`: a second
`DistillRecipe` on the same data, seed, steps and quantization, without a teacher) and writes
`results.json`. Output goes through a `Reporter`: `run_distill(cfg, Reporter(quiet=True))` prints nothing.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
from transformers import PreTrainedTokenizerBase

from hybridopt.fileio import (WRITE_ERRORS, atomic_save, atomic_write, json_text, remove_stale_temporaries,
                              write_failure)
from hybridopt.training.checkpoint import CHECKPOINT_NAME
from hybridopt.config import DEFAULT_TOPK, DistillConfig, QuantConfig
from hybridopt.data.splits import corpus_documents, token_splits
from hybridopt.data.clusters import DataClusters, cluster_data, format_cluster_report
from hybridopt.data.blocks import NotEnoughTokens, TokenBlocks
from hybridopt.training.distributed import DistEnv, is_sharded, shard_fsdp
from hybridopt.errors import UserError, first_line, for_flag
from hybridopt.training.evaluation import evaluate_lm
from hybridopt.export.packed import export_packed
from hybridopt.export.gguf import GGUFReport, export_gguf
from hybridopt.training.layout import RUN_CONFIG, OutputRefused, RunLayout, check_output, claim_output, lock_run
from hybridopt.manager import format_summary
from hybridopt.training.metrics import check_new_metrics
from hybridopt.models.modeling import context_length, load_teacher, num_parameters
from hybridopt.quant.precision_plan import PrecisionPlan, calibration_batches, plan_for_model
from hybridopt.quant.qat import QATConfig, check_group_size, quantizable_linears, quantize_
from hybridopt.training.quant_report import format_report, quantization_report, save_report
from hybridopt.recipes.distill_resume import refuse_occupied, resolve_run
from hybridopt.recipes.distill_student import StudentSpec, student_spec
from hybridopt.reporting import Reporter
from hybridopt.training.default_teacher import ensure_default_teacher
from hybridopt.data.teacher_cache import TeacherCache, ensure_cache
from hybridopt.training.feature_distill import FeatureDistill
from hybridopt.training.objectives import objective_for
from hybridopt.training.quant_warmup import QuantWarmup
from hybridopt.training.step import describe_optimizer, optimizer_summary
from hybridopt.training.trainer import Trainer
from hybridopt.utils import cache_dir, resolve_device, seed_everything

def quant_config(cfg: QuantConfig) -> QATConfig | None:
    """The quantization the flags ask for: --qat alone is 1-bit, --ternary 1.58-bit, --bits any width."""
    if cfg.weight_bits is None:
        return None
    return QATConfig(bits=cfg.weight_bits, group_size=cfg.group_size, act_bits=cfg.act_bits,
                     include_head=cfg.quantize_head)


@dataclass
class RunData:
    """What the distilled student and its no-teacher baseline share: the run folder, the data, the
    student's shape and its quantization."""

    layout: RunLayout
    resuming: bool
    device: torch.device
    tokenizer: PreTrainedTokenizerBase
    train: TokenBlocks
    val: TokenBlocks
    clusters: DataClusters | None
    student: StudentSpec
    quant: QATConfig | None
    config_dict: dict


class DistillRecipe:
    """Distil a teacher into a small Llama student, or (`baseline()`) train the same student without one.

    Args:
        cfg: the run's flags.
        reporter: where the run's lines go (default: stdout).
        given: the flags given on the command line (see `resolve_run`).
        dist: the torchrun process group (default: one process). Rank 0 decides the run folder and writes
            everything; every rank loads the same teacher and data (rank 0 first, filling the caches), takes
            rank 0's data clusters, and trains its slice of each global batch.
    """

    def __init__(self, cfg: DistillConfig, reporter: Reporter | None = None, given: frozenset[str] | None = None,
                 dist: DistEnv | None = None):
        self.cfg, self.given = cfg, given
        self.dist = dist or DistEnv()
        self.reporter = reporter or Reporter()
        self.name = ""  # "baseline" for the no-teacher run
        self.teacher: torch.nn.Module | None = None
        self.teacher_dir: Path | None = None
        self.teacher_eval: dict | None = None
        self.data: RunData | None = None
        self.student: torch.nn.Module | None = None
        self.trainer: Trainer | None = None
        self.plan: PrecisionPlan | None = None
        self.teacher_cache: TeacherCache | None = None
        self.gguf: GGUFReport | None = None
        self.out: Path | None = None  # the run folder, once resolved
        self._lock = None  # rank 0's hold on the run folder (layout.lock_run)

    # ------------------------------------------------------------------ setup
    def setup(self) -> None:
        """Resolve the run folder, load the teacher and data, build the student and its training loop."""
        out, resuming, self.cfg = self.dist.on_main(self._resolve_run)  # one folder, one decision for all ranks
        self.out = out
        with self.dist.main_first():
            self._prepare(out, resuming)
        if self.cfg.fsdp_teacher:  # every process at once, after everything that runs the teacher on rank 0 alone
            shard_fsdp(self.teacher, self.data.device)
            self._evaluate_teacher()
        if self.data.clusters is not None:  # rank 0's k-means (the others read its cache, or redo it): its labels
            c = self.data.clusters
            for name in ("labels", "val_labels"):
                setattr(c, name, self.dist.broadcast_(torch.as_tensor(np.array(getattr(c, name)))).numpy())
        self._build_trainer()  # collective under torchrun: DistributedDataParallel's first broadcast
        cfg = self.cfg
        self.reporter.line(f"Distilling: {cfg.epochs} epochs x {self.trainer.steps_per_epoch} steps, batch "
                           f"{cfg.batch_size}{self._per_rank()}, alpha {cfg.alpha}, temperature {cfg.temperature}")
        if (line := describe_optimizer(self.trainer.optimizer)) is not None:
            self.reporter.line(line)

    def _per_rank(self) -> str:
        """`" (2 processes x 8)"` under torchrun (`"; student sharded"` and `" and teacher"` with --fsdp and
        --fsdp_teacher), "" for one process."""
        n = self.dist.world_size
        if not self.dist.active:
            return ""
        sharded = [what for what, on in (("student", self.trainer.fsdp), ("teacher", is_sharded(self.teacher))) if on]
        return f" ({n} processes x {self.cfg.batch_size // n}" + (f"; {' and '.join(sharded)} sharded)" if sharded else ")")

    def _resolve_run(self) -> tuple[Path, bool, DistillConfig]:
        """Refuse an output or metrics path that is not ours, pick the run folder, and (under torchrun) refuse
        what data-parallel training does not support yet."""
        if self.cfg.out and not self.cfg.resume:
            with for_flag("--out", OutputRefused):  # `.`, a file; a run folder is left to resolve_run's advice
                check_output(self.cfg.out, "distill", legacy=(RUN_CONFIG, CHECKPOINT_NAME))
        if self.cfg.metrics_out and not self.cfg.resume:  # before the run folder is made, which would block a rerun
            with for_flag("--metrics_out"):
                check_new_metrics(Path(self.cfg.metrics_out), self.cfg.baseline)
        out, resuming, cfg = resolve_run(self.cfg, self.reporter, self.given)
        if self.dist.active:
            self.dist.check_batch(cfg.batch_size)
        with for_flag("--resume" if resuming else "--out", OutputRefused):
            self._lock = lock_run(out)  # held while this process writes the run (see `release`)
        if not resuming:
            refuse_occupied(out)  # again, under the lock: a run started beside this one may have written there
        return out, resuming, cfg

    def release(self) -> None:
        """Let another process write the run folder (a finished, failed or interrupted run; idempotent)."""
        if self._lock is not None:
            self._lock.close()
            self._lock = None

    def _prepare(self, out: Path, resuming: bool) -> None:
        """Everything before the training loop: teacher, data, student, clusters, the teacher's validation."""
        cfg, say = self.cfg, self.reporter.line
        with for_flag("--device"):
            device = self.dist.device(resolve_device(cfg.device))
        seed_everything(cfg.seed)
        tokenizer, train, val, desc = self._setup_teacher_and_data(device)
        layout = RunLayout(out)
        config_dict = {**asdict(cfg), "resume": None, "out": str(out), "teacher_path": str(self.teacher_dir)}
        if self.dist.is_main:
            claim_output(out, "distill")
            if not resuming:
                atomic_write(layout.config, lambda tmp: Path(tmp).write_text(json.dumps(config_dict, indent=2)))
            else:  # a kill inside a student or export write (the trainers clean their own folders)
                remove_stale_temporaries(layout.student)
                remove_stale_temporaries(layout.export)
        spec, quant = self._setup_student(tokenizer, train, device)
        s_config = spec.config
        say(f"Teacher: {self.teacher_dir} ({num_parameters(self.teacher) / 1e6:.2f}M parameters, {cfg.teacher_dtype})")
        start = "started from the teacher's weights" if spec.layer_map is not None else "freshly initialised"
        say(f"Student: Llama, {num_parameters(self.student) / 1e6:.2f}M parameters, {s_config.num_hidden_layers} "
            f"layers x {s_config.hidden_size} hidden, vocab {s_config.vocab_size}, {start}")
        say(f"Data: {desc}; {train.num_tokens:,} training tokens, {val.num_tokens:,} validation tokens, "
            f"sequences of {cfg.seq_len}")
        clusters = None
        if cfg.data_clusters:
            with for_flag("--data_clusters"):
                clusters = cluster_data(self.teacher, train, val, cfg.data_clusters, cfg.seed, cfg.batch_size,
                                        device, cache_dir() / "clusters")
        self.data = RunData(layout, resuming, device, tokenizer, train, val, clusters, spec, quant, config_dict)
        if quant and cfg.qat and not cfg.param_clusters:
            self._quantize(quant, "quantization-aware training")
        if clusters is not None:
            say(format_cluster_report(clusters, train, tokenizer, sampling=cfg.cluster_sampling,
                                      batch_size=cfg.batch_size))
            say(f"Cluster sampling: {cfg.cluster_sampling}")
        if not cfg.fsdp_teacher:  # a sharded teacher runs on every process at once: after this rank-0-first block
            self._evaluate_teacher()
        if cfg.teacher_topk and cfg.alpha < 1.0:
            self.teacher_cache = self._teacher_cache(train, device)

    def _setup_teacher_and_data(self, device: torch.device) -> tuple[PreTrainedTokenizerBase, TokenBlocks, TokenBlocks, str]:
        """The teacher (`--teacher`, or the default one, trained on first use) and the token blocks of the
        corpus in its tokenizer. Cheap checks of user input come first: the default teacher trains for minutes."""
        cfg = self.cfg
        if cfg.teacher:
            self.teacher_dir = Path(cfg.teacher)
            with for_flag("--teacher"):
                self.teacher, tokenizer = load_teacher(self.teacher_dir, device, getattr(torch, cfg.teacher_dtype))
        with for_flag("--data"):
            docs, desc = corpus_documents(cfg.data)
        if not cfg.teacher:
            self.teacher_dir = ensure_default_teacher(self.reporter)
            self.teacher, tokenizer = load_teacher(self.teacher_dir, device, getattr(torch, cfg.teacher_dtype))
        ctx = context_length(self.teacher.config)
        if ctx is not None and cfg.seq_len > ctx:
            raise UserError(f"--seq_len {cfg.seq_len} exceeds the teacher's context length {ctx}; "
                            f"use --seq_len {ctx} or less")
        with for_flag("--seq_len", NotEnoughTokens):
            train, val = token_splits(docs, tokenizer, cfg.seq_len, cfg.val_fraction)
        if len(train) < cfg.batch_size:
            raise UserError(f"the training split has {len(train)} sequences, fewer than --batch_size "
                            f"{cfg.batch_size}; add text or lower --batch_size or --seq_len")
        return tokenizer, train, val, desc

    def _evaluate_teacher(self) -> None:
        """The teacher's validation loss (per data cluster, with clusters), printed."""
        d = self.data
        self.teacher_eval = evaluate_lm(self.teacher, d.val, self.cfg.batch_size, d.device,
                                        d.clusters.val_labels if d.clusters else None,
                                        d.clusters.num_clusters if d.clusters else None)
        self.reporter.line(f"Teacher validation loss {self.teacher_eval['loss']:.4f}, perplexity "
                           f"{self.teacher_eval['ppl']:.2f}")

    def _teacher_cache(self, train: TokenBlocks, device: torch.device) -> TeacherCache:
        """The teacher's top-k targets for `train` (--teacher_topk), read from the cache or built into it."""
        with for_flag("--teacher_topk"):
            return ensure_cache(self.teacher, train, self.cfg.teacher_topk, self.cfg.temperature,
                                cache_dir() / "teacher-logits", self.cfg.batch_size, device, self.reporter)

    def _setup_student(self, tokenizer: PreTrainedTokenizerBase, train: TokenBlocks,
                       device: torch.device) -> tuple[StudentSpec, QATConfig | None]:
        """The student (a fresh one sharing the teacher's vocabulary, or the teacher's own weights) and the
        quantization the flags ask for, checked against its shapes now: PTQ and precision plans quantize only
        after training."""
        cfg = self.cfg
        spec = student_spec(cfg, self.teacher, tokenizer, train, device, self.reporter)
        self.student = spec.build(self.teacher, cfg.seed, device)
        quant = quant_config(cfg)
        if quant:
            with for_flag("--group_size"):
                check_group_size(self.student, quant)
            n_layers = len(quantizable_linears(self.student, quant.include_head))
            if cfg.param_clusters and cfg.param_clusters > n_layers:
                raise UserError(f"--param_clusters {cfg.param_clusters} exceeds the {n_layers} quantized layers; "
                                f"ask for at most {n_layers}")
        return spec, quant

    def _build_trainer(self) -> None:
        cfg, d = self.cfg, self.data
        out = d.layout.baseline if self.name else d.layout.root
        out.mkdir(exist_ok=True)
        metrics = Path(cfg.metrics_out) if cfg.metrics_out else d.layout.metrics
        if self.name:
            metrics = metrics.with_name(f"{metrics.stem}_{self.name}.csv")
        config_dict = d.config_dict if self.teacher is not None else {**d.config_dict, "alpha": 1.0, "teacher_path": None}
        features = None
        if self.teacher is not None and (cfg.hidden_distill or cfg.attn_distill):
            features = FeatureDistill(self.student, self.teacher, d.student.layer_map, cfg.hidden_distill,
                                      cfg.attn_distill)
        objective = objective_for(self.teacher, self.teacher_cache, cfg.alpha, cfg.temperature, cfg.teacher_tail,
                                  cfg.kd_loss, features)
        callbacks = [QuantWarmup(self.student, cfg.quant_warmup)] if cfg.quant_warmup else []
        self.trainer = Trainer(cfg, self.student, d.train, d.val, out, d.device, objective,
                               metrics_path=metrics if cfg.save_metrics else None, name=self.name,
                               config_dict=config_dict, clusters=d.clusters, sampling=cfg.cluster_sampling,
                               reporter=self.reporter, dist=self.dist, callbacks=callbacks, fsdp=cfg.fsdp)
        if cfg.quant_warmup >= self.trainer.total_steps:
            raise UserError(f"--quant_warmup {cfg.quant_warmup} must be below the run's {self.trainer.total_steps} "
                            "steps, so that training ends fully quantized")
        self.trainer.setup(resume=d.resuming)

    def baseline(self) -> DistillRecipe:
        """The same student (initial weights, seed, data order, steps, quantization and precision plan)
        without a teacher: a second recipe sharing this one's data."""
        base = DistillRecipe(self.cfg, self.reporter, dist=self.dist)
        base.name, base.data, base.plan = "baseline", self.data, self.plan
        # the teacher object is only read for its weights (a teacher start); the baseline never runs it
        base.student = self.data.student.build(self.teacher, self.cfg.seed, self.data.device)
        if self.data.quant and self.cfg.qat and not self.cfg.param_clusters:
            base._quantize(self.data.quant)
        base._build_trainer()
        self.reporter.line("Baseline: the same student without a teacher (cross-entropy only), same seed and steps"
                           + (", started from the teacher's weights" if self.cfg.student == "teacher" else ""))
        return base

    # ------------------------------------------------------------------ train
    def train(self, stop_after_epoch: int | None = None) -> bool:
        """Run the remaining epochs; False if stopped early (after `stop_after_epoch`, checkpointed).

        With --param_clusters and --qat, the first --plan_after_epochs epochs train in full precision;
        then the plan is measured (or read back on resume, or taken from the distilled run for the
        baseline) and QAT continues with it.
        """
        cfg, trainer = self.cfg, self.trainer
        if self.data.quant and cfg.qat and cfg.param_clusters:
            switch = cfg.plan_after_epochs
            if trainer.epoch < switch:
                trainer.train(switch if stop_after_epoch is None else min(switch, stop_after_epoch))
                if trainer.epoch < switch:
                    return False
            if self.plan is None and self.data.layout.plan.is_file():
                self.plan = PrecisionPlan.from_json(self.data.layout.plan.read_text())
            if self.plan is None:
                self._measure_plan()
            # The QAT layers share the linears' parameters, so DistributedDataParallel and the optimizer go on
            # holding the same tensors.
            self._quantize(self._with_plan(self.data.quant),
                           None if self.name else f"quantization-aware training from epoch {switch + 1}")
        trainer.train(stop_after_epoch)
        if trainer.epoch < cfg.epochs:
            return False
        self.student = trainer.unshard()  # under --fsdp, whole again on every process: evaluated, saved, exported
        return True

    def _measure_plan(self) -> None:
        """Measure layer sensitivities on calibration batches of the training objective, and (--plan_method
        measured) the student's cross-entropy there under each candidate plan; solve, print, save the plan.
        Under torchrun rank 0 measures (on the whole calibration batches, outside DistributedDataParallel) and
        every rank takes its plan and random state, so all quantize alike and draw the same batches after."""
        self.plan = self.dist.on_main(self._measured_plan)
        self.dist.share_rng_state()

    def _measured_plan(self) -> PrecisionPlan:
        cfg, quant, trainer = self.cfg, self.data.quant, self.trainer
        batches = calibration_batches(len(self.data.train), cfg.batch_size, cfg.calibration_batches, cfg.seed)
        names = quantizable_linears(self.student, quant.include_head)
        # Calibration batches are drawn uniformly, so the plain objective (no sampler importance weights).
        with for_flag("--param_clusters/--avg_bits"):
            plan = plan_for_model(self.student, names, batches, lambda b: trainer.batch_loss(b, weighted=False)[0],
                                  quant.bits, quant.group_size, cfg.param_clusters, cfg.avg_bits, cfg.seed,
                                  cfg.plan_method, eval_fn=trainer.batch_ce)
        self.reporter.line(plan.format())
        atomic_write(self.data.layout.plan, lambda tmp: Path(tmp).write_text(plan.to_json()))
        return plan

    def _with_plan(self, quant: QATConfig) -> QATConfig:
        return replace(quant, layer_bits=self.plan.layer_bits) if self.plan else quant

    def _quantize(self, quant: QATConfig, announce: str | None = None) -> None:
        """Swap the student's linears for QAT layers; print "Replaced N Linear modules" when `announce` is set."""
        with for_flag("--group_size"):
            names = quantize_(self.student, quant)
        if announce:
            self.reporter.line(f"Replaced {len(names)} Linear modules with QATLinear ({quant.describe()}; {announce})")

    # ------------------------------------------------------------------ evaluate
    def evaluate(self) -> dict:
        """Post-training quantization (with its plan) if the run asks for it, then validation loss."""
        cfg, quant = self.cfg, self.data.quant
        if quant and not cfg.qat:
            if cfg.param_clusters and self.plan is None:
                self._measure_plan()
            self._quantize(self._with_plan(quant), None if self.name else "post-training quantization")
        return self.trainer.evaluate()

    # ------------------------------------------------------------------ save
    def save_checkpoint(self) -> dict | None:
        """Save the student in Hugging Face format with its tokenizer; pack and measure it when quantized.

        Returns:
            The quantization report, or None for a full-precision run.
        """
        d = self.data

        def write(tmp: Path) -> None:
            self.student.save_pretrained(tmp, safe_serialization=True)
            d.tokenizer.save_pretrained(tmp)

        try:
            atomic_save(d.layout.student, write)  # a full disk leaves the student of an earlier attempt whole
        except WRITE_ERRORS as e:  # safetensors reports a failed write as SafetensorError
            raise UserError(write_failure(f"cannot write the student '{d.layout.student}'", d.layout.student,
                                          first_line(e), "Nothing in it was replaced; free some space and continue "
                                          "with --resume", e, "Nothing in it was replaced; fix that and continue "
                                          "with --resume")) from None
        if self.cfg.gguf or d.quant:
            claim_output(d.layout.export, "export")  # ours: `hybridopt export` may write into it again
        if self.cfg.gguf:
            with for_flag("--gguf"):
                # a student started from its teacher has the teacher's widths, padded exactly to whole blocks
                self.gguf = export_gguf(self.student, d.layout.export / f"model-{self.cfg.gguf}.gguf", d.tokenizer,
                                        self.cfg.gguf, name=d.layout.root.resolve().name,
                                        pad=self.cfg.student == "teacher")
            self.reporter.line(self.gguf.format())
        if not d.quant:
            return None
        path = export_packed(self.student, d.layout.export, d.tokenizer, getattr(torch, self.cfg.export_dtype), self.plan)
        report = quantization_report(self.student, d.layout.student, d.layout.export, d.val, self.cfg.batch_size,
                                     d.device, "QAT" if self.cfg.qat else "PTQ")
        save_report(report, d.layout.export, then="continue with --resume")
        self.reporter.line(f"Exported the packed student to {path}")
        self.reporter.line(format_report(report))
        return report

    def cleanup(self) -> None:
        """Close the training loop's metrics files."""
        self.trainer.cleanup()

    def summary(self, evaluation: dict) -> dict:
        """The run's entry in results.json: validation, steps, time, history (and the hybrid summary)."""
        t = self.trainer
        row = {**evaluation, "steps": t.global_step, "train_seconds": t.elapsed, "history": t.history}
        if self.name:
            return row
        row.update(parameters=num_parameters(self.student), path=str(self.data.layout.student),
                   skipped_steps=t.skipped_steps)
        if (hybrid := optimizer_summary(t.optimizer)) is not None:
            row["hybrid"] = hybrid
        return row


def run_distill(cfg: DistillConfig, reporter: Reporter | None = None, stop_after_epoch: int | None = None,
                given: frozenset[str] | None = None) -> dict:
    """Distil a teacher into a student; train the no-teacher baseline; save and report.

    Args:
        cfg: the run config (flags).
        reporter: where the run's lines go (default: stdout; `Reporter(quiet=True)` for none).
        stop_after_epoch: stop both runs after this many epochs, checkpointed, as an interruption would.
        given: the flags given on the command line, which `--resume` checks against the run's (default:
            those that differ from the defaults).

    Returns:
        The results dictionary also written to `<out>/results.json` (or `{"interrupted_at_epoch": N}`).

    Launched by torchrun (RANK, WORLD_SIZE and LOCAL_RANK set), every process runs this: they join one
    process group (gloo on CPU, nccl on CUDA) and train with DistributedDataParallel; only rank 0 prints
    and writes.
    """
    dist = DistEnv.from_env()
    if cfg.fsdp and not dist.active:
        raise UserError("--fsdp shards the student over the processes torchrun starts; launch with torchrun "
                        "--nproc_per_node=N -m hybridopt distill --fsdp ... (a single process holds the whole "
                        "student anyway)")
    if dist.active:
        with for_flag("--device"):
            dist.init(dist.device(resolve_device(cfg.device)))
        if not dist.is_main:
            reporter = Reporter(silent=True)
    try:
        return _run_distill(cfg, reporter, stop_after_epoch, given, dist)
    finally:
        dist.teardown()


def _run_distill(cfg: DistillConfig, reporter: Reporter | None, stop_after_epoch: int | None,
                 given: frozenset[str] | None, dist: DistEnv) -> dict:
    recipe = DistillRecipe(cfg, reporter, given, dist)
    try:
        return _distill(recipe, stop_after_epoch, dist)
    except KeyboardInterrupt as e:  # for the message: the folder --resume continues, if the run has one yet
        if recipe.out is not None and RunLayout(recipe.out).config.exists():
            e.run_folder = recipe.out
        raise
    finally:
        recipe.release()


def _distill(recipe: DistillRecipe, stop_after_epoch: int | None, dist: DistEnv) -> dict:
    recipe.setup()
    cfg, d = recipe.cfg, recipe.data
    finished = recipe.train(stop_after_epoch)
    recipe.cleanup()
    if not finished:
        return {"interrupted_at_epoch": recipe.trainer.epoch}
    student_eval = recipe.evaluate()
    if (hybrid := optimizer_summary(recipe.trainer.optimizer)) is not None:
        recipe.reporter.line(format_summary(hybrid, final_loss=recipe.trainer.history[-1]["loss"]))
    quant_report = recipe.save_checkpoint() if dist.is_main else None  # every rank holds the same student
    results = {
        "teacher": {**recipe.teacher_eval, "path": str(recipe.teacher_dir), "parameters": num_parameters(recipe.teacher)},
        "student": recipe.summary(student_eval),
        "config": d.config_dict,
    }
    if quant_report:
        results["quantization"] = quant_report
    if recipe.gguf:
        g = recipe.gguf
        results["gguf"] = {"path": g.path, "type": g.gguf_type, "file_bytes": g.file_bytes,
                           "bits_per_weight": g.bits_per_weight, "linear_bits_per_weight": g.linear_bits_per_weight,
                           "layer_types": g.layer_types, "widened": g.widened}
    if recipe.plan:
        results["precision_plan"] = asdict(recipe.plan)
    if d.clusters is not None:
        results["data_clusters"] = {"k": d.clusters.num_clusters, "sizes": d.clusters.sizes.tolist(),
                                    "seconds": d.clusters.seconds, "sampling": cfg.cluster_sampling,
                                    "teacher_val_loss_clusters": recipe.teacher_eval["cluster_loss"]}
    if cfg.baseline:
        base = recipe.baseline()
        finished = base.train(stop_after_epoch)
        base.cleanup()
        if not finished:
            return {"interrupted_at_epoch": base.trainer.epoch}
        results["baseline"] = base.summary(base.evaluate())

    recipe.reporter.line(format_results(results))
    if dist.is_main:
        try:
            atomic_write(d.layout.results, lambda tmp: Path(tmp).write_text(json_text(results)))
        except WRITE_ERRORS as e:
            raise UserError(write_failure(
                f"cannot write the results '{d.layout.results}'", d.layout.results, first_line(e),
                "The student and its export are saved; free some space and continue with --resume, which writes "
                "them again", e, "The student and its export are saved; fix that and continue with --resume, "
                "which writes them again")) from None
    recipe.reporter.line(f"Student saved to {d.layout.student}; results in {d.layout.results}")
    return results


def format_results(results: dict) -> str:
    """The validation table: teacher, distilled student and no-teacher student."""
    from_teacher = results["config"].get("student") == "teacher"
    rows = [("teacher", results["teacher"]), ("student (distilled)", results["student"])]
    if "baseline" in results:
        rows.append(("student (CE only)" if from_teacher else "student (no teacher)", results["baseline"]))
    tokens = results["student"]["tokens"]
    lines = [f"\nValidation on {tokens:,} held-out tokens:", f"  {'model':<22}{'loss':>10}{'perplexity':>12}"]
    lines += [f"  {name:<22}{r['loss']:>10.4f}{r['ppl']:>12.2f}" for name, r in rows]
    if "baseline" in results:
        gain = results["baseline"]["loss"] - results["student"]["loss"]
        against = ("the same teacher-started student trained on cross-entropy alone" if from_teacher
                   else "the no-teacher student")
        lines.append(f"  distillation {'lowers' if gain > 0 else 'raises'} validation loss by {abs(gain):.4f} "
                     f"nats/token against {against}")
    return "\n".join(lines)


def run_teacher_cache(cfg: DistillConfig, reporter: Reporter | None = None) -> Path:
    """`hybridopt teacher-cache`: build (or check) the teacher-logit cache a `distill` run with the same
    flags will read, without training. Returns the cache file."""
    cfg = replace(cfg, teacher_topk=cfg.teacher_topk or DEFAULT_TOPK)
    recipe = DistillRecipe(cfg, reporter)
    with for_flag("--device"):
        device = resolve_device(cfg.device)
    _, train, _, _ = recipe._setup_teacher_and_data(device)
    return recipe._teacher_cache(train, device).path
