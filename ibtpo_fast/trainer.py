"""The IB-TPO training loop: sample trees -> reward -> walk -> flatten -> PPO-clip update -> sync."""
from __future__ import annotations

import copy
import math
import random
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from ibtpo_fast.checkpoint import find_latest, load_state, save_checkpoint, set_rng_state
from ibtpo_fast.config import Config, ConfigError, dump_yaml
from ibtpo_fast.data import PromptRow, PromptStream, encode_prompt, load_files
from ibtpo_fast.engines.protocol import SamplingParams
from ibtpo_fast.engines.torch_engine import TorchEngine
from ibtpo_fast.evaluation import evaluate
from ibtpo_fast.losses import ppo_clip_loss, token_coefficients
from ibtpo_fast.packing import TrainBatch, flatten, pack_trees
from ibtpo_fast.policy import resolve_tree_attention, supports_tree_packing, token_logprobs
from ibtpo_fast.rewards import RewardScorer, default_math_reward, load_reward_fn
from ibtpo_fast.runlog import RunLogger, plot_metrics, read_metrics
from ibtpo_fast.sampler import IBTreeSampler, SamplerConfig
from ibtpo_fast.walk import walk


@contextmanager
def _deterministic(enabled: bool) -> Iterator[None]:
    """torch's deterministic algorithms inside the block, the caller's setting after it. On several CPU
    threads the update's backward otherwise sums in a varying order (index accumulation, MKL matmuls), so
    runs from one seed drift apart; on CPU the deterministic paths cost nothing measurable here."""
    if not enabled:
        yield
        return
    was, warn_only = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(was, warn_only=warn_only)


@dataclass
class Task:
    train: list[PromptRow]
    val: list[PromptRow]
    reward_fn: Any
    workers: int  # reward process-pool size; 0 scores inline


def load_task(cfg: Config) -> Task:
    if cfg.data.task == "arithmetic":
        from ibtpo_fast.tasks import compute_score, prompt_rows

        fn = load_reward_fn(cfg.data.reward_fn) if cfg.data.reward_fn else compute_score
        return Task(prompt_rows("train", 4096), prompt_rows("test", cfg.data.val_size), fn, 1 if cfg.data.reward_fn else 0)
    fn = load_reward_fn(cfg.data.reward_fn) if cfg.data.reward_fn else default_math_reward()
    train = load_files(cfg.data.train_files)
    val = load_files(cfg.data.val_files)[: cfg.data.val_size] if cfg.data.val_files else []
    return Task(train, val, fn, 2)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def load_policy(cfg: Config, device: torch.device) -> tuple[torch.nn.Module, Any]:
    if cfg.model.path:
        path = Path(cfg.model.path)
    else:
        from ibtpo_fast.tasks import tiny_model_path

        path = tiny_model_path()
    dtype = getattr(torch, cfg.model.dtype)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation=cfg.model.attn_implementation)
    model.to(device)
    tokenizer = AutoTokenizer.from_pretrained(path)
    return model, tokenizer


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


