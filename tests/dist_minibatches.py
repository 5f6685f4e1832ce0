"""`torchrun --nproc-per-node 2 tests/dist_minibatches.py OUT`: 8 trees, 4 a rank, trained in train.mini_batches=3
on every CPU layout, packed as the trainer packs them, with and without micro-batches. Each rank writes its rows,
optimizer steps and gradient norms per variant to OUT/rank<r>.json, for tests/test_minibatch_split.py."""
import copy
import json
import sys
from pathlib import Path

import torch
from dist_update import global_forest

from ibtpo_fast.config import TrainConfig
from ibtpo_fast.distributed import close_world, init_world, wrap
from ibtpo_fast.loading import load_policy, load_task
from ibtpo_fast.policy import TokenLogprobs
from ibtpo_fast.trainer import pack_batch
from ibtpo_fast.update import UpdateSettings, ppo_update
from ibtpo_fast.walk import walk

TREES, MINI_BATCHES, BUDGET = 8, 3, 300
VARIANTS = [("fsdp", "tree", "gather", 0), ("fsdp", "tree", "mask", 0), ("ddp", "tree", "mask", 0),
            ("fsdp", "flat", "gather", 0), ("fsdp", "tree", "gather", BUDGET), ("fsdp", "tree", "mask", BUDGET),
            ("fsdp", "flat", "gather", BUDGET)]


def main(out: Path) -> None:
    torch.set_num_threads(1)
    world = init_world()
    base, tok = load_policy("", torch.device("cpu"))
    forest = global_forest(base, tok, load_task("arithmetic", val_size=1), TREES)
    mine = forest.trees_only(list(range(TREES))[world.share(TREES)])[0]
    w = walk(mine, lam=0.1)
    seen = {}
    for parallel, layout, attention, budget in VARIANTS:
        train = TrainConfig(mini_batches=MINI_BATCHES, max_tokens_per_micro_batch=budget)
        batch = pack_batch(mine, w, tok.pad_token_id, layout, attention, train)
        policy = wrap(TokenLogprobs(copy.deepcopy(base)), parallel, world)
        opt = torch.optim.SGD(policy.parameters(), lr=1e-2)
        steps = []
        opt.register_step_post_hook(lambda *_: steps.append(1))
        settings = UpdateSettings(temperature=1.0, kl_coef=0.0, tree_attention=attention, mini_batches=MINI_BATCHES,
                                  max_tokens_per_micro_batch=budget, deterministic=True)
        stats = ppo_update(policy, opt, batch, settings, world=world)
        seen[f"{parallel}-{layout}-{attention}-{budget}"] = {"rows": batch.num_rows, "steps": len(steps),
                                                             "grad_norm": stats["actor/grad_norm"]}
    (out / f"rank{world.rank}.json").write_text(json.dumps(seen))
    close_world()  # no rank exits while a peer still uses the group: gloo aborts it


if __name__ == "__main__":
    main(Path(sys.argv[1]))
