"""The IB-TPO training loop: sample trees -> reward -> walk -> pack -> PPO-clip update -> sync, then evaluate and save."""
from __future__ import annotations

import math
import random
import time
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ibtpo_fast.checkpoint import (
    checkpoints_newest_first,
    load_checkpoint,
    lock_run_dir,
    save_checkpoint,
    set_rng_state,
    verify_checkpoint,
)
from ibtpo_fast.config import Config, ConfigError, TrainConfig, dump_yaml, to_dict
from ibtpo_fast.data import PromptRow, PromptStream, encode_prompt
from ibtpo_fast.distributed import frozen_copy, init_world, resolve_parallel, shard_from_rank0, whole, wrap
from ibtpo_fast.engines.protocol import SamplingParams
from ibtpo_fast.errors import CheckpointError
from ibtpo_fast.evaluation import correct_counts, merge_shares, sample_scores, summarise
from ibtpo_fast.loading import (
    Task,
    build_engine,
    check_engine,
    load_policy,
    load_task,
    load_tokenizer,
    model_dir,
    resolve_device,
    stop_token_ids,
)
from ibtpo_fast.metrics import mean_of, parts_of
from ibtpo_fast.packing import TrainBatch, flatten, pack_trees
from ibtpo_fast.policy import TokenLogprobs, checkpoint_activations, resolve_tree_attention, supports_tree_packing
from ibtpo_fast.runlog import RunLogger, SilentLogger, plot_metrics, read_metrics
from ibtpo_fast.sampler import IBTreeSampler, Rollout, SamplerConfig, TreeSpec
from ibtpo_fast.update import SKIPPED, UpdateSettings, ppo_update, reference_logprobs
from ibtpo_fast.walk import WalkResult, walk


def task_of(cfg: Config, val_size: int | None = None) -> Task:
    """The task a run's config names (`val_size` replaces `data.val_size`)."""
    d = cfg.data
    return load_task(d.task, train_files=d.train_files, val_files=d.val_files,
                     val_size=d.val_size if val_size is None else val_size, reward_fn=d.reward_fn,
                     reward_workers=d.reward_workers)


def sampler_config(cfg: Config, stop_ids: Sequence[int], async_rewards: bool = False) -> SamplerConfig:
    """The sampler a run's config describes; `async_rewards` where its grader waits on worker processes."""
    r = cfg.rollout
    return SamplerConfig(
        strategy=r.strategy, schedule=r.schedule, tree=r.tree, max_new_tokens=r.max_new_tokens,
        sampling=SamplingParams(r.temperature, r.top_p, r.top_k), stop_token_ids=tuple(stop_ids),
        step_delimiter=r.step_delimiter, min_step_tokens=r.min_step_tokens, token_budget=r.token_budget or None,
        beta=cfg.algo.beta, step_prob=cfg.algo.step_prob, ib_norm=cfg.algo.ib_norm, branch_root=r.branch_root,
        tie_break=r.tie_break, min_branch_room=r.min_branch_room, seed=cfg.train.seed, async_rewards=async_rewards,
    )


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def pack_batch(forest, w: WalkResult, pad: int, layout: str, tree_attention: str, train: TrainConfig,
               prefix_weighting: str = "none") -> TrainBatch:
    """A rank's training batch as the run's layout packs it, with at least a row for each mini-batch, so that
    every rank takes `train.mini_batches` optimizer steps."""
    if layout == "flat":  # a row per trajectory: at least as many as trees
        return flatten(forest, w.advantage, w.leaves, pad, prefix_weighting)
    # masks grow with the row width squared: gather alone takes wide rows
    gather, budget = tree_attention == "gather", train.max_tokens_per_micro_batch
    rows = train.mini_batches if gather and not budget else None  # one row per mini-batch
    return pack_trees(forest, w.advantage, w.leaves, pad, prefix_weighting, rows, row_width=budget if gather else 0,
                      min_rows=train.mini_batches)


