"""rollout.engine=sglang drives the trainer's rollouts, against a stand-in for `sglang.Engine` (SGLang runs on
CUDA only) that holds to the pinned release's protocol (tests/sglang_fake.py) and generates for real, with a
TorchEngine on its own copy of the checkpoint. Every call the adapter makes is checked against the pinned
release's API, and every protocol fact the stand-in encodes against the release's source, both read into
ibtpo_fast/engines/sglang_api.json."""
import importlib.machinery
import importlib.util
import inspect
import json
import os
import sys
import types
import zipfile
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import numpy as np
import pytest
import torch
from sglang_fake import PROTOCOL, StrictEngine
from transformers import AutoModelForCausalLM

from ibtpo_fast.config import load_config
from ibtpo_fast.engines import Request, SamplingParams
from ibtpo_fast.engines.sglang_api import API_FILE, read_api
from ibtpo_fast.engines.sglang_engine import DETERMINISTIC_ATTENTION_BACKENDS, FP32_ATTENTION_BACKENDS, SGLANG_VERSION
from ibtpo_fast.engines.torch_engine import TorchEngine
from ibtpo_fast.errors import MissingExtraError
from ibtpo_fast.trainer import Trainer

API = json.loads(API_FILE.read_text())
FAST = ["data.batch_size=2", "data.val_size=2", "train.eval_k=1", "rollout.tree=2,3,1,1", "run.progress=off",
        "model.device=cpu", "rollout.sglang.weight_bucket_mb=1"]


class GeneratingEngine(StrictEngine):
    """The stand-in, sampling with a TorchEngine on its own copy of the checkpoint and loading what it is sent."""

    def __init__(self, **kwargs):
        self.model = AutoModelForCausalLM.from_pretrained(kwargs["model_path"]).eval()
        self.context_len = self.model.config.max_position_embeddings
        super().__init__(**kwargs)
        self.inner = TorchEngine(self.model)

    def _sample(self, input_ids, sampling_params, seed):
        s = sampling_params
        request = Request(input_ids, s["max_new_tokens"], SamplingParams(s["temperature"], s["top_p"], s["top_k"], seed),
                          tuple(s["stop_token_ids"]))
        c = self.inner.generate([request])[0]
        return c.token_ids.tolist(), c.logprobs.tolist(), {"type": c.finish_reason}, c.cached_tokens

    def _load(self, named_tensors):
        with torch.no_grad():
            self.model.load_state_dict(dict(named_tensors), strict=False)

    def flush_cache(self):
        answer = super().flush_cache()
        if answer.success:
            self.inner.flush_cache()
        return answer


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
        runs[engine] = (tr, [tr.step() for _ in range(2)] + [tr.evaluate()[0]])
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
    assert order == ["release_memory_occupation", "resume_memory_occupation", "begin_weight_update",
                     *["update_weights_from_tensor"] * len(updates), "end_weight_update", "flush_cache"]
    assert len(updates) > 1 and not any(kw["flush_cache"] for kw in updates)  # 1 MB buckets, one flush at the end
    sent = [n for kw in updates for n in kw["named_tensors"]]
    assert sorted(sent) == sorted(n for n, _ in tr.model.named_parameters())
    init = fake.calls[0][1]
    assert init["enable_memory_saver"] is True and init["mem_fraction_static"] == 0.4 and init["random_seed"] == 0
    # the default float32 runs on an fp32 attention backend; seeds are honoured by default
    assert init["dtype"] == "float32" and init["attention_backend"] == "triton"
    assert init["enable_deterministic_inference"] is True


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
    assert {name for name, _ in calls} >= {"__init__", "async_generate", "generate", "begin_weight_update",
                                            "update_weights_from_tensor", "end_weight_update", "flush_cache",
                                            "release_memory_occupation", "resume_memory_occupation"}
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


