"""Atomic checkpoints: complete ones load with from_pretrained, incomplete ones are never picked."""
import random

import numpy as np
import torch
from tokenizers import Tokenizer, models
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

from ibtpo_fast.checkpoint import find_latest, list_checkpoints, load_state, save_checkpoint, set_rng_state


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
    set_rng_state(load_state(path)["rng"])
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == want
