"""Data-parallel scaling on CPU: the default workload's training step at 1 rank against 2 ranks under torchrun
(gloo, one thread per rank, the same global batch of 16 trees), FSDP2 and DDP.

- scaling efficiency t1 / (2 x t2) from the median `timing/step` after a warm-up step (target >= 0.8);
- what the FSDP2 weight gather for the rollout engine adds (`timing/sync`) and holds (`perf/rollout_weights_mb`).

Run: pytest bench/bench_distributed.py --benchmark-only
"""
import json
import os
import subprocess
import sys
from pathlib import Path
from statistics import median

EFFICIENCY_TARGET = 0.8


def run(out: Path, nproc: int, parallel: str, steps: int, batch: int) -> list[dict]:
    args = ["-m", "ibtpo_fast.train", f"train.steps={steps}", f"data.batch_size={batch}", "data.val_size=2",
            "train.eval_k=1", "train.eval_every=0", f"run.save_every={steps}", "run.progress=off",
            f"run.out_dir={out}", f"run.name={parallel}-{nproc}", f"train.parallel={parallel}"]
    launcher = ["-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--standalone"] if nproc > 1 else []
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, *launcher, *args], capture_output=True, text=True, env=env, timeout=1200)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = (out / f"{parallel}-{nproc}" / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["step"] > 1]  # step 1 warms up (numba, allocator)


def test_two_ranks_against_one(benchmark, claim, tmp_path):
    steps, batch = (2, 4) if benchmark.disabled else (7, 16)
    records = {}

    def measure():
        for nproc, parallel in ((1, "none"), (2, "fsdp"), (2, "ddp")):
            records[parallel] = run(tmp_path, nproc, parallel, steps, batch)

    benchmark.pedantic(measure, rounds=1, iterations=1)
    step = {k: median(r["timing/step"] for r in recs) for k, recs in records.items()}
    for name in ("fsdp", "ddp"):
        claim(f"efficiency_{name}", step["none"] / (2 * step[name]), EFFICIENCY_TARGET if name == "fsdp" else None,
              slack=1.6)
        benchmark.extra_info[f"step_s_{name}"] = step[name]
        benchmark.extra_info[f"sync_s_{name}"] = median(r["timing/sync"] for r in records[name])
    benchmark.extra_info["step_s_one_rank"] = step["none"]
    benchmark.extra_info["sync_s_one_rank"] = median(r["timing/sync"] for r in records["none"])
    benchmark.extra_info["rollout_weights_mb"] = records["fsdp"][-1]["perf/rollout_weights_mb"]
    assert all(r["tree/trajectories"] == 12 for recs in records.values() for r in recs)
