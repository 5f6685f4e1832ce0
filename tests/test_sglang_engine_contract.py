"""SGLangEngine against a stand-in `sglang` module: what the adapter sends and how it reads answers."""
import asyncio
import sys
import types

import numpy as np
import pytest
import torch

from ibtpo_fast.engines import Engine, Request, SamplingParams, SGLangEngine

EVERY_SAMPLING_PARAM = {"temperature", "top_p", "top_k", "max_new_tokens", "stop_token_ids", "stop"}


class FakeSGLangEngine:
    """Records calls; answers generate like sglang.Engine does."""

    def __init__(self, **kwargs):
        self.init_kwargs = kwargs
        self.generate_calls = []
        self.async_calls = []
        self.weight_calls = []
        self.flushes = 0
        self.answers = []
        self.loop = asyncio.new_event_loop()  # sglang.Engine runs its tokenizer manager on its own loop

    def generate(self, **kwargs):
        self.generate_calls.append(kwargs)
        return self.answers

    async def async_generate(self, **kwargs):
        """One request; it takes as many loop turns as it has prefix tokens, so short prefixes finish first."""
        self.async_calls.append(kwargs)
        for _ in kwargs["input_ids"]:
            await asyncio.sleep(0)
        n = kwargs["sampling_params"]["max_new_tokens"]
        return answer([len(kwargs["input_ids"])] * n, [-0.5] * n, {"type": "length", "length": n}, 0)

    def update_weights_from_tensor(self, named_tensors, load_format=None, flush_cache=True):
        self.weight_calls.append(([name for name, _ in named_tensors], flush_cache))
        return True, "Success"

    def flush_cache(self):
        self.flushes += 1

    def shutdown(self):
        pass


@pytest.fixture
def fake_sglang(monkeypatch):
    module = types.ModuleType("sglang")
    module.Engine = FakeSGLangEngine
    monkeypatch.setitem(sys.modules, "sglang", module)
    return module


def answer(tokens, logprobs, finish, cached):
    return {
        "text": "",
        "output_ids": tokens,
        "meta_info": {
            "output_token_logprobs": [(lp, t, None) for lp, t in zip(logprobs, tokens)],
            "finish_reason": finish,
            "cached_tokens": cached,
        },
    }


def test_constructor_passes_the_engine_arguments(fake_sglang):
    engine = SGLangEngine("/models/qwen", mem_fraction_static=0.5)
    assert isinstance(engine, Engine)
    assert engine.engine.init_kwargs == {"model_path": "/models/qwen", "mem_fraction_static": 0.5}


def test_generate_sends_every_sampling_param_explicitly(fake_sglang):
    engine = SGLangEngine("m")
    requests = [
        Request([1, 2, 3], 16, SamplingParams(temperature=0.7, top_p=0.9, top_k=20, seed=11),
                stop_token_ids=[2], stop_strings=["</answer>"]),
        Request(np.array([4, 5]), 8),  # all defaults: still sent
    ]
    engine.engine.answers = [answer([7, 2], [-0.5, -1.0], {"type": "stop", "matched": 2}, 2),
                             answer([9, 9, 9], [-0.1, -0.2, -0.3], {"type": "length", "length": 3}, 0)]
    engine.generate(requests)
    (call,) = engine.engine.generate_calls
    assert call["input_ids"] == [[1, 2, 3], [4, 5]]
    assert all(type(t) is int for ids in call["input_ids"] for t in ids)
    assert call["return_logprob"] is True
    first, second = call["sampling_params"]
    assert EVERY_SAMPLING_PARAM <= set(first) and EVERY_SAMPLING_PARAM <= set(second)
    assert first["temperature"] == 0.7 and first["top_p"] == 0.9 and first["top_k"] == 20
    assert first["max_new_tokens"] == 16 and first["stop_token_ids"] == [2] and first["stop"] == ["</answer>"]
    assert first["sampling_seed"] == 11
    assert second == {
        "temperature": 1.0, "top_p": 1.0, "top_k": -1, "min_p": 0.0, "max_new_tokens": 8, "min_new_tokens": 0,
        "stop_token_ids": [], "stop": [], "ignore_eos": False, "no_stop_trim": True,
        "repetition_penalty": 1.0, "frequency_penalty": 0.0, "presence_penalty": 0.0, "n": 1,
    }


