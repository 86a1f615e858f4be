"""The tasks of `hybridopt bench` and the loop that runs one arm on one of them.

Tasks:

    distill          the default teacher (or --teacher) into the default student on the embedded corpus
                     (or --data), full precision, the KD loss of `hybridopt distill` (alpha 0.5, T 2)
    distill_ternary  the same student in ternary (1.58-bit) quantization-aware training
    mlp              a non-LM control: a 2-hidden-layer MLP with LayerNorm classifying 32-d points labelled
                     by a fixed random network (10 classes, 10% label noise), made here from a fixed seed

Every arm at a given seed sees the same initial weights and the same batches (clustered arms excepted:
they sample by cluster), so differences between arms are not differences of luck. The teacher runs
once per training block for the whole bench: its logits, shifted so that each row's maximum is 0, are
kept in float16 (an absolute error below 0.016 on every logit, below 0.004 on those within 8 of the
maximum, which carry the probability mass) and reused by every arm and seed.
"""

from __future__ import annotations

import contextlib
import math
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from torch import nn

from hybridopt.bench.arms import Arm, BuildContext, param_groups, set_lr_scale
from hybridopt.bench.stats import median
from hybridopt.quant.bits import TERNARY
from hybridopt.config import DistillConfig
from hybridopt.data.splits import corpus_documents, token_splits
from hybridopt.data.clusters import cluster_data
from hybridopt.data.blocks import TokenBlocks
from hybridopt.errors import UserError, for_flag
from hybridopt.training.evaluation import evaluate_lm
from hybridopt.kmeans import kmeans
from hybridopt.training.losses import kd_loss
from hybridopt.models.modeling import build_model, context_length, load_teacher, student_config, vocab_size
from hybridopt.quant.qat import QATConfig, quantize_
from hybridopt.reporting import Reporter
from hybridopt.data.sampler import ClusterStratifiedBatchSampler, ShuffledBatchSampler
from hybridopt.training.default_teacher import ensure_default_teacher
from hybridopt.optim.schedules import warmup_cosine
from hybridopt.training.objectives import objective_for
from hybridopt.training.step import lr_multiplier, step_optimizer
from hybridopt.training.trainer import Trainer
from hybridopt.utils import cache_dir, seed_everything

TASKS = ("distill", "distill_ternary", "mlp")
NUM_CLUSTERS = 8  # `--data_clusters` alone
DIVERGED = 3.0  # a run whose curve loss exceeds this multiple of its first evaluation is stopped as diverged

# `hybridopt distill`'s defaults: the bench trains with the recipe's clipping, schedule floor and split.
DISTILL_DEFAULTS = DistillConfig()


