"""Token-budgeted micro-batches and activation checkpointing on the bundled model: the update they make is the
unsplit one (2 ranks: tests/test_distributed.py)."""
import copy

import numpy as np
import pytest
import torch
from dist_update import global_forest

from ibtpo_fast.loading import load_policy, load_task
from ibtpo_fast.packing import flatten, pack_trees
from ibtpo_fast.policy import TokenLogprobs, checkpoint_activations
from ibtpo_fast.update import UpdateSettings, micro_batches, ppo_update
from ibtpo_fast.walk import walk

BUDGET = 300


@pytest.fixture(scope="module")
def walked():
    base, tok = load_policy("", torch.device("cpu"))
    forest = global_forest(base, tok, load_task("arithmetic", val_size=1))
    return base, forest, walk(forest, lam=0.1)


def batches(forest, w, budget):
    return {"tree": pack_trees(forest, w.advantage, w.leaves, 0, "none", None if budget else 1, budget),
            "flat": flatten(forest, w.advantage, w.leaves, 0)}


@pytest.mark.parametrize("layout", ["tree", "flat"])
def test_micro_batches_cover_every_row_within_the_budget(walked, layout):
    _, forest, w = walked
    batch = batches(forest, w, BUDGET)[layout]
    groups = micro_batches(batch, BUDGET)
    width = batch.row_widths
    assert sorted(np.concatenate(groups).tolist()) == list(range(batch.num_rows)) and len(groups) > 1
    for g in groups:
        assert len(g) * width[g].max() <= BUDGET or len(g) == 1
        assert len(g) == 1 or width[g].max() <= BUDGET
    assert any(len(g) > 1 for g in groups) or layout == "tree"


def update(base, batch, settings, ckpt=False):
    lm = copy.deepcopy(base)
    if ckpt:
        checkpoint_activations(lm)
    ref = copy.deepcopy(base).eval()
    opt = torch.optim.SGD(lm.parameters(), lr=1e-2)
    np.random.seed(0)
    stats = ppo_update(TokenLogprobs(lm), opt, batch, settings, ref_model=TokenLogprobs(ref))
    return stats, dict(lm.named_parameters())


@pytest.mark.parametrize("layout", ["tree", "flat"])
@pytest.mark.parametrize("loss_agg", ["token-mean", "seq-mean-token-mean"])
def test_micro_batched_update_equals_the_unsplit_one(walked, layout, loss_agg):
    """With the KL to a reference, an entropy bonus and two mini-batches (the same rows in both runs):
    normalisers, reference log-probs and statistics all follow each micro-batch."""
    base, forest, w = walked
    batch = batches(forest, w, BUDGET)[layout]
    settings = UpdateSettings(temperature=1.0, loss_agg=loss_agg, kl_coef=0.05, entropy_coef=0.01, mini_batches=2,
                              deterministic=True)
    want_stats, want = update(base, batch, settings)
    assert want_stats["actor/grad_norm"] > 0 and want_stats["actor/kl"] > 0
    assert max(float((want[n].detach() - base.state_dict()[n]).abs().max()) for n in want) > 1e-4
    micro = UpdateSettings(**{**settings.__dict__, "max_tokens_per_micro_batch": BUDGET})
    for ckpt in (False, True):
        got_stats, got = update(base, batch, micro, ckpt)
        for key in ("actor/pg_loss", "actor/kl", "actor/entropy", "actor/pg_clipfrac", "actor/grad_norm"):
            assert got_stats[key] == pytest.approx(want_stats[key], rel=1e-5, abs=1e-8), key
        for name, p in want.items():
            torch.testing.assert_close(got[name], p, rtol=1e-5, atol=1e-7, msg=name)


def test_checkpointing_keeps_fewer_activations(walked):
    base, forest, w = walked
    batch = batches(forest, w, 0)["tree"]

    def saved(lm):
        count = [0]

        def pack(t):
            count[0] += 1
            return t
        lm.train()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            TokenLogprobs(lm)(batch, 1.0, "gather")
        return count[0]

    plain, ckpt = copy.deepcopy(base), copy.deepcopy(base)
    checkpoint_activations(ckpt)
    assert saved(ckpt) < saved(plain) / 2


def test_trainer_steps_with_micro_batches_and_checkpointing(tmp_path):
    from ibtpo_fast.config import load_config
    from ibtpo_fast.trainer import Trainer

    tr = Trainer(load_config(["data.batch_size=2", "data.val_size=2", "rollout.tree=2,3,1,1", "run.progress=off",
                              f"run.out_dir={tmp_path}", "train.max_tokens_per_micro_batch=200",
                              "train.activation_checkpointing=true", "train.mini_batches=2"]))
    layers = [m for m in tr.model.modules() if hasattr(m, "gradient_checkpointing") and hasattr(m, "self_attn")]
    assert layers and all(m.gradient_checkpointing for m in layers)  # every decoder layer recomputes
    m = tr.step()
    assert np.isfinite(m["actor/pg_loss"]) and m["actor/grad_norm"] > 0


@pytest.mark.parametrize("source", ["engine", "policy"])
def test_old_logprobs_from_the_policy_make_the_first_ratio_one(tmp_path, source):
    from ibtpo_fast.config import load_config
    from ibtpo_fast.trainer import Trainer

    tr = Trainer(load_config(["data.batch_size=2", "data.val_size=2", "rollout.tree=2,3,1,1", "run.progress=off",
                              f"run.out_dir={tmp_path}", f"algo.old_logprobs={source}",
                              "train.max_tokens_per_micro_batch=200"]))
    rollout = tr.rollout(range(2))
    batch = tr.pack(rollout.forest, walk(rollout.forest, lam=0.1))
    engine = batch.old_logp.clone()
    m = tr.update(batch)
    if source == "policy":  # recomputed by the training forward before the first (and only) mini-batch
        assert m["actor/ratio_max"] == pytest.approx(1.0, abs=1e-6) and m["actor/pg_clipfrac"] == 0
        assert not torch.equal(batch.old_logp, engine)
        torch.testing.assert_close(batch.old_logp, engine, atol=1e-3, rtol=0)  # the engine's, up to its precision
    else:
        assert torch.equal(batch.old_logp, engine) and m["actor/ratio_max"] != 1.0
