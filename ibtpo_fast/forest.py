"""Forest: every tree of a batch in one flat, topologically ordered struct-of-arrays.

Node i has `parent[i] < i` (-1 for a root), `tree[i]`, and its tokens at
`tokens[token_start[i]:token_end[i]]`. The root holds the prompt; every other node is one step
with its rollout log-probs. Arrays grow by doubling; the public properties are views.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

_NODE_FIELDS = {
    "parent": np.int32,
    "tree": np.int32,
    "token_start": np.int64,
    "token_end": np.int64,
    "logprob_sum": np.float64,
    "num_tokens": np.int64,
    "reward": np.float64,
    "num_children": np.int32,
}
_TOKEN_FIELDS = {"tokens": np.int64, "token_logprobs": np.float32, "token_entropies": np.float32}


@dataclass
class Trajectory:
    """One root-to-leaf response: prompt + path tokens, with per-token node index and loss mask."""

    leaf: int
    tree: int
    input_ids: np.ndarray  # [T] int64
    node_index: np.ndarray  # [T] int32, node owning each token (the root for prompt tokens)
    loss_mask: np.ndarray  # [T] bool, True on response tokens
    old_logprobs: np.ndarray  # [T] float32, rollout log-probs (0 on the prompt)
    prompt_len: int


class _View:
    """Read-only-length view of the used part of a growable buffer (`forest.parent`, ...)."""

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def __get__(self, obj: Forest, owner: type | None = None) -> np.ndarray:
        if self.name in _NODE_FIELDS:
            return obj._nodes[self.name][: obj._n]
        return obj._toks[self.name][: obj._num_tokens_used]


class Forest:
    parent = _View()
    tree = _View()
    token_start = _View()
    token_end = _View()
    logprob_sum = _View()
    num_tokens = _View()
    reward = _View()
    num_children = _View()
    tokens = _View()
    token_logprobs = _View()
    token_entropies = _View()

    def __init__(self, capacity: int = 64, token_capacity: int = 4096) -> None:
        self._n = 0
        self._num_tokens_used = 0
        self._nodes = {k: np.empty(capacity, dt) for k, dt in _NODE_FIELDS.items()}
        self._toks = {k: np.empty(token_capacity, dt) for k, dt in _TOKEN_FIELDS.items()}
        self.roots: list[int] = []

    # ---- sizes and views -------------------------------------------------------------------
    def __len__(self) -> int:
        return self._n

    @property
    def num_trees(self) -> int:
        return len(self.roots)

    @property
    def is_leaf(self) -> np.ndarray:
        leaf = self.num_children == 0
        leaf[self.roots] = False
        return leaf

    def node_tokens(self, i: int) -> np.ndarray:
        return self.tokens[self.token_start[i] : self.token_end[i]]

    def path(self, i: int) -> list[int]:
        """Nodes from the root down to node i."""
        out = []
        while i >= 0:
            out.append(i)
            i = int(self.parent[i])
        return out[::-1]

    def prefix_tokens(self, i: int) -> np.ndarray:
        """Prompt + steps up to and including node i: what a continuation from i is fed."""
        return np.concatenate([self.node_tokens(v) for v in self.path(i)])

    def depth(self) -> np.ndarray:
        """Steps from the root to each node (0 for roots)."""
        return self._accumulate_down(np.ones(self._n, np.int64)).astype(np.int32)

    def response_lengths(self) -> np.ndarray:
        """Response tokens on the path from the root down to each node, the node included."""
        return self._accumulate_down(self.num_tokens)

    def _accumulate_down(self, per_node: np.ndarray) -> np.ndarray:
        """out[v] = sum of per_node over the steps from the root to v (parents precede children)."""
        out = np.zeros(self._n, np.int64)
        parent = self.parent
        for i in range(self._n):
            if parent[i] >= 0:
                out[i] = out[parent[i]] + per_node[i]
        return out

    # ---- building ----------------------------------------------------------------------------
    def _grow(self, nodes: int, tokens: int) -> None:
        for bufs, need in ((self._nodes, self._n + nodes), (self._toks, self._num_tokens_used + tokens)):
            cap = len(next(iter(bufs.values())))
            if need > cap:
                new_cap = max(need, 2 * cap)
                for k, a in bufs.items():
                    b = np.empty(new_cap, a.dtype)
                    b[: len(a)] = a
                    bufs[k] = b

    def _append(self, parent: int, tree: int, tokens, logprobs, entropies) -> int:
        tokens = np.asarray(tokens, np.int64)
        m = len(tokens)
        self._grow(1, m)
        i, t0 = self._n, self._num_tokens_used
        self._toks["tokens"][t0 : t0 + m] = tokens
        self._toks["token_logprobs"][t0 : t0 + m] = logprobs
        self._toks["token_entropies"][t0 : t0 + m] = entropies
        row = dict(parent=parent, tree=tree, token_start=t0, token_end=t0 + m,
                   logprob_sum=float(np.sum(logprobs, dtype=np.float64)) if parent >= 0 else 0.0,
                   num_tokens=m, reward=np.nan, num_children=0)
        for k, v in row.items():
            self._nodes[k][i] = v
        if parent >= 0:
            self._nodes["num_children"][parent] += 1
        self._n += 1
        self._num_tokens_used += m
        return i

    def add_tree(self, prompt_ids: Sequence[int]) -> int:
        """Add a tree whose root holds the prompt; returns the root's node index."""
        if len(prompt_ids) == 0:
            raise ValueError("prompt_ids is empty: a tree needs a non-empty prompt")
        root = self._append(-1, len(self.roots), prompt_ids, 0.0, np.nan)
        self.roots.append(root)
        return root

    def add_chain(
        self,
        parent: int,
        steps: Sequence[Sequence[int]],
        logprobs: Sequence[float],
        entropies: Sequence[float] | None = None,
    ) -> list[int]:
        """Hang a chain of steps under `parent`: one node per step, the last one a leaf.

        `logprobs` (and `entropies`) are per token over the concatenated steps.
        """
        if not 0 <= parent < self._n:
            raise ValueError(f"parent {parent} is not a node of this forest (it has {self._n})")
        if not np.isnan(self._nodes["reward"][parent]):
            raise ValueError(f"parent {parent} is a rewarded leaf; a chain cannot grow below it")
        if len(steps) == 0 or any(len(s) == 0 for s in steps):
            raise ValueError("steps must be a non-empty list of non-empty token lists")
        total = sum(len(s) for s in steps)
        logprobs = np.asarray(logprobs, np.float64)
        entropies = np.full(total, np.nan) if entropies is None else np.asarray(entropies, np.float64)
        for name, a in (("logprobs", logprobs), ("entropies", entropies)):
            if len(a) != total:
                raise ValueError(f"{name} has {len(a)} entries but the steps have {total} tokens")
        tree = int(self._nodes["tree"][parent])
        nodes, k = [], 0
        for s in steps:
            nodes.append(self._append(parent, tree, s, logprobs[k : k + len(s)], entropies[k : k + len(s)]))
            parent, k = nodes[-1], k + len(s)
        return nodes

    def set_reward(self, leaf: int, reward: float) -> None:
        if not 0 <= leaf < self._n or self._nodes["parent"][leaf] < 0:
            raise ValueError(f"node {leaf} is not a step node of this forest")
        if self._nodes["num_children"][leaf] > 0:
            raise ValueError(f"node {leaf} has children; only leaves carry rewards")
        if not np.isfinite(reward):
            raise ValueError(f"reward for leaf {leaf} is not finite: {reward}")
        self._nodes["reward"][leaf] = reward

    @classmethod
    def from_arrays(
        cls,
        parent: np.ndarray,
        num_tokens: np.ndarray,
        logprob_sum: np.ndarray,
        reward: np.ndarray,
        tokens: np.ndarray | None = None,
        tree: np.ndarray | None = None,
    ) -> Forest:
        """A forest from per-node arrays (for trees built elsewhere), topologically ordered.

        `tree` defaults to contiguous trees (each root followed by its own nodes); `tokens` (flat,
        node after node) defaults to zeros. The walk checks the structure and names the first bad
        node.
        """
        parent = np.asarray(parent, np.int32)
        n = len(parent)
        num_tokens = np.asarray(num_tokens, np.int64)
        total = int(num_tokens.sum())
        f = cls(capacity=max(n, 1), token_capacity=max(total, 1))
        roots = np.flatnonzero(parent < 0)
        if tree is None:
            tree = np.cumsum(parent < 0, dtype=np.int32) - 1
        ok = parent >= 0
        end = np.cumsum(num_tokens)
        cols = dict(parent=parent, tree=tree, token_start=end - num_tokens, token_end=end,
                    logprob_sum=logprob_sum, num_tokens=num_tokens, reward=reward,
                    num_children=np.bincount(parent[ok], minlength=n))
        for k, v in cols.items():
            f._nodes[k][:n] = v
        f._toks["tokens"][:total] = 0 if tokens is None else tokens
        f._toks["token_logprobs"][:total] = np.nan
        f._toks["token_entropies"][:total] = np.nan
        f._n, f._num_tokens_used = n, total
        f.roots = roots.tolist()
        return f

    def tree_major(self) -> tuple[Forest, np.ndarray]:
        """This forest with each tree's nodes contiguous, trees in order, each tree's nodes in their
        order here; and the new index of every node. Trees grown concurrently interleave their nodes:
        this is the order the same trees grown one round after another would have."""
        return self.select(np.lexsort((np.arange(self._n), self.tree)))

    def trees_only(self, trees: Sequence[int]) -> tuple[Forest, np.ndarray]:
        """The forest of `trees` alone (renumbered 0, 1, ... in the order given), and the index here of
        each of its nodes."""
        nodes = np.concatenate([np.flatnonzero(self.tree == t) for t in trees])
        return self.select(nodes)[0], nodes

    def select(self, order: np.ndarray) -> tuple[Forest, np.ndarray]:
        """The nodes `order` (whole trees, each tree's nodes in topological order) as a new forest, trees
        renumbered by first appearance; and the new index of every node (-1 where not selected)."""
        new_index = np.full(self._n, -1, np.int64)
        new_index[order] = np.arange(len(order))
        lengths = self.num_tokens[order]
        end = np.cumsum(lengths)
        total = int(end[-1]) if len(order) else 0
        token_order = np.repeat(self.token_start[order] - (end - lengths), lengths) + np.arange(total)
        parent = self.parent[order]
        _, first, inverse = np.unique(self.tree[order], return_index=True, return_inverse=True)
        renumber = np.empty(len(first), np.int64)
        renumber[np.argsort(first)] = np.arange(len(first))
        f = Forest(capacity=max(len(order), 1), token_capacity=max(total, 1))
        cols = dict(parent=np.where(parent >= 0, new_index[np.maximum(parent, 0)], -1), tree=renumber[inverse],
                    token_start=end - lengths, token_end=end, logprob_sum=self.logprob_sum[order],
                    num_tokens=lengths, reward=self.reward[order], num_children=self.num_children[order])
        for k, v in cols.items():
            f._nodes[k][: len(order)] = v
        for k in _TOKEN_FIELDS:
            f._toks[k][:total] = self._toks[k][token_order]
        f._n, f._num_tokens_used = len(order), total
        f.roots = np.flatnonzero(cols["parent"] < 0).tolist()
        return f, new_index

    # ---- reading -----------------------------------------------------------------------------
    def leaf_paths(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(leaf_ids, offsets, nodes): leaf k's root-to-leaf path is nodes[offsets[k]:offsets[k+1]]."""
        from ibtpo_fast import _native

        return _native.leaf_paths(self.parent)

    def trajectories(self) -> list[Trajectory]:
        """One trajectory per leaf, in node order."""
        leaf_ids, offsets, nodes = self.leaf_paths()
        start, end = self.token_start, self.token_end
        out = []
        for k, leaf in enumerate(leaf_ids):
            path = nodes[offsets[k] : offsets[k + 1]]
            spans = [np.arange(start[v], end[v]) for v in path]
            idx = np.concatenate(spans)
            node_index = np.repeat(path.astype(np.int32), end[path] - start[path])
            prompt_len = len(spans[0])
            mask = np.ones(len(idx), bool)
            mask[:prompt_len] = False
            lp = self.token_logprobs[idx].copy()
            lp[:prompt_len] = 0.0
            out.append(Trajectory(int(leaf), int(self.tree[leaf]), self.tokens[idx], node_index, mask, lp, prompt_len))
        return out
