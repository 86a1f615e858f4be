"""Data-parallel training under torchrun: the process group, rank helpers and the per-rank batch slice.

Everything here is PyTorch's own machinery (`torch.distributed`, DistributedDataParallel, torchrun's
environment); this module only decides when to use it and keeps the rest of the package rank-agnostic:

    dist = DistEnv.from_env()         # RANK, WORLD_SIZE, LOCAL_RANK as torchrun sets them (1 process: rank 0 of 1)
    dist.init(device)                  # gloo on CPU, nccl on CUDA; nothing to do for one process
    local = dist.slice(global_batch)   # this rank's disjoint share of the global batch
    loss = dist.mean(loss)             # the global batch's loss, equal on every rank
    dist.teardown()

The global batch is the one the single-process run draws (the same sampler, the same seed); each rank
trains on one contiguous slice of it, and DistributedDataParallel averages the gradients, so one step on
N ranks is one step of the single-process run.
"""

from __future__ import annotations

import contextlib
import copy
import os
from dataclasses import dataclass
from typing import Callable, Iterator, TypeVar

import torch
import torch.distributed as tdist

from hybridopt.errors import UserError
from hybridopt.optim.trust_region import DTensor

T = TypeVar("T")


@dataclass(frozen=True)
class DistEnv:
    """Where this process stands in a torchrun job (rank 0 of 1 outside one)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None) -> "DistEnv":
        """Read torchrun's RANK, WORLD_SIZE and LOCAL_RANK (absent: a single process).

        Raises:
            UserError: the variables are set but are not consistent integers.
        """
        env = os.environ if environ is None else environ
        if "WORLD_SIZE" not in env:
            return cls()
        try:
            rank, world, local = int(env.get("RANK", "0")), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", "0"))
        except ValueError:
            raise UserError("RANK, WORLD_SIZE and LOCAL_RANK must be integers (launch with torchrun, which sets "
                            "them)") from None
        if world < 1 or not 0 <= rank < world or local < 0:
            raise UserError(f"RANK {rank} and WORLD_SIZE {world} are not a valid process group (launch with "
                            "torchrun, which sets them)")
        return cls(rank, world, local)

    @property
    def active(self) -> bool:
        """More than one process: gradients, losses and decisions must be shared."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that prints, writes metrics, checkpoints and exports."""
        return self.rank == 0

    # ------------------------------------------------------------------ process group
    def device(self, device: torch.device) -> torch.device:
        """The device this rank trains on: its own GPU (`cuda:LOCAL_RANK`) under torchrun, else `device`."""
        if self.active and device.type == "cuda":
            return torch.device("cuda", self.local_rank)
        return device

    def init(self, device: torch.device) -> None:
        """Join the process group torchrun describes (MASTER_ADDR/MASTER_PORT): nccl for CUDA, gloo for CPU."""
        if not self.active or tdist.is_initialized():
            return
        if device.type == "cuda":
            torch.cuda.set_device(device)
        tdist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=self.rank,
                                 world_size=self.world_size)

    def teardown(self) -> None:
        """Leave the process group (if this module joined one)."""
        if self.active and tdist.is_initialized():
            tdist.destroy_process_group()

    # ------------------------------------------------------------------ data
    def check_batch(self, batch_size: int) -> None:
        """The global batch must split evenly: equal slices keep one step on N ranks the single-process step."""
        if batch_size % self.world_size:
            raise UserError(f"--batch_size {batch_size} does not split into {self.world_size} equal per-process "
                            f"slices; use a multiple of {self.world_size} (the global batch is what one step sees)")

    def slice(self, batch: list[int]) -> list[int]:
        """This rank's contiguous share of a global batch: the slices of all ranks partition it."""
        n = len(batch) // self.world_size
        assert n * self.world_size == len(batch), (len(batch), self.world_size)
        return batch[self.rank * n:(self.rank + 1) * n]

    # ------------------------------------------------------------------ agreement
    def mean(self, *values: float) -> list[float]:
        """Each value averaged over ranks, in one all-reduce: the same floats on every rank (a NaN on one rank
        is a NaN on all)."""
        if not self.active:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64, device=self._comm_device())
        tdist.all_reduce(t)
        return (t / self.world_size).tolist()

    def any(self, flag: bool) -> bool:
        """Whether `flag` is true on some rank (a stop asked of one is a stop for all)."""
        if not self.active:
            return flag
        t = torch.tensor([int(flag)], device=self._comm_device())
        tdist.all_reduce(t, op=tdist.ReduceOp.MAX)
        return bool(t)

    def broadcast_(self, tensor: torch.Tensor) -> torch.Tensor:
        """Overwrite `tensor` on every rank with rank 0's, in place."""
        if self.active:
            moved = tensor.to(self._comm_device())
            tdist.broadcast(moved, src=0)
            tensor.copy_(moved.to(tensor.device))
        return tensor

    def share_rng_state(self) -> None:
        """Set every rank's torch random state to rank 0's, so all draw the same numbers from here on."""
        torch.set_rng_state(self.broadcast_(torch.get_rng_state()))

    def on_main(self, fn: Callable[[], T]) -> T:
        """Run `fn` on rank 0 only and hand its result to every rank, so all take the same decision (the run
        folder, a refusal of bad input: rank 0's UserError is raised on every rank)."""
        if not self.active:
            return fn()
        if not self.is_main:
            return self._receive()[1]
        with self._sent_on_failure():
            result = fn()
        self._share(("ok", result))
        return result

    @contextlib.contextmanager
    def main_first(self) -> Iterator[None]:
        """Rank 0 runs the block first (training the default teacher, filling the token and cluster caches);
        the others run it after, finding the caches filled, so no two processes write the same file. If rank 0
        fails in the block, every rank stops with its error."""
        if not self.active:
            yield
        elif self.is_main:
            with self._sent_on_failure():
                yield
            self._share(("ok", None))
        else:
            self._receive()
            yield

    @contextlib.contextmanager
    def _sent_on_failure(self) -> Iterator[None]:
        """On rank 0: an exception in the block is sent to the waiting ranks before it propagates."""
        try:
            yield
        except UserError as e:
            e.every_rank = True  # the others raise it too: the CLI prints it once, on rank 0
            self._share(("user_error", str(e)))
            raise
        except Exception as e:
            self._share(("failed", f"{type(e).__name__}: {e}"))
            raise

    def _receive(self) -> tuple:
        """On ranks > 0: what rank 0 sent; its failure raised here."""
        message = self._share(None)
        if message[0] == "user_error":
            error = UserError(message[1])
            error.every_rank = True
            raise error
        if message[0] == "failed":
            raise RuntimeError(f"rank 0 failed ({message[1]})")
        return message

    def _share(self, obj):
        box = [obj]
        tdist.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        if self.active:
            tdist.barrier()

    def _comm_device(self) -> torch.device:
        return torch.device("cuda", torch.cuda.current_device()) if tdist.get_backend() == "nccl" else torch.device("cpu")


