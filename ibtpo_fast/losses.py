"""Policy loss (docs/algorithm.md section 5) and its token aggregation, in one registry.

Every aggregation mode is a per-token coefficient c_t with loss = sum_t c_t * loss_t, so the
flattened-trajectory batch and a tree-packed batch (where a token stands for every trajectory
through it) share one loss function and give the same loss.
"""
from __future__ import annotations

from collections.abc import Callable

import torch

# mode -> (mult [N], seq_share [N], number of trajectories) -> (weights [N], normaliser), where a loss
# token stands for `mult` trajectory tokens and seq_share = sum over them of 1 / trajectory length. The
# coefficient is weights / normaliser; data-parallel ranks sum their normalisers, so that each divides
# by the global batch's and the ranks' losses add up to the single-process loss.
Aggregation = Callable[[torch.Tensor, torch.Tensor, int], tuple[torch.Tensor, float]]


def _token_mean(mult: torch.Tensor, seq_share: torch.Tensor, num_traj: int) -> tuple[torch.Tensor, float]:
    return mult, float(mult.sum())


def _seq_mean_token_mean(mult: torch.Tensor, seq_share: torch.Tensor, num_traj: int) -> tuple[torch.Tensor, float]:
    return seq_share, float(num_traj)


AGGREGATIONS: dict[str, Aggregation] = {
    "token-mean": _token_mean,
    "seq-mean-token-mean": _seq_mean_token_mean,
}


def _aggregate(mode: str, mult: torch.Tensor, seq_share: torch.Tensor, num_traj: int) -> tuple[torch.Tensor, float]:
    if mode not in AGGREGATIONS:
        raise ValueError(f"unknown loss aggregation {mode!r}; choose one of {', '.join(AGGREGATIONS)}")
    return AGGREGATIONS[mode](mult.float(), seq_share.float(), num_traj)


def loss_normaliser(mode: str, mult: torch.Tensor, seq_share: torch.Tensor, num_traj: int) -> float:
    """What the loss of these tokens divides by under `mode` (their token or trajectory count)."""
    return _aggregate(mode, mult, seq_share, num_traj)[1]


def token_coefficients(mode: str, mult: torch.Tensor, seq_share: torch.Tensor, num_traj: int,
                       reduce: Callable[[float], float] | None = None, norm: float | None = None) -> torch.Tensor:
    """Per-token loss coefficients; `reduce` turns this batch's normaliser into the global batch's, and
    `norm`, where given, replaces both (a micro-batch divides by its whole mini-batch's normaliser)."""
    weights, own = _aggregate(mode, mult, seq_share, num_traj)
    if norm is None:
        norm = reduce(own) if reduce else own
    return weights / max(norm, 1.0)


def kl_k3(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Schulman's k3 estimator of KL(pi || ref): exp(ref - logp) - (ref - logp) - 1 >= 0."""
    d = ref_logp - logp
    return torch.exp(d) - d - 1


def ppo_clip_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    coef: torch.Tensor,
    *,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    ref_logp: torch.Tensor | None = None,
    kl_coef: float = 0.0,
    entropy: torch.Tensor | None = None,
    entropy_coef: float = 0.0,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Token-level PPO clip objective with optional k3 KL and entropy bonus; all inputs [N]."""
    ratio = torch.exp(logp - old_logp)
    unclipped = ratio * advantages
    clipped = ratio.clamp(1 - clip_low, 1 + clip_high) * advantages
    per_token = -torch.minimum(unclipped, clipped)
    stats = {"actor/pg_clipfrac": _wmean((clipped < unclipped).float(), coef)}
    stats["actor/pg_loss"] = _wmean(per_token, coef)
    if kl_coef > 0:
        if ref_logp is None:
            raise ValueError("kl_coef > 0 needs ref_logp")
        kl = kl_k3(logp, ref_logp)
        per_token = per_token + kl_coef * kl
        stats["actor/kl"] = _wmean(kl, coef)
    if entropy is not None:
        stats["actor/entropy"] = _wmean(entropy, coef)
        if entropy_coef > 0:
            per_token = per_token - entropy_coef * entropy
    stats["actor/ratio_max"] = float(ratio.detach().max()) if ratio.numel() else 1.0
    return (coef * per_token).sum(), stats


def _wmean(x: torch.Tensor, coef: torch.Tensor) -> float:
    total = coef.sum()
    return float((x.detach() * coef).sum() / total) if total > 0 else 0.0
