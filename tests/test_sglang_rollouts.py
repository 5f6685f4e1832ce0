"""rollout.engine=sglang drives the trainer's rollouts, against a stand-in for `sglang.Engine` (SGLang runs on
CUDA only). The stand-in generates for real, with a TorchEngine on its own copy of the checkpoint, and refuses
what would go wrong with the real engine: generating while its memory is released, with weights it has not
been sent since, or from a prefix cache older than the last weight update. Every call the adapter makes is
checked against the pinned release's API, read from its source into ibtpo_fast/engines/sglang_api.json."""
import asyncio
import importlib.machinery
import json
import sys
import types
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from ibtpo_fast.config import load_config
from ibtpo_fast.engines import Request, SamplingParams
from ibtpo_fast.engines.sglang_api import API_FILE, read_api
from ibtpo_fast.engines.sglang_engine import SGLANG_VERSION
from ibtpo_fast.engines.torch_engine import TorchEngine
from ibtpo_fast.errors import MissingExtraError
from ibtpo_fast.trainer import Trainer

API = json.loads(API_FILE.read_text())
FAST = ["data.batch_size=2", "data.val_size=2", "train.eval_k=1", "rollout.tree=2,3,1,1", "run.progress=off",
        "model.device=cpu", "rollout.sglang.weight_bucket_mb=1"]


class GeneratingEngine:
    """sglang.Engine's contract, generating on CPU; `calls` records (method, kwargs) in order."""

    def __init__(self, **kwargs):
        self.calls = [("__init__", kwargs)]
        self.model = AutoModelForCausalLM.from_pretrained(kwargs["model_path"]).eval()
        self.inner = TorchEngine(self.model)
        self.loop = asyncio.new_event_loop()
        self.released, self.weights_current, self.cache_current = False, True, True

    def _answer(self, input_ids, sampling_params):
        if self.released or not self.weights_current or not self.cache_current:
            raise AssertionError(f"generate with released={self.released}, weights current={self.weights_current}, "
                                 f"cache current={self.cache_current}")
        s = sampling_params
        request = Request(list(input_ids), s["max_new_tokens"], SamplingParams(s["temperature"], s["top_p"], s["top_k"],
                                                                               s.get("sampling_seed")),
                          tuple(s["stop_token_ids"]))
        c = self.inner.generate([request])[0]
        return {"text": "", "meta_info": {"output_token_logprobs": [(float(lp), int(t), None) for lp, t in
                                                                    zip(c.logprobs, c.token_ids)],
                                          "finish_reason": {"type": c.finish_reason}, "cached_tokens": c.cached_tokens}}

    async def async_generate(self, **kwargs):
        self.calls.append(("async_generate", kwargs))
        await asyncio.sleep(0)
        return self._answer(kwargs["input_ids"], kwargs["sampling_params"])

    def generate(self, **kwargs):
        self.calls.append(("generate", kwargs))
        return [self._answer(ids, sp) for ids, sp in zip(kwargs["input_ids"], kwargs["sampling_params"])]

    def update_weights_from_tensor(self, named_tensors, load_format=None, flush_cache=True):
        self.calls.append(("update_weights_from_tensor", {"named_tensors": [n for n, _ in named_tensors],
                                                          "load_format": load_format, "flush_cache": flush_cache}))
        with torch.no_grad():
            self.model.load_state_dict(dict(named_tensors), strict=False)
        self.weights_current, self.cache_current = True, flush_cache
        return True, "Success"

    def flush_cache(self):
        self.calls.append(("flush_cache", {}))
        self.inner.flush_cache()
        self.cache_current = True

    def release_memory_occupation(self, tags=None):
        self.calls.append(("release_memory_occupation", {}))
        self.released = True

    def resume_memory_occupation(self, tags=None):
        self.calls.append(("resume_memory_occupation", {}))
        self.released, self.weights_current = False, False  # the memory is back; what it held must be sent again

    def shutdown(self):
        pass


@pytest.fixture
def sglang(monkeypatch):
    module = types.ModuleType("sglang")
    module.__spec__ = importlib.machinery.ModuleSpec("sglang", None)
    module.Engine = GeneratingEngine
    monkeypatch.setitem(sys.modules, "sglang", module)
    monkeypatch.setattr("ibtpo_fast.loading._cuda", lambda: True)
    return module


def comparable(m):
    """What the rollouts decide: every metric but timings and the engine's own cache statistics."""
    return {k: v for k, v in m.items() if not k.startswith(("timing/", "perf/", "rollout/prefix_cache"))}


def test_sglang_rollouts_train_as_torch_rollouts_do(sglang, tmp_path):
    runs = {}
    for engine in ("torch", "sglang"):
        tr = Trainer(load_config([*FAST, f"rollout.engine={engine}", f"run.out_dir={tmp_path / engine}"]))
        runs[engine] = (tr, [tr.step() for _ in range(2)] + [tr.evaluate()])
    tr, got = runs["sglang"]
    want = runs["torch"][1]
    # The same tokens and rewards in step 2 as in step 1 show the synced weights sampled them; log-probs differ in
    # the last bits, the stand-in decoding one request at a time.
    for g, w in zip(got, want):
        assert comparable(g) == pytest.approx(comparable(w), rel=1e-4, abs=1e-6)
    assert got[1]["tree/generated_tokens"] == want[1]["tree/generated_tokens"]
    for name, p in tr.model.state_dict().items():
        torch.testing.assert_close(tr.engine.engine.model.state_dict()[name], p, rtol=0, atol=0, msg=name)


