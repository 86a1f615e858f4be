"""Typed configurations. The CLI is generated from these dataclasses (see `cli.py`), one help group per component.

Components, each validating its own values in `__post_init__` (a `UserError` naming the flag): `OptimizerConfig`
(its ranges by the optimizer's own rules, `optim.arguments`), `LoopConfig`, `StudentConfig`, `QuantConfig`,
`DataConfig` and `ExportOptions`; `TrainConfig` is the loop and the optimizer, what the Trainer takes. The
commands' run configs compose them (`DistillConfig`, `TeacherConfig`) and check only what spans components; the
others (`GenerateConfig`, `ExportConfig`, `BenchConfig`, `InspectConfig`) are one class each. Library code takes
a component (the Trainer a `TrainConfig`, `build_optimizer` an `OptimizerConfig`) or plain arguments. The
resolved config is saved with every checkpoint and result. No torch here: `hybridopt --help` stays fast.
"""

from __future__ import annotations

import json
import math
import os
import types
import typing
from pathlib import Path
import dataclasses
from dataclasses import dataclass, field

from hybridopt.errors import UserError
from hybridopt.optim.arguments import checked_arguments
from hybridopt.quant.bits import TERNARY, canonical_bits

# K of --teacher_topk given alone: the best K measured (docs/RESULTS.md, "Offline distillation"); no K up to
# 128 came within seed noise of the live teacher on the default run, so the live teacher stays the default.
DEFAULT_TOPK = 128
# GGUF types for the linear layers (hybridopt.export.gguf.GGUF_TYPES; config imports no torch), and the block whose
# multiple every row length and scale group must be for each narrow one.
GGUF_TYPES = ["auto", "q1_0", "tq1_0", "tq2_0", "q8_0", "f16"]
GGUF_BLOCKS = {"q1_0": 128, "tq1_0": 256, "tq2_0": 256}


def _arg(default, help: str, **meta):
    """A dataclass field with CLI metadata (`help`, and optionally `flag`, `choices`, `nargs`)."""
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"help": help, **meta})
    return field(default=default, metadata={"help": help, **meta})


