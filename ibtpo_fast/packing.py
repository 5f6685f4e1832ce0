"""Turn a walked Forest into training tensors, in one of two layouts.

`flatten`: one right-padded row per trajectory (prompt + path); shared prefixes are repeated.
`pack_trees`: each unique token once, trees packed into rows, positions by depth, attention
restricted to ancestors (`TreeMask`); each loss token stands for every trajectory through it.
Both describe a loss token by `mult` (trajectories through it) and `seq_share` (sum over those
trajectories of 1 / trajectory length), so every loss aggregation gives the same loss and
gradient in both layouts.
"""
from __future__ import annotations

from dataclasses import dataclass, fields

import numba
import numpy as np
import torch

from ibtpo_fast.forest import Forest
from ibtpo_fast.tree_attention import TreeMask, ancestor_table

LAYOUTS = ("tree", "flat")  # pack_trees: each unique token once; flatten: one row per trajectory
PREFIX_WEIGHTINGS = ("none", "sqrt")  # sqrt: a token's loss over sqrt(leaves below its node), as TreeRL


@dataclass
class TrainBatch:
    input_ids: torch.Tensor  # [R, W]
    attention_mask: torch.Tensor  # [R, W]: 1 on tokens, 0 on padding
    position_ids: torch.Tensor  # [R, W]
    # One entry per loss token: target = input_ids[row, col], predicted from the hidden state at pred_col.
    rows: torch.Tensor
    cols: torch.Tensor
    pred_cols: torch.Tensor
    old_logp: torch.Tensor
    advantages: torch.Tensor
    mult: torch.Tensor  # trajectories through the token
    seq_share: torch.Tensor  # sum over those trajectories of 1 / response length
    prefix_w: torch.Tensor  # prefix weighting (1, or 1 / sqrt(leaves below the token's node))
    traj_of_row: torch.Tensor  # [R] trajectories each row stands for
    tree: TreeMask | None = None  # tree-packed rows: who may attend to whom

    @property
    def num_traj(self) -> int:
        return int(self.traj_of_row.sum())

    @property
    def num_rows(self) -> int:
        return len(self.input_ids)

    @property
    def tokens_processed(self) -> int:
        """Positions the decoder runs over, padding included."""
        return int(self.input_ids.numel())

    @property
    def row_widths(self) -> np.ndarray:
        """Each row's width up to its last loss token (what `select` cuts a set of rows to)."""
        width = np.zeros(self.num_rows, np.int64)
        np.maximum.at(width, self.rows.numpy(), self.cols.numpy() + 1)
        return width

    @property
    def targets(self) -> torch.Tensor:
        return self.input_ids[self.rows, self.cols]

    def select(self, rows: np.ndarray) -> TrainBatch:
        """Rows `rows` only (a mini-batch), renumbered from 0 and cut to their width."""
        idx = torch.as_tensor(np.sort(rows), dtype=torch.long)
        keep = torch.isin(self.rows, idx)
        remap = torch.full((self.num_rows,), -1, dtype=torch.long)
        remap[idx] = torch.arange(len(idx))
        width = int(self.cols[keep].max()) + 1 if keep.any() else 1
        per_token = {f.name: getattr(self, f.name)[keep] for f in fields(self)
                     if f.name in ("cols", "pred_cols", "old_logp", "advantages", "mult", "seq_share", "prefix_w")}
        return TrainBatch(self.input_ids[idx, :width], self.attention_mask[idx, :width], self.position_ids[idx, :width],
                          rows=remap[self.rows[keep]], traj_of_row=self.traj_of_row[idx],
                          tree=None if self.tree is None else self.tree.select(idx, width), **per_token)


def _prefix_weights(leaves: np.ndarray, nodes: np.ndarray, mode: str) -> np.ndarray:
    if mode not in PREFIX_WEIGHTINGS:
        raise ValueError(f"prefix_weighting must be one of {', '.join(PREFIX_WEIGHTINGS)}, got {mode!r}")
    return 1.0 / np.sqrt(leaves[nodes]) if mode == "sqrt" else np.ones(len(nodes))


