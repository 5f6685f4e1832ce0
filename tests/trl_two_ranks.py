"""Two training steps of IBTPOTrainer at whatever world size this runs in (`torchrun --nproc-per-node 2
tests/trl_two_ranks.py OUT`): each rank writes OUT/rank<r>.json with, per step, the prompts its trees
grew from and whether the advantages TRL's loss received are the walk's of its own trees; the tree
metrics it logged; and checksums of the weights before and after training, for
tests/test_integration_trl.py to compare."""
import json
import os
import sys
from pathlib import Path

from test_integration_trl import Recording, config, correct, dataset, rows_by_content, tiny

from ibtpo_fast import walk
from ibtpo_fast.leaf_batch import leaf_batch

LOGGED = ("tree/generated_tokens", "tree/trajectories_per_1k_tokens", "rollout/prefix_cache_hit_rate")
out = Path(sys.argv[1])
model, tok = tiny()
before = [float(p.double().sum()) for p in model.parameters()]
trainer = Recording(model=model, reward_funcs=[correct], train_dataset=dataset(), processing_class=tok,
                    args=config(out / "trl", per_device_train_batch_size=6))
trainer.train()
steps = []
for rollout, got in zip(trainer.rollouts, trainer.loss_inputs):
    forest = rollout.forest
    ref = leaf_batch(forest, walk(forest, beta=5.0, lam=0.1, eps=1e-4), tok.pad_token_id, rollout.finish_reason)
    mine = rows_by_content(ref.prompt_ids, ref.prompt_mask, ref.response_ids, ref.response_mask, ref.advantages)
    steps.append({"prompts": [forest.node_tokens(r).tolist() for r in forest.roots],
                  "advantages_are_the_walks": rows_by_content(**got) == mine,
                  "parts": {k: rollout.parts[k] for k in LOGGED}})
logged = [{k: entry[k] for k in LOGGED} for entry in trainer.state.log_history if LOGGED[0] in entry]
checksum = [float(p.double().sum()) for p in model.parameters()]
record = {"steps": steps, "logged": logged, "before": before, "checksum": checksum}
(out / f"rank{os.environ.get('RANK', '0')}.json").write_text(json.dumps(record))