class Trainer:
    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        seed_everything(cfg.train.seed)
        self.device = resolve_device(cfg.model.device)
        self.model, self.tokenizer = load_policy(cfg, self.device)
        self.ref_model = self._frozen_copy() if cfg.algo.kl_coef > 0 else None
        self.task = load_task(cfg)
        self.scorer = RewardScorer(self.task.reward_fn, timeout_s=cfg.rollout.reward_timeout_s, workers=self.task.workers)
        self.train_prompts = self._encode(self.task.train)
        self.val_prompts = self._encode(self.task.val)
        self.stream = PromptStream(list(range(len(self.task.train))), cfg.data.batch_size, cfg.data.seed)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self._lr_factor)
        self.layout, self.tree_attention = self._resolve_layout()
        self.engine = TorchEngine(self.model, tokenizer=self.tokenizer, max_cache_tokens=cfg.rollout.max_cache_tokens)
        self.stop_ids = self._stop_ids()
        self.sampling = SamplingParams(cfg.rollout.temperature, cfg.rollout.top_p, cfg.rollout.top_k)
        self.sampler = IBTreeSampler(self.engine, self.tokenizer, self._reward_trees, SamplerConfig(
            strategy=cfg.rollout.strategy, tree=cfg.rollout.tree, max_new_tokens=cfg.rollout.max_new_tokens,
            sampling=self.sampling, stop_token_ids=self.stop_ids, step_delimiter=cfg.rollout.step_delimiter,
            min_step_tokens=cfg.rollout.min_step_tokens, token_budget=cfg.rollout.token_budget or None,
            beta=cfg.algo.beta, step_prob=cfg.algo.step_prob, seed=cfg.train.seed,
        ))
        self.run_dir = Path(cfg.run.out_dir) / cfg.run.name
        self.ckpt_dir = self.run_dir / "checkpoints"
        self.global_step = 0
        self.bad_steps_in_row = 0
        self.bad_steps_total = 0
        self._bad_update = False  # set by _apply when a mini-batch's loss or gradient is non-finite
        self._batch_rows: list[PromptRow] = []
        if cfg.run.resume == "auto":
            latest = find_latest(self.ckpt_dir)
            if latest is not None:
                self.resume_from(latest)

    # ---- checkpoints -------------------------------------------------------------------------
    def save(self) -> Path:
        state = {
            "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
            "data": self.stream.state_dict(), "sampler": self.sampler.state_dict(),
            "bad_steps_total": self.bad_steps_total,
        }
        return save_checkpoint(self.ckpt_dir, self.global_step, self.model, self.tokenizer, state,
                               dump_yaml(self.cfg), self.cfg.run.keep_last)

    def resume_from(self, path: Path) -> None:
        trained = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, self.cfg.model.dtype))
        self.model.load_state_dict(trained.state_dict())
        state = load_state(path)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.stream.load_state_dict(state["data"])
        self.sampler.load_state_dict(state["sampler"])
        self.bad_steps_total = state["bad_steps_total"]
        self.global_step = state["global_step"]
        set_rng_state(state["rng"])
        self.engine.update_weights()

    # ---- setup helpers -----------------------------------------------------------------------
    def _frozen_copy(self) -> torch.nn.Module:
        ref = copy.deepcopy(self.model).eval()
        for p in ref.parameters():
            p.requires_grad_(False)
        return ref

    def _encode(self, rows: list[PromptRow]) -> list[list[int]]:
        return [encode_prompt(r, self.tokenizer, self.cfg.data.max_prompt_tokens) for r in rows]

    def _stop_ids(self) -> tuple[int, ...]:
        eos = self.tokenizer.eos_token_id
        gen = getattr(self.model, "generation_config", None)
        ids = {eos} if eos is not None else set()
        if gen is not None and gen.eos_token_id is not None:
            ids |= set(gen.eos_token_id if isinstance(gen.eos_token_id, list) else [gen.eos_token_id])
        return tuple(sorted(ids))

    def _lr_factor(self, step: int) -> float:
        t = self.cfg.train
        if step < t.warmup_steps:
            return (step + 1) / (t.warmup_steps + 1)
        if t.lr_schedule == "cosine":
            progress = (step - t.warmup_steps) / max(1, t.steps - t.warmup_steps)
            return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
        return 1.0

    def _reward_trees(self, trees: list[int], responses: list[np.ndarray]) -> np.ndarray:
        rows = [self._batch_rows[t] for t in trees]
        texts = self.tokenizer.batch_decode([r.tolist() for r in responses], skip_special_tokens=True)
        return self.scorer([r.data_source for r in rows], texts, [r.ground_truth for r in rows],
                           [r.extra_info for r in rows])

    # ---- one step ----------------------------------------------------------------------------
    def step(self) -> dict[str, float]:
        cfg = self.cfg
        idx = self.stream.next_batch()
        self._batch_rows = [self.task.train[i] for i in idx]
        t0 = time.perf_counter()
        rollout = self.sampler.sample([self.train_prompts[i] for i in idx])
        t_rollout = time.perf_counter() - t0
        t0 = time.perf_counter()
        w = walk(rollout.forest, beta=cfg.algo.beta, lam=cfg.algo.lam, eps=cfg.algo.eps, step_prob=cfg.algo.step_prob)
        batch = self.pack(rollout.forest, w)
        t_walk = time.perf_counter() - t0
        t0 = time.perf_counter()
        update = self.update(batch)
        t_update = time.perf_counter() - t0
        t0 = time.perf_counter()
        self.engine.update_weights()  # colocated: weights are shared; this flushes the stale KV cache
        t_sync = time.perf_counter() - t0
        self.global_step += 1
        m = dict(rollout.metrics)
        m.update(update)
        m["train/tokens_processed"] = float(batch.tokens_processed)
        gen_tokens = float(rollout.generated_tokens.sum())
        m.update({
            "ib/score_mean": w.ib_score_mean, "ib/cov_eta": w.cov_eta_mean,
            "timing/rollout": t_rollout, "timing/walk": t_walk + m.pop("timing/walk", 0.0),
            "timing/update": t_update, "timing/sync": t_sync,
            "perf/tokens_per_s": gen_tokens / max(t_rollout, 1e-9),
            "actor/lr": self.scheduler.get_last_lr()[0],
            **self.scorer.stats(),
        })
        m["timing/rollout"] -= m["timing/reward"]  # the sampler's reward calls ran inside the rollout
        return m

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

    def pack(self, forest, w) -> TrainBatch:
        pad = self.tokenizer.pad_token_id or 0
        if self.layout == "tree":  # masks grow with the row width squared: gather alone takes one row per mini-batch
            rows = self.cfg.train.mini_batches if self.tree_attention == "gather" else None
            return pack_trees(forest, w.advantage, w.leaves, pad, self.cfg.algo.prefix_weighting, rows)
        return flatten(forest, w.advantage, w.leaves, pad, self.cfg.algo.prefix_weighting)

    def update(self, batch: TrainBatch) -> dict[str, float]:
        with _deterministic(self.device.type == "cpu"):
            return self._update(batch)

    def _update(self, batch: TrainBatch) -> dict[str, float]:
        cfg = self.cfg
        ref_logp = self._ref_logprobs(batch) if self.ref_model is not None else None
        self.model.train()
        self._bad_update = False
        stats: dict[str, list[float]] = {}
        order = np.arange(batch.num_rows)
        for _ in range(cfg.train.ppo_epochs):
            np.random.shuffle(order)
            for rows in np.array_split(order, min(cfg.train.mini_batches, batch.num_rows)):
                mb = batch.select(rows)
                sel = torch.isin(batch.rows, torch.as_tensor(rows))
                loss, s = self._loss(mb, None if ref_logp is None else ref_logp[sel])
                s["actor/grad_norm"] = self._apply(loss)
                for k, v in s.items():
                    stats.setdefault(k, []).append(v)
        self.scheduler.step()
        self._count_bad_step()
        out = {k: float(np.nanmean(v)) if not np.isnan(v).all() else float("nan") for k, v in stats.items()}
        out["train/bad_steps"] = float(self.bad_steps_total)
        return out

    def _count_bad_step(self) -> None:
        if not self._bad_update:
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

    def _loss(self, mb: TrainBatch, ref_logp: torch.Tensor | None) -> tuple[torch.Tensor, dict[str, float]]:
        a = self.cfg.algo
        logp, entropy = token_logprobs(self.model, mb, self.cfg.rollout.temperature, self.tree_attention)
        dev = logp.device
        coef = token_coefficients(a.loss_agg, mb.mult, mb.seq_share, mb.num_traj).to(dev) * mb.prefix_w.to(dev)
        return ppo_clip_loss(logp, mb.old_logp.to(dev), mb.advantages.to(dev), coef, clip_low=a.clip_low,
                             clip_high=a.clip_high, ref_logp=None if ref_logp is None else ref_logp.to(dev),
                             kl_coef=a.kl_coef, entropy=entropy, entropy_coef=a.entropy_coef)

    @torch.no_grad()
    def _ref_logprobs(self, batch: TrainBatch) -> torch.Tensor:
        logp, _ = token_logprobs(self.ref_model, batch, self.cfg.rollout.temperature, self.tree_attention)
        return logp.float().cpu()

    def _apply(self, loss: torch.Tensor) -> float:
        """Backward and optimizer step; a non-finite loss or gradient skips the step (counted)."""
        self.optimizer.zero_grad(set_to_none=True)
        if torch.isfinite(loss):
            loss.backward()
            norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.train.grad_clip or float("inf"))
        else:
            norm = loss.detach()
        if not torch.isfinite(norm):
            self.optimizer.zero_grad(set_to_none=True)
            self._bad_update = True
            return float("nan")
        self.optimizer.step()
        return float(norm)

    # ---- evaluation and the run --------------------------------------------------------------
    def evaluate(self) -> dict[str, float]:
        if not self.val_prompts:
            return {}
        self.engine.flush_cache()
        return evaluate(self.engine, self.tokenizer, self.val_prompts, self.task.val, self.scorer,
                        k=self.cfg.train.eval_k, max_new_tokens=self.cfg.rollout.max_new_tokens,
                        sampling=self.sampling, stop_token_ids=self.stop_ids, seed=self.cfg.train.seed + 10_000)

    def train(self) -> dict[str, Any]:
        cfg = self.cfg
        self.run_dir.mkdir(parents=True, exist_ok=True)
        (self.run_dir / "config.yaml").write_text(dump_yaml(cfg))
        start = self.global_step
        with RunLogger(self.run_dir, cfg.train.steps, progress=cfg.run.progress, tensorboard=cfg.run.tensorboard,
                       wandb=cfg.run.wandb, start_step=start) as log:
            log.print(dump_yaml(cfg) if start == 0 else f"resumed from step {start} in {self.ckpt_dir}")
            if start == 0:
                before = self.evaluate()
                log.log(0, before)
            else:
                before = read_metrics(self.run_dir / "metrics.jsonl")[0]
            history = []
            while self.global_step < cfg.train.steps:
                m = self.step()
                last = self.global_step == cfg.train.steps
                every = cfg.train.eval_every
                if last or (every and self.global_step % every == 0):
                    m.update(self.evaluate())
                log.log(self.global_step, m)
                history.append(m)
                if last or self.global_step % cfg.run.save_every == 0:
                    self.save()
        plot_metrics(self.run_dir / "metrics.jsonl", self.run_dir / "plots")
        self.scorer.close()
        return {"before": before, "after": history[-1] if history else before, "history": history}