def wrap_ddp(model: torch.nn.Module, dist: DistEnv) -> torch.nn.Module:
    """The module a training step calls: `model` in DistributedDataParallel under torchrun (its gradients
    averaged over ranks in backward, its initial weights broadcast from rank 0), `model` itself otherwise."""
    if not dist.active:
        return model
    from torch.nn.parallel import DistributedDataParallel

    device_ids = [model.device.index] if getattr(model, "device", torch.device("cpu")).type == "cuda" else None
    return DistributedDataParallel(model, device_ids=device_ids)


# ---------------------------------------------------------------------------- FSDP2
def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The repeated blocks of a Hugging Face causal LM (`model.model.layers`, Llama's layout), each sharded as one
    unit under FSDP2."""
    layers = getattr(getattr(model, "model", None), "layers", None)
    if layers is None:
        raise UserError(f"--fsdp shards a causal LM's decoder layers (model.model.layers); {type(model).__name__} "
                        "has none")
    return list(layers)


def shard_fsdp(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """`model` sharded in place with FSDP2 (`fully_shard`) over the default process group: each decoder layer, then
    the root (embeddings, final norm, head). Its parameters become DTensors, each process holding a slice; a
    forward gathers a layer's weights just before it runs and frees them after. On a GPU the forward runs in
    bfloat16 with gradients reduced in float32 (the mixed-precision policy); on a CPU everything stays float32.
    Returns `model` (what a training step calls)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    policy = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if device.type == "cuda"
              else MixedPrecisionPolicy())
    for layer in decoder_layers(model):
        fully_shard(layer, mp_policy=policy)
    fully_shard(model, mp_policy=policy)
    return model


