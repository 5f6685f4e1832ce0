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

With `max_tokens_per_micro_batch` a mini-batch runs as micro-batches of rows whose padded size
(rows x widest row) stays within the budget, each one forward and backward, the gradients
accumulated before the one optimizer step: every micro-batch divides by its whole mini-batch's
normaliser, so the update is the unsplit one. Ranks agree on the number of micro-batches (a rank with
fewer rows runs zero-weight ones), so all run the same collectives. The loss statistics returned are
those of the global mini-batches, reduced over the ranks, so every rank returns the same.
"""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch

from ibtpo_fast.distributed import SINGLE, World, whole
from ibtpo_fast.losses import loss_normaliser, ppo_clip_loss, token_coefficients
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
    max_tokens_per_micro_batch: int = 0  # padded tokens a forward and backward may hold; 0: a whole mini-batch


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
    global RNG), one optimizer step each: the same number on every rank of `world`, each of which must hold
    at least `mini_batches` rows. Returns the loss statistics of the global mini-batches (all ranks' rows), averaged
    over mini-batches, and `train/skipped_minibatches`."""
    if settings.kl_coef > 0 and ref_model is None:
        raise ValueError("kl_coef > 0 needs a reference model")
    if batch.num_rows < settings.mini_batches:  # fewer steps here than on other ranks would stall them all
        raise ValueError(f"{batch.num_rows} rows cannot fill {settings.mini_batches} mini-batches: pack at least as "
                         "many rows (pack_trees(min_rows=...)) or use fewer train.mini_batches")
    policy = as_logprob_module(model)
    with deterministic_algorithms(settings.deterministic):
        ref_logp = reference_logprobs(ref_model, batch, settings, world) if settings.kl_coef > 0 else None
        policy.train()
        stats: dict[str, list[float]] = {}
        order = np.arange(batch.num_rows)
        for _ in range(settings.ppo_epochs):
            np.random.shuffle(order)
            for rows in np.array_split(order, settings.mini_batches):
                mb_ref = None if ref_logp is None else ref_logp[torch.isin(batch.rows, torch.as_tensor(rows))]
                s = _minibatch_step(policy, optimizer, batch.select(rows), settings, mb_ref, world)
                for k, v in s.items():
                    stats.setdefault(k, []).append(v)
    out = {k: _nanmean(v) for k, v in stats.items()}
    out[SKIPPED] = float(np.isnan(stats["actor/grad_norm"]).sum())
    return out


