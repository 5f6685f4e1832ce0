"""The real SGLang on a GPU (skipped without CUDA and the `sglang` extra): the log-probs it returns against
the same tokens scored by the model's own forward, and training steps with rollout.engine=sglang whose
weight sync shows in what SGLang then samples."""
import importlib.util

import numpy as np
import pytest
import torch
from test_torch_engine import reference
from transformers import AutoModelForCausalLM, AutoTokenizer

from ibtpo_fast.config import load_config
from ibtpo_fast.engines import Request, SamplingParams
from ibtpo_fast.engines.sglang_engine import SGLangEngine
from ibtpo_fast.tasks import make_split, tiny_model_path
from ibtpo_fast.trainer import Trainer

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
    pytest.mark.skipif(importlib.util.find_spec("sglang") is None, reason="needs the sglang extra"),
]
# The bundled model in fp32 (on the triton attention backend SGLangEngine picks for it), seeds honoured; SGLang
# reads token ids, never text.
ENGINE_ARGS = dict(mem_fraction_static=0.2, dtype="float32", random_seed=0, skip_tokenizer_init=True,
                   enable_deterministic_inference=True)
LOGPROB_TOL = 2e-3  # fp32 on both sides; another attention kernel rounds differently


def prompts(n: int) -> list[list[int]]:
    tok = AutoTokenizer.from_pretrained(tiny_model_path())
    return [tok.encode(p.prompt, add_special_tokens=False) for p in make_split("test", n)]


def max_logprob_gap(model, requests, completions) -> float:
    return max(float(np.abs(c.logprobs - reference(model, r, c)[0]).max()) for r, c in zip(requests, completions))


def test_sglang_logprobs_are_the_models_on_its_own_tokens():
    model = AutoModelForCausalLM.from_pretrained(tiny_model_path()).cuda().eval()
    eos = model.config.eos_token_id
    requests = [Request(p, 48, SamplingParams(seed=i), (eos,)) for i, p in enumerate(prompts(16))]
    engine = SGLangEngine(str(tiny_model_path()), **ENGINE_ARGS)
    try:
        completions = engine.generate(requests)
    finally:
        engine.shutdown()
    assert all(1 <= len(c.token_ids) <= 48 and c.finish_reason in ("stop", "length") for c in completions)
    assert sum(c.finish_reason == "stop" for c in completions) >= 12  # the model ends its answers
    assert max_logprob_gap(model, requests, completions) < LOGPROB_TOL


def test_a_seeded_request_samples_the_same_tokens_in_any_batch():
    """With deterministic inference a request's seed decides its tokens, whatever else runs beside it."""
    requests = [Request(p, 32, SamplingParams(seed=100 + i)) for i, p in enumerate(prompts(8))]
    engine = SGLangEngine(str(tiny_model_path()), **ENGINE_ARGS)
    try:
        together = engine.generate(requests)
        engine.flush_cache()
        alone = [engine.generate([r])[0] for r in requests[::-1]][::-1]
    finally:
        engine.shutdown()
    for a, b in zip(together, alone):
        np.testing.assert_array_equal(a.token_ids, b.token_ids)


def test_training_steps_sync_the_weights_sglang_samples_with(tmp_path):
    cfg = load_config(["data.batch_size=4", "data.val_size=8", "train.eval_k=1", "rollout.tree=2,3,1,1",
                       "run.progress=off", "train.lr=1e-3", "rollout.engine=sglang",
                       "rollout.sglang.mem_fraction_static=0.2", "rollout.sglang.engine_args={skip_tokenizer_init: true}",
                       f"run.out_dir={tmp_path}"])
    trainer = Trainer(cfg)
    before = {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}
    metrics = [trainer.step() for _ in range(3)]
    assert all(np.isfinite(m["actor/pg_loss"]) for m in metrics)
    assert any(not torch.equal(before[k], v) for k, v in trainer.model.state_dict().items())
    # What SGLang samples now is scored by the updated weights, not the loaded ones.
    requests = [Request(p, 32, SamplingParams(seed=i)) for i, p in enumerate(prompts(8))]
    completions = trainer.engine.generate(requests)
    trainer.model.eval()
    assert max_logprob_gap(trainer.model, requests, completions) < LOGPROB_TOL