def _tensors(**arrays: np.ndarray) -> dict[str, torch.Tensor]:
    out = {}
    for k, a in arrays.items():
        a = np.ascontiguousarray(a)
        out[k] = torch.from_numpy(a.astype(np.float32) if a.dtype.kind == "f" else a.astype(np.int64))
    return out


def flatten(forest: Forest, advantage: np.ndarray, leaves: np.ndarray, pad_id: int,
            prefix_weighting: str = "none") -> TrainBatch:
    trajs = forest.trajectories()
    width = max(len(t.input_ids) for t in trajs)
    ids = np.full((len(trajs), width), pad_id, np.int64)
    attn = np.zeros((len(trajs), width), np.int64)
    rows, cols, nodes, old, share = [], [], [], [], []
    for s, t in enumerate(trajs):
        n = len(t.input_ids)
        ids[s, :n], attn[s, :n] = t.input_ids, 1
        pos = np.flatnonzero(t.loss_mask)
        rows.append(np.full(len(pos), s))
        cols.append(pos)
        nodes.append(t.node_index[pos])
        old.append(t.old_logprobs[pos])
        share.append(np.full(len(pos), 1.0 / len(pos)))
    rows_a, cols_a, nodes_a = np.concatenate(rows), np.concatenate(cols), np.concatenate(nodes)
    return TrainBatch(**_tensors(
        input_ids=ids, attention_mask=attn, position_ids=np.broadcast_to(np.arange(width), ids.shape),
        rows=rows_a, cols=cols_a, pred_cols=cols_a - 1, old_logp=np.concatenate(old),
        advantages=advantage[nodes_a], mult=np.ones(len(rows_a)), seq_share=np.concatenate(share),
        prefix_w=_prefix_weights(leaves, nodes_a, prefix_weighting), traj_of_row=np.ones(len(trajs)),
    ))


def _rows_for_trees(tree_len: np.ndarray, row_width: int = 0) -> tuple[np.ndarray, np.ndarray, int]:
    """First-fit decreasing: several small trees share a row as wide as the widest tree (or `row_width`,
    where wider), so rows carry little padding. Returns each tree's row and column offset, and the
    number of rows."""
    width = max(int(tree_len.max()), row_width)
    row_of, offset = np.zeros(len(tree_len), np.int64), np.zeros(len(tree_len), np.int64)
    fill: list[int] = []
    for t in np.argsort(-tree_len, kind="stable"):
        r = next((i for i, used in enumerate(fill) if used + tree_len[t] <= width), len(fill))
        if r == len(fill):
            fill.append(0)
        row_of[t], offset[t] = r, fill[r]
        fill[r] += int(tree_len[t])
    return row_of, offset, len(fill)


def _balanced_rows(tree_len: np.ndarray, num_rows: int) -> tuple[np.ndarray, np.ndarray, int]:
    """Largest tree first into the emptiest of `num_rows` rows: rows of near-equal width."""
    row_of, offset = np.zeros(len(tree_len), np.int64), np.zeros(len(tree_len), np.int64)
    fill = np.zeros(num_rows, np.int64)
    for t in np.argsort(-tree_len, kind="stable"):
        r = int(np.argmin(fill))
        row_of[t], offset[t] = r, fill[r]
        fill[r] += tree_len[t]
    return row_of, offset, num_rows


@numba.njit(cache=True)
def _tree_layout(parent, tree, token_start, token_end, num_trees):
    """Per node: first column within its tree and the position of its first token; per tree: length."""
    n = len(parent)
    tree_len = np.zeros(num_trees, np.int64)
    col0 = np.zeros(n, np.int64)
    pos0 = np.zeros(n, np.int64)
    for v in range(n):  # parents precede children: columns follow node order within a tree
        t = tree[v]
        col0[v] = tree_len[t]
        tree_len[t] += token_end[v] - token_start[v]
        u = parent[v]
        if u >= 0:
            pos0[v] = pos0[u] + token_end[u] - token_start[u]
    return col0, pos0, tree_len


