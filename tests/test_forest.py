"""Forest building, views, trajectories and from_arrays."""
import numpy as np
from forests import random_forest

from ibtpo_fast import Forest, walk


def test_trajectories_follow_paths():
    f = Forest(capacity=2, token_capacity=4)  # forces growth
    root = f.add_tree([10, 11, 12])
    a, b = f.add_chain(root, [[1, 2], [3]], [-0.1, -0.2, -0.3], entropies=[0.5, 0.6, 0.7])
    f.set_reward(b, 1.0)
    (c,) = f.add_chain(a, [[4, 5, 6]], [-1.0, -1.0, -1.0])
    f.set_reward(c, 0.0)
    t1, t2 = f.trajectories()
    assert t1.leaf == b and t2.leaf == c
    assert t1.input_ids.tolist() == [10, 11, 12, 1, 2, 3]
    assert t2.input_ids.tolist() == [10, 11, 12, 1, 2, 4, 5, 6]
    assert t2.node_index.tolist() == [root] * 3 + [a] * 2 + [c] * 3
    assert t2.loss_mask.tolist() == [False] * 3 + [True] * 5
    np.testing.assert_allclose(t2.old_logprobs, [0, 0, 0, -0.1, -0.2, -1, -1, -1], rtol=1e-6)
    assert f.prefix_tokens(a).tolist() == [10, 11, 12, 1, 2]
    assert f.path(c) == [root, a, c]
    assert f.num_children.tolist() == [1, 2, 0, 0]
    assert f.is_leaf.tolist() == [False, False, True, True]
    np.testing.assert_allclose(f.token_entropies[3:6], [0.5, 0.6, 0.7])
    assert f.logprob_sum[a] == np.float64(np.float64(-0.1) + np.float64(-0.2))
    assert f.depth().tolist() == [0, 1, 2, 2]
    assert f.response_lengths().tolist() == [0, 2, 3, 5]


def test_views_are_not_copies():
    f = Forest()
    f.add_tree([1])
    assert np.shares_memory(f.parent, f._nodes["parent"])


def test_from_arrays_round_trip():
    g = random_forest(np.random.default_rng(3), 1, 40)
    f = Forest.from_arrays(g.parent, g.num_tokens, g.logprob_sum, g.reward, tokens=g.tokens)
    for name in ["advantage", "ib_score", "p"]:
        np.testing.assert_array_equal(getattr(walk(f), name), getattr(walk(g), name))
    assert [t.input_ids.tolist() for t in f.trajectories()] == [t.input_ids.tolist() for t in g.trajectories()]


def test_interleaved_trees():
    g = random_forest(np.random.default_rng(4), 3, 20)
    assert len(set(g.tree[: len(g) // 2].tolist())) == 3  # trees interleave in the flat arrays
    trajs = g.trajectories()
    assert len(trajs) == int(g.is_leaf.sum())
    for t in trajs:
        assert np.all(g.tree[t.node_index] == t.tree)
