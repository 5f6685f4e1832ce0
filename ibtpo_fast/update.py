"""The policy update on one training batch: PPO epochs over mini-batches of the clipped loss.

`ppo_update(model, optimizer, batch, settings)` is all a caller needs (the trainer, a distributed
worker, another framework's loop): reference log-probs, the loss, backward, gradient clipping and
the optimizer step, with a guard that skips a mini-batch whose loss or gradient is not finite.
The learning-rate schedule and what to do after skipped updates stay with the caller.
"""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch

from ibtpo_fast.losses import ppo_clip_loss, token_coefficients
from ibtpo_fast.packing import TrainBatch
from ibtpo_fast.policy import token_logprobs

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
               settings: UpdateSettings, ref_model: torch.nn.Module | None = None) -> dict[str, float]:
    """`settings.ppo_epochs` passes over `batch` in `settings.mini_batches` shuffled mini-batches (numpy's
    global RNG), one optimizer step each. Returns the loss statistics averaged over mini-batches and
    `train/skipped_minibatches`."""
    if settings.kl_coef > 0 and ref_model is None:
        raise ValueError("kl_coef > 0 needs a reference model")
    with deterministic_algorithms(settings.deterministic):
        ref_logp = reference_logprobs(ref_model, batch, settings) if settings.kl_coef > 0 else None
        model.train()
        stats: dict[str, list[float]] = {}
        order = np.arange(batch.num_rows)
        for _ in range(settings.ppo_epochs):
            np.random.shuffle(order)
            for rows in np.array_split(order, min(settings.mini_batches, batch.num_rows)):
                mb_ref = None if ref_logp is None else ref_logp[torch.isin(batch.rows, torch.as_tensor(rows))]
                loss, s = minibatch_loss(model, batch.select(rows), settings, mb_ref)
                s["actor/grad_norm"] = _step(model, optimizer, loss, settings.grad_clip)
                for k, v in s.items():
                    stats.setdefault(k, []).append(v)
    out = {k: _nanmean(v) for k, v in stats.items()}
    out[SKIPPED] = float(np.isnan(stats["actor/grad_norm"]).sum())
    return out


def minibatch_loss(model: torch.nn.Module, mb: TrainBatch, settings: UpdateSettings,
                   ref_logp: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """The aggregated PPO-clip loss of one mini-batch and its statistics."""
    logp, entropy = token_logprobs(model, mb, settings.temperature, settings.tree_attention)
    dev = logp.device
    coef = token_coefficients(settings.loss_agg, mb.mult, mb.seq_share, mb.num_traj).to(dev) * mb.prefix_w.to(dev)
    return ppo_clip_loss(logp, mb.old_logp.to(dev), mb.advantages.to(dev), coef, clip_low=settings.clip_low,
                         clip_high=settings.clip_high, ref_logp=None if ref_logp is None else ref_logp.to(dev),
                         kl_coef=settings.kl_coef, entropy=entropy, entropy_coef=settings.entropy_coef)


@torch.no_grad()
def reference_logprobs(ref_model: torch.nn.Module, batch: TrainBatch, settings: UpdateSettings) -> torch.Tensor:
    logp, _ = token_logprobs(ref_model, batch, settings.temperature, settings.tree_attention)
    return logp.float().cpu()


def _step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, loss: torch.Tensor, grad_clip: float) -> float:
    """Backward and optimizer step; the gradient norm, or NaN when a non-finite loss or gradient skipped it."""
    optimizer.zero_grad(set_to_none=True)
    if torch.isfinite(loss):
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip or float("inf"))
    else:
        norm = loss.detach()
    if not torch.isfinite(norm):
        optimizer.zero_grad(set_to_none=True)
        return float("nan")
    optimizer.step()
    return float(norm)


def _nanmean(values: list[float]) -> float:
    return float(np.nanmean(values)) if not np.isnan(values).all() else float("nan")