@dataclass
class Budget:
    """How long each run trains and how it is evaluated."""

    steps: int
    batch_size: int
    seq_len: int = 128
    eval_every: int = 10
    curve_blocks: int = 64  # validation blocks (or points / 16 for mlp) of the loss curve
    final_blocks: int = 256  # validation blocks of the final loss (the first ones; mlp: all its points)

    @property
    def warmup(self) -> int:
        return max(1, self.steps // 20)


class _Batches:
    """The batches of one run: the plain per-epoch shuffle, or cluster-stratified batches."""

    def __init__(self, n: int, batch_size: int, seed: int, labels: np.ndarray | None):
        self.sampler = (ClusterStratifiedBatchSampler(labels, batch_size, seed) if labels is not None
                        else ShuffledBatchSampler(n, batch_size, seed))

    def __call__(self, steps: int) -> Iterator[list[int]]:
        epoch, done = 0, 0
        while done < steps:
            self.sampler.set_epoch(epoch)
            for indices in self.sampler:
                yield indices
                done += 1
                if done == steps:
                    return
            epoch += 1

    def cluster(self, indices: list[int]) -> int | None:
        return self.sampler.batch_cluster(indices) if isinstance(self.sampler, ClusterStratifiedBatchSampler) else None


class DistillTask:
    """Distillation of a teacher into the default student (`ternary`: in ternary QAT)."""

    def __init__(self, name: str, budget: Budget, teacher: str | None, data: list[str], device: torch.device,
                 reporter: Reporter, ternary: bool = False, shared: "DistillTask | None" = None):
        self.name, self.budget, self.device, self.ternary = name, budget, device, ternary
        if shared is not None:  # the ternary task shares the FP task's teacher, data, logits and clusters
            self.teacher, self.tokenizer, self.train, self.val = shared.teacher, shared.tokenizer, shared.train, shared.val
            self.teacher_dir, self._logits, self._labels = shared.teacher_dir, shared._logits, shared._labels
            self.final_val = shared.final_val
            self.val_loss_teacher = shared.val_loss_teacher
            self.description = shared.description
        else:
            self._load(teacher, data, reporter)
        self.cfg = DISTILL_DEFAULTS
        ctx = context_length(self.teacher.config)
        self.student_config = student_config(self.teacher.config, vocab_size(self.teacher), self.cfg, self.tokenizer,
                                             max_positions=ctx or budget.seq_len)
        self.curve_val = _first_blocks(self.val, budget.curve_blocks)
        self.num_clusters = NUM_CLUSTERS

    def _load(self, teacher: str | None, data: list[str], reporter: Reporter) -> None:
        b = self.budget
        with for_flag("--data"):
            docs, desc = corpus_documents(data)
        self.teacher_dir = teacher or ensure_default_teacher(reporter)
        with for_flag("--teacher") if teacher else contextlib.nullcontext():  # as `hybridopt distill` words it
            self.teacher, self.tokenizer = load_teacher(self.teacher_dir, self.device)
        ctx = context_length(self.teacher.config)
        if ctx is not None and b.seq_len > ctx:
            raise UserError(f"--seq_len {b.seq_len} exceeds the teacher's context length {ctx}")
        self.train, self.val = token_splits(docs, self.tokenizer, b.seq_len, DISTILL_DEFAULTS.val_fraction)
        if len(self.train) < b.batch_size:
            raise UserError(f"the training split has {len(self.train)} sequences, fewer than the batch of {b.batch_size}")
        self._logits: dict[int, torch.Tensor] = {}
        self._labels: np.ndarray | None = None
        self.final_val = _first_blocks(self.val, b.final_blocks)
        self.val_loss_teacher = evaluate_lm(self.teacher, self.final_val, b.batch_size, self.device)["loss"]
        self.description = f"{desc}; teacher {self.teacher_dir}"

    def new_model(self, seed: int) -> nn.Module:
        model = build_model(self.student_config, seed).to(self.device)
        if self.ternary:
            quantize_(model, QATConfig(bits=TERNARY))
        return model

    def batches(self, seed: int, clusters: bool) -> _Batches:
        if clusters and self._labels is None:
            c = cluster_data(self.teacher, self.train, self.val, NUM_CLUSTERS, 0, self.budget.batch_size,
                             self.device, cache_dir() / "clusters")
            self._labels = c.labels
        return _Batches(len(self.train), self.budget.batch_size, seed, self._labels if clusters else None)

    @torch.no_grad()
    def teacher_logits(self, indices: list[int]) -> torch.Tensor:
        """The teacher's logits for `indices`, `(B, T, V)` float32, computed once per block."""
        missing = [i for i in dict.fromkeys(indices) if i not in self._logits]
        if missing:
            input_ids, _ = self.train.batch(missing)
            logits = self.teacher(input_ids=input_ids.to(self.device)).logits.float()
            logits = (logits - logits.amax(-1, keepdim=True)).half().cpu()
            self._logits.update(zip(missing, logits))
        return torch.stack([self._logits[i] for i in indices]).to(self.device, torch.float32)

    def loss(self, model: nn.Module, indices: list[int]) -> torch.Tensor:
        input_ids, labels = (t.to(self.device) for t in self.train.batch(indices))
        return kd_loss(model(input_ids=input_ids).logits, labels, self.teacher_logits(indices),
                       self.cfg.alpha, self.cfg.temperature)[0]

    def curve_loss(self, model: nn.Module) -> float:
        return evaluate_lm(model, self.curve_val, self.budget.batch_size, self.device)["loss"]

    def final_loss(self, model: nn.Module) -> float:
        return evaluate_lm(model, self.final_val, self.budget.batch_size, self.device)["loss"]


def _first_blocks(blocks: TokenBlocks, n: int) -> TokenBlocks:
    """The first `n` blocks of a split (all of them when it has fewer)."""
    n = min(n, len(blocks))
    return TokenBlocks(blocks.stream[: n * blocks.seq_len + 1], blocks.seq_len, "validation")


class _MLP(nn.Sequential):
    """The mlp task's network, naming its input and output layers as a transformers model does, so Muon's arms
    give them AdamW's step and orthogonalise only the hidden matrix (`modeling.hidden_matrices`)."""

    def get_input_embeddings(self) -> nn.Module:
        return self[0]

    def get_output_embeddings(self) -> nn.Module:
        return self[-1]


class MLPTask:
    """A small classification problem made here: 10 classes of 32-d points from a mixture of 16 Gaussians,
    labelled by a fixed random 2-layer tanh network, 10% of labels flipped at random; the student is a
    32-256-256-10 GELU MLP with LayerNorm. Loss: cross-entropy (nats), as the LM tasks."""

    dim, classes, hidden, n_train, n_val = 32, 10, 256, 8192, 2048
    threads = 1  # matrices this small gain nothing from intra-op threads, and lose a lot on a busy machine

    def __init__(self, budget: Budget, device: torch.device):
        self.name, self.budget, self.device = "mlp", budget, device
        g = torch.Generator().manual_seed(20261125)
        centres = torch.randn(16, self.dim, generator=g) * 2
        n = self.n_train + self.n_val
        x = centres[torch.randint(16, (n,), generator=g)] + torch.randn(n, self.dim, generator=g)
        w1, w2 = torch.randn(self.dim, 64, generator=g) / math.sqrt(self.dim), torch.randn(64, self.classes, generator=g)
        y = (torch.tanh(x @ w1) @ w2).argmax(1)
        flip = torch.rand(n, generator=g) < 0.1
        y[flip] = torch.randint(self.classes, (int(flip.sum()),), generator=g)
        self.x, self.y = x[: self.n_train].to(device), y[: self.n_train].to(device)
        self.vx, self.vy = x[self.n_train:].to(device), y[self.n_train:].to(device)
        self.num_clusters = NUM_CLUSTERS
        self._labels: np.ndarray | None = None
        self.description = "10-class MLP on 32-d Gaussian-mixture points labelled by a random network (10% noise)"
        self.val_loss_teacher = None

    def new_model(self, seed: int) -> nn.Module:
        torch.manual_seed(seed)
        return _MLP(nn.Linear(self.dim, self.hidden), nn.LayerNorm(self.hidden), nn.GELU(),
                    nn.Linear(self.hidden, self.hidden), nn.LayerNorm(self.hidden), nn.GELU(),
                    nn.Linear(self.hidden, self.classes)).to(self.device)

    def batches(self, seed: int, clusters: bool) -> _Batches:
        if clusters and self._labels is None:
            feats = torch.nn.functional.normalize(self.x, dim=1).cpu().numpy()
            self._labels = kmeans(feats, NUM_CLUSTERS, 0)[1]
        return _Batches(self.n_train, self.budget.batch_size, seed, self._labels if clusters else None)

    def loss(self, model: nn.Module, indices: list[int]) -> torch.Tensor:
        idx = torch.as_tensor(indices, device=self.device)
        return nn.functional.cross_entropy(model(self.x[idx]), self.y[idx])

    @torch.no_grad()
    def _val(self, model: nn.Module, n: int) -> float:
        was = model.training
        model.eval()
        loss = float(nn.functional.cross_entropy(model(self.vx[:n]), self.vy[:n]))
        model.train(was)
        return loss

    def curve_loss(self, model: nn.Module) -> float:
        return self._val(model, self.budget.curve_blocks * 16)

    def final_loss(self, model: nn.Module) -> float:
        return self._val(model, self.n_val)


@dataclass
class RunResult:
    """One arm at one grid value and seed."""

    task: str
    arm: str
    lr: float
    seed: int
    steps: list[int] = field(default_factory=list)  # evaluated steps (0 = before training)
    curve: list[float] = field(default_factory=list)  # curve validation loss at those steps
    train_loss: list[float] = field(default_factory=list)  # every step's training loss
    lr_multiplier: list[float] = field(default_factory=list)  # hybrid arms: the (first optimizer's) multiplier of every step
    final_loss: float = math.inf  # full validation loss after the last step (inf: diverged)
    diverged_at: int | None = None
    seconds: float = 0.0
    optimizer_state_bytes: int = 0


def _state_bytes(optimizers: list[torch.optim.Optimizer]) -> int:
    return sum(t.numel() * t.element_size() for opt in optimizers for st in opt.state.values()
               for t in st.values() if isinstance(t, torch.Tensor))


@contextlib.contextmanager
def _threads(n: int | None):
    """Run with `n` intra-op threads (None: leave torch's setting), restored afterwards."""
    before = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def run_arm(task, arm: Arm, lr: float, seed: int, replay: list[float] | None = None) -> RunResult:
    """Train a fresh model of `task` with `arm` at grid value `lr`; stop early when it diverges.

    The global RNGs are seeded from `seed` first: the hybrid arms' controller draws its initial weights from
    torch's, which would otherwise carry whatever the runs before it in the same process left (a resumed or
    parallel bench gave other hybrid results)."""
    seed_everything(seed)
    with _threads(getattr(task, "threads", None)):
        return _run_arm(task, arm, lr, seed, replay)


def _run_arm(task, arm: Arm, lr: float, seed: int, replay: list[float] | None) -> RunResult:
    b = task.budget
    model = task.new_model(seed)
    model.train()
    batches = task.batches(seed, arm.clusters)
    ctx = BuildContext(b.steps, b.warmup, task.num_clusters, replay, seed)
    optimizers = arm.build(model, lr, ctx)
    base_lrs = [[g["lr"] for g in opt.param_groups] for opt in optimizers]
    final = {"cosine": DISTILL_DEFAULTS.min_lr_ratio, "warmup": 1.0}.get(arm.schedule)
    schedule = warmup_cosine(b.warmup, b.steps, final) if final is not None else None
    params = [p for p in model.parameters() if p.requires_grad]
    res = RunResult(task.name, arm.name, lr, seed)

    def evaluate(step: int) -> float:
        for opt in optimizers:
            getattr(opt, "eval", lambda: None)()  # Schedule-Free evaluates at its averaged point
        loss = task.curve_loss(model)
        for opt in optimizers:
            getattr(opt, "train", lambda: None)()
        res.steps.append(step)
        res.curve.append(loss)
        return loss

    for opt in optimizers:
        getattr(opt, "train", lambda: None)()
    first = evaluate(0)
    start = time.perf_counter()
    for step, indices in enumerate(batches(b.steps)):
        if schedule is not None:
            set_lr_scale(optimizers, base_lrs, schedule(step))
        loss = task.loss(model, indices)
        value = loss.item()
        res.train_loss.append(value)
        if not math.isfinite(value):
            res.diverged_at = step
            break
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, DISTILL_DEFAULTS.grad_clip)
        for k, opt in enumerate(optimizers):
            step_optimizer(opt, value, batches.cluster(indices))
            if k == 0 and (multiplier := lr_multiplier(opt)) is not None:  # wrap_muon's two: Muon's
                res.lr_multiplier.append(multiplier)
            opt.zero_grad(set_to_none=True)
        if (step + 1) % b.eval_every == 0 or step + 1 == b.steps:
            curve = evaluate(step + 1)
            if not math.isfinite(curve) or curve > DIVERGED * first:
                res.diverged_at = step + 1
                break
    res.seconds = time.perf_counter() - start
    res.optimizer_state_bytes = _state_bytes(optimizers)
    if res.diverged_at is None:
        for opt in optimizers:
            getattr(opt, "eval", lambda: None)()
        res.final_loss = task.final_loss(model)
        if not math.isfinite(res.final_loss):
            res.final_loss, res.diverged_at = math.inf, b.steps
    return res


