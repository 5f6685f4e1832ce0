"""ibtpo_fast.integrations.verl: trees grown through the agent-loop manager, and the `ibtpo` estimator.

verl's rollout servers need GPUs, and verl 0.9.1 (which pins transformers < 5.11) is installed only in CI's
verl environment, so most tests are contract tests against verl 0.9.1's source: the stand-in for its
`LLMServerClient` (verl/workers/rollout/llm_server.py: async `generate(request_id, *, prompt_ids,
sampling_params) -> TokenOutput`, stop_reason "completed" for a stop and a cut alike) answers by generating
with a real TorchEngine on the bundled tiny model, the prompts come as RayPPOTrainer.fit hands them over
(each row `rollout.n` times under one uid, verl/protocol.py `repeat(interleave=True)`), and the estimator is
called with the keywords ray_trainer.compute_advantage passes. The tests behind `importorskip("verl...")`
run verl's real code: the estimator registry, DataProto's repeat / union / reorder as fit() uses them,
LLMServerClient.generate (its Ray actor handles stood in for in-process) with verl's TokenOutput,
compute_advantage, and verl's custom-reward loader.
"""
import asyncio
import importlib.util
import os
import sys
from dataclasses import dataclass, field
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from threads import one_thread  # noqa: F401  (autouse)
from transformers import AutoModelForCausalLM, AutoTokenizer

import ibtpo_fast.integrations.verl as verl_adapter
from ibtpo_fast import walk
from ibtpo_fast.engines.protocol import Request, SamplingParams
from ibtpo_fast.engines.torch_engine import TorchEngine
from ibtpo_fast.errors import MissingExtraError
from ibtpo_fast.integrations.verl import ADVANTAGE_KEY, IBTreeAgentLoopManager, ibtpo_advantage
from ibtpo_fast.tasks import STEP_DELIMITER, compute_score, make_split, tiny_model_path

TREE, G, P, R = "2,3,1,2", 6, 128, 40


@dataclass
class TokenOutput:  # verl/workers/rollout/replica.py TokenOutput: the fields the adapter reads
    token_ids: list[int]
    log_probs: list[float] | None = None
    stop_reason: str | None = None
    extra_fields: dict = field(default_factory=dict)


class TorchServerClient:
    """Stands in for verl's LLMServerClient; requests that arrive together decode as one TorchEngine batch."""

    def __init__(self, engine: TorchEngine | None, report_cache: bool = True) -> None:
        self.engine, self.params, self.request_ids, self._queue = engine, [], [], []
        self.report_cache = report_cache  # verl's vLLM server reports num_cached_tokens, its SGLang server does not

    async def generate(self, request_id, *, prompt_ids, sampling_params):
        self.params.append(dict(sampling_params))
        self.request_ids.append((request_id, list(prompt_ids)))
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._queue.append((server_request(prompt_ids, sampling_params), future))
        if len(self._queue) == 1:
            loop.call_later(0.01, self._decode)
        return await future

    def _decode(self) -> None:
        queued, self._queue = self._queue, []
        try:
            completions = self.engine.generate([r for r, _ in queued])
        except Exception as e:
            for _, future in queued:
                future.set_exception(e)
            return
        for (_, future), c in zip(queued, completions):
            extra = {"num_cached_tokens": c.cached_tokens} if self.report_cache else {}
            future.set_result(TokenOutput(c.token_ids.tolist(), c.logprobs.tolist(), "completed", extra))


def server_request(prompt_ids, params) -> Request:
    """A verl server's reading of the sampling params (vLLM's names)."""
    sampling = SamplingParams(params["temperature"], params["top_p"], params["top_k"], params.get("seed"))
    return Request(list(prompt_ids), params["max_tokens"], sampling, params["stop_token_ids"], params.get("stop", ()))


def verl_config(n: int = G, **ibtpo) -> dict:
    return {"actor_rollout_ref": {"rollout": {"name": "vllm", "n": n, "temperature": 1.0, "top_p": 1.0, "top_k": -1,
                                              "prompt_length": P, "response_length": R}},
            "algorithm": {"adv_estimator": "ibtpo", "use_kl_in_reward": False},
            "ibtpo": {"tree": TREE, "beta": 5.0, "lam": 0.1, "step_delimiter": STEP_DELIMITER, **ibtpo}}


