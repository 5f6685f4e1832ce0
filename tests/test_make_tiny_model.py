"""The bundled model's recipe: its SFT data, and a short regeneration that is reproducible."""
import json
from itertools import islice

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from ibtpo_fast.tasks import TINY_MODEL_TASKS
from ibtpo_fast.tasks.arithmetic import INSTRUCTION, parse_prompt, question_of, solve, step_results
from ibtpo_fast.tasks.make_tiny_model import META_FILE, SFTConfig, _batches, make_tiny_model


def test_sft_examples_drop_the_instruction_at_the_set_rate_and_keep_the_procedure():
    task, sft = TINY_MODEL_TASKS["arithmetic"], SFTConfig(batch_size=50)
    pairs = [pair for batch in islice(_batches(task, sft), 8) for pair in batch]
    bare = [prompt for prompt, _ in pairs if not prompt.startswith(INSTRUCTION)]
    assert 0.35 <= len(bare) / len(pairs) <= 0.65
    assert all(prompt == question_of(prompt) + "\n" for prompt in bare)
    slipped = 0
    for prompt, solution in pairs:
        lines = solution.split("\n")
        assert lines[-1].startswith("A:") and len(lines) - 1 == len(parse_prompt(prompt)[1])
        exact, value = solve(*parse_prompt(prompt))
        slipped += lines[:-1] != exact
        assert min(step_results(lines[:-1])) >= 0
    assert 0.2 <= slipped / len(pairs) <= 0.8  # 1 - 0.8^(3..5) of solutions carry a slip


def test_regeneration_is_reproducible_and_loadable(tmp_path):
    sft = SFTConfig(steps=3, batch_size=8)
    metas = [make_tiny_model(tmp_path / name, TINY_MODEL_TASKS["arithmetic"], sft=sft, eval_problems=4) for name in ("a", "b")]
    assert (tmp_path / "a" / "model.safetensors").read_bytes() == (tmp_path / "b" / "model.safetensors").read_bytes()
    assert metas[0] == metas[1] == json.loads((tmp_path / "a" / META_FILE).read_text())
    assert metas[0]["task"]["instruction"] == INSTRUCTION and metas[0]["sft"]["steps"] == 3
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "a")
    tok = AutoTokenizer.from_pretrained(tmp_path / "a")
    ids = tok(INSTRUCTION + "1+2*3-4=?\n", return_tensors="pt").input_ids
    assert torch.isfinite(model(ids).logits).all()