def is_sharded(model: torch.nn.Module | None) -> bool:
    """Whether `model`'s parameters are FSDP2's DTensors."""
    return model is not None and any(isinstance(p, DTensor) for p in model.parameters())


def meta_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A copy of `model` whose parameters are empty tensors on the meta device (no memory) and whose buffers are
    copied: the unsharded module a sharded run's weights are loaded back into (`unsharded`). Tied parameters stay
    tied (one meta tensor for one parameter)."""
    memo = {id(p): torch.nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad)
            for p in model.parameters()}
    return copy.deepcopy(model, memo)


def unsharded(skeleton: torch.nn.Module, state: dict, device: torch.device) -> torch.nn.Module:
    """`skeleton` (from `meta_copy`) holding the full weights `state` on `device`: an ordinary module again."""
    skeleton.load_state_dict({k: v.to(device) for k, v in state.items()}, assign=True)
    if callable(getattr(skeleton, "tie_weights", None)):
        skeleton.tie_weights()  # `assign` gave the tied head its own tensor
    return skeleton


def gathered(value, keep: bool = True):
    """`value` (a state dict, nested dicts and lists of tensors and numbers) with every DTensor replaced by its
    full tensor on the CPU. Each gather is a collective: every process calls this on a value of the same
    structure (state dicts are). Processes that do not `keep` get None in place of each gathered tensor (the
    memory of a whole model is needed only where it is written)."""
    if isinstance(value, DTensor):
        full = value.full_tensor()
        return full.cpu() if keep else None
    if isinstance(value, dict):
        return type(value)((k, gathered(v, keep)) for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return type(value)(gathered(v, keep) for v in value)
    return value


def sharded_like(full: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """`full` cut as the DTensor `like` is (its mesh and placements; every process holds `full`), or `full` itself
    when `like` is an ordinary tensor."""
    if not isinstance(like, DTensor):
        return full
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(full.to(like.device_mesh.device_type), like.device_mesh, like.placements)


def sharded_optimizer_state(state_dict: dict, params: list[torch.Tensor]) -> dict:
    """An optimizer state_dict saved with full tensors (`gathered`) cut for sharded `params` (in the order of the
    optimizer's param groups, as torch numbers them): every per-parameter tensor of a parameter's shape becomes
    a DTensor placed as that parameter. Covers torch's optimizers' "state", `HybridOptimizer`'s (the same) and
    the `hybrid(...)` wrapper's "hybrid" "updates"."""
    def cut(per_param: dict) -> dict:
        out = {}
        for i, entry in per_param.items():
            p = params[int(i)]
            if isinstance(entry, dict):
                out[i] = {k: sharded_like(v, p) if torch.is_tensor(v) and v.shape == p.shape else v
                          for k, v in entry.items()}
            else:
                out[i] = sharded_like(entry, p) if torch.is_tensor(entry) and entry.shape == p.shape else entry
        return out

    result = dict(state_dict)
    result["state"] = cut(state_dict.get("state", {}))
    if "hybrid" in state_dict and "updates" in state_dict["hybrid"]:
        result["hybrid"] = {**state_dict["hybrid"], "updates": cut(state_dict["hybrid"]["updates"])}
    return result
