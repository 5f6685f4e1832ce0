"""Attention restricted to ancestors, for tree-packed rows.

A tree-packed row holds the unique tokens of one or more trees, each node's tokens after its
ancestors'. Token q reads token k iff k's node is an ancestor-or-self of q's node and k <= q.
`TreeMask` states that rule compactly (the node at each column; each node's ancestor at every
depth) and serves it three ways, chosen by `train.tree_attention`:

- `gather`: each chain of columns (a node and the descendants laid out right after it) reads its
  ancestors' keys, gathered, and its own, causally: SDPA over [chains, chain length, path length].
  Attention costs what it costs on flattened trajectories, while every projection and MLP runs
  once per unique token. Works on CPU and CUDA, whatever attention the model was loaded with.
- `mask`: a dense additive [R, 1, W, W] mask for the model's own sdpa or eager attention. The
  reference; cost and memory grow with the square of the row width.
- `flex`: a FlexAttention BlockMask of the same rule, block-sparse without gathering; the default on
  CUDA, where it trains fastest. torch has no FlexAttention backward on CPU, so it needs CUDA.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numba
import numpy as np
import torch
import torch.nn.functional as F
from transformers import AttentionInterface

GATHER_ATTENTION = "ibtpo_gather"
TREE_ATTENTION_BACKENDS = ("gather", "mask", "flex")


@numba.njit(cache=True)
def ancestor_table(parent: np.ndarray, depth: np.ndarray) -> np.ndarray:
    """up[v, d]: the ancestor of node v at depth d (v itself at its own depth), -1 below v."""
    up = np.full((len(parent), depth.max() + 1 if len(parent) else 1), -1, np.int64)
    for v in range(len(parent)):  # parents precede children
        d = depth[v]
        if d > 0:
            up[v, :d] = up[parent[v], :d]
        up[v, d] = v
    return up


@dataclass
class Chains:
    """Gather indices of one packed batch: chain c's queries sit at flat columns (row * W + col)
    q_index[c][q_valid[c]]; its keys are its ancestors' columns, then its own, at k_index[c]."""

    q_index: torch.Tensor  # [C, Lq]
    k_index: torch.Tensor  # [C, Lk]
    mask: torch.Tensor  # [C, 1, Lq, Lk] bool
    q_valid: torch.Tensor  # [C, Lq] bool
    calls: int = 0  # attention layers that ran on these chains

    def to(self, device: torch.device) -> Chains:
        return Chains(self.q_index.to(device), self.k_index.to(device), self.mask.to(device), self.q_valid.to(device))


@numba.njit(cache=True)
def _chain_arrays(node_at, up, depth):
    R, W = node_at.shape
    start = np.full(up.shape[0], -1, np.int64)  # flat column of each node's first token
    length = np.zeros(up.shape[0], np.int64)
    head_col, head_node, q_len = [0], [0], [0]  # one dummy entry types the lists for numba
    for r in range(R):
        for c in range(W):
            v = node_at[r, c]
            if v < 0:
                continue
            if start[v] < 0:
                start[v] = r * W + c
            length[v] += 1
            prev = node_at[r, c - 1] if c > 0 else -1
            if prev >= 0 and (prev == v or (depth[v] > 0 and up[v, depth[v] - 1] == prev)):
                q_len[-1] += 1  # the same node, or its child laid right after it: the chain goes on
            else:
                head_col.append(r * W + c)
                head_node.append(v)
                q_len.append(1)
    C = len(head_col) - 1
    n_anc = np.zeros(C, np.int64)
    for i in range(C):
        v = head_node[i + 1]
        for d in range(depth[v]):
            n_anc[i] += length[up[v, d]]
    lens = np.array(q_len[1:], np.int64)
    q_index = np.zeros((C, max(lens.max(), 1) if C else 1), np.int64)
    k_index = np.zeros((C, max((n_anc + lens).max(), 1) if C else 1), np.int64)
    for i in range(C):
        v, f = head_node[i + 1], head_col[i + 1]
        k = 0
        for d in range(depth[v]):
            u = up[v, d]
            for j in range(length[u]):
                k_index[i, k] = start[u] + j
                k += 1
        for j in range(lens[i]):
            q_index[i, j] = f + j
            k_index[i, k + j] = f + j
    return q_index, k_index, lens, n_anc


