"""The bundled tiny model: loads offline, is small, and solves some but not all problems."""
import json

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

from ibtpo_fast.tasks import DATA_SOURCE, ArithmeticConfig, compute_score, make_split, tiny_model_path
from ibtpo_fast.tasks.make_tiny_model import META_FILE, sample_solutions

PATH = tiny_model_path()


@pytest.fixture(scope="module")
def meta():
    return json.loads((PATH / META_FILE).read_text())


@pytest.fixture(scope="module")
def model_and_tok():
    torch.set_num_threads(2)
    model = AutoModelForCausalLM.from_pretrained(PATH)
    return model.eval(), AutoTokenizer.from_pretrained(PATH)


def test_checkpoint_is_small_and_complete():
    names = {p.name for p in PATH.iterdir()}
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json"} <= names
    assert sum(p.stat().st_size for p in PATH.rglob("*") if p.is_file()) <= 10 * 2**20


def test_architecture():
    cfg = AutoConfig.from_pretrained(PATH)
    assert cfg.model_type in ("qwen2", "llama")
    assert cfg.architectures[0] in ("Qwen2ForCausalLM", "LlamaForCausalLM")


def test_tokenizer_matches_model(model_and_tok):
    model, tok = model_and_tok
    assert len(tok) == model.config.vocab_size
    assert tok.eos_token_id == model.config.eos_token_id
    (nl,) = tok.encode("\n", add_special_tokens=False)
    assert tok.decode([nl]) == "\n"


def test_auto_tokenizer_agrees_with_saved_pipeline(model_and_tok):
    # AutoTokenizer rebuilds a Qwen2 pipeline around the vocabulary; it must match tokenizer.json
    _, tok = model_and_tok
    plain = PreTrainedTokenizerFast.from_pretrained(PATH)
    for p in make_split("test", 20):
        text = p.prompt + p.solution
        ids = tok.encode(text, add_special_tokens=False)
        assert ids == plain.encode(text, add_special_tokens=False)
        assert len(ids) == len(text) and tok.decode(ids) == text


def test_recorded_accuracy_in_band(meta):
    assert 0.2 <= meta["heldout_acc_t1"] <= 0.6
    assert meta["heldout_problems"] >= 200


def test_quick_heldout_accuracy_at_t1(model_and_tok, meta):
    model, tok = model_and_tok
    task = {k: v for k, v in meta["task"].items() if k != "data_source"}
    problems = make_split("test", 64, ArithmeticConfig(**task))
    torch.manual_seed(0)
    texts = sample_solutions(model, tok, [p.prompt for p in problems], temperature=1.0)
    acc = sum(compute_score(DATA_SOURCE, t, p.answer) for t, p in zip(texts, problems)) / 64
    well_formed = sum("A:" in t for t in texts) / 64
    assert 0.05 <= acc <= 0.8
    assert well_formed >= 0.8
