"""IB-TPO in verl 0.9.1: an agent-loop manager that grows one IBTree per prompt through verl's rollout
servers, and the advantage estimator `ibtpo` that trains on the tree's per-token step advantages.

    trainer.use_v1=False
    algorithm.adv_estimator=ibtpo algorithm.use_kl_in_reward=False
    actor_rollout_ref.rollout.n=12                      # = B0 + (L-1)*K*B of the tree below
    +actor_rollout_ref.rollout.agent.agent_loop_manager_class=ibtpo_fast.integrations.verl.IBTreeAgentLoopManager
    +ibtpo.tree=[4,9,1,1] +ibtpo.beta=5.0 +ibtpo.lam=0.1

The top-level `ibtpo` section takes `lam` and `eps` (the walk's) and any `SamplerConfig` field but the
three verl sets: `sampling` (rollout.temperature / top_p / top_k), `max_new_tokens`
(rollout.response_length) and `stop_token_ids` (the tokenizer's and the model's EOS). Set text such as
`step_delimiter` (default "\\n\\n") in the YAML config, where "\\n" is a newline; hydra's command-line
grammar escapes only quotes and backslashes.

Route of the step advantages. verl's `compute_advantage` (verl/trainer/ppo/ray_trainer.py) calls a
registered estimator with `token_level_rewards`, `response_mask`, `config` (the algorithm section) and,
when present, `index` (non_tensor_batch["uid"]) and `reward_baselines` (batch["reward_baselines"],
passed as is). So the manager writes the [N, R] per-token step advantages to batch["reward_baselines"],
next to `rm_scores` holding each leaf's reward on its last token as verl's own agent loop does (so
verl's scores, logs and validation stay right). They are a column of the same batch, so
`_balance_batch` and every other reordering move them with their rows. The estimator returns them
masked by `response_mask`, and refuses a batch without them, or with REMAX's [N] baselines there.

Why the legacy trainer (`trainer.use_v1=False`): verl 0.9.1's V1 trainer moves rollouts through
TransferQueue and its `_compute_advantage` (verl/trainer/ppo/v1/trainer_base.py) fetches only uid,
response_mask, rm_scores, log-probs and values, so nothing per token but the rewards reaches an estimator.
`create` refuses V1, and a KL penalty in the reward (the advantages come from the tree, so it would be
dropped silently); use actor.use_kl_loss. Validation batches go to verl's own AgentLoopManager.
"""
from __future__ import annotations

import asyncio
import importlib
import inspect
import threading
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, fields
from types import ModuleType
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ibtpo_fast.engines.loop_client import LoopClientEngine
from ibtpo_fast.engines.protocol import Completion, Request, SamplingParams
from ibtpo_fast.errors import MissingExtraError
from ibtpo_fast.leaf_batch import LeafBatch, check_leaves_per_tree, leaf_batch
from ibtpo_fast.rewards import RewardScorer
from ibtpo_fast.sampler import IBTreeSampler, Rollout, SamplerConfig
from ibtpo_fast.walk import WalkResult, walk

VERL_VERSION = "0.9.1"  # the verl whose trainer, agent loop and server client this mirrors
ESTIMATOR = "ibtpo"
ADVANTAGE_KEY = "reward_baselines"  # the batch key verl's compute_advantage hands estimators unchanged
SEED_KEYS = {"vllm": "seed", "sglang": "sampling_seed"}  # per-request seed, by rollout.name
_FROM_VERL = ("sampling", "max_new_tokens", "stop_token_ids")
_WALK_OPTIONS = ("lam", "eps")
_KL_IN_REWARD = ("algorithm.use_kl_in_reward=True: the ibtpo advantages come from the tree and would drop the KL "
                 "penalty silently; set it False and use actor_rollout_ref.actor.use_kl_loss=True")


def _verl(module: str) -> ModuleType:
    try:
        return importlib.import_module(module)
    except ImportError as error:
        raise MissingExtraError(f"{module} is needed here: pip install verl=={VERL_VERSION} ({error})") from error


