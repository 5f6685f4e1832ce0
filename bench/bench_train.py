"""Training-step claims on the default workload (bundled model and task, IB-TPO preset).

- the step split into the parts the trainer times (rollout, reward, walk, update, sync, ...), with
  generated tokens per second;
- tree-packed against flattened training on the same rollout: tokens processed, update time and
  peak memory (target: <= 0.7x the tokens processed, a matching drop in time, identical loss), for
  the default `gather` tree attention and, as extra information, the dense-mask reference;
- on CUDA (marked gpu): the same comparison at a real model's scale, a Qwen2.5-0.5B-shaped model in
  bf16 on IBTree-shaped trees of 1k-token responses, for gather, mask and flex tree attention.

Run: pytest bench/bench_train.py --benchmark-only
"""
import json
import os
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from forests import ibtree_forest

from ibtpo_fast import walk
from ibtpo_fast.config import load_config
from ibtpo_fast.losses import token_coefficients
from ibtpo_fast.packing import flatten, pack_trees
from ibtpo_fast.policy import token_logprobs
from ibtpo_fast.trainer import Trainer
from ibtpo_fast.update import minibatch_loss

BATCH = 16


def make_trainer(tmp: Path, batch: int) -> Trainer:
    return Trainer(load_config([f"data.batch_size={batch}", "data.val_size=8", f"run.out_dir={tmp}",
                                "run.resume=never", "run.progress=off"]))


def test_step_breakdown(benchmark, tmp_path):
    batch = 2 if benchmark.disabled else BATCH
    trainer = make_trainer(tmp_path, batch)
    trainer.step()  # warm-up: first-call costs (numba compilation, allocator) out of the figure
    m = benchmark.pedantic(trainer.step, rounds=1 if benchmark.disabled else 3, iterations=1)
    # Every part the trainer times, whichever it reports; "timing/step" is their whole, not a part.
    parts = {k: v for k, v in m.items() if k.startswith("timing/") and k != "timing/step"}
    benchmark.extra_info.update(parts, tokens_per_s=m["perf/tokens_per_s"],
                                generated_tokens=m["tree/generated_tokens"] * batch)
    assert all(v >= 0 for v in parts.values())
    assert m["tree/trajectories"] == trainer.sampler.cfg.tree.trajectories


def _batches(trainer: Trainer) -> dict:
    """One rollout as the trainer packs it (`tree`), with narrow rows under a dense mask, and flattened."""
    rollout = trainer.rollout(range(trainer.cfg.data.batch_size))
    w = walk(rollout.forest)
    pad = trainer.tokenizer.pad_token_id
    return {"tree": trainer.pack(rollout.forest, w), "mask": pack_trees(rollout.forest, w.advantage, w.leaves, pad),
            "flat": flatten(rollout.forest, w.advantage, w.leaves, pad)}


def _update_loss(trainer: Trainer, batch, backend: str = "gather") -> tuple[float, float]:
    """Loss and time of one forward + backward from the trainer's current weights."""
    settings = replace(trainer.update_settings, tree_attention=backend)
    trainer.model.zero_grad()
    t0 = time.perf_counter()
    loss, _ = minibatch_loss(trainer.model, batch, settings)
    loss.backward()
    elapsed = time.perf_counter() - t0
    return float(loss.detach()), elapsed


TOKENS_TARGET = TIME_TARGET = 0.7  # tree-packed vs flattened: <= 0.7x the tokens, a matching drop in time


def test_tree_packed_vs_flattened(benchmark, claim, tmp_path):
    trainer = make_trainer(tmp_path, 2 if benchmark.disabled else BATCH)
    trainer.cfg.algo.kl_coef = 0.0
    assert trainer.layout == "tree" and trainer.tree_attention == "gather"  # the defaults on this model
    batches = _batches(trainer)
    backend = {"tree": "gather", "mask": "mask", "flat": "gather"}
    for name, b in batches.items():
        _update_loss(trainer, b, backend[name])  # warm-up
    rounds = 1 if benchmark.disabled else 5
    tree_loss, _ = benchmark.pedantic(_update_loss, (trainer, batches["tree"]), rounds=rounds, iterations=1)
    times = {"tree": benchmark.stats.stats.min if not benchmark.disabled else 1.0}
    losses = {"tree": tree_loss}
    for name in ("mask", "flat"):  # interleaved rounds: every layout sees the same machine load
        runs = [_update_loss(trainer, batches[name], backend[name]) for _ in range(rounds)]
        losses[name], times[name] = runs[0][0], min(t for _, t in runs)
    assert losses["tree"] == pytest.approx(losses["flat"], rel=1e-5)
    assert losses["mask"] == pytest.approx(losses["flat"], rel=1e-5)
    tokens = {k: b.tokens_processed for k, b in batches.items()}
    benchmark.extra_info.update({f"tokens_{k}": v for k, v in tokens.items()}, **{f"loss_{k}": v for k, v in losses.items()})
    claim("tokens_ratio", tokens["tree"] / tokens["flat"])
    claim("tokens_ratio_mask", tokens["mask"] / tokens["flat"])
    assert tokens["tree"] <= TOKENS_TARGET * tokens["flat"] and tokens["mask"] < tokens["flat"]
    if not benchmark.disabled:
        mem = {layout: _peak_rss(layout, tmp_path) for layout in ("tree", "flat")}
        benchmark.extra_info.update({f"time_s_{k}": v for k, v in times.items()}, peak_mib_tree=mem["tree"] / 2**20,
                                    peak_mib_flat=mem["flat"] / 2**20)
        claim("time_ratio", times["tree"] / times["flat"], TIME_TARGET, higher_is_better=False)
        claim("time_ratio_mask", times["mask"] / times["flat"])  # the dense-mask reference: no claim
        claim("peak_ratio", mem["tree"] / mem["flat"])