def test_each_update_releases_resumes_resends_then_flushes(sglang, tmp_path):
    tr = Trainer(load_config([*FAST, "rollout.engine=sglang", f"run.out_dir={tmp_path}"]))
    fake = tr.engine.engine
    start = len(fake.calls)
    tr.step()
    order = [name for name, _ in fake.calls[start:] if name != "async_generate"]
    updates = [kw for name, kw in fake.calls[start:] if name == "update_weights_from_tensor"]
    assert order == ["release_memory_occupation", "resume_memory_occupation", *["update_weights_from_tensor"] * len(updates),
                     "flush_cache"]
    assert len(updates) > 1 and not any(kw["flush_cache"] for kw in updates)  # 1 MB buckets, one flush at the end
    sent = [n for kw in updates for n in kw["named_tensors"]]
    assert sorted(sent) == sorted(n for n, _ in tr.model.named_parameters())
    init = fake.calls[0][1]
    assert init["enable_memory_saver"] is True and init["mem_fraction_static"] == 0.4 and init["random_seed"] == 0


def test_entropy_strategy_says_it_falls_back_to_surprisal(sglang, tmp_path):
    tr = Trainer(load_config([*FAST, "rollout.engine=sglang", "preset=entropy_tree", f"run.out_dir={tmp_path}"]))
    with pytest.warns(RuntimeWarning, match="no token entropies.*surprisal"):
        tr.step()
    assert np.isnan(tr.sampler.sample([[5, 6, 7]]).forest.token_entropies).all()


def test_every_call_the_adapter_makes_exists_in_the_pinned_release(sglang, tmp_path):
    tr = Trainer(load_config([*FAST, "rollout.engine=sglang", "rollout.sglang.engine_args={log_level: error}",
                              f"run.out_dir={tmp_path}"]))
    tr.step()
    tr.evaluate()
    calls = tr.engine.engine.calls
    assert {name for name, _ in calls} >= {"__init__", "async_generate", "generate", "update_weights_from_tensor",
                                            "flush_cache", "release_memory_occupation", "resume_memory_occupation"}
    for name, kwargs in calls:
        if name == "__init__":
            assert set(kwargs) <= set(API["server_args"]), set(kwargs) - set(API["server_args"])
            continue
        params = API["engine_methods"][name]
        assert set(kwargs) <= set(params), (name, set(kwargs) - set(params))
        for sp in (kwargs.get("sampling_params") or []) if name == "generate" else [kwargs.get("sampling_params") or {}]:
            assert set(sp) <= set(API["sampling_params"]), set(sp) - set(API["sampling_params"])
    assert "loop" in API["engine_attributes"]
    assert API["version"] == SGLANG_VERSION


def test_the_api_reader_reads_signatures_from_source(tmp_path):
    wheel = tmp_path / "sglang-0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr("sglang/srt/entrypoints/engine.py", "class Engine(Base):\n    def __init__(self, **kwargs):\n"
                   "        self.loop = 1\n    def generate(self, prompt=None, *, input_ids=None): ...\n"
                   "    async def async_generate(self, input_ids, sampling_params): ...\n")
        z.writestr("sglang/srt/sampling/sampling_params.py", "class SamplingParams:\n    temperature: float\n    top_k: int\n")
        z.writestr("sglang/srt/arg_groups/fields/memory.py", "class Memory:\n    mem_fraction_static: float = 0.8\n")
    api = read_api(wheel)
    assert api["engine_methods"] == {"generate": ["prompt", "input_ids"], "async_generate": ["input_ids", "sampling_params"]}
    assert api["engine_attributes"] == ["loop"]
    assert api["sampling_params"] == ["temperature", "top_k"] and api["server_args"] == ["mem_fraction_static"]


def test_sglang_without_the_package_or_a_gpu_fails_before_any_work(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "sglang", None)  # import fails, find_spec finds nothing
    monkeypatch.setattr("ibtpo_fast.loading.load_policy", lambda *a, **k: pytest.fail("loaded a model first"))
    with pytest.raises(MissingExtraError, match=r"pip install 'ibtpo_fast\[sglang\]'"):
        Trainer(load_config([*FAST, "rollout.engine=sglang", f"run.out_dir={tmp_path}"]))
    module = types.ModuleType("sglang")
    module.__spec__ = importlib.machinery.ModuleSpec("sglang", None)
    monkeypatch.setitem(sys.modules, "sglang", module)
    monkeypatch.setattr("ibtpo_fast.loading._cuda", lambda: False)
    with pytest.raises(MissingExtraError, match="CUDA only"):
        Trainer(load_config([*FAST, "rollout.engine=sglang", f"run.out_dir={tmp_path}"]))


def test_the_api_file_is_the_pinned_release(tmp_path):
    assert Path(API_FILE).is_file() and API["engine_methods"]["update_weights_from_tensor"] == [
        "named_tensors", "load_format", "flush_cache"]


def test_each_rank_starts_its_engine_on_its_own_gpu_and_ports(sglang, monkeypatch):
    from ibtpo_fast.config import SGLangConfig
    from ibtpo_fast.loading import build_engine, model_dir

    calls = []
    monkeypatch.setattr(GeneratingEngine, "__init__", lambda self, **kw: calls.append(kw))
    for rank in (0, 1, 2):
        build_engine("sglang", None, None, model_path=model_dir(""), local_rank=rank, sglang=SGLangConfig())
    assert [c["base_gpu_id"] for c in calls] == [0, 1, 2]
    assert len({c["port"] for c in calls}) == 3
