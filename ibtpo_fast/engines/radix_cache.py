"""A radix tree over token ids that maps cached prefixes to their per-token K/V.

Each node owns the K/V of its edge's tokens as one tensor [layers, 2, kv_heads, n_tokens, head_dim],
so a match is a list of such chunks along the token axis. Unlocked leaves are evicted least recently
used first whenever the tree holds more than `max_tokens` tokens.
"""
from __future__ import annotations

import heapq
import itertools
from collections.abc import Sequence
from typing import NamedTuple

import torch


class _Node:
    __slots__ = ("children", "kv", "last_used", "lock_ref", "parent", "tokens")

    def __init__(self, tokens: list[int], kv: torch.Tensor | None, parent: _Node | None) -> None:
        self.tokens = tokens  # the edge label: tokens this node adds to its parent's prefix
        self.kv = kv
        self.parent = parent
        self.children: dict[int, _Node] = {}
        self.last_used = 0
        self.lock_ref = 0  # requests using this node or a descendant


class PrefixMatch(NamedTuple):
    length: int  # tokens matched
    kv: list[torch.Tensor]  # chunks [layers, 2, kv_heads, n, head_dim] covering those tokens, in order
    node: _Node  # deepest node touched; pass it to lock / unlock


def common_prefix_length(a: Sequence[int], b: Sequence[int]) -> int:
    """Length of the common prefix of two token lists: one comparison in C in the usual case (one
    is a prefix of the other), else a binary search over slice comparisons."""
    n = min(len(a), len(b))
    if a[:n] == b[:n]:
        return n
    low, high = 0, n - 1  # a[:low] == b[:low]; a[:high + 1] != b[:high + 1]
    while low < high:
        mid = (low + high + 1) // 2
        if a[:mid] == b[:mid]:
            low = mid
        else:
            high = mid - 1
    return low


class RadixCache:
    def __init__(self, max_tokens: int) -> None:
        if max_tokens < 0:
            raise ValueError(f"max_tokens must be >= 0, got {max_tokens}")
        self.max_tokens = max_tokens
        self._clock = itertools.count(1)
        self.reset()

    def reset(self) -> None:
        """Drop every cached prefix (locks included) and the hit statistics."""
        self.root = _Node([], None, None)
        self.num_tokens = 0
        self.lookup_tokens = 0
        self.hit_tokens = 0

    @property
    def hit_rate(self) -> float:
        return self.hit_tokens / self.lookup_tokens if self.lookup_tokens else 0.0

    def match_prefix(self, ids: Sequence[int]) -> PrefixMatch:
        """Longest cached prefix of `ids`; a match may end inside a node (its K/V is then sliced)."""
        ids = list(ids)
        node, pos, chunks = self.root, 0, []
        now = next(self._clock)
        while pos < len(ids) and (child := node.children.get(ids[pos])) is not None:
            n = common_prefix_length(child.tokens, ids[pos : pos + len(child.tokens)])
            child.last_used = now
            chunks.append(child.kv if n == len(child.tokens) else child.kv[:, :, :, :n])
            node, pos = child, pos + n
            if n < len(child.tokens):
                break
        self.lookup_tokens += len(ids)
        self.hit_tokens += pos
        return PrefixMatch(pos, chunks, node)

    def insert(self, ids: Sequence[int], kv: torch.Tensor) -> None:
        """Cache `ids` whose K/V is `kv` [layers, 2, kv_heads, len(ids), head_dim] (may be a view: only
        the tokens not cached yet are copied out of it)."""
        ids = list(ids)
        if kv.shape[3] != len(ids):
            raise ValueError(f"kv holds {kv.shape[3]} tokens for {len(ids)} ids")
        node, pos = self.root, 0
        now = next(self._clock)
        while pos < len(ids):
            child = node.children.get(ids[pos])
            if child is None:
                leaf = _Node(ids[pos:], kv[:, :, :, pos:].clone(), node)
                leaf.last_used = now
                node.children[ids[pos]] = leaf
                self.num_tokens += len(leaf.tokens)
                break
            n = common_prefix_length(child.tokens, ids[pos : pos + len(child.tokens)])
            if n < len(child.tokens):
                child = self._split(child, n)
            child.last_used = now
            node, pos = child, pos + n
        if self.num_tokens > self.max_tokens:
            self._evict(self.num_tokens - self.max_tokens)

    def lock(self, node: _Node) -> None:
        """Protect `node` and its ancestors from eviction until `unlock`."""
        while node is not self.root:
            node.lock_ref += 1
            node = node.parent

    def unlock(self, node: _Node) -> None:
        while node is not self.root:
            node.lock_ref -= 1
            node = node.parent

    def _split(self, child: _Node, n: int) -> _Node:
        """Cut `child`'s edge after `n` tokens; returns the new upper node."""
        upper = _Node(child.tokens[:n], child.kv[:, :, :, :n].clone(), child.parent)
        upper.lock_ref = child.lock_ref  # every lock through child also runs through upper
        upper.last_used = child.last_used
        upper.children[child.tokens[n]] = child
        child.parent.children[child.tokens[0]] = upper
        child.tokens = child.tokens[n:]
        child.kv = child.kv[:, :, :, n:].clone()  # own storage, so evicting either half frees memory
        child.parent = upper
        return upper

    def _evict(self, n_tokens: int) -> None:
        heap = [(leaf.last_used, id(leaf), leaf) for leaf in self._leaves() if leaf.lock_ref == 0]
        heapq.heapify(heap)
        freed = 0
        while freed < n_tokens and heap:
            _, _, leaf = heapq.heappop(heap)
            parent = leaf.parent
            del parent.children[leaf.tokens[0]]
            freed += len(leaf.tokens)
            if parent is not self.root and not parent.children and parent.lock_ref == 0:
                heapq.heappush(heap, (parent.last_used, id(parent), parent))
        self.num_tokens -= freed

    def _leaves(self) -> list[_Node]:
        leaves, stack = [], [self.root]
        while stack:
            node = stack.pop()
            if node.children:
                stack.extend(node.children.values())
            elif node is not self.root:
                leaves.append(node)
        return leaves
