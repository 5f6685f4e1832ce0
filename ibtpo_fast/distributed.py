"""Data parallelism under torchrun: the process group, each rank's share of trees, FSDP2 or DDP, and
the reductions that give N ranks the single-process loss and metrics.

Without torchrun (no WORLD_SIZE in the environment, or a world of one) nothing here starts a process
group and every reduction is the identity: one process runs exactly as it always did.
"""
from __future__ import annotations

import copy
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from ibtpo_fast.metrics import Parts, reduce_parts

PARALLEL = ("auto", "fsdp", "ddp", "none")  # train.parallel; auto: fsdp when the world has more than one rank


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def share(self, n: int) -> slice:
        """This rank's contiguous share of n items that divide evenly over the world."""
        if n % self.size:
            raise ValueError(f"{n} items do not divide over {self.size} ranks")
        per = n // self.size
        return slice(self.rank * per, (self.rank + 1) * per)

    def split(self, n: int) -> slice:
        """This rank's contiguous share of n items, the first n % size ranks taking one more."""
        per, extra = divmod(n, self.size)
        start = self.rank * per + min(self.rank, extra)
        return slice(start, start + per + (self.rank < extra))

    def _reduce(self, values: Sequence[float], op: Any) -> list[float]:
        if self.size == 1:
            return [float(v) for v in values]
        t = torch.tensor(values, dtype=torch.float64, device=_collective_device())
        dist.all_reduce(t, op=op)
        return t.tolist()

    def sum(self, value: float) -> float:
        return self._reduce([value], dist.ReduceOp.SUM)[0]

    def max(self, value: float) -> float:
        return self._reduce([value], dist.ReduceOp.MAX)[0]

    def all_true(self, flag: bool) -> bool:
        return self._reduce([float(flag)], dist.ReduceOp.MIN)[0] > 0

    def gather(self, obj: Any) -> list[Any]:
        """Every rank's `obj`, in rank order, on every rank."""
        if self.size == 1:
            return [obj]
        out: list[Any] = [None] * self.size
        dist.all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        if self.size > 1:
            dist.barrier()

    def reduce_metrics(self, parts: Mapping[str, Parts]) -> dict[str, float]:
        """One step's metrics over the ranks, each from the ranks' reduced parts (ibtpo_fast.metrics)."""
        return reduce_parts(self.gather(dict(parts)))


SINGLE = World()


def _collective_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def init_world(timeout_s: float = 1800.0) -> World:
    """The process group torchrun describes (NCCL on CUDA, gloo on CPU; a world of one too, so that FSDP can
    run on one GPU), or a world of one without a process group outside torchrun. A collective waiting on a
    stalled rank for `timeout_s` raises instead of hanging."""
    if "WORLD_SIZE" not in os.environ:
        return SINGLE
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo", timeout=timedelta(seconds=timeout_s))
    return World(dist.get_rank(), dist.get_world_size(), local_rank)


def close_world() -> None:
    """Every rank reaches the end before any tears its process group down: gloo aborts a process whose
    peer destroyed the group under it."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def whole(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor behind `t`: all-gathered from its shards when FSDP holds it as a DTensor (every rank
    must ask, in the same order), `t` itself otherwise."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def resolve_parallel(choice: str, world: World, master_weights: bool = False) -> str:
    """The sharding a run uses: `auto` is FSDP2 on several ranks, and on one under torchrun where low-precision
    weights need fp32 master copies (`master_weights`); none otherwise."""
    if choice == "auto":
        return "fsdp" if world.size > 1 or (master_weights and dist.is_initialized()) else "none"
    return choice


def frozen_copy(lm: torch.nn.Module, dtype: torch.dtype | None = None) -> torch.nn.Module:
    """A copy of `lm` in eval mode, its parameters detached in `dtype` (default theirs); made without a
    whole-precision copy first, and keeping tied parameters tied."""
    memo = {id(p): torch.nn.Parameter(p.detach().to(dtype or p.dtype, copy=True), requires_grad=False)
            for p in lm.parameters()}
    return copy.deepcopy(lm, memo).eval()


def decoder_layers(lm: torch.nn.Module) -> list[torch.nn.Module]:
    """The model's transformer blocks: the classes transformers lists as never to be split."""
    names = set(getattr(lm, "_no_split_modules", None) or ())
    layers = [m for m in lm.modules() if type(m).__name__ in names]
    if not layers:
        raise ValueError(f"{type(lm).__name__} names no decoder layer class (_no_split_modules): FSDP cannot shard it "
                         "layer by layer; use train.parallel=ddp")
    return layers


def wrap(policy: torch.nn.Module, mode: str, world: World, param_dtype: str = "") -> torch.nn.Module:
    """`policy` (a TokenLogprobs) made data-parallel: FSDP2 shards each decoder layer and the root, in
    `param_dtype` when set with fp32 gradient reductions; DDP replicates it; none leaves it alone."""
    if mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        device_ids = [world.local_rank] if torch.cuda.is_available() else None
        return DistributedDataParallel(policy, device_ids=device_ids)
    if mode == "fsdp":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        mesh = init_device_mesh("cuda" if torch.cuda.is_available() else "cpu", (world.size,))
        # No input casting: the inputs are token ids and masks, and casting would copy the tree-attention
        # chains the layers report back through.
        mp = MixedPrecisionPolicy(param_dtype=getattr(torch, param_dtype), reduce_dtype=torch.float32,
                                  cast_forward_inputs=False) if param_dtype else None
        kwargs = {"mesh": mesh, **({"mp_policy": mp} if mp else {})}
        for layer in decoder_layers(policy.lm):
            fully_shard(layer, **kwargs)
        fully_shard(policy, **kwargs)
    return policy


class RolloutWeights:
    """Whole weights for the colocated engine of a sharded policy: the engine decodes on its own schedule,
    which no collective could follow, so it needs a plain replica (in `dtype`, the engine's, where the
    policy keeps fp32 master weights). `gather()` all-gathers every parameter
    into the replica before a rollout; `free()` releases them for the update."""

    def __init__(self, lm: torch.nn.Module, dtype: torch.dtype | None = None) -> None:
        self.model = frozen_copy(lm, dtype)  # made before sharding: whole, plain tensors, in the engine's dtype
        self.bytes = sum(p.numel() * p.element_size() for p in self.model.parameters())

    @torch.no_grad()
    def gather(self, sharded_lm: torch.nn.Module) -> None:
        mine = dict(self.model.named_parameters())
        for name, p in sharded_lm.named_parameters():  # one order on every rank: the collectives pair up
            mine[name].data = whole(p).detach().to(mine[name].dtype)

    def free(self) -> None:
        for p in self.model.parameters():
            p.data = torch.empty(0, dtype=p.dtype, device=p.device)
