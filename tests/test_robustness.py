"""NaN steps are skipped and counted, then abort with the checkpoint intact; bad rewards score 0."""
import warnings
from pathlib import Path

import pytest
import torch

from ibtpo_fast import update
from ibtpo_fast.checkpoint import find_latest
from ibtpo_fast.config import load_config
from ibtpo_fast.trainer import Trainer

FNS = Path(__file__).resolve().parent / "reward_fns.py"
FAST = ["data.batch_size=2", "data.val_size=4", "train.eval_k=2", "rollout.tree=2,2,1,1", "run.progress=off"]


def make(tmp_path, *args):
    return Trainer(load_config([*FAST, f"run.out_dir={tmp_path}", *args]))


def poison(monkeypatch):
    """Make every loss NaN from now on, as a diverged model would."""
    real = update.minibatch_loss

    def nan_loss(*args, **kw):
        loss, stats = real(*args, **kw)
        return loss * float("nan"), stats

    monkeypatch.setattr(update, "minibatch_loss", nan_loss)


def test_nan_steps_skip_then_abort_with_checkpoint_intact(tmp_path, monkeypatch):
    tr = make(tmp_path, "train.max_bad_steps=2")
    tr.step()
    good = tr.save()
    params = {n: p.detach().clone() for n, p in tr.model.named_parameters()}
    poison(monkeypatch)
    with pytest.warns(RuntimeWarning, match="non-finite loss or gradient, update skipped"):
        m = tr.step()
    assert m["train/bad_steps"] == 1
    for n, p in tr.model.named_parameters():
        assert torch.equal(p, params[n]), n  # the bad update was not applied
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        with pytest.raises(FloatingPointError, match="2 non-finite steps in a row"):
            tr.step()
    assert find_latest(tr.ckpt_dir) == good


def test_raising_reward_scores_zero_and_is_counted(tmp_path):
    tr = make(tmp_path, f"data.reward_fn={FNS}:always_raise")
    m = tr.step()
    assert m["reward/errors"] > 0 and m["critic/score/mean"] == 0.0
    tr.scorer.close()


def test_hanging_reward_is_cut_off(tmp_path):
    tr = make(tmp_path, f"data.reward_fn={FNS}:always_hang", "rollout.reward_timeout_s=1")
    m = tr.step()
    assert m["reward/timeouts"] > 0
    tr.scorer.close()
