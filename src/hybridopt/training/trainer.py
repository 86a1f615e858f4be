"""The training loop: one student (or teacher) trained on token blocks, resumable at every epoch.

`Trainer` runs the steps of a run: the batch sampler, the optimizer (AdamW or the hybrid optimizer, stepped
through `step.step_optimizer`) and its warmup-cosine schedule, the objective it is given (`objectives`:
distillation or plain cross-entropy), non-finite-step skipping, per-epoch evaluation, metrics files and atomic
checkpoints. What is trained and what happens around it (teacher, data, clusters, precision plan, export)
belongs to the recipe.
"""

from __future__ import annotations

import contextlib
import math
import signal
import time
from dataclasses import asdict
from pathlib import Path
from typing import Iterator, Sequence

import torch

from hybridopt.config import TrainConfig
from hybridopt.data.blocks import TokenBlocks
from hybridopt.data.clusters import DataClusters
from hybridopt.data.sampler import ClusterStratifiedBatchSampler, ShuffledBatchSampler
from hybridopt.errors import UserError
from hybridopt.fileio import remove_stale_temporaries
from hybridopt.optim.schedules import warmup_cosine
from hybridopt.optim.trust_region import global_value
from hybridopt.reporting import Reporter
from hybridopt.training.checkpoint import CHECKPOINT_NAME, load_checkpoint, save_checkpoint, set_rng_state
from hybridopt.training.distributed import (DistEnv, gathered, meta_copy, shard_fsdp, sharded_optimizer_state,
                                            unsharded, wrap_ddp)
from hybridopt.training.evaluation import evaluate_lm
from hybridopt.training.losses import kd_loss
from hybridopt.training.metrics import MetricsLogger
from hybridopt.training.objectives import Batch, CrossEntropy, Objective
from hybridopt.training.signals import StopOnSignal, StopRequested
from hybridopt.training.step import build_optimizer, lr_multiplier, optimizer_metrics, step_optimizer
from hybridopt.utils import autocast_dtype


# A run stops (checkpointed) after this many non-finite steps in a row: a few are a bad batch, skipped;
# this many mean the run itself has diverged, and skipping on would only burn the remaining steps.
MAX_NONFINITE_STREAK = 20

class NonFiniteTraining(UserError):
    """Too many non-finite steps in a row: the run stopped at a step boundary, checkpointed."""


class TrainerCallback:
    """Hooks into a training step, all no-ops here: subclass and pass `callbacks=` to the Trainer (the test
    suite's fault injection makes losses and gradients non-finite through them; the quantization warmup sets
    its blend through them)."""

    def on_step_begin(self, step: int) -> None:
        """Before the forward pass of step `step` (counted from 1; a resumed run goes on counting)."""

    def on_loss(self, step: int, loss: torch.Tensor) -> torch.Tensor:
        """The loss of step `step` (counted from 1), before the backward pass; returns the loss to use."""
        return loss

    def on_backward(self, step: int, params: list[torch.Tensor]) -> None:
        """After the backward pass of step `step`, before the gradients are clipped."""


