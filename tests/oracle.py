"""Pure-Python reference of docs/algorithm.md sections 1, 2 and 4, written line by line from the spec."""
from __future__ import annotations

import math


def oracle_walk(parent, tree, logprob_sum, num_tokens, reward, beta=5.0, lam=0.1, eps=1e-6, step_prob="product"):
    n = len(parent)
    children = [[] for _ in range(n)]
    for v in range(n):
        if parent[v] >= 0:
            children[parent[v]].append(v)

    def leaves_below(v):
        if not children[v]:
            return [v]
        return [leaf for c in children[v] for leaf in leaves_below(c)]

    leaves, correct, p = [], [], []
    for v in range(n):
        below = leaves_below(v)
        leaves.append(len(below))
        correct.append(sum(reward[leaf] for leaf in below))
        p.append(correct[v] / leaves[v])

    def pi(v):  # step probability under the rollout policy
        if step_prob == "geomean":
            return math.exp(logprob_sum[v] / num_tokens[v])
        return math.exp(logprob_sum[v])

    def r(v):  # odds ratio against the parent, 1 when p(parent) = 0
        u = parent[v]
        return p[v] / p[u] if p[u] != 0 else 1.0

    roots = [v for v in range(n) if parent[v] < 0]
    root_of_tree = {tree[v]: v for v in roots}
    tree_mean, tree_std, effective = [], [], []
    for t in range(len(roots)):
        rewards = [reward[leaf] for leaf in leaves_below(root_of_tree[t])]
        mean = sum(rewards) / len(rewards)
        var = sum((x - mean) ** 2 for x in rewards) / (len(rewards) - 1) if len(rewards) > 1 else 0.0
        tree_mean.append(p[root_of_tree[t]])
        tree_std.append(math.sqrt(var))
        effective.append(min(rewards) != max(rewards))

    nan = float("nan")
    ib, cov = [nan] * n, [nan] * n
    for v in range(n):
        cs = children[v]
        if not cs:
            continue
        eta1 = [r(c) - (1 + 1 / beta) for c in cs]
        eta2 = [pi(c) for c in cs]
        ib[v] = (1 + beta) / len(cs) * sum(a * b for a, b in zip(eta1, eta2))
        if len(cs) >= 2:
            m1, m2 = sum(eta1) / len(cs), sum(eta2) / len(cs)
            cov[v] = sum((a - m1) * (b - m2) for a, b in zip(eta1, eta2)) / (len(cs) - 1)

    a_gl, a_ib, adv, spi = [nan] * n, [nan] * n, [nan] * n, [nan] * n
    for v in range(n):
        if parent[v] < 0:
            continue
        t = tree[v]
        spi[v] = pi(v)
        a_gl[v] = (p[v] - tree_mean[t]) / (tree_std[t] + eps)
        a_ib[v] = (r(v) - (1 + 1 / beta)) * pi(v)
        adv[v] = a_gl[v] + lam * a_ib[v]
    return dict(
        leaves=leaves, correct=correct, p=p, step_prob=spi, ib_score=ib, cov_eta=cov,
        adv_global=a_gl, adv_ib=a_ib, advantage=adv, num_children=[len(c) for c in children],
        tree_mean=tree_mean, tree_std=tree_std, effective=effective,
    )
