"""The native walk against the pure-Python oracle, hand-worked trees, the GRPO special case."""
import math

import numpy as np
import pytest
from forests import random_forest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from oracle import oracle_walk

from ibtpo_fast import Forest, walk

FIELDS = ["leaves", "correct", "p", "step_prob", "ib_score", "cov_eta", "adv_global", "adv_ib",
          "advantage", "num_children", "tree_mean", "tree_std", "effective"]


def assert_matches_oracle(f: Forest, **kw) -> None:
    got = walk(f, **kw)
    want = oracle_walk(f.parent.tolist(), f.tree.tolist(), f.logprob_sum.tolist(), f.num_tokens.tolist(),
                       f.reward.tolist(), **kw)
    for name in FIELDS:
        np.testing.assert_allclose(getattr(got, name), np.asarray(want[name], dtype=float), rtol=1e-9, atol=1e-9,
                                   equal_nan=True, err_msg=name)


@settings(max_examples=2000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    seed=st.integers(0, 2**32 - 1),
    num_trees=st.integers(1, 4),
    nodes=st.integers(2, 30),
    binary=st.booleans(),
    beta=st.floats(0.1, 20.0),
    lam=st.floats(0.0, 1.0),
    step_prob=st.sampled_from(["geomean", "product"]),
)
def test_native_equals_oracle_on_random_forests(seed, num_trees, nodes, binary, beta, lam, step_prob):
    f = random_forest(np.random.default_rng(seed), num_trees, nodes, binary)
    assert_matches_oracle(f, beta=beta, lam=lam, step_prob=step_prob)


def _chains(rewards, logprobs=(-0.5, -0.3)):
    """A root with one two-step chain per reward; returns the forest and each chain's nodes."""
    f = Forest()
    root = f.add_tree([1, 2])
    chains = []
    for r in rewards:
        nodes = f.add_chain(root, [[3], [4]], list(logprobs))
        f.set_reward(nodes[-1], r)
        chains.append(nodes)
    return f, root, chains


def test_hand_worked_four_chains_then_a_branch():
    # Root with 4 chains rewarded 1, 0, 0, 1; every step has logprob -0.5 then -0.3.
    f, root, chains = _chains([1, 0, 0, 1])
    w = walk(f, beta=5.0, lam=0.1, eps=0.0)
    pi1, pi2 = math.exp(-0.5), math.exp(-0.3)
    std = math.sqrt(1 / 3)  # rewards 1,0,0,1: mean 0.5, Bessel variance (4 * 0.25) / 3
    assert w.p[root] == 0.5 and w.tree_std[0] == pytest.approx(std)
    # eta1 = r - 1.2 with r = 2 (p=1) or 0 (p=0): 0.8 or -1.2; IB(root) = 6/4 * pi1 * (0.8+0.8-1.2-1.2)
    assert w.ib_score[root] == pytest.approx(1.5 * pi1 * -0.8)
    # Single-child chain nodes score -(1+beta)/beta * pi(child) = -1.2 * 6 * ... : r = 1, eta1 = -0.2
    assert w.ib_score[chains[0][0]] == pytest.approx(6 * -0.2 * pi2)
    assert w.cov_eta[root] == pytest.approx(0.0)  # equal pi on every child: no covariance
    assert w.advantage[chains[0][0]] == pytest.approx(0.5 / std + 0.1 * 0.8 * pi1)
    assert w.advantage[chains[1][1]] == pytest.approx(-0.5 / std + 0.1 * -0.2 * pi2)

    # Branch under chain 1's first step (a p=0 node): one new step rewarded 1.
    (new,) = f.add_chain(chains[1][0], [[7]], [-0.1])
    f.set_reward(new, 1.0)
    w = walk(f, beta=5.0, lam=0.1, eps=0.0)
    v = chains[1][0]
    assert w.leaves[v] == 2 and w.p[v] == 0.5 and w.leaves[root] == 5 and w.p[root] == pytest.approx(0.6)
    std = math.sqrt(sum((x - 0.6) ** 2 for x in [1, 0, 1, 0, 1]) / 4)
    assert w.tree_std[0] == pytest.approx(std)
    # Children of v: old step (p=0, pi2) and new step (p=1, exp(-0.1)); r = 0 and 2.
    pi_new = math.exp(-0.1)
    assert w.ib_score[v] == pytest.approx(6 / 2 * (-1.2 * pi2 + 0.8 * pi_new))
    eta1, eta2 = np.array([-1.2, 0.8]), np.array([pi2, pi_new])
    assert w.cov_eta[v] == pytest.approx(np.cov(eta1, eta2, ddof=1)[0, 1])
    # v's own advantage: p(v)=0.5 vs root 0.6, r = 0.5/0.6
    assert w.advantage[v] == pytest.approx((0.5 - 0.6) / std + 0.1 * (0.5 / 0.6 - 1.2) * pi1)
    assert w.effective[0]
    assert_matches_oracle(f)


def test_zero_parent_probability_gives_r_one():
    f, root, chains = _chains([0, 0])
    w = walk(f, eps=1e-6)
    assert not w.effective[0] and w.tree_std[0] == 0.0
    assert np.allclose(w.adv_global[1:], 0.0)
    assert np.allclose(w.adv_ib[1:], -0.2 * w.step_prob[1:])  # r = 1 where p(parent) = 0


def test_one_leaf_tree_has_zero_std():
    f, _, _ = _chains([1])
    w = walk(f)
    assert w.tree_std[0] == 0.0 and not w.effective[0]
    assert np.isnan(w.cov_eta).all()


def test_grpo_special_case_independent_chains_lam_zero():
    rng = np.random.default_rng(0)
    f = Forest()
    expected = {}
    for _ in range(5):
        root = f.add_tree([1])
        rewards = rng.integers(0, 2, size=8).astype(float)
        mean, std = rewards.mean(), rewards.std(ddof=1)
        for r in rewards:
            depth = int(rng.integers(1, 5))
            nodes = f.add_chain(root, [[2, 3]] * depth, -rng.random(2 * depth))
            f.set_reward(nodes[-1], r)
            for v in nodes:
                expected[v] = (r - mean) / (std + 1e-6)
    w = walk(f, lam=0.0)
    for v, a in expected.items():
        assert w.advantage[v] == a  # exactly GRPO's (R - mean) / (std + eps), not approximately
    # and every token of a trajectory carries its chain's advantage
    for traj in f.trajectories():
        adv = w.advantage[traj.node_index[traj.loss_mask]]
        assert np.all(adv == expected[traj.leaf])


def test_metrics_means():
    f, root, chains = _chains([1, 0, 0, 1])
    w = walk(f)
    inner = ~np.isnan(w.ib_score)
    assert w.ib_score_mean == pytest.approx(w.ib_score[inner].mean())
    assert w.cov_eta_mean == pytest.approx(w.cov_eta[root])