class Trainer:
    """One process's part of a run: the whole run without torchrun, one rank's share of trees under it."""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        check_engine(cfg.rollout.engine)  # a missing extra or GPU fails here, before any work
        self.world = init_world(cfg.train.dist_timeout_s)
        self.run_dir = Path(cfg.run.out_dir) / cfg.run.name
        self.ckpt_dir = self.run_dir / "checkpoints"
        self._lock = lock_run_dir(self.run_dir) if self.world.is_main else None  # released when the run ends
        try:
            self._build(cfg)
        except BaseException:
            self.release()
            raise

    def _build(self, cfg: Config) -> None:
        seed_everything(cfg.train.seed)
        self.device = self._device()
        # Low-precision training keeps fp32 master weights (FSDP computes in model.dtype); engines get model.dtype.
        self.engine_dtype = getattr(torch, cfg.model.dtype)
        master = self.engine_dtype != torch.float32
        self.parallel = resolve_parallel(cfg.train.parallel, self.world, needs_fsdp=master or cfg.train.ref_offload)
        compute = cfg.train.param_dtype or (cfg.model.dtype if master else "")
        if self.parallel == "fsdp":
            self._load_sharded("float32" if master else cfg.model.dtype, compute)
        else:
            self._load_whole(compute)
        self.layout, self.tree_attention = self._resolve_layout()
        self.task = task_of(cfg)
        self.scorer = self.task.scorer(cfg.rollout.reward_timeout_s)
        self.train_prompts = self._encode(self.task.train)
        self.val_prompts = self._encode(self.task.val)
        self.stream = PromptStream(list(range(len(self.task.train))), cfg.data.batch_size, cfg.data.seed)
        self.optimizer = torch.optim.AdamW(self.policy.parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self._lr_factor)
        self.engine_model = self.rollout_weights.model if self.rollout_weights else self.model
        self.engine = build_engine(cfg.rollout.engine, self.engine_model, self.tokenizer,
                                   model_path=model_dir(cfg.model.path, cfg.data.task), dtype=cfg.model.dtype,
                                   seed=cfg.train.seed, local_rank=self.world.local_rank,
                                   max_cache_tokens=cfg.rollout.max_cache_tokens, sglang=cfg.rollout.sglang)
        self.stop_ids = stop_token_ids(self.model, self.tokenizer)
        self.sampling = SamplingParams(cfg.rollout.temperature, cfg.rollout.top_p, cfg.rollout.top_k)
        # A grader in worker processes scores each finished round while the engine decodes on.
        self.sampler = IBTreeSampler(self.engine, self.tokenizer, self._reward,
                                     sampler_config(cfg, self.stop_ids, async_rewards=self.scorer.workers > 0))
        self.global_step = 0
        self.bad_steps_in_row = 0
        self.bad_steps_total = 0
        if cfg.run.resume == "auto":
            self._resume()
        self.sync_weights()

    def _load_whole(self, compute: str) -> None:
        """Every rank loads the whole model: one process, or DDP's replicas."""
        cfg = self.cfg
        self.model, self.tokenizer = load_policy(cfg.model.path, self.device, cfg.model.dtype,
                                                 cfg.model.attn_implementation, cfg.model.trust_remote_code,
                                                 task=cfg.data.task)
        self.rollout_weights = None
        self.ref_model = frozen_copy(self.model) if cfg.algo.kl_coef > 0 else None
        if cfg.train.activation_checkpointing:
            checkpoint_activations(self.model)
        self.policy = wrap(TokenLogprobs(self.model), self.parallel, self.world, compute)

    def _load_sharded(self, dtype: str, compute: str) -> None:
        """Rank 0 alone loads the whole model (into CPU memory); every rank keeps its shards of it, of the
        reference model and, for TorchEngine, an empty replica gathered whole before each rollout and freed for
        the update (SGLang holds its own copy)."""
        cfg, m = self.cfg, self.cfg.model
        s = shard_from_rank0(
            lambda: load_policy(m.path, torch.device("cpu"), dtype, m.attn_implementation, m.trust_remote_code,
                                task=cfg.data.task)[0],
            self.world, self.device, param_dtype=compute,
            ref_dtype=self.engine_dtype if cfg.algo.kl_coef > 0 else None, ref_offload=cfg.train.ref_offload,
            replica_dtype=self.engine_dtype if cfg.rollout.engine == "torch" else None,
            activation_checkpointing=cfg.train.activation_checkpointing, trust_remote_code=m.trust_remote_code)
        self.model, self.policy, self.ref_model, self.rollout_weights = s.lm, s.policy, s.ref, s.replica
        self.tokenizer = load_tokenizer(m.path, m.trust_remote_code, cfg.data.task)

    @property
    def update_settings(self) -> UpdateSettings:
        a, t = self.cfg.algo, self.cfg.train
        return UpdateSettings(
            temperature=self.cfg.rollout.temperature, tree_attention=self.tree_attention, loss_agg=a.loss_agg,
            clip_low=a.clip_low, clip_high=a.clip_high, kl_coef=a.kl_coef, entropy_coef=a.entropy_coef,
            ppo_epochs=t.ppo_epochs, mini_batches=t.mini_batches, grad_clip=t.grad_clip,
            deterministic=self.device.type == "cpu", max_tokens_per_micro_batch=t.max_tokens_per_micro_batch,
        )

    # ---- checkpoints -------------------------------------------------------------------------
    def save(self) -> Path:
        state = {
            "scheduler": self.scheduler.state_dict(), "data": self.stream.state_dict(),
            "sampler": self.sampler.state_dict(), "bad_steps_total": self.bad_steps_total,
        }
        return save_checkpoint(self.ckpt_dir, self.global_step, self.policy, self.tokenizer, state, dump_yaml(self.cfg),
                               self.cfg.run.keep_last, optimizer=self.optimizer, world=self.world)

    def _resume(self) -> None:
        """Continue from the newest checkpoint that matches its manifest: a corrupt one is passed over with a
        warning (run.on_corrupt=fallback) or ends the run (refuse); none at all starts afresh."""
        found = checkpoints_newest_first(self.ckpt_dir)
        for path in found:
            try:
                verify_checkpoint(path, self.world)
            except CheckpointError as e:
                if self.cfg.run.on_corrupt == "refuse":
                    raise CheckpointError(f"{e} (run.on_corrupt=fallback resumes from an earlier one)") from None
                warnings.warn(f"{e}; trying an earlier checkpoint", RuntimeWarning, stacklevel=2)
                continue
            self.resume_from(path)
            return
        if found:
            raise CheckpointError(f"no intact checkpoint in {self.ckpt_dir} to resume from; move it aside to start afresh")

    def resume_from(self, path: Path) -> None:
        """Continue from checkpoint `path`, written at this world size or another."""
        state = load_checkpoint(path, self.policy, self.optimizer)
        self.scheduler.load_state_dict(state["scheduler"])
        self.stream.load_state_dict(state["data"])
        self.sampler.load_state_dict(state["sampler"])
        self.bad_steps_total = state["bad_steps_total"]
        self.global_step = state["global_step"]
        rngs = state["rng"]  # one per rank that wrote it; a rank the writer did not have takes rank 0's
        if len(rngs) != self.world.size and self.world.is_main:
            warnings.warn(f"{path} was written at {len(rngs)} ranks and resumes at {self.world.size}: the ranks take "
                          f"{'the first ' + str(self.world.size) if len(rngs) > self.world.size else 'rank 0'}'s RNG "
                          "states, so the run goes on as a new sample, not as the uninterrupted run",
                          RuntimeWarning, stacklevel=2)
        set_rng_state(rngs[self.world.rank] if self.world.rank < len(rngs) else rngs[0])

    # ---- setup helpers -----------------------------------------------------------------------
    def _device(self) -> torch.device:
        device = resolve_device(self.cfg.model.device)
        return torch.device("cuda", self.world.local_rank) if device.type == "cuda" and self.world.size > 1 else device

    def _encode(self, rows: list[PromptRow]) -> list[list[int]]:
        return [encode_prompt(r, self.tokenizer, self.cfg.data.max_prompt_tokens) for r in rows]

    def _lr_factor(self, step: int) -> float:
        t = self.cfg.train
        if step < t.warmup_steps:
            return (step + 1) / (t.warmup_steps + 1)
        if t.lr_schedule == "cosine":
            progress = (step - t.warmup_steps) / max(1, t.steps - t.warmup_steps)
            return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
        return 1.0

    def _resolve_layout(self) -> tuple[str, str]:
        """(layout, tree attention backend); a bad choice fails here, before any work."""
        layout = self.cfg.train.layout
        if layout == "auto":
            layout = "tree" if supports_tree_packing(self.model) else "flat"
        try:
            backend = resolve_tree_attention(self.model, self.cfg.train.tree_attention) if layout == "tree" else "auto"
        except ValueError as e:  # the choice does not fit the loaded model: a config error, named as such
            raise ConfigError(str(e)) from e
        if backend == "flex" and self.device.type != "cuda":
            raise ConfigError("train.tree_attention=flex trains on CUDA only: torch has no FlexAttention "
                              "backward on CPU; use gather (the default)")
        return layout, backend

    # ---- one step ----------------------------------------------------------------------------
    def _reward(self, rows: Sequence[PromptRow], responses: Sequence[np.ndarray]) -> np.ndarray:
        texts = self.tokenizer.batch_decode([r.tolist() for r in responses], skip_special_tokens=True)
        return self.scorer([r.data_source for r in rows], texts, [r.ground_truth for r in rows],
                           [r.extra_info for r in rows])

    def rollout(self, indices: Sequence[int], tree_ids: Sequence[int] | None = None) -> Rollout:
        """One tree for each training row in `indices`, each response graded against its own row; `tree_ids`
        seed the trees (default: the sampler's running count)."""
        self.engine_model.eval()  # for the whole rollout, not once per engine poll; the update switches back
        return self.sampler.sample([self.train_prompts[i] for i in indices], [self.task.train[i] for i in indices],
                                   tree_ids)

    def sync_weights(self) -> None:
        """Make the engine generate with the policy's current weights and flush the KV cache the old ones computed.
        An engine on the policy's own parameters needs only the flush (a sharded policy's whole replica is
        gathered first); one with its own copy is sent every tensor, whole, one bucket at a time."""
        if not self.engine.weights_shared:
            self.engine.update_weights(self._whole_weights())
            return
        if self.rollout_weights is not None:
            self.rollout_weights.gather(self.model)
        self.engine.update_weights()

    def _whole_weights(self) -> Iterator[tuple[str, torch.Tensor]]:
        """(name, whole tensor) of each parameter in the engine's dtype, gathered when sharded as the engine asks."""
        for name, p in self.model.named_parameters():
            yield name, whole(p).detach().to(self.engine_dtype)

    def step(self) -> dict[str, float]:
        """One training step on this rank's share of the global batch. Its `timing/*` parts (rollout, reward,
        walk, pack, update, sync) sum to `timing/step`, the step's wall time (the slowest rank's); the other
        metrics are those of all ranks' data together (ibtpo_fast.metrics)."""
        cfg, start = self.cfg, time.perf_counter()
        share, first = self.world.share(cfg.data.batch_size), self.global_step * cfg.data.batch_size
        rollout = self.rollout(self.stream.next_batch()[share], range(first, first + cfg.data.batch_size)[share])
        if self.rollout_weights is not None:
            self.rollout_weights.free()
        t0 = time.perf_counter()
        w = walk(rollout.forest, beta=cfg.algo.beta, lam=cfg.algo.lam, eps=cfg.algo.eps, step_prob=cfg.algo.step_prob,
                 ib_norm=cfg.algo.ib_norm, branch_width=TreeSpec.parse(cfg.rollout.tree).B)
        t_walk = time.perf_counter() - t0
        batch = self.pack(rollout.forest, w)
        t_pack = time.perf_counter() - t0 - t_walk
        t0 = time.perf_counter()
        self.engine.release_memory()  # the update gets the device memory the engine held
        update = self.update(batch)
        t_update = time.perf_counter() - t0
        t0 = time.perf_counter()
        self.engine.resume_memory()
        self.sync_weights()
        t_sync = time.perf_counter() - t0
        self.global_step += 1
        local = {
            "train/tokens_processed": float(batch.tokens_processed),
            "timing/walk": rollout.metrics["timing/walk"] + t_walk,  # the sampler's branch scoring and the advantages
            "timing/pack": t_pack, "timing/update": t_update, "timing/sync": t_sync,
            "actor/lr": self.scheduler.get_last_lr()[0], **self.scorer.stats(),
        }
        if self.rollout_weights is not None:  # what the engine's whole replica holds while a rollout runs
            local["perf/rollout_weights_mb"] = self.rollout_weights.bytes / 2**20
        local["timing/step"] = time.perf_counter() - start
        # the update's statistics are already the global batch's, the same on every rank (ppo_update reduced them)
        return self.world.reduce_metrics({
            **rollout.parts, **parts_of(update), **parts_of(local),
            "ib/score_mean": mean_of(w.ib_score), "ib/cov_eta": mean_of(w.cov_eta),
            "perf/tokens_per_s": (float(rollout.generated_tokens.sum()), rollout.metrics["timing/rollout"]),
        })

    def pack(self, forest, w: WalkResult) -> TrainBatch:
        return pack_batch(forest, w, self.tokenizer.pad_token_id or 0, self.layout, self.tree_attention,
                          self.cfg.train, self.cfg.algo.prefix_weighting)

    def update(self, batch: TrainBatch) -> dict[str, float]:
        """The PPO update, the learning-rate step, and the count of steps skipped as non-finite. With
        algo.old_logprobs=policy the old log-probs are first recomputed by the training forward, whose
        precision and kernels may differ from the engine's."""
        if self.cfg.algo.old_logprobs == "policy":
            batch.old_logp = reference_logprobs(self.policy, batch, self.update_settings, self.world)
        out = ppo_update(self.policy, self.optimizer, batch, self.update_settings, self.ref_model, self.world)
        self.scheduler.step()
        self._count_bad_step(out.pop(SKIPPED) > 0)
        out["train/bad_steps"] = float(self.bad_steps_total)
        return out

    def _count_bad_step(self, bad: bool) -> None:
        if not bad:
            self.bad_steps_in_row = 0
            return
        self.bad_steps_in_row += 1
        self.bad_steps_total += 1
        warnings.warn(f"step {self.global_step + 1}: non-finite loss or gradient, update skipped "
                      f"({self.bad_steps_in_row} in a row)", RuntimeWarning, stacklevel=2)
        if self.bad_steps_in_row >= self.cfg.train.max_bad_steps:
            raise FloatingPointError(
                f"step {self.global_step + 1}: {self.bad_steps_in_row} non-finite steps in a row "
                f"(train.max_bad_steps={self.cfg.train.max_bad_steps}); aborting, the last good checkpoint "
                f"in {self.ckpt_dir} is intact")

    def release(self) -> None:
        """Give up the run directory's lock (the run's end does; so does the process's)."""
        if self._lock is not None:
            self._lock.close()
            self._lock = None

    # ---- evaluation and the run --------------------------------------------------------------
    def evaluate(self) -> tuple[dict[str, float], list[int]]:
        """Held-out accuracy, each rank sampling its share of the problems, and every problem's count of
        correct samples (in the held-out set's order)."""
        if not self.val_prompts:
            return {}, []
        self.engine.flush_cache()
        part = self.world.split(len(self.val_prompts))
        rows = self.task.val[part]
        scores = sample_scores(self.engine, self.tokenizer, self.val_prompts[part], rows, self.scorer,
                               k=self.cfg.train.eval_k, max_new_tokens=self.cfg.rollout.max_new_tokens,
                               sampling=self.sampling, stop_token_ids=self.stop_ids, seed=self.cfg.train.seed + 10_000,
                               first_index=part.start)
        counts: dict[str, int] = {}
        for r in rows:
            counts[r.data_source] = counts.get(r.data_source, 0) + 1
        shares = self.world.gather((summarise(scores, rows), counts, correct_counts(scores)))
        return merge_shares([(m, c) for m, c, _ in shares]), [n for _, _, correct in shares for n in correct]

    def train(self) -> dict[str, Any]:
        """The run to train.steps; the run directory's lock is given up at its end, also when it fails."""
        try:
            return self._run()
        finally:
            self.release()

    def _run(self) -> dict[str, Any]:
        cfg, main = self.cfg, self.world.is_main
        start = self.global_step
        if main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "config.yaml").write_text(dump_yaml(cfg))
        logger = RunLogger(self.run_dir, cfg.train.steps, progress=cfg.run.progress, tensorboard=cfg.run.tensorboard,
                           wandb=cfg.run.wandb, start_step=start, config=to_dict(cfg)) if main else SilentLogger()
        with logger as log:
            log.print(dump_yaml(cfg) if start == 0 else f"resumed from step {start} in {self.ckpt_dir}")
            if start == 0:
                before, correct = self.evaluate()
                log.log(0, before)
                log.log_eval(0, correct)
            else:
                before = read_metrics(self.run_dir / "metrics.jsonl")[0] if main else {}
            history = []
            while self.global_step < cfg.train.steps:
                m = self.step()
                last = self.global_step == cfg.train.steps
                every = cfg.train.eval_every
                if last or (every and self.global_step % every == 0):
                    t0 = time.perf_counter()
                    held_out, correct = self.evaluate()
                    m.update(held_out)
                    m["timing/eval"] = time.perf_counter() - t0
                    log.log_eval(self.global_step, correct)
                log.log(self.global_step, m)
                history.append(m)
                if last or self.global_step % cfg.run.save_every == 0:
                    self.save()
        if main:
            plot_metrics(self.run_dir / "metrics.jsonl", self.run_dir / "plots")
        self.scorer.close()
        return {"before": before, "after": history[-1] if history else before, "history": history}
