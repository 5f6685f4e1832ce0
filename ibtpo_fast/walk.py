"""Python front of the native tree walk (csrc/walk.cpp)."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ibtpo_fast import _native
from ibtpo_fast.forest import Forest

STEP_PROBS = ("geomean", "product")
# IB(v) over v's children: (1 + beta) times their mean of eta1 * eta2, or their sum divided by the tree's B
IB_NORMS = ("mean", "sum")


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
    step_prob: str = "product",
    ib_norm: str = "mean",
    branch_width: int = 1,
) -> WalkResult:
    """Leaves, p, IB-Score, Cov(eta1, eta2) and step-level advantages in one native pass.

    `ib_norm="sum"` scales the native walk's mean-over-children IB-Score by m(v) / `branch_width`, the
    reading of docs/algorithm.md section 2 that divides by the tree's B rather than by the child count.
    Raises ValueError naming the first bad node for a malformed forest.
    """
    if ib_norm not in IB_NORMS:
        raise ValueError(f"ib_norm must be one of {', '.join(IB_NORMS)}, got {ib_norm!r}")
    out = _native.walk(
        forest.parent, forest.tree, forest.logprob_sum, forest.num_tokens, forest.reward,
        forest.num_trees, beta=beta, lam=lam, eps=eps, step_prob=step_prob,
    )
    if ib_norm == "sum":
        out["ib_score"] = out["ib_score"] * out["num_children"] / branch_width
    return WalkResult(**out)
