"""IB-TPO inside TRL: `IBTPOTrainer`, a `GRPOTrainer` whose groups are IBTrees (`pip install 'ibtpo_fast[trl]'`).

TRL hands each process its prompts G times over (G = `num_generations`). In training, this trainer
grows one tree per prompt with `IBTreeSampler` on TRL's own model (a `TorchEngine` reads its live
parameters inside TRL's `unwrap_model_for_generation`, which gathers ZeRO-3 shards, so rollouts always
use the current, whole weights), rewards each round's leaves with the user's TRL reward functions
(async ones on TRL's event loop) before the next round picks where to branch, and returns the tree's G
leaves in place of G independent completions. Everything after generation is TRL's: the reference and
old log-probs, the loss, logging. Two things change: the rewards TRL records are the ones the tree was
scored with (no second call), and the advantages TRL's loss receives are the walk's per-token step
advantages, shape (rows, completion length), instead of one number a completion. Evaluation samples as
TRL does.

    trainer = IBTPOTrainer(model=model, reward_funcs=[correct], train_dataset=ds, processing_class=tok,
                           args=IBTPOConfig(output_dir="out", tree="4,9,1,1", step_delimiter="\\n\\n"))

`num_generations` and `per_device_train_batch_size` default to the tree's leaves. GRPO options that a
tree cannot follow are refused by name (`IBTPOConfig.__post_init__`); the rest are TRL's own. With
`branch_strategy="independent"`, `tree="G,1,1,1"` and `ib_lambda=0`, the advantages are TRL's own GRPO
advantages (TRL divides by std + 1e-4; `adv_eps` defaults to that).
"""
from __future__ import annotations

import asyncio
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ibtpo_fast.engines.protocol import SamplingParams
from ibtpo_fast.engines.torch_engine import TorchEngine
from ibtpo_fast.errors import MissingExtraError
from ibtpo_fast.forest import Forest
from ibtpo_fast.leaf_batch import LeafBatch, check_leaves_per_tree, leaf_batch
from ibtpo_fast.metrics import Parts, reduce_parts
from ibtpo_fast.sampler import SCHEDULES, IBTreeSampler, Rollout, SamplerConfig, check_tree
from ibtpo_fast.walk import walk

TRL_VERSION = "1.16"  # the `trl` extra's pin: the GRPOTrainer internals this adapter overrides
try:
    from trl import GRPOConfig, GRPOTrainer
    from trl.data_utils import is_conversational
    from trl.models import unwrap_model_for_generation
    from trl.trainer.utils import is_async_callable
except ImportError as error:
    raise MissingExtraError(f"ibtpo_fast.integrations.trl needs TRL {TRL_VERSION}.x: pip install 'ibtpo_fast[trl]'") from error

Key = tuple[int, tuple[int, ...]]  # (tree, response token ids): one graded leaf


