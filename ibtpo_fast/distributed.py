"""Data parallelism under torchrun: the process group, each rank's share of trees, FSDP2 or DDP, and
the reductions that give N ranks the single-process loss and metrics.

Without torchrun (no WORLD_SIZE in the environment, or a world of one) nothing here starts a process
group and every reduction is the identity: one process runs exactly as it always did.
"""
from __future__ import annotations

import copy
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from ibtpo_fast.metrics import Parts, reduce_parts
from ibtpo_fast.policy import TokenLogprobs, checkpoint_activations

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

    def sums(self, values: Sequence[float]) -> list[float]:
        """Each of `values` summed over the ranks, in one collective."""
        return self._reduce(values, dist.ReduceOp.SUM)

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


def resolve_parallel(choice: str, world: World, needs_fsdp: bool = False) -> str:
    """The sharding a run uses: `auto` is FSDP2 on several ranks, and on one under torchrun where the run needs
    what FSDP2 alone gives (`needs_fsdp`: fp32 master copies of low-precision weights, CPU offload); none
    otherwise."""
    if choice == "auto":
        return "fsdp" if world.size > 1 or (needs_fsdp and dist.is_initialized()) else "none"
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


def wrap(policy: torch.nn.Module, mode: str, world: World, param_dtype: str = "",
         offload: bool = False) -> torch.nn.Module:
    """`policy` (a TokenLogprobs) made data-parallel: FSDP2 shards each decoder layer and the root, in
    `param_dtype` when set with fp32 gradient reductions, the shards kept in CPU memory with `offload`
    (moved to the device layer by layer for compute); DDP replicates it; none leaves it alone."""
    if offload and mode != "fsdp":
        raise ValueError(f"offloading shards needs fsdp, not {mode}")
    if mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        device_ids = [world.local_rank] if torch.cuda.is_available() else None
        return DistributedDataParallel(policy, device_ids=device_ids)
    if mode == "fsdp":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard

        mesh = init_device_mesh("cuda" if torch.cuda.is_available() else "cpu", (world.size,))
        # No input casting: the inputs are token ids and masks, and casting would copy the tree-attention
        # chains the layers report back through.
        mp = MixedPrecisionPolicy(param_dtype=getattr(torch, param_dtype), reduce_dtype=torch.float32,
                                  cast_forward_inputs=False) if param_dtype else None
        kwargs: dict[str, Any] = {"mesh": mesh, **({"mp_policy": mp} if mp else {})}
        if offload:  # pinned memory only where a GPU copies from it
            kwargs["offload_policy"] = CPUOffloadPolicy(pin_memory=torch.cuda.is_available())
        for layer in decoder_layers(policy.lm):
            fully_shard(layer, **kwargs)
        fully_shard(policy, **kwargs)
    return policy


