"""SGLangEngine against a stand-in `sglang` module that holds to the pinned release's protocol (tests/sglang_fake.py):
what the adapter sends, in which order, and how it reads and checks the answers."""
import asyncio
import atexit
import logging
import subprocess
import sys
import types

import numpy as np
import psutil
import pytest
import reward_fns
import sglang_fake
import torch

from ibtpo_fast.engines import Engine, Request, SamplingParams, SGLangEngine
from ibtpo_fast.engines.protocol import context_limit
from ibtpo_fast.engines.sglang_engine import NOT_REPRODUCIBLE, supported_engine_args
from ibtpo_fast.errors import ConfigError, EngineError
from ibtpo_fast.rewards import RewardScorer

EVERY_SAMPLING_PARAM = {"temperature", "top_p", "top_k", "max_new_tokens", "stop_token_ids", "stop"}


class CannedEngine(sglang_fake.StrictEngine):
    """Answers from `answers` ((tokens, logprobs, finish_reason, cached) each, in the order requests are answered),
    else `max_new_tokens` copies of the prefix length. A streamed request takes as many loop turns as it has prefix
    tokens, so short prefixes finish first. `seeds` records the seed each answer was sampled with."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.answers, self.seeds = [], []

    def _sample(self, input_ids, sampling_params, seed):
        self.seeds.append(seed)
        if self.answers:
            return self.answers.pop(0)
        n = sampling_params["max_new_tokens"]
        return [len(input_ids)] * n, [-0.5] * n, {"type": "length", "length": n}, 0

    async def _work(self, input_ids):
        for _ in input_ids:
            await asyncio.sleep(0)

    def names(self, start=1):
        return [name for name, _ in self.calls[start:]]


@pytest.fixture
def fake_sglang(monkeypatch):
    module = types.ModuleType("sglang")
    module.Engine = CannedEngine
    monkeypatch.setitem(sys.modules, "sglang", module)
    return module


def canned(tokens, logprobs, finish, cached=0):
    return tokens, logprobs, finish, cached


def test_constructor_passes_the_engine_arguments(fake_sglang):
    engine = SGLangEngine("/models/qwen", mem_fraction_static=0.5)
    assert isinstance(engine, Engine)
    assert engine.engine.calls[0] == ("__init__", {"model_path": "/models/qwen", "mem_fraction_static": 0.5})
    assert engine.context == sglang_fake.StrictEngine.context_len


def test_generate_sends_every_sampling_param_explicitly(fake_sglang):
    engine = SGLangEngine("m", enable_deterministic_inference=True)
    requests = [
        Request([1, 2, 3], 16, SamplingParams(temperature=0.7, top_p=0.9, top_k=20, seed=11),
                stop_token_ids=[2], stop_strings=["</answer>"]),
        Request(np.array([4, 5]), 8),  # all defaults: still sent
    ]
    engine.generate(requests)
    ((_, call),) = [c for c in engine.engine.calls if c[0] == "generate"]
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


def test_generate_parses_the_releases_answers_into_completions(fake_sglang):
    engine = SGLangEngine("m")
    engine.engine.answers = [canned([7, 2], [-0.5, -1.0], {"type": "stop", "matched": 2}, 2),
                             canned([9, 9, 9], [-0.1, -0.2, -0.3], {"type": "length", "length": 3})]
    stopped, cut = engine.generate([Request([1, 2, 3], 16), Request([4, 5], 3)])
    np.testing.assert_array_equal(stopped.token_ids, [7, 2])
    assert stopped.token_ids.dtype == np.int64 and stopped.logprobs.dtype == np.float32
    np.testing.assert_allclose(stopped.logprobs, [-0.5, -1.0])
    assert stopped.finish_reason == "stop" and stopped.cached_tokens == 2 and stopped.entropies is None
    assert cut.finish_reason == "length" and len(cut.token_ids) == 3 and cut.cached_tokens == 0


def test_an_aborted_request_raises(fake_sglang):
    engine = SGLangEngine("m")
    engine.engine.answers = [canned([], [], {"type": "abort", "message": "out of memory"})]
    with pytest.raises(RuntimeError, match="out of memory"):
        engine.generate([Request([1], 4)])


def test_empty_requests_send_nothing(fake_sglang):
    engine = SGLangEngine("m")
    assert engine.generate([]) == []
    assert engine.engine.names() == []


def test_update_weights_sends_capped_buckets_in_one_session_then_flushes_once(fake_sglang):
    engine = SGLangEngine("m", weight_bucket_bytes=100)
    # 40, 40, 120 and 20 bytes: c alone exceeds the cap and goes on its own
    tensors = {"a": torch.zeros(10), "b": torch.zeros(10), "c": torch.zeros(30), "d": torch.zeros(5)}
    engine.update_weights(tensors)
    fake = engine.engine
    assert fake.names() == ["begin_weight_update", *["update_weights_from_tensor"] * 3, "end_weight_update", "flush_cache"]
    sent = [kw for name, kw in fake.calls if name == "update_weights_from_tensor"]
    assert [kw["named_tensors"] for kw in sent] == [["a", "b"], ["c"], ["d"]]
    assert not any(kw["flush_cache"] for kw in sent) and not fake.session and fake.cache_current
    engine.update_weights()
    assert fake.names()[-1] == "flush_cache" and "begin_weight_update" not in fake.names(7)


def test_a_refused_bucket_closes_the_session_and_names_the_call(fake_sglang):
    engine = SGLangEngine("m", weight_bucket_bytes=8)
    fake = engine.engine
    sent = fake.update_weights_from_tensor
    fake.update_weights_from_tensor = lambda **kw: (False, "shape mismatch") if kw["named_tensors"][0][0] == "w2" else sent(**kw)
    with pytest.raises(EngineError, match=r"update_weights_from_tensor \(bucket 2\): shape mismatch"):
        engine.update_weights([("w1", torch.zeros(2)), ("w2", torch.zeros(2)), ("w3", torch.zeros(2))])
    assert not fake.session and fake.names()[-1] == "end_weight_update"
    fake.update_weights_from_tensor = sent
    engine.update_weights([("w1", torch.zeros(2))])  # a new session opens: the failed one was closed
    assert fake.names()[-4:] == ["begin_weight_update", "update_weights_from_tensor", "end_weight_update", "flush_cache"]


def test_every_answer_is_checked(fake_sglang):
    engine = SGLangEngine("m")
    fake = engine.engine
    fake.session = True  # a session left open elsewhere: the release refuses to open another
    with pytest.raises(EngineError, match="begin_weight_update: a weight-update session is already open"):
        engine.update_weights({"w": torch.zeros(2)})
    fake.session = False
    fake.end_weight_update = lambda: (False, "finalize failed")
    with pytest.raises(EngineError, match="refused end_weight_update: finalize failed"):
        engine.update_weights({"w": torch.zeros(2)})
    fake.running.add("elsewhere")  # the scheduler still runs a request: the flush is refused
    with pytest.raises(EngineError, match="refused flush_cache: Cache not flushed"):
        engine.flush_cache()
    fake.flush_cache = lambda: None
    with pytest.raises(EngineError, match="unexpected answer None"):
        engine.flush_cache()


def test_the_fake_refuses_tensors_outside_a_session_as_the_release_does(fake_sglang):
    fake = CannedEngine()
    ok, message = fake.update_weights_from_tensor(named_tensors=[("w", torch.zeros(1))], flush_cache=False)
    assert not ok and message == sglang_fake.PROTOCOL["refusals"]["update_weights_from_tensor"]
    assert fake.end_weight_update()[0] is False and fake.begin_weight_update()[0] is True
    assert fake.begin_weight_update()[0] is False


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
    sent = [kw for name, kw in engine.engine.calls if name == "async_generate"]
    assert all(call["return_logprob"] is True and EVERY_SAMPLING_PARAM <= set(call["sampling_params"]) for call in sent)
    assert sent[0]["sampling_params"]["sampling_seed"] == 5 and sent[0]["input_ids"] == long_ids
    assert not engine.engine.running


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
    assert engine.engine.names()[-1] == "flush_cache"


def test_a_failed_request_cancels_the_rest_and_leaves_sglang_idle(fake_sglang):
    engine = SGLangEngine("m")
    fake = engine.engine
    fake.answers = [canned([], [], {"type": "abort", "message": "bad request"})]  # the first to finish: the shortest
    engine.submit([Request(list(range(1, 30)), 4), Request([1, 2], 4), Request(list(range(1, 20)), 4)])
    with pytest.raises(RuntimeError, match="bad request"):
        engine.poll()
    assert engine.in_flight == 0 and engine.poll() == []
    assert ("abort_request", {"rid": "", "abort_all": True}) in fake.calls and not fake.running
    engine.release_memory()  # the release asserts an idle server: the two cancelled requests were aborted there too
    assert fake.released


def test_requests_are_clipped_to_the_context_by_torch_engines_rule(fake_sglang):
    engine = SGLangEngine("m")
    context = engine.context
    lengths = [1, context - 10, context - 2, context - 1]
    engine.generate([Request([1] * n, 16) for n in lengths])  # the fake raises as SGLang does past the context
    ((_, call),) = [c for c in engine.engine.calls if c[0] == "generate"]
    sent = [sp["max_new_tokens"] for sp in call["sampling_params"]]
    assert sent == [16, 10, 2, 1] == [context_limit(n, 16, context) for n in lengths]
    handles = engine.submit([Request([1] * (context - 3), 16)])
    assert len(dict(engine.poll())[handles[0]].token_ids) == 3
    with pytest.raises(ValueError, match=f"request 1: prefix of {context} tokens leaves no room"):
        engine.submit([Request([1], 4), Request([1] * context, 4)])
    assert engine.in_flight == 0  # refused before any was sent


def test_seeds_reach_sampling_only_with_deterministic_inference(fake_sglang, caplog):
    request = Request([1, 2], 2, SamplingParams(seed=11))
    with caplog.at_level(logging.WARNING, "ibtpo_fast.engines.sglang_engine"):
        loose = SGLangEngine("m")
    assert NOT_REPRODUCIBLE in caplog.text
    loose.generate([request])
    assert loose.engine.seeds == [None]  # sent, and dropped by the release's seed gate
    caplog.clear()
    with caplog.at_level(logging.WARNING, "ibtpo_fast.engines.sglang_engine"):
        seeded = SGLangEngine("m", enable_deterministic_inference=True)
    assert NOT_REPRODUCIBLE not in caplog.text
    seeded.generate([request])
    assert seeded.engine.seeds == [11]


def test_engine_args_are_a_combination_the_release_runs(caplog):
    with caplog.at_level(logging.WARNING, "ibtpo_fast.engines.sglang_engine"):
        assert supported_engine_args({"dtype": "float32"})["attention_backend"] == "triton"
    assert "attention_backend=triton" in caplog.text
    assert supported_engine_args({"dtype": "float32", "attention_backend": "torch_native"})["attention_backend"] == "torch_native"
    with pytest.raises(ConfigError, match="attention_backend=fa3 takes fp16 / bf16 only"):
        supported_engine_args({"dtype": "float32", "attention_backend": "fa3"})
    with pytest.raises(ConfigError, match="decode_attention_backend=flashinfer"):
        supported_engine_args({"dtype": "float", "decode_attention_backend": "flashinfer"})
    half = {"dtype": "bfloat16", "attention_backend": "fa3"}
    assert supported_engine_args(half) == half
    assert "attention_backend" not in supported_engine_args({"dtype": "bfloat16"})  # SGLang picks its own
    deterministic = {"enable_deterministic_inference": True}
    assert supported_engine_args({**deterministic, "dtype": "float32"})["attention_backend"] == "triton"
    with pytest.raises(ConfigError, match="rollout.sglang.deterministic=false"):
        supported_engine_args({**deterministic, "dtype": "float32", "attention_backend": "torch_native"})


def test_the_fake_engines_shutdown_kills_every_child_as_the_releases_does():
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    fake = CannedEngine()
    atexit.unregister(fake.shutdown)
    fake.shutdown()
    assert not psutil.pid_exists(other.pid)  # killed and reaped, though not the engine's


def test_shutdown_stops_sglangs_processes_and_leaves_the_reward_workers(fake_sglang):
    registered, unregistered = [], []
    scorer = RewardScorer(reward_fns.exact, workers=1)
    scorer.start()
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(atexit, "register", registered.append)
            mp.setattr(atexit, "unregister", unregistered.append)
            engine = SGLangEngine("m")
        fake = engine.engine
        assert registered == [fake.shutdown, engine.shutdown] and unregistered == [fake.shutdown]
        fake.spawn_children(2)  # its scheduler and detokenizer
        engine.shutdown()
        assert not any(psutil.pid_exists(p.pid) for p in fake.children)
        assert scorer._pool and all(w.proc.is_alive() for w in scorer._pool)
        assert scorer(["t"], ["4"], ["4"]).tolist() == [1.0]
        engine.shutdown()  # once only
        assert fake.names().count("shutdown") == 1
    finally:
        scorer.close()