def objects(values: list) -> np.ndarray:
    out = np.empty(len(values), dtype=object)
    out[:] = values
    return out


def dataset_rows(problems) -> dict[str, np.ndarray]:
    """One row per prompt, as verl's RLHFDataset yields them, with the uid fit() adds."""
    return {"uid": objects([f"uid-{i}" for i in range(len(problems))]),
            "raw_prompt": objects([[{"role": "user", "content": p.prompt}] for p in problems]),
            "data_source": objects(["arithmetic"] * len(problems)),
            "reward_model": objects([{"ground_truth": p.answer, "style": "rule"} for p in problems]),
            "extra_info": objects([{"index": i} for i in range(len(problems))])}


def repeated(rows: dict[str, np.ndarray], n: int = G) -> dict[str, np.ndarray]:
    return {k: np.repeat(v, n, axis=0) for k, v in rows.items()}


@pytest.fixture(scope="module")
def tiny():
    path = tiny_model_path()
    return AutoModelForCausalLM.from_pretrained(path), AutoTokenizer.from_pretrained(path)


def make_manager(tiny, config=None, client=None) -> tuple[IBTreeAgentLoopManager, TorchServerClient]:
    model, tok = tiny
    client = client or TorchServerClient(TorchEngine(model, tokenizer=tok))
    manager = IBTreeAgentLoopManager(config or verl_config(), client, tokenizer=tok, compute_score=compute_score,
                                     encode_prompt=lambda row: tok.encode(row["raw_prompt"][0]["content"], add_special_tokens=False))
    return manager, client


@pytest.fixture(scope="module")
def grown(tiny):
    problems = make_split("test", 2)
    manager, client = make_manager(tiny)
    rows = repeated(dataset_rows(problems))
    return manager, client, problems, rows, manager.grow(rows)


def walked_advantages(groups) -> torch.Tensor:
    """[N, R] step advantages of verl's rows from a fresh walk of the grown forest (not the manager's)."""
    forest = groups.rollout.forest
    result = walk(forest, beta=5.0, lam=0.1)
    trajs = forest.trajectories()
    out = torch.zeros(len(groups.order), R)
    for i, j in enumerate(groups.order.tolist()):
        t = trajs[j]
        out[i, : len(t.input_ids) - t.prompt_len] = torch.from_numpy(result.advantage[t.node_index[t.prompt_len :]].astype(np.float32))
    return out


def compute_advantage_kwargs(batch: dict, uid: np.ndarray, config: dict | None = None) -> dict:
    """What verl 0.9.1's compute_advantage hands a registered estimator (token_level_rewards = rm_scores)."""
    kwargs = {"token_level_rewards": batch["rm_scores"], "response_mask": batch["response_mask"],
              "config": config or {"use_kl_in_reward": False}, "index": uid}
    if ADVANTAGE_KEY in batch:
        kwargs["reward_baselines"] = batch[ADVANTAGE_KEY]
    return kwargs


def test_each_uid_gets_its_trees_g_leaves_in_its_rows(grown, tiny):
    manager, client, problems, rows, groups = grown
    tok, b, trajs = tiny[1], groups.batch, groups.rollout.forest.trajectories()
    assert b["prompts"].shape == (2 * G, P) and b["responses"].shape == b["rm_scores"].shape == (2 * G, R)
    assert sorted(groups.order.tolist()) == list(range(2 * G))
    for i, j in enumerate(groups.order.tolist()):
        k = i // G  # verl's repeat(interleave=True): uid k's rows are k*G .. k*G + G-1
        t = trajs[j]
        assert t.tree == k and rows["uid"][i] == f"uid-{k}"
        prompt = tok.encode(problems[k].prompt, add_special_tokens=False)
        assert b["prompts"][i, P - len(prompt) :].tolist() == prompt and (b["prompts"][i, : P - len(prompt)] == tok.pad_token_id).all()
        n = int(b["response_mask"][i].sum())
        assert b["responses"][i, :n].tolist() == t.input_ids[t.prompt_len :].tolist() and b["response_mask"][i, :n].all()
        real = b["attention_mask"][i].bool()
        assert b["input_ids"][i][real].tolist() == t.input_ids.tolist()
        assert b["position_ids"][i][real].tolist() == list(range(len(t.input_ids)))


