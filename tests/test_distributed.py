"""Data parallelism on CPU (gloo, 2 ranks, 1 thread each): N ranks make the single-process update, a run
killed mid-step resumes exactly, checkpoints move between world sizes, one rank's error ends every rank."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from test_resume import comparable, records, wait_inside_step_3
from transformers import AutoModelForCausalLM

from ibtpo_fast.config import ConfigError, load_config
from ibtpo_fast.metrics import reduce_parts

HERE = Path(__file__).resolve().parent
SLOW = f"{HERE / 'reward_fns.py'}:slow_arithmetic"
RUN = ["data.batch_size=2", "data.val_size=4", "train.eval_k=2", "rollout.tree=2,3,1,1", "run.progress=off",
       "train.steps=4", "run.save_every=2", "run.name=r", "data.reward_workers=0"]


def env(**extra):
    return {**os.environ, "OMP_NUM_THREADS": "1", **extra}


def torchrun(*args, nproc=2):
    return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--standalone",
            "--monitor-interval", "0.1", *args]


def train(out_dir, *args, nproc=2, launcher=None):
    """The training command at `nproc` ranks, under torchrun when more than one (or `launcher`)."""
    launched = nproc > 1 if launcher is None else launcher
    cmd = torchrun("-m", "ibtpo_fast.train", *RUN, f"run.out_dir={out_dir}", *args, nproc=nproc) if launched else \
        [sys.executable, "-m", "ibtpo_fast.train", *RUN, f"run.out_dir={out_dir}", *args]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env())


def finish(proc, timeout=600):
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, err[-4000:]
    return out


@pytest.fixture(scope="module")
def updates(tmp_path_factory):
    """One update on the same global batch, at 1 rank and at 2 (fsdp and ddp, tree and flat layouts)."""
    one, two = tmp_path_factory.mktemp("one"), tmp_path_factory.mktemp("two")
    script = str(HERE / "dist_update.py")
    single = subprocess.run([sys.executable, script, str(one)], capture_output=True, text=True, env=env())
    assert single.returncode == 0, single.stderr[-4000:]
    pair = subprocess.run(torchrun(script, str(two)), capture_output=True, text=True, env=env(), timeout=600)
    assert pair.returncode == 0, pair.stderr[-4000:]
    return one, two


def assert_same_update(want, got):
    assert got["loss"] == pytest.approx(want["loss"], rel=1e-5, abs=1e-7)
    assert want["stats"].keys() == got["stats"].keys() and "actor/pg_clipfrac" in want["stats"]
    for key, value in want["stats"].items():  # the global batch's statistics, not rank 0's
        assert got["stats"][key] == pytest.approx(value, rel=1e-5, abs=1e-7), key
    assert got["grad_norm"] == pytest.approx(want["grad_norm"], rel=1e-5)
    assert want["grad_norm"] > 0
    assert want["weights"].keys() == got["weights"].keys() and want["grads"].keys() == got["grads"].keys()
    for name, g in want["grads"].items():
        scale = g.abs().max()
        assert (got["grads"][name] - g).abs().max() <= 1e-5 * scale + 1e-9, name
    for name, w in want["weights"].items():
        torch.testing.assert_close(got["weights"][name], w, rtol=1e-5, atol=1e-7, msg=name)


@pytest.mark.parametrize("parallel", ["fsdp", "ddp"])
@pytest.mark.parametrize("layout", ["tree", "flat"])
@pytest.mark.parametrize("variant", ["", "micro-", "micro-ckpt-"])
def test_two_ranks_make_the_single_process_update(updates, parallel, layout, variant):
    """Also with micro-batches (the ranks running different numbers of them) and activation checkpointing."""
    one, two = updates
    got = torch.load(two / f"{parallel}-{variant}{layout}.pt")
    assert_same_update(torch.load(one / f"none-{layout}.pt"), got)
    if variant:
        assert len(set(got["micro_batches"])) == 2, got["micro_batches"]  # one rank ran zero-weight passes


@pytest.mark.parametrize("layout", ["tree", "flat"])
@pytest.mark.parametrize("variant", ["micro-", "micro-ckpt-"])
def test_micro_batches_and_checkpointing_make_the_unsplit_update(updates, layout, variant):
    one, _ = updates
    got = torch.load(one / f"none-{variant}{layout}.pt")
    assert_same_update(torch.load(one / f"none-{layout}.pt"), got)
    assert got["micro_batches"][0] >= 3


def test_fsdp_mixed_precision_computes_in_bf16_and_stays_close(updates):
    one, two = updates
    want, got = torch.load(one / "none-tree.pt"), torch.load(two / "fsdp-bfloat16-tree.pt")
    assert got["loss"] != want["loss"] and got["loss"] == pytest.approx(want["loss"], rel=0.05)
    assert all(w.dtype == torch.float32 for w in got["weights"].values())  # the sharded master weights stay fp32
    moved = [(got["weights"][k] - want["weights"][k]).abs().max() for k in want["weights"]]
    assert max(moved) < 1e-3


def union_metrics(ranks):
    """The one-process metrics of the ranks' data together, as one process defines them."""
    cat = {k: np.concatenate([np.asarray(r[k], np.float64) for r in ranks]) for k in
           ("reward", "response_len", "cut", "effective", "generated", "pick_depth", "pick_len", "pick_cov",
            "ib_score", "cov_eta")}
    trees, gen, leaves = sum(r["trees"] for r in ranks), cat["generated"].sum(), len(cat["reward"])
    cached, prefix = np.sum([r["parts"]["rollout/prefix_cache_hit_rate"] for r in ranks], axis=0)
    return {
        "tree/trajectories": leaves / trees, "tree/generated_tokens": gen / trees,
        "tree/trajectories_per_1k_tokens": 1000 * leaves / gen, "tree/unique_token_ratio": gen / cat["response_len"].sum(),
        "tree/eff_rate": cat["effective"].mean(), "critic/score/mean": cat["reward"].mean(),
        "response_length/mean": cat["response_len"].mean(), "response_length/clip_ratio": cat["cut"].mean(),
        "rollout/prefix_cache_hit_rate": cached / prefix, "tree/root_pick_share": np.mean(cat["pick_depth"] == 0),
        "tree/pick_prefix_share": cat["pick_len"].mean() / cat["response_len"].mean(),
        "ib/cov_eta_picked": np.nanmean(cat["pick_cov"]), "ib/score_mean": np.nanmean(cat["ib_score"]),
        "ib/cov_eta": np.nanmean(cat["cov_eta"]), "perf/tokens_per_s": gen / max(r["rollout_s"] for r in ranks),
        "train/tokens_processed": sum(r["parts"]["train/tokens_processed"][0] for r in ranks),
    }


