"""IB-TPO in slime (THUDM/slime): a rollout function that grows one IBTree per prompt through slime's
SGLang router, and a custom advantage function that trains on the tree's per-token step advantages.

    --rollout-function-path ibtpo_fast.integrations.slime.generate_rollout
    --custom-advantage-function-path ibtpo_fast.integrations.slime.compute_advantages
    --custom-config-path ibtpo.yaml   # ibtpo_tree: "4,3,2,1" etc.; B0 + (L-1)*K*B = --n-samples-per-prompt

Options, read from `args` (slime's --custom-config-path YAML sets any attribute):
    ibtpo_tree            "B0,L,K,B"  default "4,9,1,1"
    ibtpo_beta            5.0         IB-Score beta, for branching and advantages
    ibtpo_lam             0.1         weight of A_IB in the step advantage
    ibtpo_step_delimiter  "\\n\\n"      text that ends a reasoning step

Each leaf becomes one slime `Sample` (one row per leaf, `ibtpo_fast.leaf_batch`). slime hands the
trainer only a fixed set of per-sample fields, and `metadata` is not among them; `teacher_log_probs`
is the one per-token float field that reaches the advantage hook, sliced for context parallelism
like the log-probs, and it is unused unless --use-opd. So the advantages travel there, and
on-policy distillation is refused. Rewards come from slime's own `async_rm` (--custom-rm-path or
--rm-type), called on each round's new leaves, since the tree branches on them.

slime is not on PyPI and is imported only on the paths that need it (SLIME_COMMIT names the one
this mirrors).
"""
from __future__ import annotations

import asyncio
import copy
import importlib
from argparse import Namespace
from collections.abc import Awaitable, Callable, Mapping, Sequence
from functools import lru_cache
from types import ModuleType
from typing import Any

import numpy as np
import torch

from ibtpo_fast.engines.loop_client import LoopClientEngine
from ibtpo_fast.engines.protocol import Completion, Request, SamplingParams
from ibtpo_fast.engines.sglang_engine import sampling_params, to_completion
from ibtpo_fast.errors import MissingExtraError
from ibtpo_fast.leaf_batch import LeafBatch, check_leaves_per_tree, leaf_batch
from ibtpo_fast.sampler import IBTreeSampler, RewardFn, SamplerConfig, TreeSpec
from ibtpo_fast.walk import walk

DEFAULTS = {"ibtpo_tree": "4,9,1,1", "ibtpo_beta": 5.0, "ibtpo_lam": 0.1, "ibtpo_step_delimiter": "\n\n"}
ADVANTAGE_FIELD = "teacher_log_probs"  # the Sample field (and rollout_data key) carrying the advantages
SLIME_COMMIT = "624b824a898ab0ec1fcb4d373004c7f3852bf515"  # the slime whose hooks and Sample this mirrors
_INSTALL_HINT = (f"needs slime, which is not on PyPI: clone https://github.com/THUDM/slime (written against commit "
                 f"{SLIME_COMMIT[:10]}) and `pip install -e .` in it, or use slime's Docker image")

_OWN_LOOP = "slime's own rollout function runs it, and this one replaces that function"
# slime options this rollout refuses when set, and why
REFUSED = {
    "group_rm": "the tree rewards each round's new leaves before it branches, never a whole group at once",
    "use_opd": f"on-policy distillation reads {ADVANTAGE_FIELD}, where this rollout puts the advantages",
    "reward_key": "the tree walks one float reward per leaf: have the reward model return it",
    "dynamic_sampling_filter_path": f"every tree is kept, as grown, so nothing is filtered or re-sampled ({_OWN_LOOP})",
    "partial_rollout": "a tree is grown to the end within one rollout, never recycled part-grown",
    "custom_generate_function_path": "the tree sampler sends each branch to the router itself",
    "rollout_sample_hook_path": _OWN_LOOP,
    "rollout_sample_filter_path": _OWN_LOOP,
    "rollout_all_samples_process_path": _OWN_LOOP,
}

