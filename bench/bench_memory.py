"""Memory per rank on CPU (gloo, one thread a rank), each figure from a fresh process's resident set:

- the training state (parameters, gradients, AdamW moments) of a 254M-parameter Qwen2-shaped model with random
  weights, loaded as the trainer loads it: whole in one process, sharded from rank 0 at 2 ranks (target: a rank's
  growth at 2 ranks <= 0.55x the one process's);
- the peak of one update on 16 responses of 2K tokens, unsplit against micro-batches of one response
  (`train.max_tokens_per_micro_batch`; target: >= 4x lower).

With --benchmark-disable both run at tiny shapes, untimed, as a smoke test.
Run: pytest bench/bench_memory.py --benchmark-only
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from forests import ibtree_forest
from transformers import AutoModelForCausalLM, Qwen2Config, Qwen2ForCausalLM

from ibtpo_fast import walk
from ibtpo_fast.distributed import close_world, init_world, shard_from_rank0
from ibtpo_fast.packing import flatten
from ibtpo_fast.policy import TokenLogprobs
from ibtpo_fast.update import UpdateSettings, micro_batches, ppo_update

STATE_TARGET, UPDATE_TARGET = 0.55, 4.0
# 254M parameters: 32k vocabulary untied, 16 layers of width 1024
STATE_SHAPE = dict(vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=16,
                   num_attention_heads=16, num_key_value_heads=8, tie_word_embeddings=False)
UPDATE_SHAPE = dict(vocab_size=16384, hidden_size=256, intermediate_size=704, num_hidden_layers=4,
                    num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
TINY = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, tie_word_embeddings=False)
RESPONSES, STEP_LEN = 16, 128  # 16 steps of 128 tokens: 2,048-token responses


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}


def _child(args: list[str], nproc: int = 1) -> list[dict]:
    """What a fresh process (`nproc` ranks under torchrun when more than one) of this file reports, per rank."""
    launcher = ["-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--standalone"] if nproc > 1 else []
    out = Path(args[1]) / f"report-{'-'.join([args[0], *args[2:]])}-{nproc}.json"
    subprocess.run([sys.executable, *launcher, __file__, *args, str(out)], check=True, timeout=1800, env=_env(),
                   capture_output=True, text=True)
    return json.loads(out.read_text())


def test_training_state_falls_with_ranks(benchmark, claim, tmp_path):
    shape = TINY if benchmark.disabled else STATE_SHAPE
    torch.manual_seed(0)
    Qwen2ForCausalLM(Qwen2Config(**shape)).save_pretrained(tmp_path / "model")
    reports = {}

    def measure():
        for nproc in (1, 2):
            reports[nproc] = _child(["state", str(tmp_path)], nproc)

    benchmark.pedantic(measure, rounds=1, iterations=1)
    one, two = reports[1][0], reports[2]
    for key in ("growth_mib", "peak_mib", "tensor_mib"):
        benchmark.extra_info[f"one_rank_{key}"] = one[key]
        benchmark.extra_info[f"two_ranks_{key}"] = [r[key] for r in two]
    benchmark.extra_info["parameters_m"] = one["parameters"] / 1e6
    assert all(r["tensor_mib"] <= 0.51 * one["tensor_mib"] for r in two)  # the shards: half, give or take padding
    claim("state_ratio", max(r["growth_mib"] for r in two) / one["growth_mib"], STATE_TARGET, higher_is_better=False,
          slack=1.0)


def test_update_peak_falls_with_micro_batches(benchmark, claim, tmp_path):
    tiny = benchmark.disabled
    reports = {}

    def measure():
        for budget in (0, 1):
            reports[budget] = _child(["update", str(tmp_path), str(budget), str(int(tiny))])[0]

    benchmark.pedantic(measure, rounds=1, iterations=1)
    unsplit, split = reports[0], reports[1]
    assert unsplit["micro_batches"] == 1 and split["micro_batches"] == RESPONSES
    assert split["loss"] == pytest.approx(unsplit["loss"], rel=1e-5)  # the same first update's loss: the split changes memory only
    benchmark.extra_info.update(unsplit_peak_mib=unsplit["peak_growth_mib"], micro_peak_mib=split["peak_growth_mib"],
                                tokens=unsplit["tokens"])
    claim("update_peak_ratio", unsplit["peak_growth_mib"] / split["peak_growth_mib"], UPDATE_TARGET, slack=1.0)


# ---- the measured processes -----------------------------------------------------------------------------------
def _status_mib(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field):
            return int(line.split()[1]) / 1024
    raise KeyError(field)


def _local_mib(tensors) -> float:
    return sum(getattr(t, "_local_tensor", t).untyped_storage().nbytes() for t in tensors) / 2**20


def _state(tmp: str, out: str) -> None:
    """One process: the whole model; under torchrun: the trainer's sharded load. Then the gradients and AdamW
    moments an update leaves, and this rank's resident growth over the process before loading."""
    world = init_world()
    base = _status_mib("VmRSS")
    load = lambda: AutoModelForCausalLM.from_pretrained(Path(tmp) / "model")  # noqa: E731
    policy = TokenLogprobs(load()) if world.size == 1 else shard_from_rank0(load, world, torch.device("cpu")).policy
    params = list(policy.parameters())
    opt = torch.optim.AdamW(params, lr=1e-5)
    for p in params:
        p.grad = torch.zeros_like(p)
    opt.step()
    state = [t for s in opt.state.values() for t in s.values() if t.dim() > 0]
    report = {"growth_mib": _status_mib("VmRSS") - base, "peak_mib": _status_mib("VmHWM") - base,
              "tensor_mib": _local_mib(params + [p.grad for p in params] + state),
              "parameters": sum(p.numel() for p in params)}
    ranks = world.gather(report)
    if world.is_main:
        Path(out).write_text(json.dumps(ranks))
    close_world()


def _update(tmp: str, budget: str, tiny: str, out: str) -> None:
    """One warm-up update (AdamW's moments made, the allocator settled), then the peak resident growth of the
    next, unsplit (`budget` 0) or one response a micro-batch."""
    torch.set_num_threads(1)
    torch.manual_seed(0)
    shape, steps = (TINY, 2) if tiny == "1" else (UPDATE_SHAPE, 16)
    lm = Qwen2ForCausalLM(Qwen2Config(**shape, attn_implementation="sdpa"))
    forest = ibtree_forest(np.random.default_rng(0), 1, 64, steps, STEP_LEN, shape["vocab_size"], tree=(RESPONSES, 0))
    w = walk(forest)
    batch = flatten(forest, w.advantage, w.leaves, 0)
    micro = int(batch.row_widths.max()) if budget == "1" else 0
    settings = UpdateSettings(temperature=1.0, kl_coef=0.0, deterministic=True, max_tokens_per_micro_batch=micro)
    policy = TokenLogprobs(lm)
    opt = torch.optim.AdamW(policy.parameters(), lr=1e-5)
    first = ppo_update(policy, opt, batch, settings)
    base = _status_mib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current resident set
    ppo_update(policy, opt, batch, settings)
    Path(out).write_text(json.dumps([{
        "peak_growth_mib": _status_mib("VmHWM") - base, "loss": first["actor/pg_loss"], "tokens": batch.tokens_processed,
        "micro_batches": len(micro_batches(batch, micro)) if micro else 1}]))


if __name__ == "__main__":
    torch.set_num_threads(1)
    {"state": _state, "update": _update}[sys.argv[1]](*sys.argv[2:])