# ---------------------------------------------------------------------------- costs
def measure_costs(task, arms: list[Arm], blocks: int = 3, steps_per_block: int = 5) -> dict:
    """Step-time ratios measured in one process, blocks of each arm alternating so machine noise hits all.

    For every arm: `optimizer.step()` alone and the whole training step (forward, backward, clipping, step)
    against AdamW with foreach, on `task`'s model and batches (LM tasks: cached teacher logits, so the
    teacher's cost is not in either). For an LM task also: `distill`'s Trainer step against a minimal loop
    on the same batches with the live teacher, and a ternary QAT step against a full-precision one.
    """
    b = task.budget
    mid = 1e-3  # an Adam-type rate; each arm takes its own equivalent (SGD x100, Prodigy d_coef 1)
    runners = {}

    def runner(name: str, build):
        model = task.new_model(0)
        model.train()
        ctx = BuildContext(b.steps, b.warmup, task.num_clusters, [1.0] * (b.steps + 100), 0)
        opts = build(model, mid, ctx)
        for opt in opts:
            getattr(opt, "train", lambda: None)()  # Schedule-Free steps only in train mode
        params = [p for p in model.parameters() if p.requires_grad]
        batches = task.batches(0, False)(10_000)
        return model, opts, params, batches, [], []

    reference = ("adamw_foreach", lambda m, lr, ctx: [torch.optim.AdamW(param_groups(m), lr=lr, foreach=True)])
    for name, build in [reference] + [(a.name, lambda m, lr, ctx, a=a: a.build(m, a.grid([lr])[0], ctx)) for a in arms]:
        runners[name] = runner(name, build)
    for block in range(blocks + 1):  # block 0 warms up
        for name, (model, opts, params, batches, total, step_only) in runners.items():
            for _ in range(steps_per_block):
                indices = next(batches)
                _warm_teacher(task, indices)
                t0 = time.perf_counter()
                loss = task.loss(model, indices)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, 1.0)
                t1 = time.perf_counter()
                for opt in opts:
                    step_optimizer(opt, loss.item())
                t2 = time.perf_counter()
                for opt in opts:
                    opt.zero_grad(set_to_none=True)
                if block:
                    total.append(t2 - t0)
                    step_only.append(t2 - t1)
    ref = runners["adamw_foreach"]
    ref_total, ref_step = median(ref[4]), median(ref[5])
    out = {"note": f"Median of {blocks} alternating blocks x {steps_per_block} steps per arm, on task `{task.name}` "
                   f"(lr {mid:g} or its arm's equivalent). Ratios of medians measured in the same process.",
           "arms": {}}
    for name, (model, opts, params, batches, total, step_only) in runners.items():
        if name == "adamw_foreach":
            continue
        out["arms"][name] = {"optimizer_step_ratio": median(step_only) / ref_step,
                             "train_step_ratio": median(total) / ref_total,
                             "state_mb": _state_bytes(opts) / 2**20}
    out["adamw_foreach"] = {"optimizer_step_s": ref_step, "train_step_s": ref_total,
                            "state_mb": _state_bytes(ref[1]) / 2**20}
    if isinstance(task, DistillTask):
        out["pipeline"] = _pipeline_ratio(task, blocks, steps_per_block)
        out["qat"] = _qat_ratio(task, blocks, steps_per_block)
    return out


