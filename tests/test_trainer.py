"""The trainer on the bundled tiny model: the update's direction, presets, the default CLI run."""
import copy
import json
import subprocess
import sys
import time
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from ibtpo_fast import walk
from ibtpo_fast.config import PRESETS, ConfigError, load_config
from ibtpo_fast.policy import token_logprobs
from ibtpo_fast.runlog import RunLogger
from ibtpo_fast.trainer import Trainer
from ibtpo_fast.update import SKIPPED, ppo_update

FAST = ["data.batch_size=2", "data.val_size=4", "train.eval_k=2", "rollout.tree=2,3,1,1", "run.progress=off"]


def trainer(tmp_path, *args):
    return Trainer(load_config([*FAST, f"run.out_dir={tmp_path}", *args]))


def test_update_moves_logprobs_along_the_advantage(tmp_path):
    tr = trainer(tmp_path, "train.lr=1e-5", "algo.kl_coef=0", "train.warmup_steps=0", "data.batch_size=4")
    for attempt in range(5):  # a batch where some step has a non-zero advantage
        rollout = tr.rollout(range(4 * attempt, 4 * attempt + 4))
        w = walk(rollout.forest, lam=0.1)
        batch = tr.pack(rollout.forest, w)
        if (batch.advantages.abs() > 1e-3).any():
            break
    with torch.no_grad():
        before, _ = token_logprobs(tr.model, batch, 1.0)
    tr.update(batch)
    with torch.no_grad():
        after, _ = token_logprobs(tr.model, batch, 1.0)
    delta = after - before
    pos, neg = batch.advantages > 1e-3, batch.advantages < -1e-3
    assert pos.any() or neg.any()
    if pos.any():
        assert delta[pos].mean() > 0
    if neg.any():
        assert delta[neg].mean() < 0


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_every_preset_runs_two_steps(tmp_path, preset):
    tree = "4,1,1,1" if preset.startswith("grpo") else "2,3,1,1"
    tr = trainer(tmp_path, f"preset={preset}", f"rollout.tree={tree}", "train.steps=2")
    metrics = [tr.step() for _ in range(2)]
    for m in metrics:
        assert np.isfinite(m["actor/pg_loss"]) and m["tree/trajectories"] == 4  # 4,1,1,1 and 2 + (3 - 1) * 1 * 1
    assert tr.global_step == 2