# ---- the engine contract on verl's rollout servers -----------------------------------------------
class VerlServerEngine(LoopClientEngine):
    """The engine contract on verl's `LLMServerClient` (verl/workers/rollout/llm_server.py), whose async
    `generate(request_id, prompt_ids=, sampling_params=)` returns a `TokenOutput` (token_ids, log_probs,
    stop_reason). Requests run on an event loop in a thread of its own."""

    owner = "verl's checkpoint manager owns the rollout servers' weights and memory"

    def __init__(self, client: Any, seed_key: str | None = "seed") -> None:
        super().__init__(asyncio.new_event_loop())
        threading.Thread(target=self.loop.run_forever, name="ibtpo-verl-engine", daemon=True).start()
        self.client, self.seed_key = client, seed_key
        self._sessions: dict[tuple[int, ...], str] = {}
        # answers without a cached-token count (verl's SGLang server passes none on): the cache hit rate is unknown
        self.cache_unreported = 0

    def open_sessions(self, prompts: Sequence[Sequence[int]], names: Sequence[str]) -> None:
        """Send each request that extends one of `prompts` under that prompt's name as request_id: verl's
        load balancer is sticky on it, so a tree's branches reach one server and its prefix cache. (With
        rollout.full_determinism the client hands request_id to vLLM itself, which needs it unique.)"""
        self._sessions = {tuple(int(t) for t in p): str(name) for p, name in zip(prompts, names)}

    async def _complete(self, request: Request, handle: int) -> Completion:
        out = await self.client.generate(self._request_id(request), prompt_ids=[int(t) for t in request.prefix_ids],
                                         sampling_params=self.sampling_params(request))
        self.cache_unreported += out.extra_fields.get("num_cached_tokens") is None
        return to_completion(out, request)

    def _request_id(self, request: Request) -> str:
        prefix = tuple(int(t) for t in request.prefix_ids)
        for n in sorted({len(p) for p in self._sessions}):
            if prefix[:n] in self._sessions:
                return self._sessions[prefix[:n]]
        return uuid.uuid4().hex

    def sampling_params(self, request: Request) -> dict[str, Any]:
        """verl's agent-loop keys (vLLM and SGLang servers both read them) plus the request's own limits."""
        s = request.sampling
        params = {"temperature": s.temperature, "top_p": s.top_p, "top_k": s.top_k, "repetition_penalty": 1.0,
                  "logprobs": True, "max_tokens": request.max_new_tokens,
                  "stop_token_ids": [int(t) for t in request.stop_token_ids]}
        if request.stop_strings:
            params["stop"] = list(request.stop_strings)
        if self.seed_key is not None and s.seed is not None:
            params[self.seed_key] = s.seed
        return params


def to_completion(out: Any, request: Request) -> Completion:
    """A `TokenOutput` as our `Completion`. verl's vLLM server reports stop_reason "completed" for a stop and
    a cut alike, so a response is cut ("length") when it fills its limit without ending on a stop token;
    its SGLang server passes SGLang's own reason on ("stop", "length", "abort")."""
    if out.stop_reason in ("aborted", "abort") or not out.token_ids:
        raise RuntimeError(f"the rollout server aborted the request or returned no tokens (stop_reason "
                           f"{out.stop_reason!r}) for a {len(request.prefix_ids)}-token prefix")
    if out.log_probs is None or len(out.log_probs) != len(out.token_ids):
        raise RuntimeError("the rollout server returned no log-prob for every token; the tree needs them "
                           "(verl's servers return them when sampling_params['logprobs'] is True)")
    ids = np.asarray(out.token_ids, np.int64)
    cut = out.stop_reason == "length" or (len(ids) >= request.max_new_tokens and int(ids[-1]) not in set(request.stop_token_ids))
    return Completion(ids, np.asarray(out.log_probs, np.float32), None, "length" if cut else "stop",
                      int(out.extra_fields.get("num_cached_tokens") or 0))