def _pipeline_ratio(task: "DistillTask", blocks: int, n: int) -> dict:
    """`distill`'s Trainer step against a minimal loop (teacher forward, student forward/backward, AdamW)."""
    b = task.budget
    cfg = replace(DISTILL_DEFAULTS, batch_size=b.batch_size, seq_len=b.seq_len, epochs=1, max_steps_per_epoch=0)
    with tempfile.TemporaryDirectory() as tmp:
        trainer_model = task.new_model(0)
        trainer = Trainer(cfg, trainer_model, task.train, task.val, Path(tmp), task.device,
                          objective_for(task.teacher, alpha=cfg.alpha, temperature=cfg.temperature),
                          reporter=Reporter(quiet=True))
        trainer_params = [p for p in trainer_model.parameters() if p.requires_grad]
        loop_model = task.new_model(0)
        loop_opt = torch.optim.AdamW(loop_model.parameters(), lr=cfg.lr, betas=(0.9, 0.95))
        batches = task.batches(1, False)(10_000)
        times = {"trainer": [], "loop": []}
        for block in range(blocks + 1):
            for _ in range(n):
                indices = next(batches)
                t0 = time.perf_counter()
                trainer.train_step(indices, trainer_params)
                t1 = time.perf_counter()
                input_ids, labels = (t.to(task.device) for t in task.train.batch(indices))
                with torch.no_grad():
                    teacher_logits = task.teacher(input_ids=input_ids).logits
                loss = kd_loss(loop_model(input_ids=input_ids).logits, labels, teacher_logits, cfg.alpha,
                               cfg.temperature)[0]
                loss.backward()
                loop_opt.step()
                loop_opt.zero_grad(set_to_none=True)
                t2 = time.perf_counter()
                if block:
                    times["trainer"].append(t1 - t0)
                    times["loop"].append(t2 - t1)
    tokens = b.batch_size * b.seq_len
    trainer_tps, loop_tps = tokens / median(times["trainer"]), tokens / median(times["loop"])
    return {"trainer_tokens_per_s": trainer_tps, "loop_tokens_per_s": loop_tps,
            "tokens_per_s_ratio": trainer_tps / loop_tps}