@dataclass
class IBTPOConfig(GRPOConfig):
    """`GRPOConfig` plus the tree. `num_generations` is the tree's leaves, B0 + (L - 1) K B (None: follow the
    tree); `per_device_train_batch_size` defaults to it. Options a tree cannot follow raise ValueError."""

    num_generations: int | None = field(default=None, metadata={"help": "the tree's leaves (None: B0 + (L-1)*K*B)"})
    per_device_train_batch_size: int | None = field(default=None, metadata={"help": "None: num_generations"})
    tree: str = field(default="4,9,1,1", metadata={"help": "B0,L,K,B: initial samples, rounds, nodes a round, continuations"})
    branch_strategy: str = field(default="ib", metadata={"help": "ib | random | entropy | independent"})
    ib_beta: float = field(default=5.0, metadata={"help": "IB-Score's entropy weight beta"})
    ib_lambda: float = field(default=0.1, metadata={"help": "weight of A_IB in the step advantage"})
    adv_eps: float = field(default=1e-4, metadata={"help": "added to the tree's reward std (TRL's GRPO uses 1e-4)"})
    step_delimiter: str = field(default="\n\n", metadata={"help": "text that ends a reasoning step"})
    min_step_tokens: int = field(default=1, metadata={"help": "shorter steps merge into the next"})
    rollout_schedule: str = field(default="continuous", metadata={"help": "continuous | lockstep"})
    token_budget: int | None = field(default=None, metadata={"help": "per tree: stop branching once spent"})

    def __post_init__(self) -> None:
        leaves = check_tree(self.branch_strategy, self.tree).trajectories
        if self.num_generations is None:
            self.num_generations = leaves
        if self.num_generations != leaves:
            raise ValueError(f"tree {self.tree} has {leaves} leaves (B0 + (L-1)*K*B) but num_generations = "
                             f"{self.num_generations}: set num_generations = {leaves} (or leave it unset)")
        if self.per_device_train_batch_size is None:
            self.per_device_train_batch_size = self.num_generations
        if self.rollout_schedule not in SCHEDULES:
            raise ValueError(f"rollout_schedule must be one of {', '.join(SCHEDULES)}, got {self.rollout_schedule!r}")
        self._refuse_generation_options()
        if self.generation_batch_size is None:  # else TRL derives steps_per_generation from the world size
            self._check_whole_trees(self.steps_per_generation or self.gradient_accumulation_steps)
        super().__post_init__()
        self._check_whole_trees(self.steps_per_generation)
        self._refuse_advantage_options()

    def _refuse_generation_options(self) -> None:
        """Training generates with the tree sampler, which samples with temperature, top_p and top_k only."""
        refused = {
            "repetition_penalty": self.repetition_penalty != 1.0,
            "min_p": self.min_p is not None,
            "generation_kwargs": bool(self.generation_kwargs),
            "cache_implementation": self.cache_implementation is not None,  # the engine keeps its own prefix cache
            "use_transformers_continuous_batching": self.use_transformers_continuous_batching or self.use_transformers_paged,
            "transformers_continuous_batching_config": bool(self.transformers_continuous_batching_config),
            "use_vllm": self.use_vllm,
        }
        names = [name for name, set_ in refused.items() if set_]
        if names:
            raise ValueError(f"IBTPOTrainer grows its trees with its own sampler (temperature, top_p, top_k, "
                             f"max_completion_length): unset {', '.join(names)}")

    def _refuse_advantage_options(self) -> None:
        """The walk normalises each tree's summed, weighted rewards by that tree's std, as GRPO's defaults do."""
        if self.scale_rewards != "group":
            raise ValueError(f"scale_rewards = {self.scale_rewards!r}: the tree's advantages scale each tree's rewards "
                             f"by its own std (scale_rewards='group'); 'batch' and 'none' are not available")
        if self.multi_objective_aggregation != "sum_then_normalize":
            raise ValueError(f"multi_objective_aggregation = {self.multi_objective_aggregation!r}: a tree branches on "
                             f"the weighted sum of the rewards, so only 'sum_then_normalize' is available")

    def _check_whole_trees(self, steps_per_generation: int) -> None:
        per_process = self.per_device_train_batch_size * steps_per_generation
        if per_process % self.num_generations:
            raise ValueError(
                f"per_device_train_batch_size * steps_per_generation = {self.per_device_train_batch_size} * "
                f"{steps_per_generation} = {per_process} rows a process generates at once must be a multiple of "
                f"num_generations = {self.num_generations}: a tree's leaves are grown on one process")


