"""Every rank takes train.mini_batches optimizer steps whatever rows its trees pack into: the packing gives a row
to every mini-batch, and a batch that cannot fill them is refused rather than trained in fewer steps."""
import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from test_distributed import env, torchrun

from ibtpo_fast import Forest
from ibtpo_fast.packing import flatten, pack_trees
from ibtpo_fast.update import UpdateSettings, ppo_update
from ibtpo_fast.walk import walk

HERE = Path(__file__).resolve().parent


def one_wide_two_narrow() -> Forest:
    """Three trees, the two narrow ones fitting together in a row as wide as the wide one."""
    f = Forest()
    for prompt, steps in ((4, 30), (2, 5), (2, 6)):
        root = f.add_tree(np.arange(prompt))
        for k in range(2):
            leaf = f.add_chain(root, [np.arange(steps)], np.full(steps, -0.5))[-1]
            f.set_reward(leaf, float(k))
    return f


def test_trees_pack_into_a_row_for_every_mini_batch():
    f = one_wide_two_narrow()
    w = walk(f, lam=0.1)
    first_fit = pack_trees(f, w.advantage, w.leaves, 0)
    assert first_fit.num_rows == 2  # the narrow trees share a row
    spread = pack_trees(f, w.advantage, w.leaves, 0, min_rows=3)
    assert spread.num_rows == 3 and int(spread.attention_mask.sum()) == int(first_fit.attention_mask.sum())
    assert torch.equal(spread.mult.sort().values, first_fit.mult.sort().values)
    with pytest.raises(ValueError, match="3 trees cannot fill 4 rows"):
        pack_trees(f, w.advantage, w.leaves, 0, min_rows=4)
    with pytest.raises(ValueError, match="3 trees cannot fill 4 rows"):
        pack_trees(f, w.advantage, w.leaves, 0, num_rows=4)


def test_a_batch_with_fewer_rows_than_mini_batches_is_refused():
    f = one_wide_two_narrow()
    w = walk(f, lam=0.1)
    batch = flatten(f.trees_only([0])[0], w.advantage, w.leaves, 0)  # 2 trajectories: 2 rows
    model = torch.nn.Linear(1, 1)
    with pytest.raises(ValueError, match="2 rows cannot fill 3 mini-batches"):
        ppo_update(model, torch.optim.SGD(model.parameters(), lr=0.1), batch,
                   UpdateSettings(temperature=1.0, mini_batches=3))


def test_two_ranks_take_every_mini_batch_on_every_layout(tmp_path):
    done = subprocess.run(torchrun(str(HERE / "dist_minibatches.py"), str(tmp_path)), capture_output=True, text=True,
                          env=env(), timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0].keys() == ranks[1].keys() and len(ranks[0]) == 7
    for variant in ranks[0]:
        mine, theirs = ranks[0][variant], ranks[1][variant]
        assert mine["steps"] == theirs["steps"] == 3 and min(mine["rows"], theirs["rows"]) >= 3, variant
        assert mine["grad_norm"] == theirs["grad_norm"] > 0, variant  # a global norm: the ranks met