def test_two_rank_metrics_are_those_of_the_union_of_their_data(tmp_path):
    done = subprocess.run(torchrun(str(HERE / "dist_metrics.py"), str(tmp_path), *RUN, "data.batch_size=4"),
                          capture_output=True, text=True, env=env(), timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert sum(ranks[0]["response_len"]) != sum(ranks[1]["response_len"])  # the ranks hold unequal token counts
    logged, want = records(tmp_path)[1], union_metrics(ranks)
    for key, value in want.items():
        assert logged[key] == pytest.approx(value, rel=1e-9, abs=1e-12), key
    # the old mean of the ranks' means misses on the token ratios: the test can tell them apart
    local = [reduce_parts([r["parts"]]) for r in ranks]
    assert abs(np.mean([m["tree/unique_token_ratio"] for m in local]) - want["tree/unique_token_ratio"]) > 1e-6
    # timings: the slowest rank's, whose parts still sum to its step
    slowest = max(ranks, key=lambda r: r["parts"]["timing/step"][0])["parts"]
    timings = {k: v for k, v in logged.items() if k.startswith("timing/") and k not in ("timing/step", "timing/eval")}
    assert timings == {k: slowest[k][0] for k in timings} and logged["timing/step"] == slowest["timing/step"][0]
    assert sum(timings.values()) == pytest.approx(logged["timing/step"], rel=0.05)


def test_killed_two_rank_run_resumes_as_if_uninterrupted(tmp_path):
    whole = train(tmp_path / "whole", f"data.reward_fn={SLOW}")
    finish(whole)
    crashed = tmp_path / "crashed"
    proc = train(crashed, f"data.reward_fn={SLOW}")
    wait_inside_step_3(proc, crashed)
    worker = [int(p) for p in subprocess.run(["pgrep", "-f", "-P", str(proc.pid), "ibtpo_fast.train"],
                                             capture_output=True, text=True).stdout.split()]
    assert worker, "no rank to kill"
    os.kill(worker[-1], signal.SIGKILL)  # one rank dies: torchrun stops the job
    proc.communicate(timeout=120)
    assert proc.returncode != 0 and 3 not in records(crashed)
    out = finish(train(crashed, f"data.reward_fn={SLOW}"))
    assert "resumed from step 2" in out
    want, got = records(tmp_path / "whole"), records(crashed)
    assert sorted(got) == [0, 1, 2, 3, 4]
    for step in (3, 4):
        assert comparable(got[step]) == comparable(want[step]), step


def test_checkpoint_moves_between_world_sizes(tmp_path):
    finish(train(tmp_path, "train.steps=2", "run.save_every=1"))
    ckpt = tmp_path / "r" / "checkpoints" / "global_step_2"
    assert sorted(p.name for p in (ckpt / "dcp").glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    export = AutoModelForCausalLM.from_pretrained(ckpt)  # the consolidated Hugging Face export
    from ibtpo_fast.trainer import Trainer

    with pytest.warns(RuntimeWarning, match="written at 2 ranks and resumes at 1: the ranks take the first 1's RNG"):
        resumed = Trainer(load_config([*RUN, f"run.out_dir={tmp_path}", "train.steps=3"]))  # one process
    assert resumed.global_step == 2
    for name, p in export.state_dict().items():
        torch.testing.assert_close(resumed.model.state_dict()[name], p, rtol=0, atol=0, msg=name)
    moments = [s["exp_avg"] for s in resumed.optimizer.state.values()]
    assert moments and all(m.abs().sum() > 0 for m in moments)  # Adam's moments came back, not a fresh optimizer
    resumed.train()  # the run goes on at one rank and saves there
    exports = [safe_open(tmp_path / "r" / "checkpoints" / f"global_step_{n}" / "model.safetensors", "pt").keys()
               for n in (2, 3)]
    assert sorted(exports[0]) == sorted(exports[1]) and "lm_head.weight" not in exports[0]  # the same at any world size
    finish(train(tmp_path, "train.steps=4", "run.save_every=1"))  # and back to two ranks
    assert sorted(records(tmp_path)) == [0, 1, 2, 3, 4]


def test_an_error_on_one_rank_ends_every_rank(tmp_path):
    start = time.time()
    proc = train(tmp_path, f"data.reward_fn={HERE / 'reward_fns.py'}:fails_on_rank_1")
    out, err = proc.communicate(timeout=120)
    assert proc.returncode != 0
    assert "reward failed on rank 1" in err
    assert time.time() - start < 90


def test_global_batch_must_divide_over_the_ranks(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "3")
    with pytest.raises(ConfigError, match="data.batch_size: 16 trees do not divide over 3 ranks"):
        load_config([])
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match="train.parallel: none cannot train on 2 ranks"):
        load_config(["train.parallel=none"])
    with pytest.raises(ConfigError, match="train.mini_batches"):
        load_config(["data.batch_size=4", "train.mini_batches=4"])
    assert load_config([]).train.parallel == "auto"
    monkeypatch.delenv("WORLD_SIZE")
    with pytest.raises(ConfigError, match="train.parallel: fsdp needs a process group; launch with torchrun"):
        load_config(["train.parallel=fsdp"])


def test_fsdp_trains_on_a_single_rank_under_torchrun(tmp_path):
    finish(train(tmp_path, "train.steps=1", "train.parallel=fsdp", nproc=1, launcher=True))
    assert sorted(records(tmp_path)) == [0, 1]


def test_a_stalled_rank_ends_the_wait_at_the_process_group_timeout():
    done = subprocess.run(torchrun(str(HERE / "dist_timeout.py"), "3"), capture_output=True, text=True, env=env(),
                          timeout=120)
    waited = [float(line.split()[3]) for line in done.stdout.splitlines() if line.startswith("gave up after")]
    assert waited and 2.5 < waited[0] < 15, done.stdout + done.stderr[-2000:]