def minibatch_loss(model: torch.nn.Module, mb: TrainBatch, settings: UpdateSettings,
                   ref_logp: torch.Tensor | None = None, world: World = SINGLE,
                   norm: float | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """The aggregated PPO-clip loss of one mini-batch and its statistics; with several ranks, this rank's
    share of the global mini-batch's loss, scaled for the wrappers' gradient averaging. `norm`: the global
    normaliser to divide by, where `mb` is a micro-batch of a larger mini-batch."""
    logp, entropy = as_logprob_module(model)(mb, settings.temperature, settings.tree_attention)
    dev = logp.device
    coef = _coefficients(mb, settings, world, norm).to(dev)
    loss, stats = ppo_clip_loss(logp, mb.old_logp.to(dev), mb.advantages.to(dev), coef, clip_low=settings.clip_low,
                                clip_high=settings.clip_high, ref_logp=None if ref_logp is None else ref_logp.to(dev),
                                kl_coef=settings.kl_coef, entropy=entropy, entropy_coef=settings.entropy_coef)
    return loss * world.size, stats


def _coefficients(mb: TrainBatch, settings: UpdateSettings, world: World, norm: float | None) -> torch.Tensor:
    reduce = world.sum if world.size > 1 else None
    return token_coefficients(settings.loss_agg, mb.mult, mb.seq_share, mb.num_traj, reduce, norm) * mb.prefix_w


def micro_batches(mb: TrainBatch, max_tokens: int) -> list[np.ndarray]:
    """Groups of `mb`'s rows, widest first, each within `max_tokens` padded tokens (rows x its widest row);
    a row wider than the budget alone, since a row (a trajectory, or whole trees) is never cut."""
    width = mb.row_widths
    groups: list[list[int]] = []
    for r in np.argsort(-width, kind="stable"):
        if groups and (len(groups[-1]) + 1) * width[groups[-1][0]] <= max_tokens:
            groups[-1].append(int(r))
        else:
            groups.append([int(r)])
    return [np.array(g) for g in groups]


def _minibatch_step(policy: torch.nn.Module, optimizer: torch.optim.Optimizer, mb: TrainBatch,
                    settings: UpdateSettings, ref_logp: torch.Tensor | None, world: World) -> dict[str, float]:
    """One optimizer step on mini-batch `mb`: the loss statistics of the global mini-batch (every rank's rows)
    and `actor/grad_norm` (NaN: skipped)."""
    optimizer.zero_grad(set_to_none=True)
    if not settings.max_tokens_per_micro_batch:
        loss, stats = minibatch_loss(policy, mb, settings, ref_logp, world)
        finite = _backward(loss, world)
        weight = _weight(mb, settings, world)
    else:
        stats, weight, finite = _accumulate(policy, mb, settings, ref_logp, world)
    stats = _over_ranks(stats, weight, world) if stats else stats  # empty on every rank alike: a skipped split
    stats["actor/grad_norm"] = _step(policy, optimizer, finite, settings.grad_clip)
    return stats


def _weight(mb: TrainBatch, settings: UpdateSettings, world: World) -> float:
    """The loss weight of `mb`'s tokens, before any normaliser: what weights its loss statistics' means."""
    return float(_coefficients(mb, settings, world, 1.0).sum())


def _over_ranks(stats: dict[str, float], weight: float, world: World) -> dict[str, float]:
    """One mini-batch's statistics over every rank's share of it (each rank's `stats` weighted by its loss
    `weight`, maxima maxed), as one process computes them on the whole mini-batch: the same on every rank."""
    if world.size == 1:
        return stats
    means = sorted(k for k in stats if k != "actor/ratio_max")
    totals = world.sums([stats[k] * weight for k in means] + [weight])
    out = {k: v / totals[-1] if totals[-1] > 0 else 0.0 for k, v in zip(means, totals)}
    if "actor/ratio_max" in stats:
        out["actor/ratio_max"] = world.max(stats["actor/ratio_max"])
    return out


def _accumulate(policy: torch.nn.Module, mb: TrainBatch, settings: UpdateSettings, ref_logp: torch.Tensor | None,
                world: World) -> tuple[dict[str, float], float, bool]:
    """Forward and backward of each micro-batch of `mb`, gradients accumulating; the statistics weighted as
    the unsplit mini-batch's, their loss weight, and whether every loss was finite on every rank."""
    norm = world.sum(loss_normaliser(settings.loss_agg, mb.mult, mb.seq_share, mb.num_traj))
    groups: list[np.ndarray | None] = list(micro_batches(mb, settings.max_tokens_per_micro_batch))
    groups += [None] * (int(world.max(len(groups))) - len(groups))  # None: a zero-weight pass, for the collectives
    parts: list[tuple[dict[str, float], float]] = []
    for rows in groups:
        chosen = rows if rows is not None else np.arange(1)
        sub = mb.select(chosen)
        sub_ref = None if ref_logp is None else ref_logp[torch.isin(mb.rows, torch.as_tensor(chosen))]
        loss, s = minibatch_loss(policy, sub, settings, sub_ref, world, norm)
        if rows is None:
            loss = loss * 0.0
        if not _backward(loss, world):
            return {}, 0.0, False
        if rows is not None:
            parts.append((s, _weight(sub, settings, world)))
    return _combine(parts), sum(w for _, w in parts), True


def _combine(parts: list[tuple[dict[str, float], float]]) -> dict[str, float]:
    """Micro-batch statistics as the whole mini-batch's: means weighted by loss weight, maxima maxed."""
    total = sum(w for _, w in parts)
    out = {}
    for key in parts[0][0]:
        values = [s[key] for s, _ in parts]
        if key == "actor/ratio_max":
            out[key] = max(values)
        else:
            out[key] = sum(v * w for v, (_, w) in zip(values, parts)) / total if total > 0 else 0.0
    return out


@torch.no_grad()
def reference_logprobs(ref_model: torch.nn.Module, batch: TrainBatch, settings: UpdateSettings,
                       world: World = SINGLE) -> torch.Tensor:
    """Per-token log-probs of `batch` under `ref_model` (fp32, on the CPU, in the batch's token order), a
    micro-batch at a time under the settings' token budget, every rank running as many forwards."""
    module = as_logprob_module(ref_model)
    budget = settings.max_tokens_per_micro_batch
    if not budget:
        return module(batch, settings.temperature, settings.tree_attention)[0].float().cpu()
    groups: list[np.ndarray | None] = list(micro_batches(batch, budget))
    groups += [None] * (int(world.max(len(groups))) - len(groups))
    out = torch.empty(len(batch.rows))
    for rows in groups:
        chosen = rows if rows is not None else np.arange(1)
        logp = module(batch.select(chosen), settings.temperature, settings.tree_attention)[0]
        if rows is not None:
            out[torch.isin(batch.rows, torch.as_tensor(chosen))] = logp.float().cpu()
    return out


def _backward(loss: torch.Tensor, world: World) -> bool:
    """Backward of `loss` when it is finite on every rank (agreed first, so that all ranks skip together)."""
    if not world.all_true(bool(torch.isfinite(loss))):
        return False
    loss.backward()
    return True


def _step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, finite: bool, grad_clip: float) -> float:
    """Clip and apply the accumulated gradients; their global norm, or NaN when a non-finite loss or gradient
    skipped the step (on every rank alike: `finite` is agreed, the norm is global)."""
    norm = torch.tensor(float("nan"))
    if finite:
        norm = whole(torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip or float("inf")))  # FSDP2: a DTensor
    if not torch.isfinite(norm):
        optimizer.zero_grad(set_to_none=True)
        return float("nan")
    optimizer.step()
    return float(norm)


def _nanmean(values: list[float]) -> float:
    return float(np.nanmean(values)) if not np.isnan(values).all() else float("nan")