class Trainer:
    """Train `model` on `train_data` to minimise `objective`.

    (Longer than this project's ~300 lines a class: the loop, its exact-resume position and its stop
    handling share one set of counters, which a checkpoint must capture together.)

    Args:
        cfg: loop settings (epochs, lr, batch size, optimizer...).
        model: the model to train, already on `device`.
        train_data: training blocks.
        val_data: validation blocks.
        out_dir: where the checkpoint goes.
        device: where the batches go.
        objective: what a step minimises given the model's logits (`objectives.objective_for`: distillation
            from a live teacher or the teacher-logit cache); default plain cross-entropy.
        metrics_path: per-epoch metrics CSV, or None to write no metrics files.
        name: prefix of printed lines (empty for the main student).
        config_dict: the resolved run config, stored in every checkpoint.
        clusters: data clusters, to sample batches by cluster and report validation loss per cluster;
            None for plain shuffling.
        sampling: `ClusterStratifiedBatchSampler` mode when `clusters` is given.
        reporter: where epoch lines and warnings go.
        callbacks: `TrainerCallback`s called inside every step, after the class attribute's (none, unless a
            test injects faults there).
        max_nonfinite_streak: stop after this many non-finite steps in a row.
        dist: the torchrun process group this process belongs to (default: none, one process). Under
            torchrun every rank draws the same global batch, trains on its own slice of it through
            DistributedDataParallel, and passes the loss averaged over ranks to the optimizer, so every
            rank takes the same step as a single process on the whole batch; rank 0 alone writes metrics
            and checkpoints.
    """

    callbacks: Sequence[TrainerCallback] = ()

    def __init__(self, cfg: TrainConfig, model: torch.nn.Module, train_data: TokenBlocks, val_data: TokenBlocks,
                 out_dir: Path, device: torch.device, objective: Objective | None = None,
                 metrics_path: Path | None = None, name: str = "", config_dict: dict | None = None,
                 clusters: DataClusters | None = None, sampling: str = "proportional",
                 reporter: Reporter | None = None, max_nonfinite_streak: int = MAX_NONFINITE_STREAK,
                 dist: DistEnv | None = None, callbacks: Sequence[TrainerCallback] | None = None,
                 fsdp: bool = False):
        self.cfg = cfg
        self.model = model
        self.objective = objective or CrossEntropy()
        self.callbacks = [*self.callbacks, *(callbacks or ())]  # the class's (fault injection), then this run's
        self.train_data = train_data
        self.val_data = val_data
        self.out_dir = Path(out_dir)
        self.device = device
        self.metrics_path = metrics_path
        self.prefix = f"[{name}] " if name else ""
        self.config_dict = config_dict or asdict(cfg)
        self.clusters, self.sampling = clusters, sampling
        self.reporter = reporter or Reporter()
        self.dist = dist or DistEnv()
        self.dist.check_batch(cfg.batch_size)
        self.autocast = autocast_dtype(cfg.autocast, device)  # None: the student's forward in float32
        if cfg.compile:  # the forward only: the state dict keeps its names, checkpoints and exports are unchanged
            model.forward = torch.compile(model.forward)  # (nn.Module.compile() compiled nothing in torch 2.13)
        self.fsdp = fsdp
        if fsdp:  # sharded in place (the parameters become DTensors); `unshard` gives an ordinary module back
            self._skeleton = meta_copy(model)
            self.train_model = shard_fsdp(model, device)
        else:
            self.train_model = wrap_ddp(model, self.dist)  # what a training step calls: DDP averages the gradients
        # Every rank draws what rank 0 draws from here on (the hybrid controller's initial weights first): the
        # ranks' random histories may differ before (rank 0 alone trains the default teacher, say).
        self.dist.share_rng_state()
        if clusters is not None:
            self.sampler = ClusterStratifiedBatchSampler(clusters.labels, cfg.batch_size, cfg.seed, sampling,
                                                         cfg.max_steps_per_epoch)
        else:
            self.sampler = ShuffledBatchSampler(len(train_data), cfg.batch_size, cfg.seed, cfg.max_steps_per_epoch)
        self.optimizer = build_optimizer(cfg, model, clusters.num_clusters if clusters is not None else 0)
        self.steps_per_epoch = len(self.sampler)
        self.total_steps = cfg.epochs * self.steps_per_epoch
        warmup = cfg.warmup_steps if cfg.warmup_steps is not None else max(1, self.total_steps // 20)
        # Schedule-Free trains at one point and evaluates at its average, which takes the place of the decay:
        # warmup, then a constant rate.
        self.schedule_free = getattr(self.optimizer, "base_name", None) == "schedulefree"
        final = 1.0 if self.schedule_free else cfg.min_lr_ratio
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, warmup_cosine(warmup, self.total_steps, final))
        self.epoch, self.step_in_epoch, self.global_step = 0, 0, 0
        self.epoch_loss_sum, self.epoch_loss_steps, self.skipped_steps = 0.0, 0, 0
        self.nonfinite_streak, self.max_nonfinite_streak = 0, max_nonfinite_streak
        self.history: list[dict] = []
        self.elapsed = 0.0
        self.metrics: MetricsLogger | None = None

    # ------------------------------------------------------------------ setup
    def setup(self, resume: bool = False) -> None:
        """Open the metrics files; on resume, restore model, optimizer, scheduler, sampler, RNG and position
        from the checkpoint (a run stopped before its first checkpoint starts again from step 0, and its
        metrics rows from before are dropped, as are the temporary files of writes a kill cut short)."""
        if resume and self.dist.is_main:
            remove_stale_temporaries(self.out_dir)
        self.dist.barrier()  # every rank reads the checkpoint rank 0 wrote last
        if resume and (self.out_dir / CHECKPOINT_NAME).is_file():
            self._restore(load_checkpoint(self.out_dir))
        if self.metrics_path is not None and self.dist.is_main:
            self.metrics = MetricsLogger(self.metrics_path, resume_step=self.global_step if resume else None)

    def _restore(self, state: dict) -> None:
        model_state, optimizer_state = state["model"], state["optimizer"]
        if self.fsdp:  # the checkpoint holds whole tensors: each process takes its slices (any number of them)
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

            set_model_state_dict(self.model, model_state, options=StateDictOptions(full_state_dict=True))
            params = [p for group in self.optimizer.param_groups for p in group["params"]]
            optimizer_state = sharded_optimizer_state(optimizer_state, params)
        else:
            self.model.load_state_dict(model_state)
        try:
            self.optimizer.load_state_dict(optimizer_state)
        except (KeyError, ValueError, TypeError) as e:  # another optimizer, or its state from an older hybridopt
            raise UserError(f"cannot resume '{self.out_dir}': its optimizer state does not fit this optimizer "
                            f"({type(e).__name__}: {e}); it was written by another version; start a new run") from None
        self.scheduler.load_state_dict(state["scheduler"])
        pos = state["position"]
        self.epoch, self.step_in_epoch, self.global_step = pos["epoch"], pos["step_in_epoch"], pos["global_step"]
        self.epoch_loss_sum, self.epoch_loss_steps = pos["epoch_loss_sum"], pos["epoch_loss_steps"]
        self.skipped_steps, self.elapsed = pos["skipped_steps"], pos["elapsed"]
        self.nonfinite_streak = pos.get("nonfinite_streak", 0)
        self.history = state["history"]
        set_rng_state(state["rng"])
        if "data" not in state:
            self.reporter.warn(f"the checkpoint in '{self.out_dir}' predates data checks; resuming without "
                               "verifying that the data is unchanged")
        elif state["data"] != self._data_digest():
            raise UserError(f"cannot resume '{self.out_dir}': its training or validation tokens differ from "
                            "this run's (other --data, tokenizer or --seq_len); start a new run")
        if "sampler" in state:  # the same batches: same batch size, mode and clusters
            try:
                self.sampler.load_state_dict(state["sampler"])
            except ValueError as e:
                raise UserError(f"cannot resume '{self.out_dir}': {e} (the data clusters changed)") from None

    # ------------------------------------------------------------------ loss
    def _loss_step(self, indices: list[int], input_ids: torch.Tensor, labels: torch.Tensor,
                   weights: torch.Tensor | None = None, model: torch.nn.Module | None = None) -> tuple[torch.Tensor, dict]:
        with torch.autocast(self.device.type, dtype=self.autocast, enabled=self.autocast is not None):
            logits = (model or self.model)(input_ids=input_ids).logits  # (B, T, V)
        logits = logits.float()  # the loss in float32 (a no-op without autocast)
        return self.objective(logits, Batch(indices, input_ids, labels, weights))

    def batch_loss(self, indices: list[int], weighted: bool = True,
                   model: torch.nn.Module | None = None) -> tuple[torch.Tensor, dict]:
        """The training objective on the blocks `indices`: importance-weighted when the sampler asks and
        `weighted` is True (batches the sampler drew); False for batches drawn uniformly elsewhere. `model`:
        what computes the logits (default the trained model; a training step passes its DDP wrapper)."""
        input_ids, labels = (t.to(self.device) for t in self.train_data.batch(indices))
        weights = None
        if weighted and self.sampler.weighted:
            weights = self.sampler.example_weights(indices).to(self.device)
        return self._loss_step(indices, input_ids, labels, weights, model)

    def batch_ce(self, indices: list[int]) -> torch.Tensor:
        """The model's plain cross-entropy on the training blocks `indices` (what validation reports)."""
        input_ids, labels = (t.to(self.device) for t in self.train_data.batch(indices))
        return kd_loss(self.model(input_ids=input_ids).logits, labels)[0]

    # ------------------------------------------------------------------ loop
    def train(self, stop_after_epoch: int | None = None) -> list[dict]:
        """Run the remaining epochs (up to `stop_after_epoch`, checkpointed, as an interruption would);
        return the per-epoch history.

        Raises:
            StopRequested: SIGINT or SIGTERM arrived; a checkpoint was saved after the step it interrupted.
            NonFiniteTraining: `max_nonfinite_streak` steps in a row were non-finite; a checkpoint was
                saved after the last of them (the weights from before them: skipped steps change nothing).
        """
        cfg = self.cfg
        params = [p for p in self.model.parameters() if p.requires_grad]  # QAT swaps keep the same tensors
        bar = self.reporter.progress(self.total_steps, self.global_step, self.prefix + "training")
        try:
            with StopOnSignal() as stop:
                while self.epoch < cfg.epochs:
                    if stop_after_epoch is not None and self.epoch >= stop_after_epoch:
                        break
                    self.model.train()
                    self.sampler.set_epoch(self.epoch, self.step_in_epoch)
                    start = time.perf_counter()
                    for indices in self.sampler:
                        loss, row = self.train_step(indices, params)
                        bar.update(1)
                        bar.set_postfix(loss=f"{loss:.4f}", refresh=False)
                        if self.metrics:
                            self.metrics.log("step", {**row, "elapsed_s": self.elapsed + time.perf_counter() - start,
                                                      **self.hybrid_metrics()})
                        diverged = self.nonfinite_streak >= self.max_nonfinite_streak
                        if self.dist.any(stop.signum is not None) and stop.signum is None:
                            stop.signum = signal.SIGTERM  # another rank was asked to stop: all stop at this step
                        if (diverged or stop.signum is not None) and self.step_in_epoch < self.steps_per_epoch:
                            # Between steps: this step's update and its counters are both done.
                            self.elapsed += time.perf_counter() - start
                            self.save_checkpoint()
                            if diverged:
                                self._raise_diverged()
                            raise StopRequested(stop.signum)
                    self.elapsed += time.perf_counter() - start
                    self._end_epoch()  # checkpoints
                    if self.nonfinite_streak >= self.max_nonfinite_streak:
                        self._raise_diverged()
                    if self.dist.any(stop.signum is not None):  # all ranks stop after this epoch, or none
                        raise StopRequested(stop.signum or signal.SIGTERM)
        finally:
            self.reporter.close_progress()
        if self.epoch >= cfg.epochs:
            self._check_finite_weights()
            if self._averages:
                self.optimizer.eval()  # trained: the model is Schedule-Free's average from here (evaluated, exported)
        return self.history

    def _check_finite_weights(self) -> None:
        """A finished run whose weights hold inf or nan (a rate so high that one step overflowed, in a run too short
        for the non-finite streak to stop it) is not handed on to be evaluated, saved and exported."""
        named = list(self.model.named_parameters())
        flags = [float(not bool(torch.isfinite(p.to_local() if self.fsdp else p).all())) for _, p in named]
        if self.fsdp:  # each process checked its slices: one all-reduce says which tensors are bad anywhere
            flags = self.dist.mean(*flags)
        bad = [name for (name, _), flag in zip(named, flags) if flag > 0]
        if bad:
            raise NonFiniteTraining(
                f"{self.prefix}training ended with non-finite weights in {len(bad)} of "
                f"{len(list(self.model.parameters()))} tensors (first: {bad[0]}), so nothing was saved or exported; "
                f"start a new run with a lower --lr (the checkpoint in '{self.out_dir}' holds them)")

    @property
    def _averages(self) -> bool:
        """The optimizer trains at one point and evaluates at another (Schedule-Free), now at the first."""
        return self.schedule_free and self.optimizer.param_groups[0]["train_mode"]

    @contextlib.contextmanager
    def averaged(self) -> Iterator[None]:
        """Inside, the model holds the optimizer's evaluation point (Schedule-Free's average x); elsewhere a no-op."""
        swap = self._averages
        if swap:
            self.optimizer.eval()
        try:
            yield
        finally:
            if swap:
                self.optimizer.train()

    def train_step(self, indices: list[int], params: list[torch.Tensor]) -> tuple[float, dict]:
        """Forward, backward, clip and step on one (global) batch; a non-finite loss or gradient skips the
        update (the schedule still advances). Returns the loss and the step's metrics row.

        Under torchrun this rank computes its slice of `indices`; the loss and its parts are then averaged
        over ranks (equal slices of full blocks: the mean of the slice means is the batch mean), so the skip
        decision, the optimizer's loss feature, the metrics and the printed loss are the global batch's."""
        cfg = self.cfg
        step = self.global_step + 1
        for callback in self.callbacks:
            callback.on_step_begin(step)
        loss, parts = self.batch_loss(self.dist.slice(indices), model=self.train_model)
        for callback in self.callbacks:
            loss = callback.on_loss(step, loss)
        # one host read for the three (each .item() is a sync on a GPU)
        value, ce, kl = self.dist.mean(*torch.stack([loss.detach(), parts["ce"], parts["kl"]]).tolist())
        grad_norm = float("nan")
        if math.isfinite(value):  # on every rank or none: DDP's backward is collective
            loss.backward()
            for callback in self.callbacks:
                callback.on_backward(step, params)
            grad_norm = float(global_value(torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip or float("inf"))))
        if not math.isfinite(grad_norm):
            # A poisoned batch must not reach the weights: skip it and keep the schedule.
            self.optimizer.zero_grad(set_to_none=True)
            self.skipped_steps += 1
            self.nonfinite_streak += 1
            what = "loss" if not math.isfinite(value) else "gradient"
            self.reporter.warn(f"{self.prefix}non-finite {what} at step {self.global_step + 1}; step skipped")
        else:
            self.nonfinite_streak = 0
            cluster = self.sampler.batch_cluster(indices) if self.clusters is not None else None
            step_optimizer(self.optimizer, value, cluster)  # the global batch's loss: the same decisions on every rank
            self.optimizer.zero_grad(set_to_none=True)
            self.epoch_loss_sum += value
            self.epoch_loss_steps += 1
        lr = self.scheduler.get_last_lr()[0]
        self.scheduler.step()
        self.global_step += 1
        self.step_in_epoch += 1
        return value, {
            "step": self.global_step, "epoch": self.epoch + 1, "loss": value, "ce": ce,
            "kl": kl, "lr": lr * self.lr_multiplier(), "grad_norm": grad_norm,
            "tokens": self.global_step * cfg.batch_size * cfg.seq_len,
        }

    def _raise_diverged(self) -> None:
        """Stop, the checkpoint saved: the last `nonfinite_streak` steps were all skipped."""
        last, n = self.global_step, self.nonfinite_streak
        raise NonFiniteTraining(
            f"{self.prefix}training stopped at step {last}: the loss or gradient was non-finite for {n} steps in a "
            f"row (steps {last - n + 1}-{last}, all skipped), so the run has diverged or its data is broken; the "
            f"checkpoint in '{self.out_dir}' holds the weights from before them: start a new run with a lower --lr "
            "or check --data (--resume would continue from there)")

    def _end_epoch(self) -> None:
        cfg = self.cfg
        self.epoch += 1
        self.step_in_epoch = 0
        mean_loss = self.epoch_loss_sum / self.epoch_loss_steps if self.epoch_loss_steps else float("nan")
        self.epoch_loss_sum, self.epoch_loss_steps = 0.0, 0
        lr = self.scheduler.get_last_lr()[0] * self.lr_multiplier()
        row = {"epoch": self.epoch, "step": self.global_step, "loss": mean_loss, "lr": lr, **self.hybrid_metrics()}
        line = f"{self.prefix}Epoch {self.epoch}, Loss: {mean_loss:.6f}, LR: {lr:.6f}"
        if cfg.hybrid and row["trust_radius"] is not None:
            line += f", Trust Radius: {row['trust_radius']:.6f}"
        if self.epoch % cfg.eval_every == 0 or self.epoch == cfg.epochs:
            ev = self.evaluate()
            row.update(val_loss=ev["loss"], val_ppl=ev["ppl"])
            line += f", Val Loss: {ev['loss']:.6f}, Val PPL: {ev['ppl']:.2f}"
            if "cluster_loss" in ev:
                losses = ev["cluster_loss"]
                seen = [k for k, v in enumerate(losses) if v is not None]  # clusters with validation blocks
                worst = max(seen, key=lambda k: losses[k])
                spread = losses[worst] - min(losses[k] for k in seen)
                row.update(val_loss_clusters=losses, val_loss_worst_cluster=losses[worst],
                           val_loss_cluster_spread=spread)
                line += f", worst cluster {worst}: {losses[worst]:.4f} (spread {spread:.4f})"
        row["elapsed_s"] = self.elapsed
        self.history.append(row)
        self.reporter.line(line)
        if self.metrics:
            self.metrics.log("epoch", row)
        self.save_checkpoint()

    def lr_multiplier(self) -> float:
        """The hybrid controller's current learning-rate multiplier (1 for AdamW)."""
        m = lr_multiplier(self.optimizer)
        return 1.0 if m is None else m

    def hybrid_metrics(self) -> dict:
        """The hybrid optimizer's multiplier, radius and last clip, for the metrics rows ({} for AdamW)."""
        return optimizer_metrics(self.optimizer)

    # ------------------------------------------------------------------ eval
    def evaluate(self, model: torch.nn.Module | None = None) -> dict[str, float]:
        """Token-averaged cross-entropy and perplexity of `model` (default: the trained one) on the validation split."""
        c = self.clusters
        with self.averaged():
            return evaluate_lm(model or self.model, self.val_data, self.cfg.batch_size, self.device,
                               c.val_labels if c is not None else None, c.num_clusters if c is not None else None)

    # ------------------------------------------------------------------ state
    def save_checkpoint(self) -> Path:
        """Atomically save model, optimizer, scheduler, sampler, RNG and data position (rank 0 only: every
        rank holds the same state; under FSDP every rank gathers its slices to rank 0, which writes whole
        tensors, so a run resumes on any number of processes)."""
        if self.fsdp:  # a collective: every rank gathers, rank 0 keeps (torch's own for the model)
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

            model_state = get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True,
                                                                                    cpu_offload=True))
            optimizer_state = gathered(self.optimizer.state_dict(), keep=self.dist.is_main)
        if not self.dist.is_main:
            return self.out_dir / CHECKPOINT_NAME
        if not self.fsdp:
            model_state, optimizer_state = self.model.state_dict(), self.optimizer.state_dict()
        return save_checkpoint(self.out_dir, {
            "model": model_state,
            "optimizer": optimizer_state,
            "scheduler": self.scheduler.state_dict(),
            "position": {
                "epoch": self.epoch, "step_in_epoch": self.step_in_epoch, "global_step": self.global_step,
                "epoch_loss_sum": self.epoch_loss_sum, "epoch_loss_steps": self.epoch_loss_steps,
                "skipped_steps": self.skipped_steps, "elapsed": self.elapsed,
                "nonfinite_streak": self.nonfinite_streak,
            },
            "history": self.history,
            "sampler": self.sampler.state_dict(),
            "data": self._data_digest(),
            "config": self.config_dict,
        })

    def unshard(self) -> torch.nn.Module:
        """Under FSDP: the trained model as an ordinary module with its whole weights, on every process (each
        gathers every tensor; evaluating, saving and exporting then run as without FSDP), now `self.model`.
        Without FSDP: `self.model`."""
        if self.fsdp:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

            with self.averaged():  # Schedule-Free's average, if training ended at the training point
                state = get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True))
            self.model, self.fsdp = unsharded(self._skeleton, state, self.device), False
        return self.model

    def _data_digest(self) -> str:
        """The training and validation blocks, as one hash checked on resume."""
        return f"{self.train_data.digest[:16]}-{self.val_data.digest[:16]}"

    def cleanup(self) -> None:
        """Close the metrics files."""
        if self.metrics:
            self.metrics.close()
            self.metrics = None
