"""IB-TPO inside TRL: `IBTPOTrainer`, a `GRPOTrainer` whose groups are IBTrees (`pip install 'ibtpo_fast[trl]'`).

TRL hands each process its prompts G times over (G = `num_generations`). In training, this trainer
grows one tree per prompt with `IBTreeSampler` on TRL's own model (a `TorchEngine` reads its live
parameters, so rollouts always use the current weights), rewards each round's leaves with the user's
TRL reward functions before the next round picks where to branch, and returns the tree's G leaves in
place of G independent completions. Everything after generation is TRL's: the reference and old
log-probs, the loss, logging. Two things change: the rewards TRL records are the ones the tree was
scored with (no second call), and the advantages TRL's loss receives are the walk's per-token step
advantages, shape (rows, completion length), instead of one number a completion. Evaluation samples as
TRL does.

    trainer = IBTPOTrainer(model=model, reward_funcs=[correct], train_dataset=ds, processing_class=tok,
                           args=IBTPOConfig(output_dir="out", tree="4,9,1,1", num_generations=12,
                                            per_device_train_batch_size=12, step_delimiter="\\n\\n"))

With `branch_strategy="independent"`, `tree="G,1,1,1"` and `ib_lambda=0`, the advantages are TRL's own
GRPO advantages (TRL divides by std + 1e-4; `adv_eps` defaults to that).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ibtpo_fast.engines.protocol import SamplingParams
from ibtpo_fast.engines.torch_engine import TorchEngine
from ibtpo_fast.errors import MissingExtraError
from ibtpo_fast.leaf_batch import LeafBatch, leaf_batch
from ibtpo_fast.sampler import SCHEDULES, IBTreeSampler, Rollout, SamplerConfig, check_tree
from ibtpo_fast.walk import walk

TRL_VERSION = "1.16"  # the `trl` extra's pin: the GRPOTrainer internals this adapter overrides
try:
    from trl import GRPOConfig, GRPOTrainer
    from trl.data_utils import is_conversational
except ImportError as error:
    raise MissingExtraError(f"ibtpo_fast.integrations.trl needs TRL {TRL_VERSION}.x: pip install 'ibtpo_fast[trl]'") from error


@dataclass
class IBTPOConfig(GRPOConfig):
    """`GRPOConfig` plus the tree: `num_generations` must equal the tree's leaves, B0 + (L - 1) K B."""

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
        spec = check_tree(self.branch_strategy, self.tree)
        if self.num_generations != spec.trajectories:
            raise ValueError(f"tree {self.tree} has {spec.trajectories} leaves (B0 + (L-1)*K*B) but num_generations = "
                             f"{self.num_generations}: set num_generations = {spec.trajectories}")
        if self.per_device_train_batch_size % self.num_generations:
            raise ValueError(f"per_device_train_batch_size = {self.per_device_train_batch_size} must be a multiple of "
                             f"num_generations = {self.num_generations}: a tree's leaves are grown on one process")
        if self.rollout_schedule not in SCHEDULES:
            raise ValueError(f"rollout_schedule must be one of {', '.join(SCHEDULES)}, got {self.rollout_schedule!r}")
        if self.repetition_penalty != 1.0 or self.min_p is not None:
            raise ValueError("IBTPOTrainer samples with temperature, top_p and top_k only: leave repetition_penalty "
                             "at 1.0 and min_p unset")
        super().__post_init__()