# The smallest source tree the reader takes: each protocol fact stated the way the release's source states it.
MINI_RELEASE = {
    "sglang/srt/entrypoints/engine.py": """
from sglang.srt.utils import kill_process_tree
class Engine(Base):
    def __init__(self, **kwargs):
        atexit.register(self.shutdown)
        self.loop = 1
    def generate(self, prompt=None, *, input_ids=None): ...
    async def async_generate(self, input_ids, sampling_params): ...
    def shutdown(self):
        kill_process_tree(os.getpid(), include_parent=False)
""",
    "sglang/srt/sampling/sampling_params.py": "class SamplingParams:\n    temperature: float\n    top_k: int\n",
    "sglang/srt/arg_groups/fields/memory.py": "class Memory:\n    mem_fraction_static: float = 0.8\n",
    "sglang/srt/managers/scheduler_components/weight_updater.py": """
class SchedulerWeightUpdaterManager:
    def begin_weight_update(self, recv_req):
        if self._session is not None:
            return Out(success=False, message="already open")
        return Out(success=True, message="Success")
    def update_weights_from_tensor(self, recv_req):
        if self._session is None:
            return Out(success=False, message="needs a session")
    def end_weight_update(self, recv_req):
        if self._session is None:
            return Out(success=False, message="none open")
    def release_memory_occupation(self, recv_req):
        assert self.is_fully_idle(), "only when idle"
""",
    "sglang/srt/managers/tokenizer_control_mixin.py": """
class TokenizerControlMixin:
    async def begin_weight_update(self, obj) -> Tuple[bool, str]: ...
    async def update_weights_from_tensor(self, obj) -> Tuple[bool, str]: ...
    async def end_weight_update(self, obj) -> Tuple[bool, str]: ...
    async def flush_cache(self) -> FlushCacheReqOutput: ...
""",
    "sglang/srt/managers/tokenizer_manager.py": """
class TokenizerManager:
    def __init__(self):
        self.context_len = 8
    def _validate_one_request(self, obj, input_ids):
        if len(input_ids) >= self.context_len:
            raise ValueError()
    def abort_request(self, rid='', abort_all=False): ...
    def detokenize_logprob_tokens(self, val, idx, text):
        return [(logprob, token_id, None) for logprob, token_id in zip(val, idx)]
""",
    "sglang/srt/managers/scheduler.py": "class Scheduler:\n    def flush_cache(self):\n        return self.is_fully_idle()\n",
    "sglang/srt/managers/io_struct.py": "class FlushCacheReqOutput:\n    success: bool\n",
    "sglang/srt/managers/schedule_batch.py": """
class FINISH_LENGTH:
    def to_json(self):
        return {"type": "length", "length": self.length}
""",
    "sglang/srt/sampling/sampling_batch_info.py": """
class SamplingBatchInfo:
    def from_schedule_batch(cls, batch):
        gate = get_exec().deterministic.enable_deterministic_inference
        sampling_seed = torch.tensor([]) if gate else None
""",
    "sglang/srt/arg_groups/choices.py": "ATTENTION_BACKEND_CHOICES = ['triton', 'fa3']\n"
                                        "DETERMINISTIC_ATTENTION_BACKEND_CHOICES = ['fa3']\n",
}


def test_the_api_reader_reads_signatures_and_protocol_from_source(tmp_path):
    wheel = tmp_path / "sglang-0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        for name, text in MINI_RELEASE.items():
            z.writestr(name, text)
    api = read_api(wheel)
    assert api["engine_methods"] == {"generate": ["prompt", "input_ids"], "async_generate": ["input_ids", "sampling_params"],
                                     "shutdown": []}
    assert api["engine_attributes"] == ["loop"]
    assert api["sampling_params"] == ["temperature", "top_k"] and api["server_args"] == ["mem_fraction_static"]
    assert api["protocol"] == {
        "refusals": {"begin_weight_update": "already open", "update_weights_from_tensor": "needs a session",
                     "end_weight_update": "none open"},
        "answers": {"begin_weight_update": "Tuple[bool, str]", "update_weights_from_tensor": "Tuple[bool, str]",
                    "end_weight_update": "Tuple[bool, str]", "flush_cache": "FlushCacheReqOutput"},
        "flush_cache_output": ["success"], "release_needs_idle": "only when idle", "flush_needs_idle": True,
        "seed_gate": "enable_deterministic_inference", "deterministic_attention_backends": ["fa3"],
        "attention_backends": ["triton", "fa3"], "context_checks": ["len(input_ids) >= self.context_len"],
        "tokenizer_manager_sets_context_len": True, "abort_request": ["rid", "abort_all"],
        "shutdown_kills": ["kill_process_tree(os.getpid(), include_parent=False)"], "shutdown_at_exit": True,
        "finish_reasons": ["length"], "output_token_logprob": ["(logprob, token_id, None)"],
    }
    for name, text in MINI_RELEASE.items():  # an installed package directory reads the same
        (tmp_path / "site" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "site" / name).write_text(text)
    assert read_api(tmp_path / "site") == api


