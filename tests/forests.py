"""Random forest builders shared by tests and benchmarks."""
from __future__ import annotations

import numpy as np

from ibtpo_fast import Forest


def random_forest(rng: np.random.Generator, num_trees: int, nodes_per_tree: int, binary: bool = True) -> Forest:
    """Trees grown like IBTree rounds: chains under the root, then chains under random inner nodes.

    Trees are interleaved in the flat arrays, as the sampler's rounds leave them.
    """
    f = Forest()
    roots = [f.add_tree(rng.integers(0, 100, size=int(rng.integers(1, 5)))) for _ in range(num_trees)]
    inner: list[list[int]] = [[r] for r in roots]
    sizes = [1] * num_trees
    while min(sizes) < nodes_per_tree:
        for t in range(num_trees):
            if sizes[t] >= nodes_per_tree:
                continue
            parent = inner[t][int(rng.integers(len(inner[t])))] if len(inner[t]) > 1 else roots[t]
            depth = int(rng.integers(1, 5))
            steps = [list(rng.integers(0, 100, size=int(rng.integers(1, 6)))) for _ in range(depth)]
            total = sum(len(s) for s in steps)
            nodes = f.add_chain(parent, steps, -rng.exponential(0.5, size=total))
            reward = float(rng.integers(0, 2)) if binary else float(rng.random())
            f.set_reward(nodes[-1], reward)
            inner[t].extend(nodes[:-1])
            sizes[t] += len(nodes)
    return f


def ibtree_forest(rng: np.random.Generator, num_trees: int, prompt_len: int, steps: int, step_len: int,
                  vocab: int, tree: tuple[int, int] = (4, 8)) -> Forest:
    """Trees shaped like IBTree (B0, L-1) rollouts of long responses: B0 chains of `steps` steps of
    `step_len` tokens under the root, then L-1 continuations, each from a random inner step node,
    running to the same response length. Half the leaves are correct."""
    b0, rounds = tree
    f = Forest()
    for _ in range(num_trees):
        root = f.add_tree(rng.integers(0, vocab, size=prompt_len))
        inner: list[tuple[int, int]] = []  # (node, its depth)
        for r in range(b0 + rounds):
            parent, depth = (root, 0) if r < b0 else inner[int(rng.integers(len(inner)))]
            chain = [rng.integers(0, vocab, size=step_len) for _ in range(steps - depth)]
            nodes = f.add_chain(parent, chain, -rng.exponential(0.5, size=step_len * len(chain)))
            f.set_reward(nodes[-1], float(r % 2))
            inner.extend((n, depth + 1 + i) for i, n in enumerate(nodes[:-1]))
    return f