# ---- settings from verl's config -------------------------------------------------------------------
def sampler_settings(config: Mapping, stop_token_ids: Sequence[int]) -> tuple[SamplerConfig, dict[str, float]]:
    """The sampler's config and the walk's lam / eps from verl's config (its `ibtpo` section and
    actor_rollout_ref.rollout); ValueError when rollout.n is not the tree's leaf count."""
    section = dict(config.get("ibtpo") or {})
    walk_options = {k: float(section.pop(k)) for k in _WALK_OPTIONS if k in section}
    unknown = sorted(set(section) - ({f.name for f in fields(SamplerConfig)} - set(_FROM_VERL)))
    if unknown:
        raise ValueError(f"unknown ibtpo option(s) {unknown}; verl sets {', '.join(_FROM_VERL)} from actor_rollout_ref.rollout")
    if "stop_strings" in section:
        section["stop_strings"] = tuple(section["stop_strings"])
    rollout = config["actor_rollout_ref"]["rollout"]
    cfg = SamplerConfig(**section, max_new_tokens=int(rollout["response_length"]), stop_token_ids=tuple(stop_token_ids),
                        sampling=SamplingParams(float(rollout["temperature"]), float(rollout["top_p"]), int(rollout["top_k"])))
    t = cfg.tree
    if int(rollout["n"]) != t.trajectories:
        raise ValueError(f"actor_rollout_ref.rollout.n = {rollout['n']}, but ibtpo.tree {t.B0},{t.L},{t.K},{t.B} grows "
                         f"G = B0 + (L-1)*K*B = {t.trajectories} leaves per prompt: set rollout.n={t.trajectories} or change the tree")
    return cfg, walk_options


def check_trainer(config: Mapping) -> None:
    """The trainer settings this route needs, refused before any rollout."""
    if config.get("trainer", {}).get("use_v1", False):
        raise ValueError("IBTreeAgentLoopManager needs verl's legacy trainer, trainer.use_v1=False: the V1 trainer "
                         "(trainer.use_v1=True, verl 0.9.1's default) fetches from TransferQueue only uid, response_mask, "
                         f"rm_scores, log-probs and values for the estimator, so the step advantages in {ADVANTAGE_KEY!r} "
                         "cannot reach it")
    if config.get("algorithm", {}).get("use_kl_in_reward", False):
        raise ValueError(_KL_IN_REWARD)
    if _path(config, "reward.reward_model.enable") or _path(config, "reward_model.enable"):
        raise ValueError("reward.reward_model.enable=True: a reward model scores whole batches after the rollout, but a "
                         "tree needs each round's leaves scored before it branches; score with "
                         "reward.custom_reward_function instead")
    managers = {_path(config, "reward.reward_manager.name"), _path(config, "reward_model.reward_manager")} - {None, "naive"}
    if managers:
        raise ValueError(f"reward manager {sorted(managers)[0]!r}: the tree scores each leaf with compute_score as verl's "
                         f"'naive' manager does, so another manager's shaping would be skipped; use 'naive'")
    # a manager class loaded from a module (verl's legacy reward_model.reward_loop_source migrates to this source)
    sources = {_path(config, "reward.reward_manager.source"), _path(config, "reward_model.reward_loop_source")} - {None, "register"}
    if sources:
        raise ValueError(f"reward.reward_manager.source={sorted(sources)[0]!r}: a reward manager loaded from a module would be "
                         f"skipped, since the tree scores each leaf with compute_score as verl's 'naive' manager does; "
                         f"use source 'register' with name 'naive', and put the scoring in reward.custom_reward_function")


def _path(config: Mapping, dotted: str) -> Any:
    """config's value at a dotted path (a dict or an OmegaConf config), None where any part is absent."""
    for key in dotted.split("."):
        config = config.get(key) if hasattr(config, "get") else None
        if config is None:
            return None
    return config


# ---- the agent-loop manager --------------------------------------------------------------------------
@dataclass
class TreeGroups:
    """One `generate_sequences` call's trees, and the rows verl gets: row i is leaf row `order[i]`."""

    rollout: Rollout
    walk: WalkResult
    leaves: LeafBatch
    order: torch.Tensor  # [N] int64: the leaf row in verl's row i, a leaf of the tree of row i's uid
    batch: dict[str, torch.Tensor]  # verl's agent-loop output tensors, plus ADVANTAGE_KEY


