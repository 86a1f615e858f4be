"""The distillation recipe: one training run of a student, with or without a teacher.

`DistillRecipe` is the loop (`setup`, `train`, `evaluate`, `save_checkpoint`, `cleanup`); the
same loop trains the no-teacher baseline and the default teacher (teacher=None, CE only).
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Callable

import torch
from tqdm.auto import tqdm

from hybridopt.checkpoint import load_checkpoint, save_checkpoint, set_rng_state
from hybridopt.config import TrainConfig
from hybridopt.dataset import TokenBlocks
from hybridopt.errors import UserError
from hybridopt.hybrid_optimizer import HybridOptimizer
from hybridopt.losses import kd_loss
from hybridopt.metrics import MetricsLogger
from hybridopt.sampler import ClusterStratifiedBatchSampler, ShuffledBatchSampler


def warmup_cosine(warmup: int, total: int, min_ratio: float) -> Callable[[int], float]:
    """LR multiplier: linear warmup to 1 over `warmup` steps, then cosine decay to `min_ratio` at `total`."""

    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return f


class DistillRecipe:
    """Train `model` on `train_data`, distilling from `teacher` when one is given.

    Args:
        cfg: loop settings (epochs, lr, batch size...).
        model: the student, already on `device`.
        train_data: training blocks.
        val_data: validation blocks.
        out_dir: where the checkpoint and metrics go.
        teacher: frozen teacher in eval mode, or None for plain cross-entropy.
        alpha: weight of the cross-entropy term (1 when there is no teacher).
        temperature: KD softmax temperature.
        metrics_path: per-epoch metrics CSV, or None to write no metrics files.
        name: prefix of printed lines (empty for the main student).
        config_dict: the resolved run config, stored in every checkpoint.
        train_clusters: cluster id of every training block, to sample batches by cluster; None for
            plain shuffling.
        val_clusters: cluster id of every validation block, to report validation loss per cluster.
        sampling: `ClusterStratifiedBatchSampler` mode when `train_clusters` is given.
    """

    def __init__(self, cfg: TrainConfig, model: torch.nn.Module, train_data: TokenBlocks, val_data: TokenBlocks,
                 out_dir: Path, device: torch.device, teacher: torch.nn.Module | None = None, alpha: float = 1.0,
                 temperature: float = 1.0, metrics_path: Path | None = None, name: str = "",
                 config_dict: dict | None = None, train_clusters=None, val_clusters=None,
                 sampling: str = "proportional"):
        self.cfg = cfg
        self.model = model
        self.teacher = teacher
        self.alpha = alpha if teacher is not None else 1.0
        self.temperature = temperature
        self.train_data = train_data
        self.val_data = val_data
        self.out_dir = Path(out_dir)
        self.device = device
        self.metrics_path = metrics_path
        self.prefix = f"[{name}] " if name else ""
        self.config_dict = config_dict or asdict(cfg)
        self.train_clusters, self.val_clusters, self.sampling = train_clusters, val_clusters, sampling
        self.sampler = None  # built by setup()

    # ------------------------------------------------------------------ setup
    def setup(self, resume: bool = False) -> None:
        """Build optimizer, scheduler and sampler; restore all of them from the checkpoint on resume."""
        cfg = self.cfg
        decay = [p for p in self.model.parameters() if p.requires_grad and p.dim() >= 2]
        no_decay = [p for p in self.model.parameters() if p.requires_grad and p.dim() < 2]
        groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        if self.train_clusters is not None:
            self.sampler = ClusterStratifiedBatchSampler(self.train_clusters, cfg.batch_size, cfg.seed, self.sampling,
                                                         cfg.max_steps_per_epoch)
        else:
            self.sampler = ShuffledBatchSampler(len(self.train_data), cfg.batch_size, cfg.seed, cfg.max_steps_per_epoch)
        if cfg.hybrid:
            self.optimizer = HybridOptimizer(groups, lr=cfg.lr, betas=(0.9, 0.95), use_trust_region=cfg.trust_region,
                                             trust_radius=cfg.trust_radius, adapt_radius=cfg.adapt_radius,
                                             controller_lr=cfg.controller_lr, trace_decay=cfg.controller_trace,
                                             num_clusters=getattr(self.sampler, "num_clusters", 0))
        else:
            self.optimizer = torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.95))
        self.steps_per_epoch = len(self.sampler)
        self.total_steps = cfg.epochs * self.steps_per_epoch
        warmup = cfg.warmup_steps if cfg.warmup_steps is not None else max(1, self.total_steps // 20)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, warmup_cosine(warmup, self.total_steps, cfg.min_lr_ratio)
        )
        self.epoch, self.step_in_epoch, self.global_step = 0, 0, 0
        self.epoch_loss_sum, self.epoch_loss_steps, self.skipped_steps = 0.0, 0, 0
        self.history: list[dict] = []
        self.elapsed = 0.0
        if resume:
            state = load_checkpoint(self.out_dir)
            self.model.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
            pos = state["position"]
            self.epoch, self.step_in_epoch, self.global_step = pos["epoch"], pos["step_in_epoch"], pos["global_step"]
            self.epoch_loss_sum, self.epoch_loss_steps = pos["epoch_loss_sum"], pos["epoch_loss_steps"]
            self.skipped_steps, self.elapsed = pos["skipped_steps"], pos["elapsed"]
            self.history = state["history"]
            set_rng_state(state["rng"])
            if "data" not in state:
                print(f"warning: the checkpoint in '{self.out_dir}' predates data checks; resuming without "
                      "verifying that the data is unchanged", file=sys.stderr)
            elif state["data"] != self._data_digest():
                raise UserError(f"cannot resume '{self.out_dir}': its training or validation tokens differ from "
                                "this run's (other --data, tokenizer or --seq_len); start a new run")
            if "sampler" in state:  # the same batches: same batch size, mode and clusters
                try:
                    self.sampler.load_state_dict(state["sampler"])
                except ValueError as e:
                    raise UserError(f"cannot resume '{self.out_dir}': {e} (the data clusters changed)") from None
        self.metrics = None
        if self.metrics_path is not None:
            self.metrics = MetricsLogger(self.metrics_path, resume_step=self.global_step if resume else None)

    # ------------------------------------------------------------------ loop
    def _loss_step(self, input_ids: torch.Tensor, labels: torch.Tensor,
                   weights: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
        logits = self.model(input_ids=input_ids).logits  # (B, T, V)
        teacher_logits = None
        if self.teacher is not None and self.alpha < 1.0:
            with torch.no_grad():
                teacher_logits = self.teacher(input_ids=input_ids).logits  # (B, T, V)
        return kd_loss(logits, labels, teacher_logits, self.alpha, self.temperature, weights)

    def batch_loss(self, indices: list[int], weighted: bool = True) -> tuple[torch.Tensor, dict]:
        """The training objective on the blocks `indices`: importance-weighted when the sampler asks and
        `weighted` is True (batches the sampler drew); False for batches drawn uniformly elsewhere."""
        input_ids, labels = (t.to(self.device) for t in self.train_data.batch(indices))
        weights = None
        if weighted and self.sampler is not None and self.sampler.weighted:
            weights = self.sampler.example_weights(indices).to(self.device)
        return self._loss_step(input_ids, labels, weights)

    def batch_ce(self, indices: list[int]) -> torch.Tensor:
        """The model's plain cross-entropy on the training blocks `indices` (what validation reports)."""
        input_ids, labels = (t.to(self.device) for t in self.train_data.batch(indices))
        return kd_loss(self.model(input_ids=input_ids).logits, labels)[0]

    def train(self, stop_after_epoch: int | None = None) -> list[dict]:
        """Run the remaining epochs; return the per-epoch history.

        Args:
            stop_after_epoch: stop (after checkpointing) once this many epochs are done, as an
                interruption would; used to test resume.
        """
        cfg = self.cfg
        params = [p for p in self.model.parameters() if p.requires_grad]
        bar = tqdm(total=self.total_steps, initial=self.global_step, desc=self.prefix + "training",
                   unit="step", leave=False, disable=None, dynamic_ncols=True)
        try:
            while self.epoch < cfg.epochs:
                if stop_after_epoch is not None and self.epoch >= stop_after_epoch:
                    break
                self.model.train()
                self.sampler.set_epoch(self.epoch, self.step_in_epoch)
                start = time.perf_counter()
                for indices in self.sampler:
                    loss, parts = self.batch_loss(indices)
                    grad_norm = float("nan")
                    if torch.isfinite(loss):
                        loss.backward()
                        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip or float("inf")))
                    if not math.isfinite(grad_norm):
                        # A poisoned batch must not reach the weights: skip it and keep the schedule.
                        self.optimizer.zero_grad(set_to_none=True)
                        self.skipped_steps += 1
                        tqdm.write(f"{self.prefix}warning: non-finite loss or gradient at step {self.global_step}; "
                                   "step skipped")
                    else:
                        if cfg.hybrid:
                            if self.train_clusters is not None:
                                self.optimizer.set_cluster(self.sampler.batch_cluster(indices))
                            self.optimizer.step(loss=loss.item())
                        else:
                            self.optimizer.step()
                        self.optimizer.zero_grad(set_to_none=True)
                        self.epoch_loss_sum += loss.item()
                        self.epoch_loss_steps += 1
                    lr = self.scheduler.get_last_lr()[0]
                    self.scheduler.step()
                    self.global_step += 1
                    self.step_in_epoch += 1
                    bar.update(1)
                    bar.set_postfix(loss=f"{loss.item():.4f}", refresh=False)
                    if self.metrics:
                        self.metrics.log("step", {
                            "step": self.global_step, "epoch": self.epoch + 1, "loss": loss.item(),
                            "ce": parts["ce"].item(), "kl": parts["kl"].item(), "lr": lr * self.lr_multiplier(),
                            "grad_norm": grad_norm, "tokens": self.global_step * cfg.batch_size * cfg.seq_len,
                            "elapsed_s": self.elapsed + time.perf_counter() - start, **self.hybrid_metrics(),
                        })
                self.elapsed += time.perf_counter() - start
                self._end_epoch()
        except KeyboardInterrupt:
            self.save_checkpoint()
            raise
        finally:
            bar.close()
        return self.history

    def _end_epoch(self) -> None:
        cfg = self.cfg
        self.epoch += 1
        self.step_in_epoch = 0
        mean_loss = self.epoch_loss_sum / max(1, self.epoch_loss_steps)
        self.epoch_loss_sum, self.epoch_loss_steps = 0.0, 0
        lr = self.scheduler.get_last_lr()[0] * self.lr_multiplier()
        row = {"epoch": self.epoch, "step": self.global_step, "loss": mean_loss, "lr": lr, **self.hybrid_metrics()}
        line = f"{self.prefix}Epoch {self.epoch}, Loss: {mean_loss:.6f}, LR: {lr:.6f}"
        if self.cfg.hybrid:
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
        tqdm.write(line)
        if self.metrics:
            self.metrics.log("epoch", row)
        self.save_checkpoint()

    def lr_multiplier(self) -> float:
        """The hybrid controller's current learning-rate multiplier (1 for AdamW)."""
        return self.optimizer.hybrid["lr_mult"] if self.cfg.hybrid else 1.0

    def hybrid_metrics(self) -> dict:
        if not self.cfg.hybrid:
            return {}
        s = self.optimizer.summary()
        return {"lr_mult": s["lr_multiplier"], "trust_radius": s["trust_radius"], "clipped": int(self.optimizer.hybrid["clipped"])}

    # ------------------------------------------------------------------ eval
    @torch.no_grad()
    def evaluate(self, model: torch.nn.Module | None = None) -> dict[str, float]:
        """Token-averaged cross-entropy and perplexity of `model` (default: the student) on the validation split."""
        num_clusters = None if self.train_clusters is None else int(max(self.train_clusters)) + 1
        return evaluate_lm(model or self.model, self.val_data, self.cfg.batch_size, self.device, self.val_clusters,
                           num_clusters)

    # ------------------------------------------------------------------ state
    def save_checkpoint(self) -> Path:
        """Atomically save model, optimizer, scheduler, RNG and data position."""
        return save_checkpoint(self.out_dir, {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "position": {
                "epoch": self.epoch, "step_in_epoch": self.step_in_epoch, "global_step": self.global_step,
                "epoch_loss_sum": self.epoch_loss_sum, "epoch_loss_steps": self.epoch_loss_steps,
                "skipped_steps": self.skipped_steps, "elapsed": self.elapsed,
            },
            "history": self.history,
            "sampler": self.sampler.state_dict(),
            "data": self._data_digest(),
            "config": self.config_dict,
        })

    def _data_digest(self) -> str:
        """The training and validation blocks, as one hash checked on resume."""
        return f"{self.train_data.digest[:16]}-{self.val_data.digest[:16]}"

    def cleanup(self) -> None:
        if self.metrics:
            self.metrics.close()
            self.metrics = None


