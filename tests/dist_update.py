"""One PPO update of the bundled model on a fixed global batch of 4 trees, at whatever world size this runs in:
`python tests/dist_update.py OUT` (one process, the whole batch) or `torchrun --nproc-per-node 2 tests/dist_update.py
OUT` (each rank its 2 trees). For each variant (parallel, mixed precision, micro-batches, activation checkpointing,
layout) it writes the loss, the gradient norm, the updated weights and every rank's micro-batch count to
OUT/<variant>.pt from rank 0, for tests/test_distributed.py to compare."""
import copy
import sys
from pathlib import Path

import torch
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

from ibtpo_fast.distributed import close_world, init_world, whole, wrap
from ibtpo_fast.engines.torch_engine import TorchEngine
from ibtpo_fast.loading import load_policy, load_task, stop_token_ids
from ibtpo_fast.packing import flatten, pack_trees
from ibtpo_fast.policy import TokenLogprobs, causal_lm_of, checkpoint_activations
from ibtpo_fast.sampler import IBTreeSampler, SamplerConfig
from ibtpo_fast.update import UpdateSettings, micro_batches, minibatch_loss, ppo_update
from ibtpo_fast.walk import walk

TREES = 4
BUDGET = 450  # tokens: at 2 ranks the ranks split into different numbers of micro-batches


def global_forest(model, tok, task, trees=TREES):
    """The same trees on every rank: one engine each, the same seeds."""
    sampler = IBTreeSampler(TorchEngine(model, tokenizer=tok), tok, lambda rows, res: task.scorer(1.0)(
        [r.data_source for r in rows], tok.batch_decode([x.tolist() for x in res], skip_special_tokens=True),
        [r.ground_truth for r in rows]), SamplerConfig(tree="2,3,1,1", max_new_tokens=64,
                                                       stop_token_ids=stop_token_ids(model, tok), seed=3,
                                                       # the trees BUDGET was sized for
                                                       branch_root=True, step_prob="geomean"))
    rows = task.train[:trees]
    return sampler.sample([tok.encode(r.prompt, add_special_tokens=False) for r in rows], rows).forest


def main(out: Path) -> None:
    torch.set_num_threads(1)
    world = init_world()
    task = load_task("arithmetic", val_size=1)
    base, tok = load_policy("", torch.device("cpu"))
    forest = global_forest(base, tok, task)
    mine = forest.trees_only(list(range(TREES))[world.share(TREES)])[0]
    w = walk(mine, lam=0.1)
    parallels = ["fsdp", "ddp"] if world.size > 1 else ["none"]
    runs = [(p, layout, "", 0, False) for p in parallels for layout in ("tree", "flat")]
    runs += [(p, layout, "", BUDGET, ckpt) for p in parallels for layout in ("tree", "flat") for ckpt in (False, True)]
    runs += [("fsdp", "tree", "bfloat16", 0, False)] * (world.size > 1)
    for parallel, layout, param_dtype, budget, ckpt in runs:
        settings = UpdateSettings(temperature=1.0, kl_coef=0.0, deterministic=True, max_tokens_per_micro_batch=budget)
        batch = pack_trees(mine, w.advantage, w.leaves, tok.pad_token_id, "none", None if budget else 1, budget) \
            if layout == "tree" else flatten(mine, w.advantage, w.leaves, tok.pad_token_id, "none")
        lm = copy.deepcopy(base)
        if ckpt:
            checkpoint_activations(lm)
        policy = wrap(TokenLogprobs(lm), parallel, world, param_dtype)
        # SGD: Adam's first step, lr * g / |g|, turns float noise in near-zero gradients into whole steps
        opt = torch.optim.SGD(policy.parameters(), lr=1e-2)
        with torch.no_grad():
            loss = world.sum(float(minibatch_loss(policy, batch, settings, world=world)[0]) / world.size)
        stats = ppo_update(policy, opt, batch, settings, world=world)
        full = get_model_state_dict(policy, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        prefix = causal_lm_of(policy)[1]
        grads = {name.removeprefix("module.")[len(prefix):]: whole(p.grad).detach().clone() for name, p in policy.named_parameters()}
        counts = world.gather(len(micro_batches(batch, budget)) if budget else 1)
        if world.is_main:
            name = "-".join(filter(None, (parallel, param_dtype, "micro" * bool(budget), "ckpt" * ckpt, layout)))
            torch.save({"loss": loss, "grad_norm": stats["actor/grad_norm"], "grads": grads, "micro_batches": counts, "stats": stats,
                        "weights": {k[len(prefix):]: v for k, v in full.items()}}, out / f"{name}.pt")
    close_world()  # no rank exits while a peer still uses the group: gloo aborts it


if __name__ == "__main__":
    main(Path(sys.argv[1]))
