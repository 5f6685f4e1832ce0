"""`torchrun --nproc-per-node 2 tests/dist_metrics.py OUT ARGS...`: a one-step run (config overrides ARGS) in
OUT/r. Each rank writes what it sampled and walked (per leaf, per tree, per pick, per node) and the metric parts
it reported to OUT/rank<r>.json, for tests/test_distributed.py to compute the metrics of the ranks' union."""
import json
import sys
from pathlib import Path

import numpy as np
import torch

import ibtpo_fast.trainer as trainer_module
from ibtpo_fast.config import load_config
from ibtpo_fast.distributed import World


def main(out: Path, args: list[str]) -> None:
    torch.set_num_threads(1)
    seen = {}

    def keep(name, fn):
        def wrapped(*a, **k):
            seen[name] = fn(*a, **k)
            return seen[name]
        return wrapped

    def reduce_metrics(world, parts):
        seen["parts"] = dict(parts)
        return reduce(world, parts)

    reduce, World.reduce_metrics = World.reduce_metrics, reduce_metrics
    trainer_module.walk = keep("walk", trainer_module.walk)
    tr = trainer_module.Trainer(load_config([*args, f"run.out_dir={out}", "run.name=r", "train.steps=1"]))
    tr.rollout = keep("rollout", tr.rollout)
    tr.train()
    r, w = seen["rollout"], seen["walk"]
    f, leaves = r.forest, np.flatnonzero(r.forest.is_leaf)
    data = {
        "reward": f.reward[leaves].tolist(), "response_len": f.response_lengths()[leaves].tolist(),
        "cut": [r.finish_reason[v] == "length" for v in leaves],
        "effective": [len(set(f.reward[leaves][f.tree[leaves] == t])) > 1 for t in range(f.num_trees)],
        "generated": r.generated_tokens.tolist(), "trees": f.num_trees,
        "pick_depth": [p.depth for p in r.picks], "pick_len": [p.response_len for p in r.picks],
        "pick_cov": [p.cov_eta for p in r.picks], "ib_score": w.ib_score.tolist(), "cov_eta": w.cov_eta.tolist(),
        "rollout_s": r.metrics["timing/rollout"], "parts": seen["parts"],
    }
    (out / f"rank{tr.world.rank}.json").write_text(json.dumps(data))


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2:])
