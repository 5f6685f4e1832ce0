"""The trainer's models at whatever world size this runs in: `python tests/dist_sharded.py OUT VARIANT...` (one
process), `torchrun --nproc-per-node N tests/dist_sharded.py OUT VARIANT...`. For each variant (`fp32`; `bf16`:
model.dtype=bfloat16 with micro-batches and activation checkpointing; `offload`: the reference model's shards in CPU
memory) it builds a Trainer (the KL term on, so the
reference model counts), records what the build held (this rank's parameter bytes of policy, reference and
rollout replica, and which ranks read the weights from disk), then makes two updates on a fixed global batch of 4
trees, each rank its share, and writes the whole weights and those records to OUT/<variant>.pt from rank 0, for
tests/test_sharded_loading.py."""
import sys
from pathlib import Path

import torch
from dist_update import BUDGET, TREES, global_forest
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from transformers import AutoModelForCausalLM

from ibtpo_fast.config import load_config
from ibtpo_fast.distributed import whole
from ibtpo_fast.loading import load_policy
from ibtpo_fast.trainer import Trainer
from ibtpo_fast.update import ppo_update
from ibtpo_fast.walk import walk

RUN = ["data.batch_size=4", "data.val_size=1", "train.eval_k=1", "rollout.tree=2,3,1,1", "run.progress=off",
       "data.reward_workers=0", "algo.kl_coef=0.05", "train.layout=tree"]
VARIANTS = {"fp32": [], "bf16": ["model.dtype=bfloat16", f"train.max_tokens_per_micro_batch={BUDGET}",
                                 "train.activation_checkpointing=true"],
            "offload": ["train.ref_offload=true"]}


def local_bytes(module: torch.nn.Module | None) -> int:
    """Bytes of the parameters this rank holds: its shards of a sharded module."""
    if module is None:
        return 0
    return sum(getattr(p, "_local_tensor", p).untyped_storage().nbytes() for p in module.parameters())


def offload_policy(ref: torch.nn.Module):
    """The offload policy FSDP2 holds the reference model's root group under."""
    return ref._get_fsdp_state()._fsdp_param_group.offload_policy


def count_loads() -> list[int]:
    """A running count of this process's whole-model loads from disk."""
    calls, real = [0], AutoModelForCausalLM.from_pretrained.__func__

    def counted(cls, *args, **kwargs):
        calls[0] += 1
        return real(cls, *args, **kwargs)

    AutoModelForCausalLM.from_pretrained = classmethod(counted)
    return calls


def run(out: Path, variant: str, loads: list[int]) -> None:
    before = loads[0]
    tr = Trainer(load_config([*RUN, f"run.out_dir={out}", f"run.name={variant}", *VARIANTS[variant]]))
    held = {"policy": local_bytes(tr.policy), "ref": local_bytes(tr.ref_model),
            "replica_built": local_bytes(tr.rollout_weights.model) if tr.rollout_weights else 0}
    loaded = loads[0] - before
    tr.sync_weights()  # the replica gathers the policy's weights, whole
    replica_whole = tr.rollout_weights is None or all(
        torch.equal(q, whole(p).detach().to(q.dtype))
        for p, q in zip(tr.model.parameters(), tr.rollout_weights.model.parameters(), strict=True))
    base, tok = load_policy("", torch.device("cpu"))
    forest = global_forest(base, tok, tr.task)
    mine = forest.trees_only(list(range(TREES))[tr.world.share(TREES)])[0]
    batch = tr.pack(mine, walk(mine, lam=0.1))
    opt = torch.optim.SGD(tr.policy.parameters(), lr=1e-2)  # SGD: see dist_update.py
    settings = tr.update_settings
    stats = [ppo_update(tr.policy, opt, batch, settings, tr.ref_model, tr.world) for _ in range(2)]
    full = get_model_state_dict(tr.policy, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    ranks = tr.world.gather({**held, "loaded": loaded, "replica_whole": replica_whole})
    offload = type(offload_policy(tr.ref_model)).__name__ if tr.parallel == "fsdp" else ""
    if tr.world.is_main:
        torch.save({"weights": {k.removeprefix("module.").removeprefix("lm."): v for k, v in full.items()},
                    "stats": stats, "ranks": ranks, "parallel": tr.parallel,
                    "ref_dtypes": sorted({str(p.dtype) for p in tr.ref_model.parameters()}),
                    "ref_offload": offload}, out / f"{variant}.pt")
    tr.release()


def main(out: Path, variants: list[str]) -> None:
    torch.set_num_threads(1)
    loads = count_loads()
    for variant in variants:
        run(out, variant, loads)


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2:])
