"""Turn a walked Forest into training tensors, in one of two layouts.

`flatten`: one right-padded row per trajectory (prompt + path); shared prefixes are repeated.
`pack_trees`: each unique token once, trees packed into rows (first-fit), attention restricted
to ancestors in the same tree by a 4D mask, positions by depth; each loss token stands for every trajectory through
it. Both describe a loss token by `mult` (trajectories through it) and `seq_share` (sum over
those trajectories of 1 / trajectory length), so every loss aggregation gives the same loss and
gradient in both layouts.
"""
from __future__ import annotations

from dataclasses import dataclass, fields

import numba
import numpy as np
import torch

from ibtpo_fast.forest import Forest


@dataclass
class TrainBatch:
    input_ids: torch.Tensor  # [R, W]
    attention_mask: torch.Tensor  # [R, W] (flattened) or [R, 1, W, W] additive float (tree-packed)
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
    def targets(self) -> torch.Tensor:
        return self.input_ids[self.rows, self.cols]

    def select(self, rows: np.ndarray) -> "TrainBatch":
        """Rows `rows` only (a mini-batch), renumbered from 0 and cut to their width."""
        idx = torch.as_tensor(np.sort(rows), dtype=torch.long)
        keep = torch.isin(self.rows, idx)
        remap = torch.full((self.num_rows,), -1, dtype=torch.long)
        remap[idx] = torch.arange(len(idx))
        width = int(self.cols[keep].max()) + 1 if keep.any() else 1
        mask = self.attention_mask[idx]
        mask = mask[..., :width, :width] if mask.ndim == 4 else mask[:, :width]
        per_token = {f.name: getattr(self, f.name)[keep] for f in fields(self)
                     if f.name in ("cols", "pred_cols", "old_logp", "advantages", "mult", "seq_share", "prefix_w")}
        return TrainBatch(self.input_ids[idx, :width], mask, self.position_ids[idx, :width], rows=remap[self.rows[keep]],
                          traj_of_row=self.traj_of_row[idx], **per_token)


def _prefix_weights(leaves: np.ndarray, nodes: np.ndarray, mode: str) -> np.ndarray:
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


def _rows_for_trees(tree_len: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    """First-fit decreasing: several small trees share a row as wide as the widest tree, so rows
    carry little padding. Returns each tree's row and column offset, and the number of rows."""
    width = int(tree_len.max())
    row_of, offset = np.zeros(len(tree_len), np.int64), np.zeros(len(tree_len), np.int64)
    fill: list[int] = []
    for t in np.argsort(-tree_len, kind="stable"):
        r = next((i for i, used in enumerate(fill) if used + tree_len[t] <= width), len(fill))
        if r == len(fill):
            fill.append(0)
        row_of[t], offset[t] = r, fill[r]
        fill[r] += int(tree_len[t])
    return row_of, offset, len(fill)


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
def _ancestor_closure(parent, tree, num_trees):
    """local[v]: index of v within its tree; anc[t][i, j]: node j of tree t is an ancestor-or-self of node i."""
    n = len(parent)
    local = np.zeros(n, np.int64)
    count = np.zeros(num_trees, np.int64)
    for v in range(n):
        local[v] = count[tree[v]]
        count[tree[v]] += 1
    size = count.max()
    anc = np.zeros((num_trees, size, size), np.bool_)
    for v in range(n):
        t, i = tree[v], local[v]
        anc[t, i, i] = True
        u = parent[v]
        if u >= 0:
            anc[t, i, : count[t]] |= anc[t, local[u], : count[t]]
    return local, anc


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
               prefix_weighting: str = "none", dtype: torch.dtype = torch.float32) -> TrainBatch:
    parent, tree, n_tok = forest.parent, forest.tree, forest.num_tokens
    T = forest.num_trees
    col0, pos0, tree_len = _tree_layout(parent, tree, forest.token_start, forest.token_end, T)
    row_of, offset, R = _rows_for_trees(tree_len)
    local, anc = _ancestor_closure(parent, tree, T)
    width = int(tree_len.max())
    node_of = np.repeat(np.arange(len(forest)), n_tok)  # flat token -> node
    within = np.arange(len(node_of)) - forest.token_start[node_of]  # index within its node
    tok_tree = tree[node_of]
    row, col = row_of[tok_tree], offset[tok_tree] + col0[node_of] + within
    ids = np.full((R, width), pad_id, np.int64)
    ids[row, col] = forest.tokens
    pos = np.zeros((R, width), np.int64)
    pos[row, col] = pos0[node_of] + within
    tree_at = np.full((R, width), -1, np.int64)
    tree_at[row, col] = tok_tree
    node_local = np.zeros((R, width), np.int64)
    node_local[row, col] = local[node_of]
    mask = _token_mask(anc, tree_at, node_local, dtype)
    # Loss tokens: response tokens; the first token of a node is predicted from its parent's last.
    is_loss = parent[node_of] >= 0
    up = np.maximum(parent[node_of], 0)
    pred = np.where(within == 0, offset[tok_tree] + col0[up] + n_tok[up] - 1, col - 1)
    share = _seq_share(parent, forest.num_children, forest.response_lengths().astype(np.float64))
    nodes = node_of[is_loss]
    traj = np.bincount(row_of, weights=leaves[forest.roots], minlength=R)
    return TrainBatch(**_tensors(
        input_ids=ids, position_ids=pos, rows=row[is_loss], cols=col[is_loss], pred_cols=pred[is_loss],
        old_logp=forest.token_logprobs[is_loss], advantages=advantage[nodes], mult=leaves[nodes].astype(np.float64),
        seq_share=share[nodes], prefix_w=_prefix_weights(leaves, nodes, prefix_weighting),
        traj_of_row=traj.astype(np.int64),
    ), attention_mask=mask)


def _token_mask(anc: np.ndarray, tree_at: np.ndarray, node_local: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    """Additive [R, 1, W, W] mask: 0 where attention is allowed, the dtype's minimum elsewhere.

    Token i sees token j iff both belong to the same tree, j's node is an ancestor-or-self of i's
    node, and j <= i (a node's tokens follow its ancestors' in the row)."""
    R, W = tree_at.shape
    t = np.maximum(tree_at, 0)
    allowed = anc[t[:, :, None], node_local[:, :, None], node_local[:, None, :]]  # [R, W, W]
    allowed &= (tree_at[:, :, None] == tree_at[:, None, :]) & (tree_at[:, None, :] >= 0)
    allowed &= np.tril(np.ones((W, W), np.bool_))[None]
    allowed[:, np.arange(W), np.arange(W)] = True  # padding attends to itself: no NaN rows
    mask = torch.zeros((R, 1, W, W), dtype=dtype)
    mask.masked_fill_(~torch.from_numpy(allowed)[:, None], torch.finfo(dtype).min)
    return mask