class IBTPOTrainer(GRPOTrainer):
    """`GRPOTrainer` with IBTree rollouts and per-token step advantages; takes an `IBTPOConfig`."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if not isinstance(self.args, IBTPOConfig):
            raise TypeError(f"IBTPOTrainer needs args=IBTPOConfig(...), got {type(self.args).__name__}")
        if self.tools or self.environment_factories is not None or self.rollout_func is not None:
            raise ValueError("IBTPOTrainer generates with its own tree sampler: tools, environments and "
                             "rollout_func are not supported")
        modules = [name for f, name in zip(self.reward_funcs, self.reward_func_names) if isinstance(f, torch.nn.Module)]
        if modules:
            raise ValueError(f"reward models {modules} cannot score a tree between rounds here: pass reward functions")
        check_generation_backend(self._dist, self.args)
        self._engine: TorchEngine | None = None
        self._sampler: IBTreeSampler | None = None
        self._inputs: list[dict[str, Any]] = []  # this generation's rows, G per prompt (set per batch)
        self._rewards: dict[Key, torch.Tensor] = {}  # graded leaf -> reward per function
        self._extra: dict[str, dict[Key, Any]] = {}  # log_extra column -> graded leaf -> value
        self._leaves: LeafBatch | None = None
        self._warned_flat = False
        self.last_rollout: Rollout | None = None  # the latest training generation's trees, for inspection

    # ---- TRL's generation step ------------------------------------------------------------------
    def _generate_and_score_completions(self, inputs: list[dict[str, Any]]) -> dict[str, Any]:
        self._inputs, self._leaves = inputs, None
        output = super()._generate_and_score_completions(inputs)
        if self._leaves is not None:  # training: TRL's GRPO advantages give way to the tree's step advantages
            output["advantages"] = self._token_advantages(output["completion_ids"].shape[1])
            self._log_advantages(len(inputs))
        return output

    def _generate_single_turn(self, prompt_ids: list[list[int]], images: Any, multimodal_fields: Any,
                              num_generations: int, has_tool_images: bool = False) -> tuple[list[list[int]], list[list[float]]]:
        if not self.model.training:
            return super()._generate_single_turn(prompt_ids, images, multimodal_fields, num_generations, has_tool_images)
        G = num_generations
        firsts = list(range(0, len(prompt_ids), G))
        for start in firsts:
            if any(prompt_ids[i] != prompt_ids[start] for i in range(start, start + G)):
                raise ValueError(f"rows {start}..{start + G - 1} should be one prompt G = {G} times over (TRL's "
                                 "RepeatSampler); the batch is not grouped")
        self._rewards, self._extra = {}, {}
        rows = list(enumerate(self._inputs[i] for i in firsts))  # (tree, dataset row): what a leaf is graded against
        with (unwrap_model_for_generation(self.model_wrapped, self.accelerator,
                                          gather_deepspeed3_params=self.args.ds3_gather_for_generation,
                                          gradient_checkpointing_kwargs=self.args.gradient_checkpointing_kwargs) as model,
              torch.no_grad()):
            self.last_rollout = self._tree_sampler(model).sample(
                [prompt_ids[i] for i in firsts], rows, tree_ids=[self._tree_id(k) for k in range(len(firsts))])
        forest = self.last_rollout.forest
        result = walk(forest, beta=self.args.ib_beta, lam=self.args.ib_lambda, eps=self.args.adv_eps)
        self._leaves = leaves = leaf_batch(forest, result, self._tokenizer.pad_token_id, self.last_rollout.finish_reason)
        check_leaves_per_tree(leaves, len(firsts), G, expected=f"num_generations = {G}", limit="max_completion_length",
                              setting="tree")
        self._log_tree_metrics({**self.last_rollout.parts, "tree/flat_share": self._flat_share(forest)})
        lengths = leaves.response_lengths.tolist()
        return ([leaves.response_list(i) for i in range(len(leaves))],
                [leaves.rollout_logprobs[i, :n].tolist() for i, n in enumerate(lengths)])

    def _calculate_rewards(self, inputs: list[dict[str, Any]], prompts: list[Any], completions: list[Any],
                           completion_ids_list: list[list[int]]) -> torch.Tensor:
        if self._leaves is None:  # evaluation: TRL scores its own completions
            return super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
        from accelerate.utils import gather

        keys = [(int(t), tuple(ids)) for t, ids in zip(self._leaves.group, completion_ids_list)]
        zero = torch.zeros(len(self.reward_funcs))  # a truncated leaf scores 0 without a reward call
        local = torch.stack([self._rewards.get(key, zero) for key in keys])
        for column, values in self._extra.items():  # in completion order, as TRL's table expects
            self._pending_extra_logs[column].extend(values.get(key) for key in keys)
        return gather(local.to(self.accelerator.device))

    # ---- the tree sampler -----------------------------------------------------------------------
    def _tree_sampler(self, model: torch.nn.Module) -> IBTreeSampler:
        """Built on first use, on the model TRL unwrapped for generation; its prefix cache is flushed before
        each generation, since the weights changed since the last one."""
        if self._sampler is None:
            a = self.args
            self._engine = TorchEngine(model, tokenizer=self._tokenizer)
            cfg = SamplerConfig(
                strategy=a.branch_strategy, tree=a.tree, max_new_tokens=a.max_completion_length,
                sampling=SamplingParams(a.temperature, a.top_p, a.top_k or -1), stop_token_ids=list(self.eos_token_ids),
                step_delimiter=a.step_delimiter, min_step_tokens=a.min_step_tokens, token_budget=a.token_budget,
                beta=a.ib_beta, seed=a.seed, schedule=a.rollout_schedule)
            self._sampler = IBTreeSampler(self._engine, self._tokenizer, self._score_leaves, cfg)
        self._engine.flush_cache()
        return self._sampler

    def _tree_id(self, k: int) -> int:
        """A tree's id seeds its samples: unique over generations and processes."""
        a = self.args
        per_process = a.per_device_train_batch_size * a.steps_per_generation // self.num_generations
        micro_step = self.state.global_step * a.gradient_accumulation_steps + self._step % a.gradient_accumulation_steps
        generation = micro_step // (a.steps_per_generation * self.num_iterations)
        return (generation * self.accelerator.num_processes + self.accelerator.process_index) * per_process + k

    def _score_leaves(self, trees_rows: Sequence[tuple[int, dict[str, Any]]], responses: Sequence[np.ndarray]) -> list[float]:
        """The sampler's reward function: TRL's reward functions on a round's finished leaves, weighted and summed.
        Each function's rewards and `log_extra` values are kept, per leaf, for `_calculate_rewards`."""
        rows = [row for _, row in trees_rows]
        keys = [(t, tuple(int(x) for x in r)) for (t, _), r in zip(trees_rows, responses)]
        texts = self.processing_class.batch_decode([r.tolist() for r in responses], skip_special_tokens=True)
        completions = [[{"role": "assistant", "content": t}] for t in texts] if is_conversational(rows[0]) else texts

        def log_extra(column: str, values: Sequence[Any]) -> None:
            self._extra.setdefault(column, {}).update(zip(keys, values))

        kwargs = {k: [row[k] for row in rows] for k in rows[0] if k not in ("prompt", "completion", "completion_ids")}
        kwargs |= dict(prompts=[row["prompt"] for row in rows], completions=completions,
                       completion_ids=[r.tolist() for r in responses], trainer_state=self.state,
                       log_extra=log_extra, log_metric=self._log_metric)
        per_func = torch.zeros(len(rows), len(self.reward_funcs))
        for j, (name, out) in enumerate(zip(self.reward_func_names, self._call_reward_funcs(kwargs))):
            if len(out) != len(rows) or any(r is None for r in out):
                raise ValueError(f"reward function {name!r} must return one number per completion ({len(rows)}); a tree "
                                 f"needs every leaf scored, so None is not allowed")
            per_func[:, j] = torch.tensor([float(r) for r in out])
        self._rewards.update(zip(keys, per_func))
        return (per_func * self.reward_weights.cpu()).sum(dim=1).tolist()

    def _call_reward_funcs(self, kwargs: dict[str, Any]) -> list[Sequence[Any]]:
        """Each reward function's output: sync ones called here, async ones together on TRL's event loop."""
        out: list[Any] = [func(**kwargs) for func in self.reward_funcs]  # an async function's call is its coroutine
        pending = [i for i, func in enumerate(self.reward_funcs) if is_async_callable(func)]
        if pending:
            async def gather_all() -> list[Any]:
                return await asyncio.gather(*(out[i] for i in pending))

            for i, result in zip(pending, asyncio.run_coroutine_threadsafe(gather_all(), self.async_loop).result()):
                out[i] = result
        return out

    # ---- what TRL's loss and logs receive -------------------------------------------------------
    def _token_advantages(self, width: int) -> torch.Tensor:
        adv = self._leaves.advantages
        if adv.shape[1] > width:
            raise RuntimeError(f"completions were cut to {width} tokens but the tree's responses run to {adv.shape[1]}")
        return torch.nn.functional.pad(adv, (0, width - adv.shape[1])).to(self.accelerator.device)

    def _log_advantages(self, rows: int) -> None:
        """TRL logged one GRPO advantage a completion; put the tree's (mean over the completion's tokens) there."""
        from accelerate.utils import gather

        mean = self._leaves.advantages.sum(1) / self._leaves.response_lengths.clamp(min=1)
        logged = gather(mean.to(self.accelerator.device)).tolist()
        log = self._logs["advantages"]
        for _ in range(min(len(logged), len(log))):
            log.pop()
        log.extend(logged)

    def _flat_share(self, forest: Forest) -> Parts:
        """The share of trees whose every response is one step, as (flat trees, trees): branching then only
        resamples from the prompt. Warns once when a whole generation is flat, which means the step delimiter
        never appears."""
        deep = np.bincount(forest.tree[forest.depth() > 1], minlength=forest.num_trees) > 0
        share = 1.0 - float(deep.mean())
        spec = check_tree(self.args.branch_strategy, self.args.tree)
        if share == 1.0 and spec.L > 1 and not self._warned_flat:
            self._warned_flat = True
            warnings.warn(f"no response of this generation contains step_delimiter={self.args.step_delimiter!r} (steps "
                          f"shorter than min_step_tokens={self.args.min_step_tokens} merge): every tree is flat, so it "
                          f"branches only from the prompt, which is independent sampling. Set step_delimiter to text "
                          f"the responses contain; tree/flat_share tracks this", RuntimeWarning, stacklevel=2)
        return float(len(deep) - deep.sum()), float(len(deep))

    def _log_tree_metrics(self, parts: dict[str, Parts]) -> None:
        """Each tree metric over every process's trees, reduced from its parts (each process grows the trees
        of its own prompts, in numbers and sizes that differ, so a mean of the processes' values would not do)."""
        from accelerate.utils import gather_object

        keys = ("tree/generated_tokens", "tree/eff_rate", "tree/trajectories_per_1k_tokens", "tree/flat_share",
                "rollout/prefix_cache_hit_rate")
        local = {k: parts[k] for k in keys}
        for key, value in reduce_parts(gather_object([local])).items():
            self._metrics["train"][key].append(value)


def check_generation_backend(dist: Any, args: IBTPOConfig) -> None:
    """ValueError unless the tree engine can read whole weights inside TRL's `unwrap_model_for_generation`
    (`dist`: TRL's `DistributedBackend`). The engine reads the weight tensors directly: ZeRO-3 shards are
    gathered there when `ds3_gather_for_generation` is on; FSDP shards are whole only inside FSDP's forward."""
    if dist.is_fsdp:
        raise ValueError(f"FSDP (version {dist.fsdp_version}) is not supported: the tree engine reads the weight "
                         f"tensors directly and FSDP's are shards; use DeepSpeed ZeRO-3 with "
                         f"ds3_gather_for_generation=True, or ZeRO-1/2 / DDP")
    if dist.is_zero3 and not args.ds3_gather_for_generation:
        raise ValueError("DeepSpeed ZeRO-3 needs ds3_gather_for_generation=True here: the tree engine reads the "
                         "weight tensors directly, so they must be gathered for generation")