def _warm_teacher(task, indices: list[int]) -> None:
    """Compute (and cache) the teacher's logits for a batch before a timed step: otherwise whichever arm meets a
    batch first pays the teacher's forward pass and the others read the cache (every arm then timed ~0.7x AdamW)."""
    if isinstance(task, DistillTask):
        task.teacher_logits(indices)


def _qat_ratio(task: "DistillTask", blocks: int, n: int) -> dict:
    """A ternary QAT training step over a full-precision one (AdamW, cached teacher logits)."""
    models = {"fp": build_model(task.student_config, 0).to(task.device), "qat": build_model(task.student_config, 0).to(task.device)}
    quantize_(models["qat"], QATConfig(bits=TERNARY))
    opts = {k: torch.optim.AdamW(m.parameters(), lr=1e-3) for k, m in models.items()}
    batches = task.batches(2, False)(10_000)
    times = {"fp": [], "qat": []}
    for block in range(blocks + 1):
        for _ in range(n):
            indices = next(batches)
            _warm_teacher(task, indices)
            for k, m in models.items():
                t0 = time.perf_counter()
                task.loss(m, indices).backward()
                opts[k].step()
                opts[k].zero_grad(set_to_none=True)
                if block:
                    times[k].append(time.perf_counter() - t0)
    return {"fp_step_s": median(times["fp"]), "qat_step_s": median(times["qat"]),
            "ratio": median(times["qat"]) / median(times["fp"])}
