"""Contract test of ibtpo_fast.integrations.slime against stand-ins for slime (not on PyPI).

The stand-ins mirror THUDM/slime commit 624b824a898ab0ec1fcb4d373004c7f3852bf515:
slime/utils/types.py Sample (fields, defaults, Status values), slime/rollout/base_types.py
RolloutFnTrainOutput, slime/utils/http_utils.py post(url, payload, max_retries, headers),
slime/utils/async_utils.py get_async_loop().loop, slime/rollout/rm_hub async_rm(args, sample),
slime/rollout/data_source.py RolloutDataSource.get_samples (n copies a prompt, group_index and
distinct index), and slime/ray/rollout.py _convert_samples_to_train_data + tensorize (what reaches
the hook of --custom-advantage-function-path, called as fn(args, rollout_data) in
slime/backends/megatron_utils/loss.py compute_advantages_and_returns). The router answers /generate
by generating with a real TorchEngine on the bundled tiny model, so tokens and log-probs are real.
The stand-ins' fields, defaults and signatures, the options the adapter reads and how slime calls
the advantage hook are checked against slime_api.json, read from that commit's source
(`python -m ibtpo_fast.integrations.slime_api`).
"""
import ast
import asyncio
import copy
import dataclasses
import inspect
import json
import sys
import threading
import types
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import ibtpo_fast.integrations.slime as slime_adapter
from ibtpo_fast import walk
from ibtpo_fast.engines import Engine, Request, SamplingParams
from ibtpo_fast.engines.torch_engine import TorchEngine
from ibtpo_fast.errors import MissingExtraError
from ibtpo_fast.leaf_batch import leaf_batch
from ibtpo_fast.tasks import STEP_DELIMITER, compute_score, make_split, tiny_model_path

URL = "http://10.0.0.7:30000/generate"


# ---- stand-ins for slime's types -----------------------------------------------------------
@dataclass
class Sample:
    group_index: int | None = None
    index: int | None = None
    rollout_id: int | None = None
    prompt: str | list[dict[str, str]] = ""
    tokens: list[int] = field(default_factory=list)
    multimodal_inputs: dict[str, Any] | None = None
    multimodal_train_inputs: dict[str, Any] | None = None
    multimodal_train_input_id: str | None = None
    apply_chat_template_kwargs: dict = field(default_factory=dict)
    response: str = ""
    response_length: int = 0
    label: str | None = None
    reward: float | dict[str, Any] | None = None
    loss_mask: list[int] | None = None
    weight_versions: list[str] = field(default_factory=list)
    rollout_log_probs: list[float] | None = None
    rollout_top_p_token_ids: list[int] | torch.Tensor | None = None
    rollout_top_p_token_offsets: list[int] | torch.Tensor | None = None
    rollout_routed_experts: list[list[int]] | torch.Tensor | None = None
    remove_sample: bool = False
    teacher_log_probs: list[float] | None = None

    class Status(Enum):
        PENDING = "pending"
        COMPLETED = "completed"
        TRUNCATED = "truncated"
        ABORTED = "aborted"
        FAILED = "failed"

    status: Status = Status.PENDING
    metadata: dict = field(default_factory=dict)
    generate_function_path: str | None = None
    custom_rm_path: str | None = None
    train_metadata: dict | None = None
    session_id: str | None = None
    non_generation_time: float = 0.0

    @dataclass
    class SpecInfo:
        spec_accept_token_num: int = 0
        spec_draft_token_num: int = 0
        spec_verify_ct: int = 0
        completion_token_num: int = 0

    spec_info: SpecInfo = field(default_factory=SpecInfo)

    @dataclass
    class PrefixCacheInfo:
        cached_tokens: int = 0
        total_prompt_tokens: int = 0

    prefix_cache_info: PrefixCacheInfo = field(default_factory=PrefixCacheInfo)


@dataclass
class RolloutFnTrainOutput:
    samples: list[list[Sample]]
    metrics: dict[str, Any] = None


