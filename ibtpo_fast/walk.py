"""Python front of the native tree walk (csrc/walk.cpp)."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ibtpo_fast import _native
from ibtpo_fast.forest import Forest

STEP_PROBS = ("geomean", "product")


@dataclass(frozen=True)
class WalkResult:
    """Per-node arrays (NaN where undefined) and per-tree arrays of one walk over a Forest."""

    leaves: np.ndarray  # int64: leaves below each node (a leaf counts itself)
    correct: np.ndarray  # sum of leaf rewards below
    p: np.ndarray  # correct / leaves
    step_prob: np.ndarray  # pi(v) under the rollout policy; NaN on roots
    ib_score: np.ndarray  # IB(v) on non-leaves
    cov_eta: np.ndarray  # Cov(eta1, eta2) over children, nodes with >= 2 children
    adv_global: np.ndarray
    adv_ib: np.ndarray
    advantage: np.ndarray  # A_GL + lam * A_IB; NaN on roots
    num_children: np.ndarray  # int32
    tree_mean: np.ndarray  # per tree: p(root)
    tree_std: np.ndarray  # per tree: leaf-reward std (n - 1), 0 with one leaf
    effective: np.ndarray  # per tree: leaf rewards not all equal

    @property
    def ib_score_mean(self) -> float:
        """Mean IB-Score over non-leaf nodes (the `ib/score_mean` metric)."""
        return _nanmean(self.ib_score)

    @property
    def cov_eta_mean(self) -> float:
        """Mean Cov(eta1, eta2) over nodes with >= 2 children (the `ib/cov_eta` metric)."""
        return _nanmean(self.cov_eta)


def _nanmean(x: np.ndarray) -> float:
    x = x[~np.isnan(x)]
    return float(x.mean()) if len(x) else float("nan")


def walk(
    forest: Forest,
    beta: float = 5.0,
    lam: float = 0.1,
    eps: float = 1e-6,
    step_prob: str = "geomean",
) -> WalkResult:
    """Leaves, p, IB-Score, Cov(eta1, eta2) and step-level advantages in one native pass.

    Raises ValueError naming the first bad node for a malformed forest.
    """
    out = _native.walk(
        forest.parent, forest.tree, forest.logprob_sum, forest.num_tokens, forest.reward,
        forest.num_trees, beta=beta, lam=lam, eps=eps, step_prob=step_prob,
    )
    return WalkResult(**out)