@dataclass
class TreeMask:
    """Which column of a packed row may attend to which."""

    node_at: torch.Tensor  # [R, W] node index (the forest's) at each column, -1 on padding
    up: torch.Tensor  # [N, max depth + 1] ancestor table, see `ancestor_table`
    depth: torch.Tensor  # [N]

    def select(self, rows: torch.Tensor, width: int) -> TreeMask:
        return TreeMask(self.node_at[rows, :width], self.up, self.depth)

    def allowed(self, b: torch.Tensor, q: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
        """The rule, on broadcast index tensors (dense masks) or scalars (FlexAttention's mask_mod).
        Padding columns attend only to themselves, so no softmax row is empty."""
        nq, nk = self.node_at[b, q], self.node_at[b, kv]
        is_ancestor = self.up[nq.clamp(min=0), self.depth[nk.clamp(min=0)]] == nk
        return ((nq >= 0) & (nk >= 0) & (kv <= q) & is_ancestor) | (q == kv)

    def dense(self, dtype: torch.dtype) -> torch.Tensor:
        R, W = self.node_at.shape
        cols = torch.arange(W)
        ok = self.allowed(torch.arange(R)[:, None, None], cols[None, :, None], cols[None, None, :])
        return torch.zeros((R, 1, W, W), dtype=dtype).masked_fill_(~ok[:, None], torch.finfo(dtype).min)

    def block_mask(self, device: torch.device) -> Any:
        from torch.nn.attention.flex_attention import create_block_mask

        moved = TreeMask(self.node_at.to(device), self.up.to(device), self.depth.to(device))
        R, W = self.node_at.shape
        return create_block_mask(lambda b, h, q, kv: moved.allowed(b, q, kv), R, None, W, W, device=device)

    def chains(self) -> Chains:
        q_index, k_index, q_len, n_anc = (torch.from_numpy(a) for a in _chain_arrays(
            self.node_at.numpy(), self.up.numpy(), self.depth.numpy()))
        i = torch.arange(q_index.shape[1])[None, :, None]
        own = torch.arange(k_index.shape[1])[None, None, :] - n_anc[:, None, None]  # < 0: an ancestor's key
        q_valid = i < q_len[:, None, None]
        mask = (q_valid & (own <= i)) | (~q_valid & (own == -n_anc[:, None, None]))  # a padding query reads key 0
        return Chains(q_index, k_index, mask[:, None], q_valid[:, :, 0])


def gather_attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                             attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                             tree_chains: Chains | None = None, **kwargs: Any) -> tuple[torch.Tensor, None]:
    """transformers attention function: [R, H, W, D] tensors in, [R, W, H, D] out."""
    if tree_chains is None:
        raise ValueError(f"attention '{GATHER_ATTENTION}' needs tree_chains; call it through ibtpo_fast.policy")
    if kwargs.get("sliding_window") is not None or kwargs.get("softcap") is not None:
        raise ValueError("gather tree attention supports neither sliding windows nor softcapping; "
                         "set train.tree_attention=mask or train.layout=flat")
    R, H, W, D = query.shape
    flat_q = query.transpose(1, 2).reshape(R * W, H, D)
    flat_k = key.transpose(1, 2).reshape(R * W, key.shape[1], D)
    flat_v = value.transpose(1, 2).reshape(R * W, value.shape[1], D)
    q = flat_q[tree_chains.q_index].transpose(1, 2)  # [C, H, Lq, D]
    k = flat_k[tree_chains.k_index].transpose(1, 2)
    v = flat_v[tree_chains.k_index].transpose(1, 2)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=tree_chains.mask, scale=scaling,
                                         dropout_p=dropout if module.training else 0.0, enable_gqa=H != k.shape[1])
    valid = tree_chains.q_valid
    rows = out.transpose(1, 2)[valid]  # [tokens, H, D]
    full = rows.new_zeros(R * W, H, D).index_copy(0, tree_chains.q_index[valid], rows)
    tree_chains.calls += 1
    return full.view(R, W, H, D), None


AttentionInterface.register(GATHER_ATTENTION, gather_attention_forward)
