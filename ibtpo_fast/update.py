"""The policy update on one training batch: PPO epochs over mini-batches of the clipped loss.

`ppo_update(model, optimizer, batch, settings)` is all a caller needs (the trainer, a distributed
worker, another framework's loop): reference log-probs, the loss, backward, gradient clipping and
the optimizer step, with a guard that skips a mini-batch whose loss or gradient is not finite.
The learning-rate schedule and what to do after skipped updates stay with the caller.

Under data parallelism (`world` of more than one rank, the model wrapped by DDP or sharded by FSDP2)
each rank passes its own trees: the loss divides by the global batch's token or sequence count, and
is scaled by the world size because the wrappers average gradients, so the update is the one a
single process makes on the whole batch. A mini-batch is skipped on every rank when it is
non-finite on any.
"""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch

from ibtpo_fast.distributed import SINGLE, World, whole
from ibtpo_fast.losses import ppo_clip_loss, token_coefficients
from ibtpo_fast.packing import TrainBatch
from ibtpo_fast.policy import as_logprob_module

SKIPPED = "train/skipped_minibatches"  # mini-batches of this update whose loss or gradient was non-finite


@dataclass(frozen=True)
class UpdateSettings:
    temperature: float  # the rollout's: log-probs are recomputed under the distribution that sampled
    tree_attention: str = "auto"  # see ibtpo_fast.tree_attention
    loss_agg: str = "token-mean"  # a key of ibtpo_fast.losses.AGGREGATIONS
    clip_low: float = 0.2
    clip_high: float = 0.2
    kl_coef: float = 0.0  # > 0 needs a reference model
    entropy_coef: float = 0.0
    ppo_epochs: int = 1
    mini_batches: int = 1
    grad_clip: float = 1.0  # max gradient norm; 0: no clipping
    deterministic: bool = False  # torch's deterministic algorithms for the update (bitwise-reproducible on CPU)


@contextmanager
def deterministic_algorithms(enabled: bool) -> Iterator[None]:
    """torch's deterministic algorithms inside the block, the caller's setting after it. On several CPU
    threads the backward otherwise sums in a varying order (index accumulation, MKL matmuls), so runs
    from one seed drift apart; on CPU the deterministic paths cost nothing measurable."""
    if not enabled:
        yield
        return
    was, warn_only = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(was, warn_only=warn_only)


def ppo_update(model: torch.nn.Module, optimizer: torch.optim.Optimizer, batch: TrainBatch,
               settings: UpdateSettings, ref_model: torch.nn.Module | None = None,
               world: World = SINGLE) -> dict[str, float]:
    """`settings.ppo_epochs` passes over `batch` in `settings.mini_batches` shuffled mini-batches (numpy's
    global RNG), one optimizer step each. Returns the loss statistics averaged over mini-batches and
    `train/skipped_minibatches`. Every rank of `world` must hold at least `mini_batches` rows."""
    if settings.kl_coef > 0 and ref_model is None:
        raise ValueError("kl_coef > 0 needs a reference model")
    policy = as_logprob_module(model)
    with deterministic_algorithms(settings.deterministic):
        ref_logp = reference_logprobs(ref_model, batch, settings) if settings.kl_coef > 0 else None
        policy.train()
        stats: dict[str, list[float]] = {}
        order = np.arange(batch.num_rows)
        for _ in range(settings.ppo_epochs):
            np.random.shuffle(order)
            for rows in np.array_split(order, min(settings.mini_batches, batch.num_rows)):
                mb_ref = None if ref_logp is None else ref_logp[torch.isin(batch.rows, torch.as_tensor(rows))]
                loss, s = minibatch_loss(policy, batch.select(rows), settings, mb_ref, world)
                s["actor/grad_norm"] = _step(policy, optimizer, loss, settings.grad_clip, world)
                for k, v in s.items():
                    stats.setdefault(k, []).append(v)
    out = {k: _nanmean(v) for k, v in stats.items()}
    out[SKIPPED] = float(np.isnan(stats["actor/grad_norm"]).sum())
    return out


def minibatch_loss(model: torch.nn.Module, mb: TrainBatch, settings: UpdateSettings,
                   ref_logp: torch.Tensor | None = None, world: World = SINGLE) -> tuple[torch.Tensor, dict[str, float]]:
    """The aggregated PPO-clip loss of one mini-batch and its statistics; with several ranks, this rank's
    share of the global mini-batch's loss, scaled for the wrappers' gradient averaging."""
    logp, entropy = as_logprob_module(model)(mb, settings.temperature, settings.tree_attention)
    dev = logp.device
    coef = token_coefficients(settings.loss_agg, mb.mult, mb.seq_share, mb.num_traj, world.sum if world.size > 1 else None)
    coef = coef.to(dev) * mb.prefix_w.to(dev)
    loss, stats = ppo_clip_loss(logp, mb.old_logp.to(dev), mb.advantages.to(dev), coef, clip_low=settings.clip_low,
                                clip_high=settings.clip_high, ref_logp=None if ref_logp is None else ref_logp.to(dev),
                                kl_coef=settings.kl_coef, entropy=entropy, entropy_coef=settings.entropy_coef)
    return loss * world.size, stats


@torch.no_grad()
def reference_logprobs(ref_model: torch.nn.Module, batch: TrainBatch, settings: UpdateSettings) -> torch.Tensor:
    logp, _ = as_logprob_module(ref_model)(batch, settings.temperature, settings.tree_attention)
    return logp.float().cpu()


def _step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, loss: torch.Tensor, grad_clip: float,
          world: World = SINGLE) -> float:
    """Backward and optimizer step; the gradient norm, or NaN when a non-finite loss or gradient skipped it
    (on every rank alike: the loss's finiteness is agreed before backward, the norm is global)."""
    optimizer.zero_grad(set_to_none=True)
    if world.all_true(bool(torch.isfinite(loss))):
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip or float("inf"))
        norm = whole(norm)  # FSDP2: a replicated DTensor
    else:
        norm = torch.tensor(float("nan"))
    if not torch.isfinite(norm):
        optimizer.zero_grad(set_to_none=True)
        return float("nan")
    optimizer.step()
    return float(norm)


def _nanmean(values: list[float]) -> float:
    return float(np.nanmean(values)) if not np.isnan(values).all() else float("nan")