def _peak_rss(layout: str, tmp: Path) -> int:
    """Peak resident-set growth of one forward + backward, in a fresh process per layout."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}  # the child imports what this process can
    out = subprocess.run([sys.executable, __file__, layout, str(tmp / layout)], capture_output=True, text=True,
                         check=True, timeout=900, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])["peak_growth"]


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field):
            return int(line.split()[1])
    raise KeyError(field)


def _child(layout: str, tmp: str) -> None:
    trainer = make_trainer(Path(tmp), BATCH)
    trainer.cfg.algo.kl_coef = 0.0
    batch = _batches(trainer)[layout]
    base = _status_kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    _update_loss(trainer, batch)
    print(json.dumps({"peak_growth": (_status_kib("VmHWM") - base) * 1024}))


def _gpu_step(model, batch, backend: str) -> tuple[float, float, int]:
    """(loss, seconds, peak bytes) of one forward + backward of a policy-gradient surrogate."""
    model.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    t0 = time.perf_counter()
    logp, _ = token_logprobs(model, batch, 1.0, backend)
    coef = token_coefficients("token-mean", batch.mult, batch.seq_share, batch.num_traj) * batch.advantages
    loss = -(logp.float() * coef.cuda()).sum()
    loss.backward()
    torch.cuda.synchronize()
    return float(loss.detach()), time.perf_counter() - t0, torch.cuda.max_memory_allocated() - base


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_tree_attention(benchmark, claim, qwen25_05b):
    smoke, model = benchmark.disabled, qwen25_05b.train()
    f = ibtree_forest(np.random.default_rng(0), 1 if smoke else 2, 256, 4 if smoke else 16, 64, model.config.vocab_size)
    w = walk(f)
    batches = {"flat": flatten(f, w.advantage, w.leaves, 0),
               "gather": pack_trees(f, w.advantage, w.leaves, 0, num_rows=1),
               "mask": pack_trees(f, w.advantage, w.leaves, 0), "flex": pack_trees(f, w.advantage, w.leaves, 0)}
    backend = {"flat": "gather", "gather": "gather", "mask": "mask", "flex": "flex"}
    runs = {name: (lambda name=name: _gpu_step(model, batches[name], backend[name])) for name in batches}
    for fn in runs.values():
        fn()  # warm-up: flex compiles its kernels, the allocator settles
    results: dict[str, list] = {name: [] for name in runs}
    for _ in range(1 if smoke else 5):  # interleaved rounds
        for name, fn in runs.items():
            results[name].append(fn())
    best = {name: min(r, key=lambda x: x[1]) for name, r in results.items()}
    benchmark.pedantic(lambda: None, rounds=1, iterations=1)
    benchmark.extra_info["device"] = torch.cuda.get_device_name()
    for name, (loss, seconds, peak) in best.items():
        benchmark.extra_info.update({f"loss_{name}": loss, f"time_s_{name}": seconds, f"peak_gib_{name}": peak / 2**30,
                                     f"tokens_{name}": batches[name].tokens_processed})
    tokens_flat = batches["flat"].tokens_processed
    for name in ("gather", "mask", "flex"):
        # The claim is flex's, the CUDA default: gather and mask have no flash kernel there.
        claim(f"time_ratio_{name}", best[name][1] / best["flat"][1], TIME_TARGET if name == "flex" else None,
              higher_is_better=False)
        claim(f"peak_ratio_{name}", best[name][2] / best["flat"][2])
        assert batches[name].tokens_processed <= TOKENS_TARGET * tokens_flat, name
        assert best[name][0] == pytest.approx(best["flat"][0], rel=2e-2, abs=1e-3), name  # bf16: sums in other orders


if __name__ == "__main__":
    torch.manual_seed(0)
    np.random.seed(0)
    _child(sys.argv[1], sys.argv[2])