@numba.njit(cache=True)
def _seq_share(parent, num_children, leaf_len):
    """Per node: sum over the leaves below it of 1 / (response length of the leaf's trajectory)."""
    n = len(parent)
    share = np.zeros(n)
    for v in range(n - 1, -1, -1):
        if num_children[v] == 0 and parent[v] >= 0:
            share[v] += 1.0 / leaf_len[v]
        if parent[v] >= 0:
            share[parent[v]] += share[v]
    return share


def pack_trees(forest: Forest, advantage: np.ndarray, leaves: np.ndarray, pad_id: int,
               prefix_weighting: str = "none", num_rows: int | None = None, row_width: int = 0,
               min_rows: int = 1) -> TrainBatch:
    """Rows as wide as the widest tree or `row_width` (`num_rows=None`: a mask's size is quadratic in
    the width; micro-batches want rows within their token budget), or `num_rows` rows sharing the trees
    evenly, with next to no padding (for gather attention, whose cost does not grow with the width).
    At least `min_rows` rows, one for each mini-batch: where first-fit leaves fewer, the trees share
    `min_rows` rows evenly."""
    parent, tree, n_tok = forest.parent, forest.tree, forest.num_tokens
    T = forest.num_trees
    if max(num_rows or 0, min_rows) > T:
        raise ValueError(f"{T} trees cannot fill {max(num_rows or 0, min_rows)} rows: a row holds whole trees")
    col0, pos0, tree_len = _tree_layout(parent, tree, forest.token_start, forest.token_end, T)
    if num_rows is None:
        row_of, offset, R = _rows_for_trees(tree_len, row_width)
        num_rows = min_rows if R < min_rows else None
    if num_rows is not None:
        row_of, offset, R = _balanced_rows(tree_len, num_rows)
    width = int((offset + tree_len).max())
    node_of = np.repeat(np.arange(len(forest)), n_tok)  # flat token -> node
    within = np.arange(len(node_of)) - forest.token_start[node_of]  # index within its node
    tok_tree = tree[node_of]
    row, col = row_of[tok_tree], offset[tok_tree] + col0[node_of] + within
    ids = np.full((R, width), pad_id, np.int64)
    ids[row, col] = forest.tokens
    pos = np.zeros((R, width), np.int64)
    pos[row, col] = pos0[node_of] + within
    node_at = np.full((R, width), -1, np.int64)
    node_at[row, col] = node_of
    # Loss tokens: response tokens; the first token of a node is predicted from its parent's last.
    is_loss = parent[node_of] >= 0
    up = np.maximum(parent[node_of], 0)
    pred = np.where(within == 0, offset[tok_tree] + col0[up] + n_tok[up] - 1, col - 1)
    share = _seq_share(parent, forest.num_children, forest.response_lengths().astype(np.float64))
    nodes = node_of[is_loss]
    traj = np.bincount(row_of, weights=leaves[forest.roots], minlength=R)
    depth = forest.depth().astype(np.int64)
    mask = TreeMask(torch.from_numpy(node_at), torch.from_numpy(ancestor_table(parent, depth)), torch.from_numpy(depth))
    return TrainBatch(**_tensors(
        input_ids=ids, attention_mask=node_at >= 0, position_ids=pos, rows=row[is_loss], cols=col[is_loss],
        pred_cols=pred[is_loss], old_logp=forest.token_logprobs[is_loss], advantages=advantage[nodes],
        mult=leaves[nodes].astype(np.float64),
        seq_share=share[nodes], prefix_w=_prefix_weights(leaves, nodes, prefix_weighting),
        traj_of_row=traj.astype(np.int64),
    ), tree=mask)
