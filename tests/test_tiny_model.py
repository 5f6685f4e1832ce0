"""The bundled tiny models: load offline, are small, and solve some but not all problems (on the hard task,
fewer the more operations a problem has)."""
import json

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

from ibtpo_fast.tasks import BUNDLED, TINY_MODEL_TASKS, compute_score, make_split, tiny_model_path
from ibtpo_fast.tasks.make_tiny_model import META_FILE, sample_solutions


@pytest.fixture(scope="module", params=sorted(TINY_MODEL_TASKS))
def bundled(request):
    return TINY_MODEL_TASKS[request.param]


@pytest.fixture(scope="module")
def meta(bundled):
    return json.loads((bundled.model_path / META_FILE).read_text())


@pytest.fixture(scope="module")
def model_and_tok(bundled):
    torch.set_num_threads(2)
    model = AutoModelForCausalLM.from_pretrained(bundled.model_path)
    return model.eval(), AutoTokenizer.from_pretrained(bundled.model_path)


def test_checkpoint_is_small_and_complete(bundled):
    names = {p.name for p in bundled.model_path.iterdir()}
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json"} <= names
    assert sum(p.stat().st_size for p in bundled.model_path.rglob("*") if p.is_file()) <= 10 * 2**20


def test_trained_for_its_task(bundled, meta):
    assert {k: v for k, v in meta["task"].items() if k != "data_source"} == bundled.problems.to_dict()
    assert AutoConfig.from_pretrained(bundled.model_path).max_position_embeddings >= 128 + bundled.max_new_tokens


def test_architecture(bundled):
    cfg = AutoConfig.from_pretrained(bundled.model_path)
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
    plain = PreTrainedTokenizerFast.from_pretrained(tiny_model_path())
    for p in make_split("test", 20):
        text = p.prompt + p.solution
        ids = tok.encode(text, add_special_tokens=False)
        assert ids == plain.encode(text, add_special_tokens=False)
        assert len(ids) == len(text) and tok.decode(ids) == text


def test_recorded_accuracy_in_band(meta):
    assert 0.2 <= meta["heldout_acc_t1"] <= 0.6
    assert meta["heldout_problems"] >= 200


def test_hard_model_fails_more_the_longer_the_problem():
    by_ops = json.loads((BUNDLED["arithmetic_hard"].model_path / META_FILE).read_text())["heldout_acc_t1_by_ops"]
    assert sorted(map(int, by_ops)) == list(range(2, 10))
    # first samples of long problems are mostly wrong, of short ones mostly right
    assert by_ops["2"] >= 0.5 and by_ops["9"] <= 0.2 and by_ops["8"] < by_ops["5"] < by_ops["2"]


def test_quick_heldout_accuracy_at_t1(bundled, model_and_tok):
    model, tok = model_and_tok
    problems = bundled.generator.make_split("test", 64, bundled.problems)
    torch.manual_seed(0)
    texts = sample_solutions(model, tok, [p.prompt for p in problems], temperature=1.0,
                             max_new_tokens=bundled.max_new_tokens)
    acc = sum(compute_score("", t, p.answer) for t, p in zip(texts, problems)) / 64
    well_formed = sum("A:" in t for t in texts) / 64
    assert 0.05 <= acc <= 0.8
    assert well_formed >= 0.8