class IBTreeAgentLoopManager:
    """verl's AgentLoopManager hook (actor_rollout_ref.rollout.agent.agent_loop_manager_class) for training
    batches: verl hands it each prompt rollout.n times under one uid; it grows one tree per uid, rewards
    each round's leaves with `compute_score(data_source, solution_str, ground_truth, extra_info)` before
    the next round branches, and returns the tree's G leaves in the uid's rows."""

    def __init__(self, config: Mapping, llm_client: Any, *, tokenizer: Any, compute_score: Callable[..., Any],
                 encode_prompt: Callable[[Mapping[str, Any]], list[int]] | None = None,
                 stop_token_ids: Sequence[int] | None = None, validation: Any = None) -> None:
        rollout = config["actor_rollout_ref"]["rollout"]
        stop_ids = stop_token_ids if stop_token_ids is not None else [t for t in [tokenizer.eos_token_id] if t is not None]
        self.sampler_config, walk_options = sampler_settings(config, stop_ids)
        self.walk_options = {"beta": self.sampler_config.beta, "step_prob": self.sampler_config.step_prob, **walk_options}
        self.prompt_length, self.response_length = int(rollout["prompt_length"]), int(rollout["response_length"])
        self.tokenizer, self.validation = tokenizer, validation
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        template_kwargs = dict(config.get("data", {}).get("apply_chat_template_kwargs") or {})
        self.encode_prompt = encode_prompt or chat_prompt_ids(tokenizer, template_kwargs)
        self.engine = VerlServerEngine(llm_client, SEED_KEYS.get(rollout.get("name")))
        self.scorer = RewardScorer(awaited(compute_score, self.engine.loop))
        self.sticky = not rollout.get("full_determinism", False)
        self.sampler = IBTreeSampler(self.engine, tokenizer, self._reward, self.sampler_config)

    @classmethod
    def create(cls, config: Any, llm_client: Any, teacher_client: Any = None,
               reward_loop_worker_handles: Any = None) -> IBTreeAgentLoopManager:
        """What RayPPOTrainer.init_workers calls, in the process that later computes the advantages:
        registers the estimator there, and builds verl's own manager for validation."""
        check_trainer(config)
        register_estimator()
        model = _verl("verl.utils.config").omega_conf_to_dataclass(config.actor_rollout_ref.model)
        eos = getattr(model.generation_config, "eos_token_id", None) if model.generation_config is not None else None
        stop_ids = {model.tokenizer.eos_token_id, *(eos if isinstance(eos, list) else [eos])} - {None}
        compute_score = (_verl("verl.trainer.ppo.reward").get_custom_reward_fn(config)
                         or _verl("verl.utils.reward_score").default_compute_score)
        validation = _verl("verl.experimental.agent_loop").AgentLoopManager.create(
            config=config, llm_client=llm_client, teacher_client=teacher_client,
            reward_loop_worker_handles=reward_loop_worker_handles)
        return cls(config, llm_client, tokenizer=model.tokenizer, compute_score=compute_score,
                   stop_token_ids=sorted(stop_ids), validation=validation)

    def generate_sequences(self, prompts: Any) -> Any:
        """verl's `generate_sequences(DataProto) -> DataProto`: the leaves in the rows of their uid."""
        if prompts.meta_info.get("validate", False):
            if self.validation is None:
                raise ValueError("validation batches go to verl's AgentLoopManager: build this manager with create()")
            return self.validation.generate_sequences(prompts)
        groups = self.grow(prompts.non_tensor_batch)
        n = len(groups.order)
        turns = np.full(n, 2, np.int32)  # a prompt and one response, as verl's single-turn loop counts
        no_media = np.empty(n, dtype=object)
        no_media[:] = [{} for _ in range(n)]  # the trainer reads multi_modal_inputs on every batch
        timing = {f"ibtpo/{k.split('/', 1)[1]}": v for k, v in groups.rollout.metrics.items() if k.startswith("timing/")}
        return _verl("verl").DataProto(
            batch=_verl("tensordict").TensorDict(groups.batch, batch_size=[n]),
            non_tensor_batch={"__num_turns__": turns, "multi_modal_inputs": no_media},
            meta_info={"timing": timing, "ibtpo_metrics": groups.rollout.metrics})

    def grow(self, non_tensor_batch: Mapping[str, np.ndarray]) -> TreeGroups:
        """The trees of a batch's uids (each must come rollout.n times, verl's `repeat`) and verl's rows."""
        positions = uid_groups(np.asarray(non_tensor_batch["uid"]), self.sampler_config.tree.trajectories)
        rows = [_row(non_tensor_batch, int(p[0])) for p in positions]
        prompts = [self._prompt(row) for row in rows]
        if self.sticky:
            self.engine.open_sessions(prompts, [row["uid"] for row in rows])
        self.engine.cache_unreported = 0
        rollout = self.sampler.sample(prompts, rows)
        if self.engine.cache_unreported:
            rollout.metrics["rollout/prefix_cache_hit_rate"] = float("nan")
        result = walk(rollout.forest, **self.walk_options)
        leaves = leaf_batch(rollout.forest, result, self.pad_id, rollout.finish_reason)
        order = _leaf_order(leaves, positions)
        return TreeGroups(rollout, result, leaves, order, self._verl_rows(leaves, order))

    def _prompt(self, row: Mapping[str, Any]) -> list[int]:
        ids = list(self.encode_prompt(row))
        if len(ids) > self.prompt_length:
            raise ValueError(f"prompt of uid {row['uid']!r} has {len(ids)} tokens, over "
                             f"actor_rollout_ref.rollout.prompt_length = {self.prompt_length}")
        return ids

    def _reward(self, rows: Sequence[Mapping[str, Any]], responses: Sequence[np.ndarray]) -> np.ndarray:
        texts = self.tokenizer.batch_decode([r.tolist() for r in responses], skip_special_tokens=True)
        return self.scorer([r["data_source"] for r in rows], texts, [r["ground_truth"] for r in rows],
                           [r["extra_info"] for r in rows])

    def _verl_rows(self, leaves: LeafBatch, order: torch.Tensor) -> dict[str, torch.Tensor]:
        """verl's agent-loop tensors, padded to rollout.prompt_length (left) and response_length (right)."""
        P, R, pad = self.prompt_length, self.response_length, self.pad_id
        prompt_mask = _pad(leaves.prompt_mask[order], P, 0, left=True)
        response_mask = _pad(leaves.response_mask[order], R, 0)
        prompts, responses = _pad(leaves.prompt_ids[order], P, pad, left=True), _pad(leaves.response_ids[order], R, pad)
        attention_mask = torch.cat([prompt_mask, response_mask], dim=1)
        rm_scores = torch.zeros(len(order), R)
        rm_scores[torch.arange(len(order)), response_mask.sum(dim=1) - 1] = leaves.reward[order]
        return {
            "prompts": prompts, "responses": responses, "response_mask": response_mask,
            "input_ids": torch.cat([prompts, responses], dim=1), "attention_mask": attention_mask,
            "position_ids": (attention_mask.cumsum(dim=1) - 1).clamp(min=0),
            "rollout_log_probs": _pad(leaves.rollout_logprobs[order], R, 0.0), "rm_scores": rm_scores,
            ADVANTAGE_KEY: _pad(leaves.advantages[order], R, 0.0),
        }