class DataSource:
    """RolloutDataSource.get_samples over a fixed prompt list."""

    def __init__(self, problems, n_samples_per_prompt):
        self.problems, self.n = problems, n_samples_per_prompt
        self.group_index = self.index = self.calls = 0

    def get_samples(self, num_samples):
        self.calls += 1
        groups = []
        for p in self.problems[:num_samples]:
            group = []
            for _ in range(self.n):
                group.append(Sample(group_index=self.group_index, index=self.index, prompt=p.prompt, label=p.answer))
                self.index += 1
            self.group_index += 1
            groups.append(group)
        return groups


class Router:
    """slime's router /generate, answered by a TorchEngine: SGLang's answer shape (meta_info's
    output_token_logprobs as (logprob, token id, text) and finish_reason as a dict)."""

    def __init__(self, model, tok):
        self.engine, self.tok, self.calls = TorchEngine(model, tokenizer=tok), tok, []

    async def post(self, url, payload, max_retries=60, headers=None):
        self.calls.append((url, payload))
        sp = payload["sampling_params"]
        request = Request(payload["input_ids"], sp["max_new_tokens"],
                          SamplingParams(sp["temperature"], sp["top_p"], sp["top_k"], sp.get("sampling_seed")),
                          tuple(sp["stop_token_ids"]), tuple(sp["stop"]))
        c = self.engine.generate([request])[0]
        return {"text": self.tok.decode(c.token_ids),
                "meta_info": {"output_token_logprobs": [[float(lp), int(t), None] for lp, t in zip(c.logprobs, c.token_ids)],
                              "finish_reason": {"type": c.finish_reason}, "cached_tokens": c.cached_tokens,
                              "prompt_tokens": len(payload["input_ids"]), "completion_tokens": len(c.token_ids)}}


def make_args(**overrides):
    args = dict(
        rollout_batch_size=2, n_samples_per_prompt=6, hf_checkpoint=str(tiny_model_path()),
        sglang_router_ip="10.0.0.7", sglang_router_port=30000, rollout_temperature=1.0, rollout_top_p=1.0,
        rollout_top_k=-1, rollout_max_response_len=40, rollout_stop=None, rollout_stop_token_ids=None,
        rollout_skip_special_tokens=True, rollout_seed=42, group_rm=False, use_opd=False, reward_key=None,
        ibtpo_tree="2,3,1,2", ibtpo_beta=5.0, ibtpo_lam=0.1, ibtpo_step_delimiter=STEP_DELIMITER,
        dynamic_sampling_filter_path=None, over_sampling_batch_size=2, partial_rollout=False,
        custom_generate_function_path=None, rollout_sample_hook_path=[], rollout_sample_filter_path=None,
        rollout_all_samples_process_path=None, sglang_server_concurrency=512, rollout_num_gpus=1,
        rollout_num_gpus_per_engine=1,
    )
    return types.SimpleNamespace(**{**args, **overrides})