def test_default_cli_run_writes_metrics_plots_and_checkpoint(tmp_path):
    cmd = [sys.executable, "-m", "ibtpo_fast.train", *FAST, "train.steps=2", f"run.out_dir={tmp_path}", "run.name=cli"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "val-core/arithmetic/acc/mean@2" in out.stdout and "->" in out.stdout
    run = tmp_path / "cli"
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [0, 1, 2]
    names = {"critic/score/mean", "actor/entropy", "actor/pg_clipfrac", "actor/kl", "response_length/mean",
             "response_length/clip_ratio",
             "ib/score_mean", "ib/cov_eta", "tree/eff_rate", "tree/trajectories", "tree/generated_tokens",
             "tree/trajectories_per_1k_tokens", "tree/unique_token_ratio", "rollout/prefix_cache_hit_rate",
             "timing/rollout", "timing/reward", "timing/walk", "timing/pack", "timing/update", "timing/sync",
             "timing/step"}
    assert names <= set(lines[1]), names - set(lines[1])
    assert "val-core/arithmetic/acc/mean@2" in lines[0] and "val-core/arithmetic/acc/pass@2" in lines[2]
    for png in ("accuracy.png", "entropy.png", "ib_score.png", "eff_rate.png", "tokens.png"):
        assert (run / "plots" / png).stat().st_size > 1000
    assert (run / "config.yaml").is_file()
    AutoModelForCausalLM.from_pretrained(run / "checkpoints" / "global_step_2")


@pytest.mark.parametrize("layout, attention", [("tree", "mask"), ("flat", "auto")])
def test_layouts_make_the_same_update(tmp_path, layout, attention):
    """One update from the same rollout: tree-packed gather (the default), the dense-mask reference
    and flattened trajectories see the same loss, gradient norm, entropy and KL."""
    def update(*args):
        tr = trainer(tmp_path / "_".join(args), "data.batch_size=4", *args)
        rollout = tr.rollout(range(4))
        return tr, tr.update(tr.pack(rollout.forest, walk(rollout.forest)))

    tr, default = update()
    assert (tr.layout, tr.tree_attention) == ("tree", "gather")
    tr, other = update(f"train.layout={layout}", f"train.tree_attention={attention}")
    assert tr.layout == layout
    for key in ("actor/pg_loss", "actor/grad_norm", "actor/entropy", "actor/kl"):
        assert other[key] == pytest.approx(default[key], rel=1e-4, abs=1e-7), key


def test_flex_attention_model_on_cpu(tmp_path):
    """A model loaded for FlexAttention decodes through sdpa and, on CPU, trains with gather;
    asking for flex on CPU fails up front."""
    tr = trainer(tmp_path, "model.attn_implementation=flex_attention", "train.steps=1")
    assert tr.model.config._attn_implementation == "flex_attention" and tr.tree_attention == "gather"
    assert np.isfinite(tr.step()["actor/pg_loss"])
    assert tr.model.config._attn_implementation == "flex_attention"
    with pytest.raises(ConfigError, match="CUDA"):
        trainer(tmp_path / "flex", "model.attn_implementation=flex_attention", "train.tree_attention=flex")
    with pytest.raises(ConfigError, match="sdpa or eager"):
        trainer(tmp_path / "mask", "model.attn_implementation=flex_attention", "train.tree_attention=mask")
    cmd = [sys.executable, "-m", "ibtpo_fast.train", *FAST, f"run.out_dir={tmp_path / 'cli'}",
           "model.attn_implementation=flex_attention", "train.tree_attention=flex"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert out.returncode == 2 and "config error: train.tree_attention=flex" in out.stderr, out.stderr[-2000:]


def test_same_seed_same_weights(tmp_path):
    """Two runs of the default tree-packed update, same seed: bitwise the same weights. Left to themselves,
    the update's backward sums in an order that varies from run to run on several CPU threads."""
    weights = []
    for run in ("a", "b"):
        tr = trainer(tmp_path / run, "data.batch_size=4", "rollout.tree=4,3,1,1", "train.steps=2")
        for _ in range(2):
            tr.step()
        weights.append([p.detach().clone() for p in tr.model.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*weights))
    assert not torch.are_deterministic_algorithms_enabled()  # the update's setting does not leak out


def test_step_timings_sum_to_its_wall_time(tmp_path):
    tr = trainer(tmp_path, "train.steps=2")
    tr.step()  # the first step pays one-off costs outside the timed parts as well
    t0 = time.perf_counter()
    m = tr.step()
    wall = time.perf_counter() - t0
    parts = {k: v for k, v in m.items() if k.startswith("timing/") and k != "timing/step"}
    assert set(parts) == {f"timing/{k}" for k in ("rollout", "reward", "walk", "pack", "update", "sync")}
    assert all(v >= 0 for v in parts.values())
    assert m["timing/step"] == pytest.approx(wall, rel=0.05)
    assert sum(parts.values()) == pytest.approx(m["timing/step"], rel=0.05)


def test_update_runs_without_the_trainer(tmp_path):
    """`ppo_update` on a model, an optimizer and a batch gives the trainer's own update, bit for bit."""
    tr = trainer(tmp_path, "data.batch_size=4", "train.warmup_steps=0")
    rollout = tr.rollout(range(4))
    batch = tr.pack(rollout.forest, walk(rollout.forest))
    model = copy.deepcopy(tr.model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=tr.cfg.train.lr, weight_decay=tr.cfg.train.weight_decay)
    state = np.random.get_state()
    ours = ppo_update(model, optimizer, batch, tr.update_settings, tr.ref_model)
    np.random.set_state(state)
    theirs = tr.update(batch)
    assert ours[SKIPPED] == 0 and theirs["train/bad_steps"] == 0
    for key in ("actor/pg_loss", "actor/grad_norm", "actor/kl", "actor/entropy"):
        assert ours[key] == theirs[key], key
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), tr.model.parameters()))
    with pytest.raises(ValueError, match="reference model"):
        ppo_update(model, optimizer, batch, tr.update_settings, None)


def test_wandb_run_records_the_config(tmp_path, monkeypatch):
    """wandb itself is not installed here: the run handle RunLogger opens is replaced by a recorder."""
    seen = {}

    def open_wandb(self, config):
        seen["config"] = config
        return SimpleNamespace(log=lambda metrics, step: seen.setdefault("steps", []).append(step), finish=lambda: None)

    monkeypatch.setattr(RunLogger, "_open_wandb", open_wandb)
    tr = trainer(tmp_path, "run.wandb=true", "train.steps=0", "algo.beta=3")
    tr.train()
    assert seen["config"]["algo"]["beta"] == 3.0 and seen["config"]["rollout"]["tree"] == "2,3,1,1"
    assert seen["steps"] == [0]