# slime's http_utils.post: (url, payload) -> the server's JSON answer
Post = Callable[[str, dict[str, Any]], Awaitable[Mapping[str, Any]]]


def _slime(module: str, what: str) -> ModuleType:
    try:
        return importlib.import_module(module)
    except ImportError as error:
        raise MissingExtraError(f"{what} {_INSTALL_HINT}") from error


class SlimeRouterEngine(LoopClientEngine):
    """The engine contract on slime's SGLang router: each request is one POST to its /generate, run on
    slime's own background loop, where its HTTP client lives; at most `concurrency` are in flight."""

    owner = "slime's train loop manages the SGLang servers behind its router"

    def __init__(self, url: str, post: Post, loop: asyncio.AbstractEventLoop, concurrency: int | None = None) -> None:
        super().__init__(loop)
        self.url, self._post = url, post
        self._slots = asyncio.Semaphore(concurrency) if concurrency else None

    @classmethod
    def from_args(cls, args: Namespace) -> SlimeRouterEngine:
        """The router slime started, through slime's `post` on slime's background loop, with slime's own
        rollout's limit: --sglang-server-concurrency requests per engine behind the router."""
        http = _slime("slime.utils.http_utils", "SlimeRouterEngine")
        loop = _slime("slime.utils.async_utils", "SlimeRouterEngine").get_async_loop().loop
        concurrency = args.sglang_server_concurrency * max(1, http.get_rollout_num_engines(args))
        return cls(f"http://{args.sglang_router_ip}:{args.sglang_router_port}/generate", http.post, loop, concurrency)

    async def _complete(self, request: Request, handle: int) -> Completion:
        payload = {"input_ids": [int(t) for t in request.prefix_ids], "sampling_params": sampling_params(request),
                   "return_logprob": True}
        if self._slots is None:
            return to_completion(await self._post(self.url, payload), handle)
        async with self._slots:
            return to_completion(await self._post(self.url, payload), handle)


def tree_spec(args: Namespace) -> TreeSpec:
    """`args.ibtpo_tree`, if its leaves per tree equal `args.n_samples_per_prompt`; ValueError otherwise."""
    spec = TreeSpec.parse(_option(args, "ibtpo_tree"))
    if spec.trajectories != args.n_samples_per_prompt:
        raise ValueError(f"ibtpo_tree {spec.B0},{spec.L},{spec.K},{spec.B} grows B0 + (L-1)*K*B = {spec.trajectories} "
                         f"leaves per prompt, but --n-samples-per-prompt is {args.n_samples_per_prompt}: change one "
                         f"so they agree (ibtpo_tree is set in the --custom-config-path YAML)")
    return spec


def _option(args: Namespace, name: str) -> Any:
    return getattr(args, name, DEFAULTS[name])


def _check_args(args: Namespace) -> None:
    """slime options this rollout cannot honour, refused before any generation."""
    for name, why in REFUSED.items():
        if getattr(args, name):
            raise ValueError(f"ibtpo_fast.integrations.slime does not support --{name.replace('_', '-')}: {why}")
    if args.over_sampling_batch_size not in (None, args.rollout_batch_size):
        raise ValueError(f"ibtpo_fast.integrations.slime does not support --over-sampling-batch-size "
                         f"{args.over_sampling_batch_size} (over --rollout-batch-size {args.rollout_batch_size}): it grows "
                         f"one tree per prompt of the batch, with no filter to over-sample for")
    if getattr(args, "router_policy", None) == "consistent_hashing":
        raise ValueError("ibtpo_fast.integrations.slime does not support --router-policy consistent_hashing: it routes "
                         "by Sample.session_id, which tree requests do not carry")
    if args.rollout_top_p != 1.0:
        raise ValueError("ibtpo_fast.integrations.slime needs --rollout-top-p 1.0: slime then expects SGLang's "
                         "per-token top-p replay, which tree rollouts do not carry")
    if not args.rollout_max_response_len:
        raise ValueError("ibtpo_fast.integrations.slime needs --rollout-max-response-len (tokens per response)")