def meta_skeleton(config: Any, dtype: torch.dtype, trust_remote_code: bool = False) -> torch.nn.Module:
    """The causal LM `config` describes, its parameters (in `dtype`) and buffers on the meta device: a shape to
    shard, holding no memory."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code,
                                                attn_implementation=config._attn_implementation)


def _copy_buffers(dst: torch.nn.Module, src: torch.nn.Module) -> None:
    """Copies of `src`'s buffers (rotary frequencies: not in a state dict) in place of `dst`'s (on the meta
    device), `dst` a module of the same structure."""
    for name, b in src.named_buffers():
        owner, _, leaf = name.rpartition(".")
        dst.get_submodule(owner)._buffers[leaf] = b.detach().clone()


@dataclass
class Sharded:
    """A policy sharded as its weights arrived, and the frozen models built from its shards."""

    lm: torch.nn.Module  # the policy's causal LM, its parameters DTensor shards
    policy: torch.nn.Module  # TokenLogprobs(lm), sharded
    ref: torch.nn.Module | None  # a sharded TokenLogprobs of a frozen copy, in its own dtype
    replica: RolloutWeights | None  # holds nothing until its first gather


def shard_from_rank0(load_whole: Callable[[], torch.nn.Module], world: World, device: torch.device, *,
                     param_dtype: str = "", ref_dtype: torch.dtype | None = None, ref_offload: bool = False,
                     replica_dtype: torch.dtype | None = None, activation_checkpointing: bool = False,
                     trust_remote_code: bool = False) -> Sharded:
    """A policy FSDP2-sharded over `world` with only rank 0 holding the whole model, from `load_whole()`
    (called there alone, in CPU memory): the other ranks build its shape on the meta device, shard it, and take
    their shards as rank 0 broadcasts each tensor. A reference model (`ref_dtype`, its shards in CPU memory
    with `ref_offload`) copies each rank's own shards; a rollout replica (`replica_dtype`) starts empty."""
    whole_lm = load_whole() if world.is_main else None
    meta = [whole_lm.config, whole_lm.generation_config, whole_lm.dtype] if whole_lm is not None else [None] * 3
    if world.size > 1:
        dist.broadcast_object_list(meta, src=0)
    lm = meta_skeleton(meta[0], meta[2], trust_remote_code)
    lm.generation_config = meta[1]
    ref_lm = _frozen_skeleton(lm, ref_dtype) if ref_dtype is not None else None
    replica = RolloutWeights(lm, replica_dtype, device) if replica_dtype is not None else None
    if activation_checkpointing:
        checkpoint_activations(lm)
    # to_empty: memory for this rank's shards alone, uninitialised until they arrive
    policy = wrap(TokenLogprobs(lm), "fsdp", world, param_dtype).to_empty(device=device)
    _receive(policy, lm, whole_lm, world)
    del whole_lm
    ref = None
    if ref_lm is not None:
        ref = wrap(TokenLogprobs(ref_lm), "fsdp", world, param_dtype, offload=ref_offload) \
            .to_empty(device=torch.device("cpu") if ref_offload else device)
        with torch.no_grad():
            for mine, theirs in zip(ref.parameters(), policy.parameters(), strict=True):
                mine.to_local().copy_(theirs.to_local())  # the same mesh and shapes: the same local shard
        _copy_buffers(ref_lm, lm)
        ref.eval()
    if replica is not None:
        _copy_buffers(replica.model, lm)
    return Sharded(lm, policy, ref, replica)


def _frozen_skeleton(lm: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """A meta copy of `lm` with its parameters in `dtype`, frozen (its buffers keep theirs: rotary frequencies
    stay fp32)."""
    memo = {id(p): torch.nn.Parameter(p.detach().to(dtype), requires_grad=False) for p in lm.parameters()}
    return copy.deepcopy(lm, memo).eval()


@torch.no_grad()
def _receive(policy: torch.nn.Module, lm: torch.nn.Module, whole_lm: torch.nn.Module | None, world: World) -> None:
    """Each rank's shards of rank 0's whole weights, one tensor broadcast at a time, and its buffers."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    full = {f"lm.{k}": v for k, v in whole_lm.state_dict().items()} if whole_lm is not None else {}
    set_model_state_dict(policy, full, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    buffers = dict(lm.named_buffers())  # one order on every rank: the structure's
    if whole_lm is not None:
        for name, b in whole_lm.named_buffers():
            buffers[name].copy_(b)  # into the device's buffer: the broadcast sends from there
    if world.size > 1:
        for b in buffers.values():
            dist.broadcast(b, src=0)


class RolloutWeights:
    """Whole weights for the colocated engine of a sharded policy: the engine decodes on its own schedule,
    which no collective could follow, so it needs a plain replica (in `dtype`, the engine's, where the
    policy keeps fp32 master weights). `gather()` all-gathers every parameter
    into the replica before a rollout; `free()` releases them for the update."""

    def __init__(self, lm: torch.nn.Module, dtype: torch.dtype | None = None,
                 device: torch.device | None = None) -> None:
        # A structure of empty parameters (from `lm` before sharding, or its meta skeleton): the first gather fills it.
        memo = {id(p): torch.nn.Parameter(torch.empty(0, dtype=dtype or p.dtype, device=device), requires_grad=False)
                for p in lm.parameters()}
        self.model = copy.deepcopy(lm, memo).eval()
        self.bytes = sum(p.numel() * (dtype or p.dtype).itemsize for p in lm.parameters())

    @torch.no_grad()
    def gather(self, sharded_lm: torch.nn.Module) -> None:
        mine = dict(self.model.named_parameters())
        for name, p in sharded_lm.named_parameters():  # one order on every rank: the collectives pair up
            mine[name].data = whole(p).detach().to(mine[name].dtype)

    def free(self) -> None:
        for p in self.model.parameters():
            p.data = torch.empty(0, dtype=p.dtype, device=p.device)