def awaited(fn: Callable[..., Any], loop: asyncio.AbstractEventLoop) -> Callable[..., Any]:
    """`fn` called synchronously: verl loads an `async def` custom reward function as a coroutine function,
    whose call must be awaited (here on the engine's loop) to give the score."""
    if not inspect.iscoroutinefunction(fn):
        return fn

    def call(*args: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(fn(*args), loop).result()

    return call


def chat_prompt_ids(tokenizer: Any, template_kwargs: Mapping[str, Any]) -> Callable[[Mapping[str, Any]], list[int]]:
    """A row's `raw_prompt` messages through the chat template, as verl's single-turn agent loop sends them."""

    def encode(row: Mapping[str, Any]) -> list[int]:
        text = tokenizer.apply_chat_template(list(row["raw_prompt"]), add_generation_prompt=True, tokenize=False,
                                             **template_kwargs)
        return tokenizer.encode(text, add_special_tokens=False)

    return encode


def uid_groups(uids: np.ndarray, size: int) -> list[np.ndarray]:
    """The row positions of each uid, uids in order of first appearance; each must have `size` rows."""
    _, first, inverse, counts = np.unique(uids, return_index=True, return_inverse=True, return_counts=True)
    bad = np.flatnonzero(counts != size)
    if len(bad):
        k = int(bad[0])
        raise ValueError(f"uid {uids[first[k]]!r} has {counts[k]} rows, but its tree grows G = {size} leaves: verl repeats "
                         f"each prompt actor_rollout_ref.rollout.n times, which must equal G")
    return [np.flatnonzero(inverse.reshape(-1) == k) for k in np.argsort(first)]


def _row(non_tensor_batch: Mapping[str, np.ndarray], i: int) -> dict[str, Any]:
    """What the tree of row i's uid needs: its prompt, and what its leaves are graded against."""
    try:
        return {"uid": non_tensor_batch["uid"][i], "raw_prompt": non_tensor_batch["raw_prompt"][i],
                "data_source": non_tensor_batch["data_source"][i],
                "ground_truth": non_tensor_batch["reward_model"][i]["ground_truth"],
                "extra_info": non_tensor_batch["extra_info"][i] if "extra_info" in non_tensor_batch else None}
    except (KeyError, TypeError) as error:
        raise ValueError(f"row {i} lacks {error}: verl's RLHFDataset rows carry raw_prompt, data_source and "
                         f"reward_model.ground_truth") from error


def _leaf_order(leaves: LeafBatch, positions: Sequence[np.ndarray]) -> torch.Tensor:
    """The leaf row for each of verl's rows: tree k's leaves, in leaf order, fill uid k's positions."""
    size = len(positions[0])
    check_leaves_per_tree(leaves, len(positions), size, expected=f"rollout.n = {size}", limit="rollout.response_length",
                          setting="ibtpo.tree")
    order = np.empty(len(leaves), np.int64)
    for k, where in enumerate(positions):
        order[where] = np.flatnonzero(leaves.group.numpy() == k)
    return torch.from_numpy(order)


def _pad(x: torch.Tensor, width: int, value: float, left: bool = False) -> torch.Tensor:
    extra = width - x.shape[1]
    return F.pad(x, (extra, 0) if left else (0, extra), value=value)


# ---- the advantage estimator -------------------------------------------------------------------------
def ibtpo_advantage(token_level_rewards: torch.Tensor, response_mask: torch.Tensor, index: np.ndarray | None = None,
                    reward_baselines: torch.Tensor | None = None, config: Any = None) -> tuple[torch.Tensor, torch.Tensor]:
    """verl estimator `ibtpo`, called by compute_advantage as (token_level_rewards, response_mask, config,
    index, reward_baselines): the per-token step advantages IBTreeAgentLoopManager put in
    batch["reward_baselines"], masked; as with GRPO, the returns are the advantages."""
    if reward_baselines is None:
        raise ValueError(f"the ibtpo estimator reads the per-token step advantages that IBTreeAgentLoopManager writes to "
                         f"batch[{ADVANTAGE_KEY!r}], and this batch has none: set actor_rollout_ref.rollout.agent."
                         f"agent_loop_manager_class=ibtpo_fast.integrations.verl.IBTreeAgentLoopManager and trainer.use_v1=False")
    if reward_baselines.shape != response_mask.shape:
        raise ValueError(f"batch[{ADVANTAGE_KEY!r}] has shape {tuple(reward_baselines.shape)}, not the responses' "
                         f"{tuple(response_mask.shape)}: it did not come from IBTreeAgentLoopManager (REMAX's baselines?)")
    if _option(config, "use_kl_in_reward"):
        raise ValueError(_KL_IN_REWARD)
    advantages = reward_baselines.float() * response_mask
    return advantages, advantages


def _option(config: Any, name: str) -> Any:
    if config is None:
        return None
    return config.get(name) if isinstance(config, Mapping) else getattr(config, name, None)


def register_estimator() -> None:
    """Register `ibtpo_advantage` as verl's estimator `ibtpo` (again is a no-op); `create` does it."""
    _verl("verl.trainer.ppo.core_algos").register_adv_est(ESTIMATOR)(ibtpo_advantage)