def test_the_facts_the_adapter_and_the_stand_in_rely_on_hold_in_the_pinned_release():
    """Each fact as sglang_api.json read it from the release: moving the pin rewrites the file and re-checks them."""
    assert PROTOCOL["refusals"]["update_weights_from_tensor"] == (
        "update_weights_from_tensor must run between begin_weight_update() and end_weight_update()")
    assert PROTOCOL["refusals"]["begin_weight_update"].startswith("a weight-update session is already open")
    assert PROTOCOL["refusals"]["end_weight_update"].startswith("no weight-update session is open")
    # the shapes sglang_engine._check reads: (success, message) tuples, and an object with success and message
    assert PROTOCOL["answers"] == {"begin_weight_update": "Tuple[bool, str]", "update_weights_from_tensor": "Tuple[bool, str]",
                                   "end_weight_update": "Tuple[bool, str]", "flush_cache": "FlushCacheReqOutput"}
    assert {"success", "message"} <= set(PROTOCOL["flush_cache_output"])
    assert PROTOCOL["release_needs_idle"] and PROTOCOL["flush_needs_idle"]
    assert PROTOCOL["seed_gate"] == "enable_deterministic_inference" and PROTOCOL["seed_gate"] in API["server_args"]
    assert list(DETERMINISTIC_ATTENTION_BACKENDS) == PROTOCOL["deterministic_attention_backends"]
    assert set(FP32_ATTENTION_BACKENDS) <= set(PROTOCOL["attention_backends"])
    assert {"attention_backend", "prefill_attention_backend", "decode_attention_backend"} <= set(API["server_args"])
    # protocol.context_limit's rule: the prompt under the context, prompt + max_new_tokens within it
    assert PROTOCOL["context_checks"] == ["input_token_num >= self.context_len",
                                          "max_new_tokens + input_token_num > _max_req_len"]
    assert PROTOCOL["tokenizer_manager_sets_context_len"] and "tokenizer_manager" in API["engine_attributes"]
    assert PROTOCOL["abort_request"] == ["rid", "abort_all"]
    # the blanket kill SGLangEngine.shutdown narrows, and the exit hook it replaces; the stand-in makes the same call
    assert PROTOCOL["shutdown_kills"] == ["kill_process_tree(os.getpid(), include_parent=False, wait_timeout=60)"]
    assert PROTOCOL["shutdown_at_exit"] and PROTOCOL["shutdown_kills"][0] in inspect.getsource(StrictEngine.shutdown)
    assert API["engine_methods"]["get_all_child_pids"] == []
    assert PROTOCOL["finish_reasons"] == ["abort", "length", "stop"]
    assert PROTOCOL["output_token_logprob"] == ["(logprob, token_id, None)"]


def _pinned_source() -> Path | None:
    """The pinned release's source on this machine: IBTPO_SGLANG_WHEEL, else the installed package at the pin."""
    if os.environ.get("IBTPO_SGLANG_WHEEL"):
        return Path(os.environ["IBTPO_SGLANG_WHEEL"])
    try:
        installed = version("sglang")
    except PackageNotFoundError:
        return None
    return Path(importlib.util.find_spec("sglang").origin).parent.parent if installed == SGLANG_VERSION else None


def test_the_api_file_regenerates_from_the_pinned_release():
    source = _pinned_source()
    if source is None:
        pytest.skip(f"needs sglang {SGLANG_VERSION}'s source: installed, or its wheel in IBTPO_SGLANG_WHEEL")
    assert read_api(source) == API, "rerun python -m ibtpo_fast.engines.sglang_api"


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
    def record(self, **kwargs):
        calls.append(kwargs)
        StrictEngine.__init__(self, **kwargs)

    monkeypatch.setattr(GeneratingEngine, "__init__", record)
    for rank in (0, 1, 2):
        build_engine("sglang", None, None, model_path=model_dir(""), local_rank=rank, sglang=SGLangConfig())
    assert [c["base_gpu_id"] for c in calls] == [0, 1, 2]
    assert len({c["port"] for c in calls}) == 3