def _fits(value, hint) -> bool:
    """Whether a JSON value has the type a config field is annotated with (an int is a float, a bool is neither)."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_fits(value, arg) for arg in typing.get_args(hint))
    if origin is list:
        return isinstance(value, list) and all(_fits(v, typing.get_args(hint)[0]) for v in value)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, hint)


def _positive(name: str, value: float | int | None) -> None:
    if value is not None and value <= 0:
        raise UserError(f"--{name} must be positive, got {value}")


def _finite(cfg, cls) -> None:
    """The float flags `cls` declares are finite: inf or nan would only train a NaN student (or fail later)."""
    for name in vars(cls).get("__annotations__", {}):
        value = getattr(cfg, name)
        if isinstance(value, float) and not math.isfinite(value):
            raise UserError(f"--{name} must be a finite number, got {value}")


def _check_seed(seed: int) -> None:
    if not 0 <= seed < 2**32:  # NumPy's range; torch, faiss and the samplers derive their seeds from it
        raise UserError(f"--seed must lie in [0, 2**32), got {seed}")


def _canonical_bits(bits: float) -> float:
    """`--bits` as the quantizers name it (1.585 -> 1.58), or a user error."""
    try:
        return canonical_bits(bits)
    except ValueError as e:
        raise UserError(f"--bits: {e}") from None


@dataclass
class StudentConfig:
    """Student: a fresh Llama-style student of the size given here, or the teacher itself (--student teacher).

    A fresh student's defaults are multiples of 256 (llama.cpp's ternary types need it)."""

    student: str = _arg("llama", "llama: a freshly initialised Llama of the size below; teacher: the teacher's own architecture and weights (a Llama-family teacher), quantized by --qat/--ternary/--bits and distilled from the full-precision original", choices=["llama", "teacher"])
    student_hidden: int = _arg(256, "student hidden size (a multiple of 256 keeps llama.cpp's ternary types usable)")
    student_layers: int | None = _arg(None, "number of student transformer blocks (default: 2; with --student teacher, keep this many of the teacher's layers, chosen by --layer_choice; default all)")
    student_intermediate: int = _arg(512, "student MLP size (a multiple of 256 keeps llama.cpp's ternary types usable)")
    student_heads: int = _arg(4, "student attention heads; must divide --student_hidden")
    student_kv_heads: int | None = _arg(None, "student key/value heads for GQA (default: --student_heads)")
    tie_embeddings: bool = _arg(False, "tie the student's input embedding and LM head")
    layer_choice: str = _arg("even", "with --student teacher and --student_layers: which teacher layers to keep: even (evenly spaced, first and last kept) or measured (ShortGPT's block influence on calibration batches: the layers that change the hidden state most)", choices=["even", "measured"])

    # a fresh student's shape: with --student teacher the teacher's shape is used, so these must stay unset
    _SHAPE = ("student_hidden", "student_intermediate", "student_heads", "student_kv_heads", "tie_embeddings")

    def __post_init__(self):
        _finite(self, StudentConfig)
        for name in ("student_hidden", "student_layers", "student_intermediate", "student_heads", "student_kv_heads"):
            _positive(name, getattr(self, name))
        if self.student == "teacher":
            for name in self._SHAPE:
                if getattr(self, name) != getattr(StudentConfig, name):
                    raise UserError(f"--{name} sizes a fresh student; with --student teacher the student has the "
                                    "teacher's shape (only --student_layers applies): drop it")
            return
        if self.layer_choice != "even":
            raise UserError("--layer_choice picks the teacher layers a student keeps: it needs --student teacher")
        if self.student_layers is None:
            self.student_layers = 2
        if self.student_hidden % self.student_heads:
            raise UserError(
                f"--student_heads {self.student_heads} must divide --student_hidden {self.student_hidden}"
            )
        kv = self.student_kv_heads or self.student_heads
        if self.student_heads % kv:
            raise UserError(f"--student_kv_heads {kv} must divide --student_heads {self.student_heads}")


# The optimizer's names for the flags whose names differ (its messages start with the argument's name).
_OPTIMIZER_FLAGS = {"use_controller": "controller"}


@dataclass
class OptimizerConfig:
    """Optimizer: AdamW's rate and schedule, or the hybrid optimizer (--hybrid) and its parts."""

    lr: float = _arg(2e-3, "peak learning rate (AdamW), reached after warmup, then cosine decay")
    min_lr_ratio: float = _arg(0.1, "final learning rate as a fraction of --lr")
    warmup_steps: int | None = _arg(None, "linear warmup steps (default: 5%% of all steps)")
    weight_decay: float = _arg(0.01, "decoupled weight decay (AdamW) on matrices; norms and embeddings are exempt")
    grad_clip: float = _arg(1.0, "clip the global gradient norm to this value; 0 disables")
    hybrid: bool = _arg(False, "use the hybrid optimizer: a learned learning-rate scale, a meta-learned controller and a trust region over --hybrid_base's step")
    hybrid_base: str = _arg("muon", "with --hybrid: the step under the learned scale and trust region: muon (Muon on the hidden matrices, AdamW on the rest), schedulefree (Schedule-Free AdamW, warmup then constant) or adam (AdamW)", choices=["muon", "schedulefree", "adam"])
    trust_radius: float = _arg(0.1, "with --hybrid: initial trust radius, relative to the parameter norm")
    trust_region: bool = _arg(True, "with --hybrid: bound each update's norm by the trust radius; --no-trust_region turns it off")
    adapt_radius: bool = _arg(False, "with --hybrid: also adapt the radius from the actual against the predicted loss decrease (the design document's rule)")
    learn_scale: bool = _arg(True, "with --hybrid: learn the learning rate's scale by normalised hypergradient descent, so --lr is only its starting point")
    scale_lr: float = _arg(0.1, "with --hybrid: how far the learned log scale may move per step")
    scale_threshold: float = _arg(0.5, "with --hybrid: the learned scale moves only when its normalised hypergradient exceeds this in size (0: on every step)")
    min_scale: float | None = _arg(None, "with --hybrid: the learned scale's lower bound, in [1e-4, 1] (default: 1 over schedulefree, 1e-4 over adam and muon)")
    radius_start: float | None = _arg(None, "with --hybrid: at the first step after warmup, raise the learned scale until the step is at least this fraction of the trust radius, in [0, 1] (default: 0.25 over schedulefree and muon, 0 over adam; 0 turns it off)")
    controller: bool | None = _arg(None, "with --hybrid: apply the meta-learned controller's learning-rate and radius multipliers (default: on over adam and muon, off over schedulefree)")
    controller_lr: float = _arg(0.001, "with --hybrid: learning rate of the controller network (the design document's 1e-3)")

    def __post_init__(self):
        _finite(self, OptimizerConfig)
        _positive("trust_radius", self.trust_radius)
        if self.warmup_steps is not None and self.warmup_steps < 0:
            raise UserError(f"--warmup_steps must be non-negative, got {self.warmup_steps}")
        if not self.grad_clip >= 0:  # NaN too
            raise UserError(f"--grad_clip must be non-negative (0 disables), got {self.grad_clip}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise UserError(f"--min_lr_ratio must lie in [0, 1], got {self.min_lr_ratio}")
        try:  # the rest by the optimizer's own rules (one check per value), its argument names made flags
            checked_arguments(
                lr=self.lr, betas=(0.9, 0.95), eps=1e-8, weight_decay=self.weight_decay, base=self.hybrid_base,
                scale_lr=self.scale_lr, scale_betas=(0.9, 0.999), scale_threshold=self.scale_threshold,
                use_controller=self.controller, adapt_radius=self.adapt_radius and self.hybrid,
                controller_lr=self.controller_lr, controller_hidden=1, num_clusters=0, min_scale=self.min_scale,
                radius_start=self.radius_start,
                muon_momentum=0.95)
        except ValueError as e:
            name, _, rest = str(e).replace("base='schedulefree'", "--hybrid_base schedulefree").partition(" ")
            raise UserError(f"--{_OPTIMIZER_FLAGS.get(name, name)} {rest}") from None


@dataclass
class LoopConfig:
    """Training loop: shared by distillation, the no-teacher baseline and teacher training."""

    epochs: int = _arg(20, "number of epochs; an epoch is --max_steps_per_epoch optimizer steps (or a full pass)")
    max_steps_per_epoch: int = _arg(
        12, "cap on optimizer steps per epoch, each epoch a fresh shuffle (as torchtune); 0 = full pass over the data"
    )
    batch_size: int = _arg(16, "sequences per optimizer step")
    seq_len: int = _arg(128, "tokens per training sequence; must not exceed the teacher's context length")
    eval_every: int = _arg(5, "evaluate on the validation split every N epochs (and after the last)")
    seed: int = _arg(0, "random seed for initialisation, shuffling and everything else")
    device: str = _arg("auto", "cpu, cuda, cuda:N or auto", choices=None)
    autocast: str = _arg("auto", "dtype of the trained model's forward and backward under torch.autocast (auto: bfloat16 on a CUDA device that supports it, off on CPU)", choices=["auto", "bfloat16", "off"])
    compile: bool = _arg(False, "torch.compile the trained model's forward")

    def __post_init__(self):
        _finite(self, LoopConfig)
        for name in ("epochs", "batch_size", "seq_len", "eval_every"):
            _positive(name, getattr(self, name))
        if self.max_steps_per_epoch < 0:
            raise UserError(f"--max_steps_per_epoch must be 0 (full pass) or positive, got {self.max_steps_per_epoch}")
        _check_seed(self.seed)


@dataclass
class TrainConfig(OptimizerConfig, LoopConfig):
    """What the Trainer takes: the loop and the optimizer."""

    def __post_init__(self):
        LoopConfig.__post_init__(self)
        OptimizerConfig.__post_init__(self)


@dataclass
class QuantConfig:
    """Quantization: QAT or post-training quantization, and mixed precision by sensitivity clusters.

    The seed's --qat / --ternary and --param_clusters: QAT trains through the quantizer, PTQ quantizes after
    training."""

    qat: bool = _arg(False, "quantization-aware training: 1-bit weights alone, ternary with --ternary, any width with --bits")
    ternary: bool = _arg(False, "1.58-bit ternary weights; without --qat, quantize after training (post-training quantization)")
    bits: float | None = _arg(None, "weight bits of the quantized linears: 1, 1.58, 2, 4 or 8 (default: 1 with --qat, 1.58 with --ternary); alone it means post-training quantization")
    group_size: int | None = _arg(None, "inputs per weight scale (default: one scale per output channel)")
    act_bits: int | None = _arg(None, "also quantize layer inputs to 8 bits per token (BitNet); only 8 is supported", choices=[8])
    quantize_head: bool = _arg(False, "also quantize the LM head (embeddings always stay in higher precision)")
    param_clusters: int | None = _arg(None, "mixed precision: group the quantized layers into K sensitivity clusters (Fisher-weighted quantization error) and give each a width under --avg_bits; alone: 4", nargs="?", const=4)
    avg_bits: float | None = _arg(None, "with --param_clusters: average stored code bits per weight allowed (packed ternary costs 1.6; the float16 scales come on top and are reported); default the base width, e.g. 1.58 = all ternary")
    plan_method: str = _arg("measured", "with --param_clusters: measured (the plan within budget with the lowest calibration loss), sensitivity (the lowest Fisher-weighted error) or random (a control)", choices=["measured", "sensitivity", "random"])
    plan_after_epochs: int = _arg(1, "with --param_clusters and --qat: full-precision epochs before the plan is measured and QAT starts")
    calibration_batches: int = _arg(8, "with --param_clusters: training batches the Fisher information and the in-context loss are measured on (and --layer_choice measured its block influence)")
    quant_warmup: int = _arg(0, "with --qat: blend the latent and quantized weights, W + l * (Q(W) - W), l rising linearly to 1 over this many first steps (0: quantized from the first step)")

    @property
    def weight_bits(self) -> float | None:
        """The quantized width this run asks for, or None for a full-precision run."""
        if self.bits is not None:
            return self.bits
        if self.ternary:
            return TERNARY
        return 1.0 if self.qat else None

    def __post_init__(self):
        _finite(self, QuantConfig)
        if self.bits is not None:
            self.bits = _canonical_bits(self.bits)
            if self.ternary and self.bits != TERNARY:
                raise UserError(f"--ternary conflicts with --bits {self.bits:g}; pass one of them")
        if self.weight_bits is None and (self.group_size or self.act_bits or self.quantize_head):
            raise UserError("--group_size, --act_bits and --quantize_head need --qat, --ternary or --bits")
        _positive("group_size", self.group_size)
        if self.quant_warmup < 0:
            raise UserError(f"--quant_warmup must be non-negative, got {self.quant_warmup}")
        if self.quant_warmup and not self.qat:
            raise UserError("--quant_warmup blends weights during quantization-aware training: it needs --qat")
        if self.quant_warmup and self.param_clusters is not None:
            raise UserError("--quant_warmup with --param_clusters is not supported (the plan switches QAT on after "
                            "--plan_after_epochs); drop one of them")
        if self.param_clusters is None:
            if self.avg_bits is not None or self.plan_method != "measured":
                raise UserError("--avg_bits and --plan_method need --param_clusters")
            return
        _positive("param_clusters", self.param_clusters)
        _positive("calibration_batches", self.calibration_batches)
        if self.weight_bits is None:
            raise UserError("--param_clusters needs a quantized run: add --ternary (with --qat for QAT) or --bits")
        if self.avg_bits is not None and self.avg_bits < self.weight_bits - 1e-9:
            raise UserError(f"--avg_bits {self.avg_bits:g} is below the run's base width {self.weight_bits:g}")


@dataclass
class DataConfig:
    """Data: the training text, its validation split and data clusters (the seed's --data_clusters)."""

    data: list[str] = _arg([], "local .txt, .jsonl (field 'text') or .parquet (column 'text') files or folders (default: the embedded Python-docs corpus)", nargs="+")
    val_fraction: float = _arg(0.05, "fraction of documents held out for validation")
    data_clusters: int | None = _arg(None, "cluster the training sequences into K groups (faiss k-means on teacher features) and sample batches by cluster; alone: 8", nargs="?", const=8)
    cluster_sampling: str = _arg("proportional", "with --data_clusters: proportional (clusters in proportion to size, unbiased), balanced (equal per cluster, importance-weighted), single (one cluster per batch) or iid (ignore clusters)", choices=["proportional", "balanced", "single", "iid"])

    def __post_init__(self):
        _finite(self, DataConfig)
        if not 0.0 < self.val_fraction < 1.0:
            raise UserError(f"--val_fraction must lie strictly between 0 and 1, got {self.val_fraction}")
        if self.data_clusters is not None and self.data_clusters < 2:
            raise UserError(f"--data_clusters must be at least 2, got {self.data_clusters}")
        if self.data_clusters is None and self.cluster_sampling != "proportional":
            raise UserError("--cluster_sampling needs --data_clusters")


@dataclass
class ExportOptions:
    """Export: the packed file's unpacked dtype and a GGUF file for llama.cpp."""

    export_dtype: str = _arg("float16", "dtype of the tensors the export does not pack (embeddings, norms, head)", choices=["float16", "float32"])
    gguf: str | None = _arg(None, "also write the student as a GGUF file for llama.cpp (<run>/export/model-TYPE.gguf) with its linear layers at this type (auto: the narrowest exact type of each)", choices=GGUF_TYPES)


@dataclass
class DistillConfig(TrainConfig, StudentConfig, QuantConfig, DataConfig, ExportOptions):
    """`hybridopt distill`: distil a teacher causal LM into a small Llama-style student."""

    teacher: str | None = _arg(None, "local Hugging Face causal-LM directory with its tokenizer, or a .gguf file (or a folder holding one), dequantized (default: the cached default teacher, trained on first use)")
    out: str | None = _arg(None, "output directory (default: hybridopt-runs/distill-<timestamp>)")
    resume: str | None = _arg(None, "continue the run in DIR from its last checkpoint with the settings it was started with (other flags must match them; --device may change); alone, the run in --out, else the newest under hybridopt-runs/", nargs="?", const="latest")
    alpha: float = _arg(0.5, "weight of the hard-label cross-entropy; 1 - alpha goes to the distillation KL")
    temperature: float = _arg(2.0, "softmax temperature for the distillation KL (scaled by T^2)")
    teacher_topk: int | None = _arg(None, f"offline distillation: cache the teacher's top-K log-probabilities once (per teacher, data, K and temperature; built on first use, or ahead with `hybridopt teacher-cache`) and train from them instead of running the teacher every step; alone: {DEFAULT_TOPK}", nargs="?", const=DEFAULT_TOPK)
    teacher_dtype: str = _arg("float32", "dtype of the teacher's weights and activations (bfloat16 and float16 halve its memory; losses stay float32)", choices=["float32", "bfloat16", "float16"])
    kd_loss: str = _arg("forward_kl", "the distillation divergence between teacher and student distributions: forward_kl (Hinton), reverse_kl (MiniLLM), skew_kl / skew_rkl (DistiLLM, skew 0.1), jsd (GKD, beta 0.5) or tv (total variation)", choices=["forward_kl", "reverse_kl", "skew_kl", "skew_rkl", "jsd", "tv"])
    hidden_distill: float = _arg(0.0, "with --student teacher: weight of the hidden-state loss, one minus the cosine between each student layer's output and its teacher layer's (0: off)")
    attn_distill: float = _arg(0.0, "with --student teacher: weight of MiniLMv2 attention-relation distillation (query, key and value relations of the last layer, as BitDistill; 0: off)")
    teacher_tail: str = _arg("bucket", "with --teacher_topk: the vocabulary outside the cached top-K as one bucket or as the teacher's remaining mass spread evenly (uniform)", choices=["bucket", "uniform"])
    baseline: bool = _arg(True, "also train the same student without a teacher (CE only, same seed and steps) and report it; --no-baseline skips it", flag="baseline")
    save_metrics: bool = _arg(False, "write per-step and per-epoch metrics (CSV and JSONL)")
    metrics_out: str | None = _arg(None, "per-epoch metrics CSV path (per-step rows go to <stem>_steps.csv, both to <stem>.jsonl); implies --save_metrics")
    fsdp_teacher: bool = _arg(False, "with --fsdp: shard the frozen teacher too, instead of a whole copy on every process; not with --data_clusters or --teacher_topk (rank 0 runs the teacher alone for those), and with --student teacher only with --no-baseline (the baseline starts from the teacher's weights)")
    fsdp: bool = _arg(False, "under torchrun: shard the student with FSDP2 (each decoder layer and the root), each process holding a slice of its weights, gradients and optimizer state, instead of DistributedDataParallel's whole copy; the teacher stays whole on every process; with --hybrid over adam or schedulefree")

    @classmethod
    def from_file(cls, path: Path) -> "DistillConfig":
        """The config saved in a run's run_config.json (keys this version does not know are ignored;
        `resume` is cleared).

        Raises:
            UserError: the file is not a JSON object of valid settings.
        """
        try:
            saved = json.loads(Path(path).read_text())
            if not isinstance(saved, dict):
                raise ValueError("not a JSON object")
            hints = typing.get_type_hints(cls)
            choices = {f.name: f.metadata.get("choices") for f in dataclasses.fields(cls)}
            values = {k: v for k, v in saved.items() if k in hints and k != "resume"}
            for name, value in values.items():
                allowed = choices.get(name)
                if not _fits(value, hints[name]) or (allowed and value is not None
                                                     and not set(value if isinstance(value, list) else [value]) <= set(allowed)):
                    raise ValueError(f"{name} is {value!r}")
            return cls(**values)
        except (ValueError, TypeError, UserError) as e:
            raise UserError(f"the run config '{path}' is unreadable ({e}); it was not written by hybridopt "
                            "or is damaged") from None

    def __post_init__(self):
        _finite(self, DistillConfig)
        for component in (TrainConfig, StudentConfig, QuantConfig, DataConfig):
            component.__post_init__(self)
        # what spans components: a GGUF type's blocks, the plan's epochs, the teacher's settings
        self._check_gguf()
        if self.qat and self.param_clusters is not None and not 0 <= self.plan_after_epochs < self.epochs:
            raise UserError(f"--plan_after_epochs must lie in [0, --epochs), got {self.plan_after_epochs}")
        if self.teacher_topk is not None and self.teacher_topk < 1:
            raise UserError(f"--teacher_topk must be at least 1, got {self.teacher_topk}")
        if self.teacher_topk is None and self.teacher_tail != "bucket":
            raise UserError("--teacher_tail needs --teacher_topk")
        if not 0.0 <= self.alpha <= 1.0:
            raise UserError(f"--alpha must lie in [0, 1], got {self.alpha}")
        _positive("temperature", self.temperature)
        if self.out is not None and not self.out.strip():
            raise UserError("--out is empty; name a folder (or leave --out out for hybridopt-runs/distill-<timestamp>)")
        self._check_teacher_start()
        if self.metrics_out:
            self.save_metrics = True
        if self.fsdp or self.fsdp_teacher:
            self._check_fsdp()

    def _check_fsdp(self) -> None:
        """What --fsdp cannot be combined with: what needs whole weight matrices, or swaps layers mid-run; what
        a sharded teacher cannot do: run on rank 0 alone, or give the baseline its weights."""
        if self.fsdp_teacher:
            if not self.fsdp:
                raise UserError("--fsdp_teacher shards the teacher beside the student: it needs --fsdp")
            for flag, value in (("--data_clusters", self.data_clusters), ("--teacher_topk", self.teacher_topk)):
                if value:
                    raise UserError(f"--fsdp_teacher cannot be combined with {flag}: rank 0 runs the teacher alone "
                                    "for it, and a sharded teacher runs only on every process at once")
            if self.student == "teacher" and self.baseline:
                raise UserError("--fsdp_teacher with --student teacher needs --no-baseline: the baseline starts "
                                "from the teacher's weights, which a sharded teacher no longer holds whole")
        if self.hybrid and self.hybrid_base == "muon":
            raise UserError("--fsdp with --hybrid needs --hybrid_base adam or schedulefree: Muon orthogonalises "
                            "whole weight matrices and under --fsdp each process holds a slice of each")
        if self.param_clusters is not None:
            raise UserError("--fsdp cannot be combined with --param_clusters: the precision plan replaces the "
                            "student's layers after training has started, and sharded layers cannot be replaced")
        if self.compile:
            raise UserError("--fsdp cannot be combined with --compile yet (the compiled forward over sharded "
                            "layers is untested); drop one")

    def _check_teacher_start(self) -> None:
        """The losses only a student started from its teacher can take, and what each needs."""
        for name in ("hidden_distill", "attn_distill"):
            value = getattr(self, name)
            if value < 0:
                raise UserError(f"--{name} must be non-negative, got {value}")
            if value and self.student != "teacher":
                raise UserError(f"--{name} pairs each student layer with the teacher layer it came from: it needs "
                                "--student teacher")
            if value and self.teacher_topk is not None:
                raise UserError(f"--{name} needs the teacher's activations, which --teacher_topk's cache does not "
                                "hold: drop one of them")
        if self.kd_loss != "forward_kl" and self.alpha == 1.0:
            raise UserError(f"--kd_loss {self.kd_loss} needs --alpha below 1 (with --alpha 1 there is no "
                            "distillation term)")

    def _check_gguf(self) -> None:
        """--gguf with a narrow type: a quantized run whose shapes its blocks tile, checked before any training."""
        block = GGUF_BLOCKS.get(self.gguf)
        if block is None:
            return
        if self.weight_bits is None:
            raise UserError(f"--gguf {self.gguf} holds quantized weights only; add --ternary (with --qat) or --bits, "
                            "or use --gguf q8_0 or f16")
        # a student started from its teacher has the teacher's widths: the export pads them to whole blocks
        names = ("group_size",) if self.student == "teacher" else ("student_hidden", "student_intermediate", "group_size")
        for name in names:
            value = getattr(self, name)
            if value is not None and value % block:
                raise UserError(f"--gguf {self.gguf} needs --{name} to be a multiple of {block}, got {value}")


@dataclass
class TeacherConfig(TrainConfig):
    """`hybridopt teacher`: train a small Llama-style teacher from scratch (the default teacher)."""

    data: list[str] = _arg([], "local .txt/.jsonl/.parquet files or folders (default: the embedded Python-docs corpus)", nargs="+")
    out: str | None = _arg(None, "output directory (default: the cache entry used by `hybridopt distill`)")
    vocab_size: int = _arg(4096, "byte-level BPE vocabulary size trained on the corpus")
    hidden: int = _arg(256, "teacher hidden size")
    layers: int = _arg(4, "teacher transformer blocks")
    intermediate: int = _arg(768, "teacher MLP size")
    heads: int = _arg(4, "teacher attention heads")
    context: int = _arg(512, "teacher context length (max positions)")
    val_fraction: float = _arg(0.05, "fraction of documents held out for validation")

    def __post_init__(self):
        _finite(self, TeacherConfig)
        TrainConfig.__post_init__(self)
        for name in ("vocab_size", "hidden", "layers", "intermediate", "heads", "context"):
            _positive(name, getattr(self, name))
        if self.hidden % self.heads:
            raise UserError(f"--heads {self.heads} must divide --hidden {self.hidden}")
        if self.seq_len > self.context:
            raise UserError(f"--seq_len {self.seq_len} exceeds --context {self.context}; lower one or raise the other")
        if self.vocab_size < 300:
            raise UserError(f"--vocab_size must be at least 300 (256 bytes plus merges), got {self.vocab_size}")


def default_teacher_config() -> TeacherConfig:
    """The default teacher: 5.5M parameters, 384 steps of 16 x 128 tokens (~0.8M tokens) with the hybrid optimizer
    (over Muon, as `distill --hybrid`): strong enough that a default student learns from it, trained in minutes."""
    return TeacherConfig(epochs=6, max_steps_per_epoch=64, batch_size=16, seq_len=128, lr=4e-3, eval_every=3,
                         hybrid=True)


@dataclass
class GenerateConfig:
    """`hybridopt generate`: sample text from a student (packed export or Hugging Face folder)."""

    model: str = _arg("", "a run folder, its export/ folder (packed), any Hugging Face causal-LM folder, or a .gguf file (run by llama.cpp when llama-cpp-python is installed)")
    prompt: str = _arg("", "text to continue")
    max_new_tokens: int = _arg(60, "tokens to generate")
    temperature: float = _arg(0.8, "sampling temperature; 0 = greedy (tiny students often repeat one token when greedy)")
    top_k: int = _arg(40, "sample among the k most likely tokens; 0 = all")
    seed: int = _arg(0, "random seed for sampling (the same seed gives the same text)")
    device: str = _arg("cpu", "cpu, cuda, cuda:N or auto")

    def __post_init__(self):
        _finite(self, GenerateConfig)
        if not self.model:
            raise UserError("--model is required: a run folder, an export folder or a Hugging Face model folder")
        _positive("max_new_tokens", self.max_new_tokens)
        if self.temperature < 0:
            raise UserError(f"--temperature must be non-negative, got {self.temperature}")
        if self.top_k < 0:
            raise UserError(f"--top_k must be non-negative, got {self.top_k}")
        _check_seed(self.seed)


@dataclass
class InspectConfig:
    """`hybridopt inspect`: the precision plan, sizes and measured errors of an exported student."""

    path: str = _arg("", "a run folder or its export/ folder")

    def __post_init__(self):
        _finite(self, InspectConfig)
        if not self.path:
            raise UserError("DIR is required: a run folder or its export/ folder")


@dataclass
class ExportConfig:
    """`hybridopt export`: pack a trained student (a run folder or any Llama-style HF folder) to low bits, or write a GGUF."""

    model: str = _arg("", "a distill run folder (its quantization settings are reused), its export/ folder, or a Hugging Face causal-LM folder")
    out: str | None = _arg(None, "output folder (default: <run>/export, or <model>-packed); with --format gguf the .gguf file (default: <run>/export/model-TYPE.gguf, or <model>-TYPE.gguf)")
    format: str = _arg("packed", "packed (hybridopt's safetensors, read by generate and inspect) or gguf (llama.cpp, Ollama, LM Studio)", choices=["packed", "gguf"])
    type: str = _arg("auto", "with --format gguf: the linear layers' type; a layer it cannot hold exactly is widened and reported; auto: the narrowest exact type of each (q1_0 for 1-bit, tq1_0 for ternary); a plain model is ternarized for q1_0/tq1_0/tq2_0, else left in full precision", choices=GGUF_TYPES)
    embed_type: str | None = _arg(None, "with --format gguf: the token embeddings' and an unquantized head's type (default: f16 with --type f16, else q8_0)", choices=["f16", "q8_0", "q4_0"])
    bits: float | None = _arg(None, "weight bits: 1, 1.58, 2, 4 or 8 (default: the run's; 1.58 for a plain model)")
    group_size: int | None = _arg(None, "inputs per weight scale (default: the run's, else one per output channel)")
    act_bits: int | None = _arg(None, "quantize layer inputs to 8 bits per token", choices=[8])
    quantize_head: bool = _arg(False, "also quantize the LM head")
    export_dtype: str = _arg("float16", "dtype of the unpacked tensors", choices=["float16", "float32"])

    def __post_init__(self):
        _finite(self, ExportConfig)
        if not self.model:
            raise UserError("--model is required: a run folder or a Hugging Face model folder")
        if self.bits is not None:
            self.bits = _canonical_bits(self.bits)
        _positive("group_size", self.group_size)
        if self.format != "gguf" and (self.type != "auto" or self.embed_type):
            raise UserError("--type and --embed_type need --format gguf")


BENCH_TASKS = ["distill", "distill_ternary", "mlp"]
BENCH_ARMS = ["sgd", "sgd_cosine", "sgd_cosine_clusters", "hybrid_sgd", "adamw_cosine", "schedulefree_adamw",
              "prodigy", "muon", "hybrid_adam", "hybrid_muon", "hybrid_sf", "hybrid_frozen", "hybrid_random", "hybrid_no_trust",
              "wrap_adamw", "wrap_sf", "wrap_muon"]
# Presets: steps, batch, seq_len, eval_every, curve blocks, grid points, seeds (docs/GUIDE.md, "hybridopt bench").
BENCH_PRESETS = {
    "quick": dict(steps=6, batch_size=4, seq_len=32, eval_every=3, curve_blocks=8, grid_points=2, seeds=2,
                  mlp_steps=60),
    "default": dict(steps=60, batch_size=8, seq_len=64, eval_every=10, curve_blocks=48, grid_points=5, seeds=3,
                    mlp_steps=600),
    "full": dict(steps=1000, batch_size=16, seq_len=128, eval_every=25, curve_blocks=128, grid_points=7, seeds=5,
                 mlp_steps=3000),
}


@dataclass
class BenchConfig:
    """`hybridopt bench`: every optimizer arm on the same tasks, learning-rate grid and seeds."""

    task: list[str] = _arg(list(BENCH_TASKS), "tasks to run", nargs="+", choices=BENCH_TASKS)
    arms: list[str] | None = _arg(None, "arms to run (hybrid_random needs hybrid_muon; default: all)", nargs="+", choices=BENCH_ARMS)
    quick: bool = _arg(False, "smoke preset: a few steps, 2 grid points, 2 seeds (minutes on 2 CPU cores)")
    full: bool = _arg(False, "large preset for a GPU: 1000 steps of 16 x 128 tokens, 7 grid points, 5 seeds")
    steps: int | None = _arg(None, "optimizer steps per LM run (default: the preset's)")
    mlp_steps: int | None = _arg(None, "optimizer steps per mlp run (default: the preset's)")
    batch_size: int | None = _arg(None, "sequences (or mlp points / 8) per step (default: the preset's)")
    seq_len: int | None = _arg(None, "tokens per sequence (default: the preset's)")
    grid_points: int | None = _arg(None, "learning rates per arm, log-spaced over [--lr_min, --lr_max] (default: the preset's)")
    lr_min: float = _arg(1e-4, "lowest Adam-type learning rate of the grid (SGD's is x100, Prodigy's d_coef grid is centred on 1)")
    lr_max: float = _arg(1e-1, "highest Adam-type learning rate of the grid")
    seeds: int | None = _arg(None, "seeds per grid point (default: the preset's)")
    teacher: str | None = _arg(None, "teacher for the distill tasks (default: the cached default teacher)")
    data: list[str] = _arg([], "text for the distill tasks (default: the embedded Python-docs corpus)", nargs="+")
    out: str | None = _arg(None, "output folder (default: hybridopt-runs/bench-<timestamp>)")
    resume: bool = _arg(False, "continue the bench in --out: runs already in its results.json are kept, the rest run")
    device: str = _arg("auto", "cpu, cuda, cuda:N or auto")
    no_cost: bool = _arg(False, "skip the cost measurements (step-time ratios, pipeline overhead)")
    workers: int | None = _arg(None, "runs at a time, each in its own process with one intra-op thread; 1 runs them one after another in this process (default: the CPU count, at most 4)")

    def __post_init__(self):
        _finite(self, BenchConfig)
        if self.workers is None:
            self.workers = min(os.cpu_count() or 1, 4)
        if self.workers < 1:
            raise UserError(f"--workers must be at least 1, got {self.workers}")
        if self.resume and not self.out:
            raise UserError("--resume continues the bench in --out DIR; pass --out")
        if self.quick and self.full:
            raise UserError("--quick and --full are two presets; pass one of them")
        preset = BENCH_PRESETS[self.preset]
        for name in ("steps", "mlp_steps", "batch_size", "seq_len", "grid_points", "seeds"):
            _positive(name, getattr(self, name))
            if getattr(self, name) is None:
                setattr(self, name, preset[name])
        self.eval_every, self.curve_blocks = preset["eval_every"], preset["curve_blocks"]
        if self.grid_points < 2:
            raise UserError(f"--grid_points must be at least 2, got {self.grid_points}")
        if not 0 < self.lr_min < self.lr_max:
            raise UserError(f"--lr_min must be positive and below --lr_max, got {self.lr_min} and {self.lr_max}")
        if self.arms is None:
            return
        if "hybrid_random" in self.arms and "hybrid_muon" not in self.arms:
            raise UserError("--arms hybrid_random replays hybrid_muon's multipliers; add hybrid_muon")
        self.task = list(dict.fromkeys(self.task))
        self.arms = list(dict.fromkeys(self.arms))

    @property
    def preset(self) -> str:
        return "quick" if self.quick else "full" if self.full else "default"