def test_a_uids_rows_need_not_be_adjacent(tiny):
    manager, _ = make_manager(tiny)
    rows = repeated(dataset_rows(make_split("test", 2)))
    mixed = np.random.default_rng(0).permutation(2 * G)
    groups = manager.grow({k: v[mixed] for k, v in rows.items()})
    trajs = groups.rollout.forest.trajectories()
    trees = [trajs[j].tree for j in groups.order.tolist()]
    assert trees == [0 if u == rows["uid"][mixed[0]] else 1 for u in rows["uid"][mixed]]
    for i, j in enumerate(groups.order.tolist()):
        real = groups.batch["attention_mask"][i].bool()
        assert groups.batch["input_ids"][i][real].tolist() == trajs[j].input_ids.tolist()


def test_rewards_and_rollout_logprobs_are_the_trees(grown, tiny):
    manager, client, problems, rows, groups = grown
    tok, b, forest = tiny[1], groups.batch, groups.rollout.forest
    trajs = forest.trajectories()
    for i, j in enumerate(groups.order.tolist()):
        t, n = trajs[j], int(b["response_mask"][i].sum())
        response = b["responses"][i, :n].tolist()
        cut = groups.rollout.finish_reason[t.leaf] == "length"
        assert cut == (n == R and response[-1] != tok.eos_token_id)  # verl says "completed" either way
        graded = compute_score("arithmetic", tok.decode(response, skip_special_tokens=True), problems[i // G].answer)
        assert forest.reward[t.leaf] == (0.0 if cut else graded)
        assert b["rm_scores"][i, n - 1] == forest.reward[t.leaf] and b["rm_scores"][i].sum() == forest.reward[t.leaf]
        np.testing.assert_array_equal(b["rollout_log_probs"][i, :n].numpy(), t.old_logprobs[t.prompt_len :])
        assert (b["rollout_log_probs"][i, n:] == 0).all() and (b[ADVANTAGE_KEY][i, n:] == 0).all()
    # every server request asked for log-probs and carried its branch's seed and remaining budget
    assert all(p["logprobs"] is True and isinstance(p["seed"], int) and 0 < p["max_tokens"] <= R
               and p["stop_token_ids"] == [tok.eos_token_id] for p in client.params)
    assert len({p["seed"] for p in client.params}) == len(client.params)
    # a tree's requests share its uid as request_id, which verl's load balancer routes to one server
    prompts = {f"uid-{k}": tok.encode(p.prompt, add_special_tokens=False) for k, p in enumerate(problems)}
    assert {r for r, _ in client.request_ids} == set(prompts)
    assert all(ids[: len(prompts[r])] == prompts[r] for r, ids in client.request_ids)


def test_estimator_returns_the_walks_step_advantages_after_rows_are_shuffled(grown):
    manager, client, problems, rows, groups = grown
    expected = walked_advantages(groups)
    perm = torch.randperm(len(groups.order), generator=torch.Generator().manual_seed(0))  # as _balance_batch reorders
    shuffled = {k: v[perm] for k, v in groups.batch.items()}
    advantages, returns = ibtpo_advantage(**compute_advantage_kwargs(shuffled, rows["uid"][perm.numpy()]))
    torch.testing.assert_close(advantages, expected[perm], rtol=0, atol=0)
    assert returns is advantages
    # per token, not one number a response: some response carries more than one step advantage
    assert any(len(set(a[m.bool()].tolist())) > 1 for a, m in zip(advantages, shuffled["response_mask"]))


def test_estimator_refuses_batches_that_did_not_come_from_the_tree_loop(grown):
    manager, client, problems, rows, groups = grown
    b, uid = groups.batch, rows["uid"]
    grpo = {k: v for k, v in b.items() if k != ADVANTAGE_KEY}
    with pytest.raises(ValueError, match=r"batch\['reward_baselines'\].*none.*IBTreeAgentLoopManager"):
        ibtpo_advantage(**compute_advantage_kwargs(grpo, uid))
    remax = {**grpo, ADVANTAGE_KEY: b["rm_scores"].sum(dim=-1)}  # REMAX puts [N] greedy-rollout rewards there
    with pytest.raises(ValueError, match="shape"):
        ibtpo_advantage(**compute_advantage_kwargs(remax, uid))
    with pytest.raises(ValueError, match="use_kl_in_reward"):
        ibtpo_advantage(**compute_advantage_kwargs(b, uid, {"use_kl_in_reward": True}))


def test_rollout_n_other_than_the_trees_leaves_fails_before_any_generation(tiny):
    with pytest.raises(ValueError, match=r"rollout\.n = 4, but ibtpo\.tree 2,3,1,2 grows G = B0 \+ \(L-1\)\*K\*B = 6"):
        IBTreeAgentLoopManager(verl_config(n=4), object(), tokenizer=tiny[1], compute_score=compute_score)


def test_bad_batches_and_settings_are_refused(grown, tiny):
    manager = grown[0]
    rows = repeated(dataset_rows(make_split("test", 1)), n=G - 1)
    with pytest.raises(ValueError, match="uid 'uid-0' has 5 rows, but its tree grows G = 6"):
        manager.grow(rows)
    with pytest.raises(ValueError, match=r"unknown ibtpo option\(s\) \['temperature'\]"):
        IBTreeAgentLoopManager(verl_config(temperature=0.5), object(), tokenizer=tiny[1], compute_score=compute_score)
    with pytest.raises(ValueError, match="legacy trainer, trainer.use_v1=False: the V1 trainer"):
        verl_adapter.check_trainer({"trainer": {"use_v1": True}})
    with pytest.raises(ValueError, match="use_kl_loss"):
        verl_adapter.check_trainer({"algorithm": {"use_kl_in_reward": True}})
    for reward_model in ({"reward": {"reward_model": {"enable": True}}}, {"reward_model": {"enable": True}}):
        with pytest.raises(ValueError, match="reward.reward_model.enable=True: .* reward.custom_reward_function"):
            verl_adapter.check_trainer(reward_model)
    with pytest.raises(ValueError, match="reward manager 'dapo'"):
        verl_adapter.check_trainer({"reward": {"reward_manager": {"name": "dapo"}}})
    for manager_module in ({"reward": {"reward_manager": {"source": "importlib", "name": "naive", "module": {"path": "m.py"}}}},
                           {"reward_model": {"reward_loop_source": "importlib"}}):  # verl's legacy key for the same
        with pytest.raises(ValueError, match="reward.reward_manager.source='importlib'"):
            verl_adapter.check_trainer(manager_module)
    defaults = {"reward": {"reward_model": {"enable": False}, "reward_manager": {"source": "register", "name": "naive"}},
                "reward_model": {"enable": None, "reward_manager": None, "reward_loop_source": None}}  # verl 0.9.1's
    verl_adapter.check_trainer(defaults)
    with pytest.raises(ValueError, match="build this manager with create"):
        manager.generate_sequences(SimpleNamespace(meta_info={"validate": True}, non_tensor_batch={}))


async def async_compute_score(data_source, solution_str, ground_truth, extra_info=None):
    await asyncio.sleep(0)
    return compute_score(data_source, solution_str, ground_truth, extra_info)


def leaf_rewards_and_grades(groups, tok, problems) -> tuple[list[float], list[float]]:
    """Each leaf's reward in the tree, and compute_score's grade of its response (0 where it was cut)."""
    forest, rewards, grades = groups.rollout.forest, [], []
    for t in forest.trajectories():
        cut = groups.rollout.finish_reason[t.leaf] == "length"
        text = tok.decode(t.input_ids[t.prompt_len :].tolist(), skip_special_tokens=True)
        rewards.append(float(forest.reward[t.leaf]))
        grades.append(0.0 if cut else compute_score("arithmetic", text, problems[t.tree].answer))
    return rewards, grades


def test_an_async_reward_function_is_awaited(tiny):
    model, tok = tiny
    problems = make_split("test", 1)
    manager = IBTreeAgentLoopManager(verl_config(), TorchServerClient(TorchEngine(model, tokenizer=tok)), tokenizer=tok,
                                     compute_score=async_compute_score,
                                     encode_prompt=lambda row: tok.encode(row["raw_prompt"][0]["content"], add_special_tokens=False))
    rewards, grades = leaf_rewards_and_grades(manager.grow(repeated(dataset_rows(problems))), tok, problems)
    assert rewards == grades and manager.scorer.stats()["reward/errors"] == 0


def test_validation_batches_go_to_verls_own_manager(tiny):
    stock = SimpleNamespace(generate_sequences=lambda prompts: ("verl's", prompts))
    manager = IBTreeAgentLoopManager(verl_config(), object(), tokenizer=tiny[1], compute_score=compute_score, validation=stock)
    prompts = SimpleNamespace(meta_info={"validate": True}, non_tensor_batch={})
    assert manager.generate_sequences(prompts) == ("verl's", prompts)


def test_server_outputs_become_completions():
    request = Request([5, 6], max_new_tokens=3, stop_token_ids=(1,))
    out = verl_adapter.to_completion(TokenOutput([7, 8, 9], [-0.1, -0.2, -0.3], "completed"), request)
    assert out.finish_reason == "length" and out.token_ids.tolist() == [7, 8, 9] and out.logprobs.dtype == np.float32
    assert verl_adapter.to_completion(TokenOutput([7, 8, 1], [-0.1, -0.2, -0.3], "completed"), request).finish_reason == "stop"
    assert verl_adapter.to_completion(TokenOutput([7], [-0.1], "completed"), request).finish_reason == "stop"
    with pytest.raises(RuntimeError, match="no tokens"):
        verl_adapter.to_completion(TokenOutput([], [], "aborted"), request)
    # behind verl's SGLang server: SGLang's own reasons
    with pytest.raises(RuntimeError, match="aborted the request"):
        verl_adapter.to_completion(TokenOutput([7], [-0.1], "abort"), request)
    assert verl_adapter.to_completion(TokenOutput([7], [-0.1], "length"), request).finish_reason == "length"
    assert verl_adapter.to_completion(TokenOutput([7, 8, 1], [-0.1, -0.2, -0.3], "stop"), request).finish_reason == "stop"
    with pytest.raises(RuntimeError, match="log-prob"):
        verl_adapter.to_completion(TokenOutput([7], None, "completed"), request)


def test_a_server_that_reports_no_cached_tokens_leaves_the_hit_rate_unknown(grown, tiny):
    assert 0 < grown[4].rollout.metrics["rollout/prefix_cache_hit_rate"] <= 1  # reported, as verl's vLLM server does
    manager, _ = make_manager(tiny, client=TorchServerClient(TorchEngine(tiny[0], tokenizer=tiny[1]), report_cache=False))
    groups = manager.grow(repeated(dataset_rows(make_split("test", 1))))
    assert np.isnan(groups.rollout.metrics["rollout/prefix_cache_hit_rate"])


@pytest.mark.skipif(importlib.util.find_spec("verl") is not None, reason="verl is installed: the real-verl tests cover these paths")
def test_without_verl_the_verl_only_paths_name_the_install():
    assert "verl" not in sys.modules  # importing the adapter did not need it
    with pytest.raises(MissingExtraError, match=r"pip install verl==0\.9\.1"):
        verl_adapter.register_estimator()
    with pytest.raises(MissingExtraError, match=r"pip install verl==0\.9\.1"):
        IBTreeAgentLoopManager.create(verl_config(), object())


class InProcessActor:
    """A Ray actor handle whose `method.remote(...)` runs the method on the caller's event loop."""

    def __init__(self, **methods) -> None:
        self.methods = methods

    def __getattr__(self, name):
        return SimpleNamespace(remote=lambda *args, **kwargs: asyncio.ensure_future(self.methods[name](*args, **kwargs)))


def returns(value):
    async def method(*args, **kwargs):
        return value

    return method


# ---- verl's real code -----------------------------------------------------------------------------------
def real_verl(module: str):
    """verl's module; skipped without verl, except where IBTPO_REAL_VERL=1 (CI's side environment, which has
    verl installed so that these tests run there instead of skipping)."""
    if os.environ.get("IBTPO_REAL_VERL") == "1":
        return importlib.import_module(module)
    return pytest.importorskip(module)


def test_real_verl_registry_returns_the_estimator():
    core_algos = real_verl("verl.trainer.ppo.core_algos")
    verl_adapter.register_estimator()
    verl_adapter.register_estimator()  # the hook may run more than once in a process
    assert core_algos.get_adv_estimator_fn("ibtpo") is ibtpo_advantage


def test_real_verl_trainer_flow_carries_the_advantages_to_the_estimator(tiny):
    """RayPPOTrainer.fit's data path: repeat, generate_sequences, union with the repeated batch,
    reorder (as _balance_batch), token_level_rewards = rm_scores, then the registered estimator."""
    verl = real_verl("verl")
    core_algos = real_verl("verl.trainer.ppo.core_algos")
    llm_server = real_verl("verl.workers.rollout.llm_server")
    from omegaconf import OmegaConf
    from verl.workers.rollout.replica import TokenOutput as VerlTokenOutput

    problems = make_split("test", 2)
    config = OmegaConf.create(verl_config(tree=[2, 3, 1, 2]))  # as hydra hands it: DictConfig, ListConfig
    torch_server = TorchServerClient(TorchEngine(tiny[0], tokenizer=tiny[1]))

    async def server_generate(request_id, prompt_ids, sampling_params, image_data=None, video_data=None):
        out = await torch_server.generate(request_id, prompt_ids=prompt_ids, sampling_params=sampling_params)
        return VerlTokenOutput(token_ids=out.token_ids, log_probs=out.log_probs, stop_reason=out.stop_reason)

    server = InProcessActor(generate=server_generate)
    balancer = InProcessActor(require_acquire_fields=returns([]), require_release_fields=returns([]),
                              acquire_server=returns(("replica-0", server)), release_server=returns(None))
    manager, _ = make_manager(tiny, config, llm_server.LLMServerClient(config, load_balancer_handle=balancer))  # verl's client
    grown = []
    grow = manager.grow
    manager.grow = lambda rows: grown.append(grow(rows)) or grown[-1]
    rows = dataset_rows(problems)
    batch = verl.DataProto.from_single_dict({"dummy_tensor": torch.zeros(len(problems), 1, dtype=torch.uint8), **rows})
    gen_batch = verl.DataProto.from_single_dict({"dummy_tensor": torch.zeros(len(problems), 1, dtype=torch.uint8), **rows},
                                                meta_info={"global_steps": 1})
    out = manager.generate_sequences(gen_batch.repeat(G, interleave=True))
    assert out.meta_info["timing"] and out.non_tensor_batch["__num_turns__"].tolist() == [2] * 2 * G
    assert len(torch_server.params) == 2 * G and all(p["seed"] is not None for p in torch_server.params)
    full = batch.repeat(G, interleave=True).union(out)
    expected = walked_advantages(grown[0])
    perm = torch.randperm(len(full), generator=torch.Generator().manual_seed(1))
    full.reorder(perm)
    full.batch["token_level_rewards"] = full.batch["rm_scores"]
    assert full.non_tensor_batch["uid"].tolist() == [f"uid-{int(i) // G}" for i in perm]
    verl_adapter.register_estimator()
    fn = core_algos.get_adv_estimator_fn("ibtpo")
    advantages, _ = fn(**compute_advantage_kwargs(full.batch, full.non_tensor_batch["uid"]))
    torch.testing.assert_close(advantages, expected[perm], rtol=0, atol=0)
    # compute_advantage itself needs ray_trainer's heavier imports (torchdata, peft, fastapi, ...)
    compute_advantage = real_verl("verl.trainer.ppo.ray_trainer").compute_advantage
    data = compute_advantage(full, adv_estimator="ibtpo", config=config.algorithm)
    torch.testing.assert_close(data.batch["advantages"], expected[perm], rtol=0, atol=0)


def test_real_verl_loads_an_async_custom_reward_function_that_the_tree_awaits(tiny, tmp_path):
    """verl's own loader (the one create() uses) wraps an `async def` compute_score in a coroutine function."""
    get_custom_reward_fn = real_verl("verl.trainer.ppo.reward").get_custom_reward_fn
    from omegaconf import OmegaConf

    module = tmp_path / "async_reward.py"
    module.write_text("from ibtpo_fast.tasks import compute_score as grade\n\n\n"
                      "async def compute_score(data_source, solution_str, ground_truth, extra_info=None):\n"
                      "    return grade(data_source, solution_str, ground_truth, extra_info)\n")
    config = OmegaConf.create({"reward": {"custom_reward_function": {"path": str(module), "name": "compute_score"}}})
    model, tok = tiny
    problems = make_split("test", 1)
    manager = IBTreeAgentLoopManager(verl_config(), TorchServerClient(TorchEngine(model, tokenizer=tok)), tokenizer=tok,
                                     compute_score=get_custom_reward_fn(config),
                                     encode_prompt=lambda row: tok.encode(row["raw_prompt"][0]["content"], add_special_tokens=False))
    rewards, grades = leaf_rewards_and_grades(manager.grow(repeated(dataset_rows(problems))), tok, problems)
    assert rewards == grades and manager.scorer.stats()["reward/errors"] == 0
