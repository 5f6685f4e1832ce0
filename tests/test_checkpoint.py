"""Atomic checkpoints: complete ones load with from_pretrained, incomplete ones are never picked, a failed
write leaves the previous one in place, and a state file that would run code is refused."""
import errno
import os
import random
import re

import numpy as np
import pytest
import torch
import transformers.modeling_utils
from safetensors import SafetensorError
from tokenizers import Tokenizer, models
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

from ibtpo_fast.checkpoint import STATE_FILE, find_latest, list_checkpoints, load_state, save_checkpoint, set_rng_state
from ibtpo_fast.errors import CheckpointError


def tiny():
    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=16, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=1, max_position_embeddings=32)
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"a": 0, "<unk>": 1}, unk_token="<unk>")))
    return Qwen2ForCausalLM(cfg), tok


def test_save_load_and_prune(tmp_path):
    model, tok = tiny()
    root = tmp_path / "checkpoints"
    for step in (1, 2, 3):
        save_checkpoint(root, step, model, tok, {"data": {"epoch": 0, "position": step}}, "a: 1\n", keep_last=2)
    assert [p.name for p in list_checkpoints(root)] == ["global_step_2", "global_step_3"]
    latest = find_latest(root)
    assert latest.name == "global_step_3" and (root / "latest").read_text() == "global_step_3"
    loaded = AutoModelForCausalLM.from_pretrained(latest)
    for (n, a), b in zip(model.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), n
    assert load_state(latest)["data"]["position"] == 3


def test_incomplete_checkpoint_never_picked(tmp_path):
    model, tok = tiny()
    root = tmp_path / "checkpoints"
    save_checkpoint(root, 1, model, tok, {}, "", keep_last=3)
    # A crash during the write of step 2: the temp dir, or a renamed dir missing its state file.
    (root / ".tmp-global_step_2-999").mkdir()
    broken = root / "global_step_2"
    broken.mkdir()
    (broken / "config.json").write_text("{}")
    (root / "latest").write_text("global_step_2")
    assert find_latest(root).name == "global_step_1"
    assert find_latest(tmp_path / "nothing") is None


def test_rng_state_round_trip(tmp_path):
    model, tok = tiny()
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    path = save_checkpoint(tmp_path, 5, model, tok, {}, "", keep_last=1)
    want = (random.random(), np.random.rand(), torch.rand(1).item())
    set_rng_state(load_state(path)["rng"][0])
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == want


class RunsCode:
    """Unpickling this creates `marker`: what a crafted state file could do with any call."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.mkdir, (str(self.marker),)


def test_state_file_that_would_run_code_is_refused(tmp_path):
    model, tok = tiny()
    path = save_checkpoint(tmp_path, 1, model, tok, {}, "", keep_last=1)
    marker = tmp_path / "code-ran"
    torch.save({"global_step": 1, "rng": RunsCode(marker)}, path / STATE_FILE)
    with pytest.raises(CheckpointError, match="refusing to load") as refused:
        load_state(path)
    assert str(path / STATE_FILE) in str(refused.value) and not marker.exists()
    torch.load(path / STATE_FILE, weights_only=False)  # the file is as crafted: a pickle load runs its code
    assert marker.is_dir()


def _fail_model_weights(monkeypatch, tmp):  # the weights' writer reports a full disk part-way through
    def save_file(tensors, filename, metadata=None):
        open(filename, "wb").write(b"\0" * 64)
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
    monkeypatch.setattr(transformers.modeling_utils, "safe_save_file", save_file)


def _fail_tokenizer(monkeypatch, tok):
    def save_pretrained(directory, *args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied", str(directory))
    monkeypatch.setattr(tok, "save_pretrained", save_pretrained)


def _fail_state(monkeypatch, _):
    real = torch.save

    def save(obj, f, *args, **kwargs):
        if not str(f).endswith(STATE_FILE):
            return real(obj, f, *args, **kwargs)
        open(f, "wb").write(b"PK partial")
        raise OSError(errno.ENOSPC, "No space left on device", str(f))
    monkeypatch.setattr(torch, "save", save)


def _fail_shards(monkeypatch, _):  # the sharded writer (it saves into an open stream) runs out of space
    real = torch.save

    def save(obj, f, *args, **kwargs):
        if isinstance(f, (str, os.PathLike)):
            return real(obj, f, *args, **kwargs)
        f.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(torch, "save", save)


def _fail_latest(monkeypatch, _):  # the checkpoint is renamed into place, then `latest` cannot be replaced
    real = os.replace

    def replace(src, dst):
        if os.path.basename(dst) == "latest":
            raise PermissionError(errno.EACCES, "Permission denied", str(dst))
        real(src, dst)
    monkeypatch.setattr(os, "replace", replace)


@pytest.mark.parametrize(("fail", "reason"), [(_fail_model_weights, "No space left"), (_fail_tokenizer, "Permission denied"),
                                              (_fail_state, "No space left"), (_fail_shards, "No space left"),
                                              (_fail_latest, "Permission denied")])
def test_failed_write_keeps_previous_checkpoint_and_latest(tmp_path, monkeypatch, fail, reason):
    model, tok = tiny()
    root = tmp_path / "checkpoints"
    save_checkpoint(root, 1, model, tok, {"data": {"position": 1}}, "", keep_last=2)
    fail(monkeypatch, tok)
    with pytest.raises(CheckpointError, match=f"cannot write checkpoint {re.escape(str(root / 'global_step_2'))}: .*{reason}"):
        save_checkpoint(root, 2, model, tok, {"data": {"position": 2}}, "", keep_last=2)
    monkeypatch.undo()
    assert sorted(p.name for p in root.iterdir()) == ["global_step_1", "latest"]  # the partial write is gone
    assert (root / "latest").read_text() == "global_step_1" and find_latest(root).name == "global_step_1"
    assert load_state(root / "global_step_1")["data"]["position"] == 1
