"""Invalid forests raise ValueError naming the first bad node; garbage never crashes."""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from ibtpo_fast import Forest, _native, walk


def arrays(parent, reward, num_tokens=None, logprob_sum=None, tree=None):
    n = len(parent)
    parent = np.asarray(parent, np.int32)
    if tree is None:
        tree = np.zeros(n, np.int32)
    return dict(
        parent=parent, tree=np.asarray(tree, np.int32),
        logprob_sum=np.asarray(logprob_sum if logprob_sum is not None else [0.0] + [-1.0] * (n - 1)),
        num_tokens=np.asarray(num_tokens if num_tokens is not None else [1] * n, np.int64),
        reward=np.asarray(reward, np.float64), num_trees=int((parent < 0).sum()),
    )


NAN = float("nan")


@pytest.mark.parametrize(
    "kw, match",
    [
        (arrays([-1, 0, 5], [NAN, NAN, 1.0]), "node 2: parent 5 out of range"),
        (arrays([-1, 0, -7], [NAN, NAN, 1.0]), "node 2: parent -7 out of range"),
        (arrays([-1, 2, 0], [NAN, 1.0, NAN]), "node 1: parent 2 does not precede it"),
        (arrays([-1, 1], [NAN, 1.0]), "node 1: parent 1 does not precede it"),
        (arrays([-1, 0, 1], [NAN, NAN, NAN]), "node 2: leaf has no reward"),
        (arrays([-1, 0, 1], [NAN, 1.0, 1.0]), "node 1: reward set on a non-leaf"),
        (arrays([-1, 0], [NAN, np.inf]), "node 1: leaf reward is infinite"),
        (arrays([-1, 0, 1], [NAN, NAN, 1.0], num_tokens=[1, 0, 1]), "node 1: step has 0 tokens"),
        (arrays([-1, 0], [NAN, 1.0], logprob_sum=[0.0, NAN]), "node 1: logprob_sum is not finite"),
        (arrays([-1, -1, 0], [NAN, NAN, 1.0], tree=[0, 1, 1]), "node 1: .*no response|node 2: tree id 1 differs"),
        (arrays([-1], [NAN]), "node 0: tree 0 has no response"),
        (arrays([-1, 0], [NAN, 1.0], tree=[3, 3]), "node 0: root of tree 3 but expected tree 0"),
    ],
)
def test_invalid_structure_names_first_bad_node(kw, match):
    with pytest.raises(ValueError, match=match):
        _native.walk(**kw)


def test_lengths_that_disagree():
    kw = arrays([-1, 0], [NAN, 1.0])
    kw["reward"] = np.array([NAN, 1.0, 0.0])
    with pytest.raises(ValueError, match="reward has length 3, expected 2"):
        _native.walk(**kw)
    kw = arrays([-1, 0], [NAN, 1.0])
    kw["num_trees"] = 2
    with pytest.raises(ValueError, match="2 roots|1 roots"):
        _native.walk(**kw)


def test_bad_parameters():
    kw = arrays([-1, 0], [NAN, 1.0])
    with pytest.raises(ValueError, match="step_prob"):
        _native.walk(**kw, step_prob="mean")
    with pytest.raises(ValueError, match="beta"):
        _native.walk(**kw, beta=0.0)
    with pytest.raises(ValueError, match="1-D"):
        _native.walk(**{**kw, "parent": np.zeros((2, 1), np.int32)})


def test_forest_guards():
    f = Forest()
    with pytest.raises(ValueError, match="prompt_ids is empty"):
        f.add_tree([])
    root = f.add_tree([1])
    with pytest.raises(ValueError, match="parent 4 is not a node"):
        f.add_chain(4, [[1]], [-0.1])
    with pytest.raises(ValueError, match="non-empty"):
        f.add_chain(root, [[1], []], [-0.1])
    with pytest.raises(ValueError, match="logprobs has 1 entries but the steps have 2 tokens"):
        f.add_chain(root, [[1, 2]], [-0.1])
    a, b = f.add_chain(root, [[1], [2]], [-0.1, -0.2])
    with pytest.raises(ValueError, match="has children"):
        f.set_reward(a, 1.0)
    with pytest.raises(ValueError, match="not finite"):
        f.set_reward(b, float("nan"))
    f.set_reward(b, 1.0)
    with pytest.raises(ValueError, match="rewarded leaf"):
        f.add_chain(b, [[3]], [-0.1])
    with pytest.raises(ValueError, match="not a step node"):
        f.set_reward(root, 1.0)
    walk(f)


@settings(max_examples=1000, deadline=None)
@given(
    parent=hnp.arrays(np.int32, st.integers(0, 12), elements=st.integers(-3, 14)),
    reward=hnp.arrays(np.float64, st.integers(0, 12)),
    num_tokens=hnp.arrays(np.int64, st.integers(0, 12), elements=st.integers(-2, 5)),
    num_trees=st.integers(-2, 4),
)
def test_garbage_never_crashes(parent, reward, num_tokens, num_trees):
    n = len(parent)
    tree = np.zeros(n, np.int32)
    logprob_sum = -np.ones(len(num_tokens))
    try:
        out = _native.walk(parent, tree, logprob_sum, num_tokens, reward, num_trees)
    except ValueError:
        return
    assert len(out["p"]) == n
    try:
        _native.leaf_paths(parent)
    except ValueError:
        pass