def get_rollout_num_engines(args):
    """slime.utils.http_utils.get_rollout_num_engines."""
    if (num_engines := getattr(args, "rollout_num_engines", None)) is not None:
        return int(num_engines)
    rollout_num_gpus = getattr(args, "rollout_num_gpus", None) or 0
    rollout_num_gpus_per_engine = getattr(args, "rollout_num_gpus_per_engine", None) or 1
    if rollout_num_gpus <= 0:
        return 0
    return max(1, rollout_num_gpus // rollout_num_gpus_per_engine)


def install_fake_slime(mp: pytest.MonkeyPatch, post, loop, rm_calls, sglang_rollout=None):
    async def async_rm(args, sample, **kwargs):
        rm_calls.append(copy.deepcopy(sample))
        return compute_score("arithmetic", sample.response, sample.label)

    modules = {
        "slime": {}, "slime.utils": {}, "slime.rollout": {},
        "slime.utils.types": {"Sample": Sample},
        "slime.utils.http_utils": {"post": post, "get_rollout_num_engines": get_rollout_num_engines},
        "slime.utils.async_utils": {"get_async_loop": lambda: types.SimpleNamespace(loop=loop)},
        "slime.rollout.base_types": {"RolloutFnTrainOutput": RolloutFnTrainOutput},
        "slime.rollout.rm_hub": {"async_rm": async_rm},
        "slime.rollout.sglang_rollout": {"generate_rollout": sglang_rollout},
    }
    for name, attrs in modules.items():
        module = types.ModuleType(name)
        module.__dict__.update(attrs)
        mp.setitem(sys.modules, name, module)


def to_rollout_data(samples):
    """What slime's rollout manager and actor hand the advantage hook (one DP rank, CP 1, kl_coef 0)."""
    data = {
        "tokens": [torch.tensor(s.tokens, dtype=torch.long) for s in samples],
        "response_lengths": [s.response_length for s in samples],
        "loss_masks": [torch.tensor(s.loss_mask, dtype=torch.int) for s in samples],
        "rollout_log_probs": [torch.tensor(s.rollout_log_probs, dtype=torch.float32) for s in samples],
        "rewards": [s.reward for s in samples],
    }
    if samples[0].teacher_log_probs is not None:
        data["teacher_log_probs"] = [torch.tensor(s.teacher_log_probs, dtype=torch.float32) for s in samples]
    data["kl"] = [torch.zeros_like(x) for x in data["rollout_log_probs"]]
    return data


# ---- fixtures ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def loop():
    """slime's background event loop (slime.utils.async_utils): another thread runs it."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    yield loop
    loop.call_soon_threadsafe(loop.stop)
    thread.join()
    loop.close()


@pytest.fixture(scope="module")
def run(loop):
    path = tiny_model_path()
    model, tok = AutoModelForCausalLM.from_pretrained(path), AutoTokenizer.from_pretrained(path)
    router, rm_calls, built = Router(model, tok), [], []
    problems = make_split("test", 2)
    args = make_args(rollout_max_response_len=37)  # a few responses run past it: both statuses occur

    def recording_leaf_batch(forest, result, pad_id, finish_reason=None):
        built.append((forest, finish_reason))
        return leaf_batch(forest, result, pad_id, finish_reason)

    with pytest.MonkeyPatch.context() as mp:
        install_fake_slime(mp, router.post, loop, rm_calls)
        mp.setattr(slime_adapter, "leaf_batch", recording_leaf_batch)
        out = slime_adapter.generate_rollout(args, 0, DataSource(problems, 6))
    (forest, finish), = built
    return types.SimpleNamespace(out=out, forest=forest, finish=finish, router=router, rm_calls=rm_calls, tok=tok,
                                 problems=problems, args=args)


# ---- the rollout function ------------------------------------------------------------------
def test_groups_hold_one_sample_per_leaf_with_the_forest_tokens_and_logprobs(run):
    groups = run.out.samples
    assert isinstance(run.out, RolloutFnTrainOutput) and run.out.metrics["tree/trajectories"] == 6
    assert [len(g) for g in groups] == [6, 6]
    flat = [s for g in groups for s in g]
    assert sorted(s.index for s in flat) == list(range(12))  # the data source's distinct indices, kept
    assert [s.group_index for s in flat] == [0] * 6 + [1] * 6
    trajs = run.forest.trajectories()  # leaf order: trees in order, each tree's leaves together
    assert len(trajs) == 12
    for s, t in zip(flat, trajs):
        prompt = run.tok.encode(run.problems[t.tree].prompt, add_special_tokens=False)
        assert t.tree == s.group_index and t.input_ids[: t.prompt_len].tolist() == prompt
        assert s.tokens == t.input_ids.tolist() and s.response_length == len(t.input_ids) - t.prompt_len
        assert s.loss_mask == [1] * s.response_length
        np.testing.assert_array_equal(np.asarray(s.rollout_log_probs, np.float32), t.old_logprobs[t.prompt_len :])
        assert s.response == run.tok.decode(s.tokens[t.prompt_len :], skip_special_tokens=True)
    statuses = [s.status for s in flat]
    # if the bundled model changes, pick a rollout_max_response_len that still cuts a few responses
    assert set(statuses) == {Sample.Status.COMPLETED, Sample.Status.TRUNCATED}, statuses
    assert [s.status == Sample.Status.TRUNCATED for s in flat] == [run.finish[t.leaf] == "length" for t in trajs]


def test_rewards_come_from_slimes_reward_model_and_truncated_leaves_score_zero(run):
    flat = [s for g in run.out.samples for s in g]
    for s, t in zip(flat, run.forest.trajectories()):
        assert s.reward == run.forest.reward[t.leaf]
        if s.status == Sample.Status.TRUNCATED:
            assert s.reward == 0.0
        else:
            assert s.reward == compute_score("arithmetic", s.response, s.label)
    # async_rm saw each finished leaf once, as a finished sample of its prompt, between rounds
    assert len(run.rm_calls) == sum(s.status == Sample.Status.COMPLETED for s in flat)
    assert all(c.status == Sample.Status.COMPLETED and c.response_length > 0 for c in run.rm_calls)
    assert {c.label for c in run.rm_calls} <= {p.answer for p in run.problems}


def test_requests_go_to_the_router_with_token_ids_and_logprobs(run):
    # per tree: B0 = 2 in round 1, then K * B = 2 in each of rounds 2 and 3
    assert len(run.router.calls) == 2 * (2 + 2 + 2)
    prompts = [run.tok.encode(p.prompt, add_special_tokens=False) for p in run.problems]
    for url, payload in run.router.calls:
        assert url == URL and payload["return_logprob"] is True
        assert any(payload["input_ids"][: len(p)] == p for p in prompts)
        assert payload["sampling_params"]["stop_token_ids"] == [run.tok.eos_token_id]
        assert payload["sampling_params"]["max_new_tokens"] <= run.args.rollout_max_response_len


# ---- the advantage function ----------------------------------------------------------------
def test_the_advantage_hook_writes_the_walks_per_token_step_advantages(run):
    flat = [s for g in run.out.samples for s in g]
    data = to_rollout_data(flat)
    slime_adapter.compute_advantages(run.args, data)
    result = walk(run.forest, beta=5.0, lam=0.1)
    # the leaf order of slime's flattened samples is leaf_batch's
    expected = leaf_batch(run.forest, result, pad_id=0)
    assert "teacher_log_probs" not in data  # nothing downstream reads the advantages as a teacher's
    for i, (s, t) in enumerate(zip(flat, run.forest.trajectories())):
        n = s.response_length
        np.testing.assert_array_equal(data["advantages"][i].numpy(), expected.advantages[i, :n].numpy())
        np.testing.assert_array_equal(data["advantages"][i].numpy(), result.advantage[t.node_index[t.prompt_len :]].astype(np.float32))
        assert data["returns"][i] is data["advantages"][i] and data["advantages"][i].dtype == torch.float32
    assert any(a.abs().sum() > 0 for a in data["advantages"])


def test_the_advantage_hook_refuses_samples_from_another_rollout():
    plain = [Sample(tokens=[1, 2, 3], response_length=2, loss_mask=[1, 1], rollout_log_probs=[-0.1, -0.2], reward=1.0)]
    with pytest.raises(ValueError, match="teacher_log_probs.*did not come from ibtpo_fast.integrations.slime"):
        slime_adapter.compute_advantages(make_args(), to_rollout_data(plain))
    wrong = [copy.deepcopy(plain[0])]
    wrong[0].teacher_log_probs = [0.5]  # one advantage for two response tokens
    with pytest.raises(ValueError, match="sample 0 carries"):
        slime_adapter.compute_advantages(make_args(), to_rollout_data(wrong))
    wrong[0].teacher_log_probs = [0.5, 0.5]
    with pytest.raises(ValueError, match="--use-opd"):
        slime_adapter.compute_advantages(make_args(use_opd=True), to_rollout_data(wrong))


# ---- what is refused before any generation -------------------------------------------------
def test_a_tree_that_does_not_grow_n_samples_per_prompt_fails_clearly(loop, monkeypatch):
    calls = []

    async def post(url, payload, max_retries=60, headers=None):
        calls.append(payload)

    install_fake_slime(monkeypatch, post, loop, [])
    source = DataSource(make_split("test", 2), 5)
    with pytest.raises(ValueError, match=r"grows B0 \+ \(L-1\)\*K\*B = 6 leaves per prompt, but --n-samples-per-prompt is 5"):
        slime_adapter.generate_rollout(make_args(n_samples_per_prompt=5), 0, source)
    assert source.calls == 0 and calls == []


@pytest.mark.parametrize("option, match", [
    ({"group_rm": True}, "--group-rm"), ({"use_opd": True}, "--use-opd"), ({"reward_key": "score"}, "--reward-key"),
    ({"rollout_top_p": 0.9}, "--rollout-top-p 1.0"), ({"rollout_max_response_len": None}, "--rollout-max-response-len"),
    ({"dynamic_sampling_filter_path": "slime.rollout.filter_hub.dynamic_sampling_filters.check_reward_nonzero_std"},
     "--dynamic-sampling-filter-path"),
    ({"over_sampling_batch_size": 4}, "--over-sampling-batch-size 4"),
    ({"partial_rollout": True}, "--partial-rollout"),
    ({"router_policy": "consistent_hashing"}, "--router-policy consistent_hashing"),
    ({"custom_generate_function_path": "my.generate"}, "--custom-generate-function-path"),
    ({"rollout_sample_hook_path": ["my.hook"]}, "--rollout-sample-hook-path"),
    ({"rollout_sample_filter_path": "my.filter"}, "--rollout-sample-filter-path"),
    ({"rollout_all_samples_process_path": "my.process"}, "--rollout-all-samples-process-path"),
])
def test_slime_options_the_tree_cannot_honour_are_refused(option, match):
    with pytest.raises(ValueError, match=match):
        slime_adapter.generate_rollout(make_args(**option), 0, DataSource([], 6))


# ---- slime itself --------------------------------------------------------------------------
def test_the_router_engine_meets_the_engine_contract(loop):
    async def post(url, payload, max_retries=60, headers=None):
        n = payload["sampling_params"]["max_new_tokens"]
        return {"text": "", "meta_info": {"output_token_logprobs": [[-0.5, 7, None]] * n,
                                          "finish_reason": {"type": "length", "length": n}, "cached_tokens": 1}}

    engine = slime_adapter.SlimeRouterEngine(URL, post, loop)
    assert isinstance(engine, Engine)
    out = engine.generate([Request([1, 2], 3), Request([4], 2)])
    assert [c.token_ids.tolist() for c in out] == [[7, 7, 7], [7, 7]] and out[0].finish_reason == "length"
    assert engine.in_flight == 0
    with pytest.raises(RuntimeError, match="slime's train loop"):
        engine.update_weights()


def test_the_router_engine_keeps_slimes_concurrency_limit(loop, monkeypatch):
    live, peak = [0], [0]

    async def post(url, payload, max_retries=60, headers=None):
        live[0] += 1
        peak[0] = max(peak[0], live[0])
        await asyncio.sleep(0.01)
        live[0] -= 1
        return {"text": "", "meta_info": {"output_token_logprobs": [[-0.5, 7, None]], "finish_reason": {"type": "stop"}}}

    install_fake_slime(monkeypatch, post, loop, [])
    engine = slime_adapter.SlimeRouterEngine.from_args(make_args(sglang_server_concurrency=2, rollout_num_gpus=4,
                                                                      rollout_num_gpus_per_engine=2))
    assert len(engine.generate([Request([1], 1)] * 9)) == 9
    assert peak[0] == 4  # --sglang-server-concurrency per engine, as slime's own rollout allows


def test_evaluation_is_slimes_own_rollout(loop, monkeypatch):
    seen = []

    def sglang_generate_rollout(args, rollout_id, data_source, evaluation=False):
        seen.append((rollout_id, evaluation))
        return "eval output"

    install_fake_slime(monkeypatch, None, loop, [], sglang_rollout=sglang_generate_rollout)
    assert slime_adapter.generate_rollout(make_args(), 3, None, evaluation=True) == "eval output"
    assert seen == [(3, True)]


def test_slime_only_paths_say_how_to_get_slime(monkeypatch):
    monkeypatch.setitem(sys.modules, "slime", None)  # not importable, as on PyPI-only machines
    with pytest.raises(MissingExtraError, match="github.com/THUDM/slime"):
        slime_adapter.SlimeRouterEngine.from_args(make_args())
    with pytest.raises(MissingExtraError, match="not on PyPI"):
        slime_adapter.generate_rollout(make_args(), 0, None, evaluation=True)


# ---- the stand-ins against slime's source (ibtpo_fast/integrations/slime_api.json) ---------
API = json.loads(Path(slime_adapter.__file__).with_name("slime_api.json").read_text())


def _default_source(f: dataclasses.Field) -> str | None:
    """A stand-in field's default as slime's source spells it."""
    if f.default_factory is not dataclasses.MISSING:
        return f"field(default_factory={f.default_factory.__name__})"
    if f.default is dataclasses.MISSING:
        return None
    return f"Status.{f.default.name}" if isinstance(f.default, Enum) else repr(f.default)


def _stand_in_fields(cls) -> dict[str, str | None]:
    return {f.name: _default_source(f) for f in dataclasses.fields(cls)}


def _params(fn) -> list[str]:
    ps = inspect.signature(fn).parameters.values()
    return [p.name for p in ps if p.name != "self" and p.kind != p.VAR_KEYWORD] + (
        ["**"] if any(p.kind == p.VAR_KEYWORD for p in ps) else [])


def test_the_api_file_is_read_from_the_pinned_commit():
    assert API["commit"] == slime_adapter.SLIME_COMMIT


def test_the_sample_stand_in_has_slimes_fields_defaults_and_statuses():
    assert list(_stand_in_fields(Sample).items()) == list(API["sample"]["fields"].items())
    assert {s.name: s.value for s in Sample.Status} == API["sample"]["status"]
    assert _stand_in_fields(Sample.SpecInfo) == API["sample"]["nested"]["SpecInfo"]
    assert _stand_in_fields(Sample.PrefixCacheInfo) == API["sample"]["nested"]["PrefixCacheInfo"]
    assert _stand_in_fields(RolloutFnTrainOutput) == API["rollout_fn_train_output"]


def test_the_stand_in_functions_and_the_hooks_have_slimes_signatures(loop, monkeypatch):
    install_fake_slime(monkeypatch, Router.post, loop, [])
    stand_ins = {
        "slime/utils/http_utils.py:post": Router.post,
        "slime/utils/http_utils.py:get_rollout_num_engines": sys.modules["slime.utils.http_utils"].get_rollout_num_engines,
        "slime/utils/async_utils.py:get_async_loop": sys.modules["slime.utils.async_utils"].get_async_loop,
        "slime/rollout/rm_hub/__init__.py:async_rm": sys.modules["slime.rollout.rm_hub"].async_rm,
        "slime/rollout/data_source.py:RolloutDataSource.get_samples": DataSource.get_samples,
        "slime/rollout/sglang_rollout.py:generate_rollout": slime_adapter.generate_rollout,  # the hook replaces it
    }
    assert stand_ins.keys() == API["functions"].keys()
    for name, fn in stand_ins.items():
        assert _params(fn) == API["functions"][name]["params"], name
        assert inspect.iscoroutinefunction(fn) == API["functions"][name]["async"], name
    assert _params(slime_adapter.compute_advantages) == API["advantage_hook_call"]  # called as fn(args, rollout_data)
    assert slime_adapter.ADVANTAGE_FIELD in API["train_data_fields"]  # it reaches the trainer, and so the hook


def _args_read(source: str) -> set[str]:
    """Every `args` attribute the adapter reads: args.x, getattr(args, "x"...) and _option(args, "x")."""
    out = set()
    for n in ast.walk(ast.parse(source)):
        if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name) and n.value.id == "args":
            out.add(n.attr)
        elif (isinstance(n, ast.Call) and isinstance(n.func, ast.Name) and n.func.id in ("getattr", "_option")
              and isinstance(n.args[0], ast.Name) and n.args[0].id == "args" and isinstance(n.args[1], ast.Constant)):
            out.add(n.args[1].value)
    return out


def test_every_option_the_adapter_reads_is_one_slime_defines():
    """slime's own options, sglang-router's (prefixed router_), or the ibtpo_* keys of --custom-config-path."""
    options = set(API["options"]["dests"])
    assert API["options"]["router_prefix"]
    read = _args_read(Path(slime_adapter.__file__).read_text()) | set(slime_adapter.REFUSED)
    assert {"n_samples_per_prompt", "partial_rollout", "sglang_server_concurrency", "router_policy"} <= read
    unknown = {a for a in read - options if not a.startswith("router_") and a not in slime_adapter.DEFAULTS}
    assert not unknown
    assert not {a for a in vars(make_args()) if a not in options and a not in slime_adapter.DEFAULTS}