@torch.no_grad()
def evaluate_lm(model: torch.nn.Module, data: TokenBlocks, batch_size: int, device: torch.device,
                clusters=None, num_clusters: int | None = None) -> dict:
    """Cross-entropy (nats per token) and perplexity of a causal LM over every block of `data`.

    With `clusters` (the cluster of every block), also `cluster_loss`: the loss of each cluster's
    blocks; their size-weighted mean is checked to equal the overall loss.
    """
    was_training = model.training
    model.eval()
    per_block = []
    for start in range(0, len(data), batch_size):
        idx = list(range(start, min(start + batch_size, len(data))))
        input_ids, labels = (t.to(device) for t in data.batch(idx))
        logits = model(input_ids=input_ids).logits  # (B, T, V)
        B, T, V = logits.shape
        ce = torch.nn.functional.cross_entropy(logits.reshape(-1, V).float(), labels.reshape(-1), reduction="none")
        per_block.append(ce.reshape(B, T).double().sum(1).cpu())
    model.train(was_training)
    sums = torch.cat(per_block)  # (N,) summed loss of each block
    count = len(data) * data.seq_len
    loss = float(sums.sum()) / count
    ppl = math.exp(loss) if loss < 700 else float("inf")
    result = {"loss": loss, "ppl": ppl, "tokens": count}
    if clusters is not None:
        labels = torch.as_tensor(clusters, dtype=torch.long)
        k = max(int(labels.max()) + 1, num_clusters or 0)
        blocks = torch.bincount(labels, minlength=k).double()
        cluster_sum = torch.zeros(k, dtype=torch.float64).index_add_(0, labels, sums)
        nonempty = blocks > 0
        cluster_loss = cluster_sum / (blocks.clamp_min(1) * data.seq_len)
        weighted = float((cluster_loss[nonempty] * blocks[nonempty]).sum() / blocks.sum())
        assert math.isclose(weighted, loss, rel_tol=1e-9), f"per-cluster losses do not add up: {weighted} != {loss}"
        # None (JSON null) for a cluster without validation blocks: NaN is not JSON and never equals itself.
        result["cluster_loss"] = [v if n else None for v, n in zip(cluster_loss.tolist(), nonempty.tolist())]
    return result