@lru_cache(maxsize=4)
def _tokenizer(path: str) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path, trust_remote_code=True)


def _sampler_config(args: Namespace, spec: TreeSpec, tokenizer: Any) -> SamplerConfig:
    # SGLang stops at the checkpoint's EOS by itself; naming it keeps any server behind the router alike.
    stop_ids = [*(args.rollout_stop_token_ids or []), *([tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else [])]
    return SamplerConfig(
        tree=spec, max_new_tokens=args.rollout_max_response_len,
        sampling=SamplingParams(args.rollout_temperature, args.rollout_top_p, args.rollout_top_k),
        stop_token_ids=stop_ids, stop_strings=tuple(args.rollout_stop or ()),
        step_delimiter=_option(args, "ibtpo_step_delimiter"), beta=float(_option(args, "ibtpo_beta")), seed=args.rollout_seed,
        async_rewards=True,  # async_rm answers on slime's loop: a round is graded while the router decodes others
    )


def _check_groups(groups: Sequence[Sequence[Any]], size: int) -> None:
    for k, group in enumerate(groups):
        if len(group) != size:
            raise ValueError(f"data source group {k} has {len(group)} samples, not --n-samples-per-prompt = {size}")
        if group[0].group_index is None:
            raise ValueError(f"data source group {k} has no group_index (it seeds the prompt's tree)")
        if group[0].multimodal_inputs and any(v is not None for v in group[0].multimodal_inputs.values()):
            raise ValueError(f"data source group {k} is multimodal; tree rollouts send token ids only")


def _prompt_ids(sample: Any, tokenizer: Any) -> list[int]:
    """As slime's own rollout: the sample's tokens when it has them, else its encoded prompt text."""
    return list(sample.tokens) if sample.tokens else tokenizer.encode(sample.prompt, add_special_tokens=False)


def _respond(sample: Any, prompt: list[int], response: list[int], tokenizer: Any, args: Namespace) -> Any:
    """`sample` (mutated) holding `response` after `prompt`, as slime's generate leaves a sample."""
    sample.tokens = prompt + response
    sample.response = tokenizer.decode(response, skip_special_tokens=args.rollout_skip_special_tokens)
    sample.response_length = len(response)
    return sample


def _reward_fn(args: Namespace, groups: Sequence[Sequence[Any]], prompts: list[list[int]], tokenizer: Any,
               loop: asyncio.AbstractEventLoop) -> RewardFn:
    """slime's `async_rm(args, sample)` on each new leaf: a copy of its prompt's sample, holding the response."""
    rm_hub = _slime("slime.rollout.rm_hub", "generate_rollout")
    completed = _slime("slime.utils.types", "generate_rollout").Sample.Status.COMPLETED

    def reward_fn(trees: Sequence[int], responses: Sequence[np.ndarray]) -> list[float]:
        samples = [_respond(copy.deepcopy(groups[t][0]), prompts[t], r.tolist(), tokenizer, args) for t, r in zip(trees, responses)]
        for s in samples:
            s.status = completed
        rewards = asyncio.run_coroutine_threadsafe(_gather([rm_hub.async_rm(args, s) for s in samples]), loop).result()
        return [float(r) for r in rewards]

    return reward_fn


async def _gather(coroutines: list[Awaitable[Any]]) -> list[Any]:
    return await asyncio.gather(*coroutines)


def generate_rollout(args: Namespace, rollout_id: int, data_source: Any, evaluation: bool = False) -> Any:
    """slime's rollout-function hook: `args.rollout_batch_size` groups from `data_source`, one IBTree
    per group's prompt, and the group's samples filled with the tree's leaves (a RolloutFnTrainOutput).
    Evaluation is plain sampling, so it goes to slime's own rollout function."""
    if evaluation:
        return _slime("slime.rollout.sglang_rollout", "evaluation").generate_rollout(args, rollout_id, data_source, evaluation=True)
    spec = tree_spec(args)
    _check_args(args)
    groups = data_source.get_samples(args.rollout_batch_size)
    _check_groups(groups, args.n_samples_per_prompt)
    tokenizer = _tokenizer(args.hf_checkpoint)
    engine = SlimeRouterEngine.from_args(args)
    prompts = [_prompt_ids(group[0], tokenizer) for group in groups]
    reward_fn = _reward_fn(args, groups, prompts, tokenizer, engine.loop)
    sampler = IBTreeSampler(engine, tokenizer, reward_fn, _sampler_config(args, spec, tokenizer))
    rollout = sampler.sample(prompts, tree_ids=[group[0].group_index for group in groups])
    result = walk(rollout.forest, beta=float(_option(args, "ibtpo_beta")), lam=float(_option(args, "ibtpo_lam")))
    batch = leaf_batch(rollout.forest, result, pad_id=0, finish_reason=rollout.finish_reason)  # rows are read back unpadded
    _fill_groups(groups, batch, tokenizer, args)
    return _slime("slime.rollout.base_types", "generate_rollout").RolloutFnTrainOutput(samples=groups, metrics=rollout.metrics)


def _fill_groups(groups: Sequence[Sequence[Any]], batch: LeafBatch, tokenizer: Any, args: Namespace) -> None:
    """Group k's samples (distinct indices from the data source) take tree k's leaves, in leaf order."""
    size = len(groups[0])
    check_leaves_per_tree(batch, len(groups), size, expected=str(size), limit="--rollout-max-response-len",
                          setting="ibtpo_tree")
    status = _slime("slime.utils.types", "generate_rollout").Sample.Status
    slot = np.zeros(len(groups), np.int64)
    for i, k in enumerate(batch.group.tolist()):
        sample = _respond(groups[k][slot[k]], batch.prompt_list(i), batch.response_list(i), tokenizer, args)
        slot[k] += 1
        n = sample.response_length
        sample.loss_mask = [1] * n
        sample.rollout_log_probs = batch.rollout_logprobs[i, :n].tolist()
        setattr(sample, ADVANTAGE_FIELD, batch.advantages[i, :n].tolist())
        sample.reward = float(batch.reward[i])
        sample.status = status.TRUNCATED if bool(batch.truncated[i]) else status.COMPLETED


def compute_advantages(args: Namespace, rollout_data: dict[str, Any]) -> None:
    """slime's --custom-advantage-function-path hook, `(args, rollout_data) -> None`: the per-token step
    advantages that `generate_rollout` put in each sample become `advantages` and `returns` (as GRPO's
    returns are its advantages) in place of slime's estimator; a KL penalty stays in the loss
    (--use-kl-loss), as with slime's GRPO. Refuses samples that did not come from `generate_rollout`."""
    if args.use_opd:
        raise ValueError(f"--use-opd puts teacher log-probs in rollout_data[{ADVANTAGE_FIELD!r}], where IB-TPO's advantages go")
    advantages = rollout_data.pop(ADVANTAGE_FIELD, None)  # popped, so neither the loss nor the logs read them as a teacher's
    if advantages is None:
        raise ValueError(f"rollout_data has no {ADVANTAGE_FIELD!r}, which holds IB-TPO's per-token advantages: the samples did "
                         f"not come from ibtpo_fast.integrations.slime.generate_rollout (set --rollout-function-path to it)")
    kl = rollout_data["kl"]  # slime sets it just before this hook: one tensor per sample, this rank's response tokens
    if len(advantages) != len(kl):
        raise ValueError(f"{len(advantages)} samples carry advantages, {len(kl)} are in the batch")
    out = []
    for i, (adv, ref) in enumerate(zip(advantages, kl)):
        if adv.shape != ref.shape:
            raise ValueError(f"sample {i} carries {tuple(adv.shape)} advantages for {tuple(ref.shape)} response tokens: "
                             f"it did not come from ibtpo_fast.integrations.slime.generate_rollout")
        out.append(adv.to(device=ref.device, dtype=torch.float32))
    rollout_data["advantages"] = out
    rollout_data["returns"] = list(out)