class IBTPOTrainer(GRPOTrainer):
    """`GRPOTrainer` with IBTree rollouts and per-token step advantages; takes an `IBTPOConfig`."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if not isinstance(self.args, IBTPOConfig):
            raise TypeError(f"IBTPOTrainer needs args=IBTPOConfig(...), got {type(self.args).__name__}")
        if self.use_vllm or self.tools or self.environment_factories is not None or self.rollout_func is not None:
            raise ValueError("IBTPOTrainer generates with its own tree sampler: vLLM, tools, environments and "
                             "rollout_func are not supported")
        modules = [name for f, name in zip(self.reward_funcs, self.reward_func_names) if isinstance(f, torch.nn.Module)]
        if modules:
            raise ValueError(f"reward models {modules} cannot score a tree between rounds here: pass reward functions")
        self._engine: TorchEngine | None = None
        self._sampler: IBTreeSampler | None = None
        self._inputs: list[dict[str, Any]] = []  # this generation's rows, G per prompt (set per batch)
        self._rewards: dict[tuple[int, tuple[int, ...]], torch.Tensor] = {}  # (tree, response) -> reward per function
        self._leaves: LeafBatch | None = None
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
        sampler = self._tree_sampler()
        self._rewards = {}
        rows = list(enumerate(self._inputs[i] for i in firsts))  # (tree, dataset row): what a leaf is graded against
        self.last_rollout = sampler.sample([prompt_ids[i] for i in firsts], rows,
                                           tree_ids=[self._tree_id(k) for k in range(len(firsts))])
        forest = self.last_rollout.forest
        result = walk(forest, beta=self.args.ib_beta, lam=self.args.ib_lambda, eps=self.args.adv_eps)
        self._leaves = leaves = leaf_batch(forest, result, self._tokenizer.pad_token_id, self.last_rollout.finish_reason)
        self._log_tree_metrics(self.last_rollout.metrics)
        lengths = leaves.response_lengths.tolist()
        return ([leaves.response_list(i) for i in range(len(leaves))],
                [leaves.rollout_logprobs[i, :n].tolist() for i, n in enumerate(lengths)])

    def _calculate_rewards(self, inputs: list[dict[str, Any]], prompts: list[Any], completions: list[Any],
                           completion_ids_list: list[list[int]]) -> torch.Tensor:
        if self._leaves is None:  # evaluation: TRL scores its own completions
            return super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
        from accelerate.utils import gather

        zero = torch.zeros(len(self.reward_funcs))  # a truncated leaf scores 0 without a reward call
        local = torch.stack([self._rewards.get((int(t), tuple(ids)), zero)
                             for t, ids in zip(self._leaves.group, completion_ids_list)])
        return gather(local.to(self.accelerator.device))

    # ---- the tree sampler -----------------------------------------------------------------------
    def _tree_sampler(self) -> IBTreeSampler:
        """Built on first use, on the unwrapped training model; its prefix cache is flushed before each
        generation, since the weights changed since the last one."""
        if self._sampler is None:
            a = self.args
            self._engine = TorchEngine(self.accelerator.unwrap_model(self.model), tokenizer=self._tokenizer)
            cfg = SamplerConfig(
                strategy=a.branch_strategy, tree=a.tree, max_new_tokens=a.max_completion_length,
                sampling=SamplingParams(a.temperature, a.top_p, a.top_k or -1), stop_token_ids=list(self.eos_token_ids),
                step_delimiter=a.step_delimiter, min_step_tokens=a.min_step_tokens, token_budget=a.token_budget,
                beta=a.ib_beta, seed=a.seed, schedule=a.rollout_schedule)
            self._sampler = IBTreeSampler(self._engine, self._tokenizer, self._score_leaves, cfg)
        self._engine.flush_cache()
        return self._sampler

    def _tree_id(self, k: int) -> int:
        """A tree's id seeds its samples: unique over steps and processes."""
        per_process = self.args.per_device_train_batch_size * self.args.steps_per_generation // self.num_generations
        return (self.state.global_step * self.accelerator.num_processes + self.accelerator.process_index) * per_process + k

    def _score_leaves(self, trees_rows: Sequence[tuple[int, dict[str, Any]]], responses: Sequence[np.ndarray]) -> list[float]:
        """The sampler's reward function: TRL's reward functions on a round's finished leaves, weighted and summed.
        Each function's rewards are kept for `_calculate_rewards`."""
        trees, rows = [t for t, _ in trees_rows], [row for _, row in trees_rows]
        prompts = [row["prompt"] for row in rows]
        texts = self.processing_class.batch_decode([r.tolist() for r in responses], skip_special_tokens=True)
        completions = [[{"role": "assistant", "content": t}] for t in texts] if is_conversational(rows[0]) else texts
        keys = [k for k in rows[0] if k not in ("prompt", "completion", "completion_ids")]
        kwargs = {k: [row[k] for row in rows] for k in keys}
        per_func = torch.zeros(len(rows), len(self.reward_funcs))
        for j, (func, name) in enumerate(zip(self.reward_funcs, self.reward_func_names)):
            out = func(prompts=prompts, completions=completions, completion_ids=[r.tolist() for r in responses],
                       trainer_state=self.state, log_extra=self._log_completion_extra, log_metric=self._log_metric, **kwargs)
            if len(out) != len(rows) or any(r is None for r in out):
                raise ValueError(f"reward function {name!r} must return one number per completion ({len(rows)}); a tree "
                                 f"needs every leaf scored, so None is not allowed")
            per_func[:, j] = torch.tensor([float(r) for r in out])
        for t, r, scores in zip(trees, responses, per_func):
            self._rewards[(t, tuple(int(x) for x in r))] = scores
        return (per_func * self.reward_weights.cpu()).sum(dim=1).tolist()

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

    def _log_tree_metrics(self, metrics: dict[str, float]) -> None:
        """The mean over processes of each tree metric (every process grows trees of its own prompts)."""
        keys = ("tree/generated_tokens", "tree/eff_rate", "tree/trajectories_per_1k_tokens", "rollout/prefix_cache_hit_rate")
        local = torch.tensor([[metrics[k] for k in keys]], dtype=torch.float64, device=self.accelerator.device)
        for key, value in zip(keys, self.accelerator.gather(local).mean(0).tolist()):
            self._metrics["train"][key].append(value)