def test_generate_parses_meta_info_into_completions(fake_sglang):
    engine = SGLangEngine("m")
    engine.engine.answers = [answer([7, 2], [-0.5, -1.0], {"type": "stop", "matched": 2}, 2),
                             answer([9, 9, 9], [-0.1, -0.2, -0.3], {"type": "length", "length": 3}, 0)]
    stopped, cut = engine.generate([Request([1, 2, 3], 16), Request([4, 5], 3)])
    np.testing.assert_array_equal(stopped.token_ids, [7, 2])
    assert stopped.token_ids.dtype == np.int64 and stopped.logprobs.dtype == np.float32
    np.testing.assert_allclose(stopped.logprobs, [-0.5, -1.0])
    assert stopped.finish_reason == "stop" and stopped.cached_tokens == 2 and stopped.entropies is None
    assert cut.finish_reason == "length" and len(cut.token_ids) == 3 and cut.cached_tokens == 0


def test_an_aborted_request_raises(fake_sglang):
    engine = SGLangEngine("m")
    engine.engine.answers = [answer([], [], {"type": "abort", "message": "out of memory"}, 0)]
    with pytest.raises(RuntimeError, match="out of memory"):
        engine.generate([Request([1], 4)])


def test_empty_requests_send_nothing(fake_sglang):
    engine = SGLangEngine("m")
    assert engine.generate([]) == []
    assert engine.engine.generate_calls == []


def test_update_weights_sends_capped_buckets_then_flushes_once(fake_sglang):
    engine = SGLangEngine("m", weight_bucket_bytes=100)
    # 40, 40, 120 and 20 bytes: c alone exceeds the cap and goes on its own
    tensors = {"a": torch.zeros(10), "b": torch.zeros(10), "c": torch.zeros(30), "d": torch.zeros(5)}
    engine.update_weights(tensors)
    assert engine.engine.weight_calls == [(["a", "b"], False), (["c"], False), (["d"], False)]
    assert engine.engine.flushes == 1
    engine.update_weights()
    assert engine.engine.flushes == 2 and len(engine.engine.weight_calls) == 3


def test_a_failed_weight_update_raises(fake_sglang):
    engine = SGLangEngine("m")
    engine.engine.update_weights_from_tensor = lambda **kwargs: (False, "shape mismatch")
    with pytest.raises(RuntimeError, match="shape mismatch"):
        engine.update_weights([("w", torch.zeros(2))])


def test_missing_sglang_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "sglang", None)  # makes `import sglang` fail
    with pytest.raises(ImportError, match=r"pip install ibtpo_fast\[sglang\]"):
        SGLangEngine("m")


def test_streaming_submits_async_requests_and_returns_them_as_they_finish(fake_sglang):
    engine = SGLangEngine("m")
    assert engine.poll() == [] and engine.in_flight == 0
    long_ids, short_ids = list(range(1, 40)), [1, 2]
    handles = engine.submit([Request(long_ids, 3, SamplingParams(seed=5)), Request(short_ids, 2)])
    assert engine.in_flight == 2
    first = engine.poll()
    assert [h for h, _ in first] == [handles[1]]  # the short prefix finished first
    np.testing.assert_array_equal(first[0][1].token_ids, [2, 2])
    late = engine.submit([Request([7], 1)])  # joins while the long one is still running
    seen = dict(first)
    while engine.in_flight:
        seen.update(engine.poll())
    assert set(seen) == {*handles, *late} and len(seen[handles[0]].token_ids) == 3
    sent = engine.engine.async_calls
    assert all(call["return_logprob"] is True and EVERY_SAMPLING_PARAM <= set(call["sampling_params"]) for call in sent)
    assert sent[0]["sampling_params"]["sampling_seed"] == 5 and sent[0]["input_ids"] == long_ids


def test_generate_and_flush_refuse_while_streamed_requests_run(fake_sglang):
    engine = SGLangEngine("m")
    engine.submit([Request([1, 2], 2)])
    with pytest.raises(RuntimeError, match="in flight"):
        engine.generate([Request([1], 1)])
    with pytest.raises(RuntimeError, match="in flight"):
        engine.flush_cache()
    while engine.in_flight:
        engine.poll()
    engine.flush_cache()
    assert engine.engine.flushes == 1
