"""Typed run configuration: dataclasses are the source of truth.

`--config file.yaml` plus dotted overrides (`algo.beta=5 rollout.tree=4,9,1,1 train.steps=50`);
`preset=grpo` selects one of the paper's comparisons before the file and overrides apply.
Every value is checked before any work starts, with the offending key in the message.
"""
from __future__ import annotations

import codecs
import dataclasses
import os
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ibtpo_fast.errors import ConfigError


@dataclass
class ModelConfig:
    path: str = ""  # HF checkpoint dir; empty: the bundled task's tiny model
    dtype: str = "float32"
    device: str = "auto"  # auto: cuda when available
    attn_implementation: str = "sdpa"  # sdpa | eager | flex_attention | flash_attention_2; decoding uses sdpa
    trust_remote_code: bool = False  # run the Python code a model directory ships (auto_map): only for ones you trust


@dataclass
class DataConfig:
    task: str = "arithmetic"  # bundled task (arithmetic | arithmetic_hard | carries | word_problems), or "file" with train_files
    train_files: str = ""  # jsonl / parquet (verl format or {"prompt", "answer"})
    val_files: str = ""
    reward_fn: str = ""  # module:function in verl's compute_score contract; empty: the task's
    reward_workers: int = 2  # processes scoring a reward_fn or the math grader (0: inline); the bundled grader runs inline
    batch_size: int = 16  # prompts (trees) per step
    max_prompt_tokens: int = 256
    val_size: int = 128
    seed: int = 0


@dataclass
class SGLangConfig:
    """rollout.engine=sglang: SGLang's engine shares each rank's GPU with training."""

    mem_fraction_static: float = 0.4  # GPU memory for SGLang's weights and KV cache; training has the rest
    weight_bucket_mb: int = 512  # new weights reach the engine in buckets of at most this size
    engine_args: str = ""  # further sglang.Engine arguments as YAML, e.g. "{attention_backend: fa3}"
    # enable_deterministic_inference: SGLang reads each request's seed only with it (false: faster, not seed-reproducible)
    deterministic: bool = True


@dataclass
class RolloutConfig:
    engine: str = "torch"  # torch (TorchEngine: CPU or GPU) | sglang (GPU, the [sglang] extra)
    strategy: str = "ib"  # ib | independent | random | entropy
    schedule: str = "continuous"  # continuous: each tree's next round joins the running batch | lockstep
    tree: str = "4,9,1,1"  # B0,L,K,B
    max_new_tokens: int = 0  # per response; 0: the task's (64 arithmetic and carries, 96 arithmetic_hard and word_problems, 256 file)
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    step_delimiter: str = "\n"
    min_step_tokens: int = 1
    branch_root: bool = False  # true: the root stays a candidate after round 1 (default: it keeps its B0 children)
    tie_break: str = "shallow"  # shallow | deep: which of two equal scores is expanded first
    min_branch_room: int = 1  # a candidate's path leaves at least this many tokens under max_new_tokens
    token_budget: int = 0  # per tree; 0: no budget
    max_cache_tokens: int = 1_000_000
    reward_timeout_s: float = 10.0
    sglang: SGLangConfig = field(default_factory=SGLangConfig)


@dataclass
class AlgoConfig:
    beta: float = 5.0
    lam: float = 0.1
    eps: float = 1e-6
    step_prob: str = "product"  # pi(step): exp(sum of token logprobs) | geomean: exp(their mean)
    ib_norm: str = "mean"  # mean | sum: IB-Score over a node's children (docs/algorithm.md section 2)
    clip_low: float = 0.2
    clip_high: float = 0.2
    kl_coef: float = 0.001
    entropy_coef: float = 0.0
    loss_agg: str = "token-mean"  # token-mean | seq-mean-token-mean
    prefix_weighting: str = "none"  # none | sqrt
    old_logprobs: str = "engine"  # engine: the rollout's | policy: the training forward's, before the first update


@dataclass
class TrainConfig:
    steps: int = 40
    lr: float = 2e-4
    warmup_steps: int = 2
    lr_schedule: str = "constant"  # constant | cosine
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    ppo_epochs: int = 1
    mini_batches: int = 1
    seed: int = 0
    eval_k: int = 4  # samples per held-out problem: avg@k and pass@k
    eval_every: int = 10  # steps; 0: before and after training only
    max_bad_steps: int = 3  # NaN/inf steps in a row before aborting
    layout: str = "auto"  # tree (tree-packed) | flat (one row per trajectory) | auto: tree where supported
    tree_attention: str = "auto"  # gather | mask | flex | auto: flex for flex_attention models, else gather
    parallel: str = "auto"  # under torchrun: fsdp | ddp | none | auto: fsdp on more than one rank
    param_dtype: str = ""  # fsdp: compute in this dtype, reduce gradients in fp32; empty: model.dtype
    max_tokens_per_micro_batch: int = 0  # padded tokens per forward and backward, gradients accumulated; 0: no split
    activation_checkpointing: bool = False  # recompute each decoder layer's activations in the backward
    ref_offload: bool = False  # fsdp: the reference model's shards live in CPU memory, copied in layer by layer
    dist_timeout_s: float = 1800.0  # under torchrun: a collective that waits longer ends the run with an error


@dataclass
class RunConfig:
    name: str = "ibtpo-arithmetic"
    out_dir: str = "runs"
    resume: str = "auto"  # auto | never
    on_corrupt: str = "fallback"  # a corrupt checkpoint at resume: fallback (to the newest intact one) | refuse
    save_every: int = 10
    keep_last: int = 2
    tensorboard: bool = False
    wandb: bool = False
    progress: str = "auto"  # auto (a bar on a TTY) | on | off


@dataclass
class Config:
    preset: str = "ibtpo"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    algo: AlgoConfig = field(default_factory=AlgoConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    run: RunConfig = field(default_factory=RunConfig)


# The paper's comparisons (docs/algorithm.md sections 3 and 5), applied over the defaults.
PRESETS: dict[str, dict[str, Any]] = {
    "ibtpo": {},
    "grpo": {"rollout.strategy": "independent", "rollout.tree": "8,1,1,1", "algo.lam": 0.0},
    "grpo_g12": {"rollout.strategy": "independent", "rollout.tree": "12,1,1,1", "algo.lam": 0.0},  # IBTree's 12 trajectories
    "grpo_clip_higher": {"rollout.strategy": "independent", "rollout.tree": "8,1,1,1", "algo.lam": 0.0,
                         "algo.clip_high": 0.28},
    "grpo_entropy": {"rollout.strategy": "independent", "rollout.tree": "8,1,1,1", "algo.lam": 0.0,
                     "algo.entropy_coef": 0.001},
    "random_tree": {"rollout.strategy": "random", "algo.lam": 0.0},
    "entropy_tree": {"rollout.strategy": "entropy", "algo.lam": 0.0},
    # The component ablation (paper, Table 2): each component of IB-TPO alone, or another branching rule
    "ibtree_grpo_adv": {"algo.lam": 0.0},  # IBTree sampling, GRPO's advantages
    "grpo_ib_adv": {"rollout.strategy": "independent", "rollout.tree": "8,1,1,1"},  # IB-TPO advantages, independent samples
    "random_tree_ib_adv": {"rollout.strategy": "random"},
    "entropy_tree_ib_adv": {"rollout.strategy": "entropy"},
}

# Keys with a fixed set of values; each module that implements the choice owns its names (imported
# when a config is validated: they live beside torch and transformers).
_OWN_CHOICES = {
    "train.lr_schedule": ("constant", "cosine"),
    "run.resume": ("auto", "never"),
    "run.on_corrupt": ("fallback", "refuse"),
    "algo.old_logprobs": ("engine", "policy"),
}


def _choices() -> dict[str, tuple[str, ...]]:
    from ibtpo_fast.distributed import PARALLEL
    from ibtpo_fast.loading import DTYPES, ENGINES, TASKS
    from ibtpo_fast.losses import AGGREGATIONS
    from ibtpo_fast.packing import LAYOUTS, PREFIX_WEIGHTINGS
    from ibtpo_fast.policy import MODEL_ATTENTION
    from ibtpo_fast.runlog import PROGRESS_MODES
    from ibtpo_fast.sampler import SCHEDULES, STRATEGIES, TIE_BREAKS
    from ibtpo_fast.tree_attention import TREE_ATTENTION_BACKENDS
    from ibtpo_fast.walk import IB_NORMS, STEP_PROBS

    return {
        **_OWN_CHOICES,
        "rollout.strategy": STRATEGIES,
        "rollout.schedule": SCHEDULES,
        "algo.step_prob": STEP_PROBS,
        "algo.ib_norm": IB_NORMS,
        "rollout.tie_break": TIE_BREAKS,
        "algo.loss_agg": tuple(AGGREGATIONS),
        "algo.prefix_weighting": PREFIX_WEIGHTINGS,
        "run.progress": PROGRESS_MODES,
        "model.dtype": DTYPES,
        "data.task": TASKS,
        "rollout.engine": ENGINES,
        "train.layout": ("auto",) + LAYOUTS,
        "train.parallel": PARALLEL,
        "train.param_dtype": ("",) + DTYPES,
        "train.tree_attention": ("auto",) + TREE_ATTENTION_BACKENDS,
        "model.attn_implementation": MODEL_ATTENTION,
    }


_POSITIVE = {"data.batch_size", "data.max_prompt_tokens", "rollout.max_new_tokens", "rollout.temperature",
             "rollout.top_p", "rollout.max_cache_tokens", "rollout.reward_timeout_s", "algo.beta", "train.dist_timeout_s",
             "rollout.sglang.mem_fraction_static", "rollout.sglang.weight_bucket_mb",
             "train.ppo_epochs", "train.mini_batches", "train.eval_k", "train.max_bad_steps",
             "run.keep_last", "run.save_every", "data.val_size", "rollout.min_branch_room"}
_NON_NEGATIVE = {"algo.lam", "algo.eps", "algo.clip_low", "algo.clip_high", "algo.kl_coef", "algo.entropy_coef",
                 "train.steps", "train.lr", "train.warmup_steps", "train.weight_decay", "train.grad_clip",
                 "train.eval_every", "train.max_tokens_per_micro_batch", "rollout.token_budget", "rollout.min_step_tokens",
                 "data.reward_workers"}


def _coerce(key: str, raw: Any, typ: Any) -> Any:
    if isinstance(raw, str) and typ is not str:
        raw = yaml.safe_load(raw) if raw != "" else raw
    try:
        if typ is bool:
            if not isinstance(raw, bool):
                raise TypeError
            return raw
        if typ is int:
            if isinstance(raw, bool) or (isinstance(raw, float) and not raw.is_integer()):
                raise TypeError
            return int(raw)
        if typ is float:
            return float(raw)
        if typ is str:
            return ",".join(str(x) for x in raw) if isinstance(raw, (list, tuple)) else str(raw)
    except (TypeError, ValueError):
        pass
    raise ConfigError(f"{key}: expected {typ.__name__}, got {raw!r}")


# Keys whose command-line value may spell control characters as escapes: rollout.step_delimiter='\n\n'
_ESCAPED = {"rollout.step_delimiter"}


def set_value(cfg: Config, key: str, raw: Any) -> None:
    """Set a dotted key (`algo.beta`) on cfg, converting to the field's declared type."""
    if key in _ESCAPED and isinstance(raw, str):
        raw = codecs.decode(raw, "unicode_escape")
    obj, parts = cfg, key.split(".")
    for part in parts[:-1]:
        if not dataclasses.is_dataclass(obj) or part not in {f.name for f in dataclasses.fields(obj)}:
            raise ConfigError(f"unknown config key {key!r}")
        obj = getattr(obj, part)
    hints = typing.get_type_hints(type(obj)) if dataclasses.is_dataclass(obj) else {}
    name = parts[-1]
    if name not in hints or dataclasses.is_dataclass(getattr(obj, name)):
        raise ConfigError(f"unknown config key {key!r}")
    setattr(obj, name, _coerce(key, raw, hints[name]))


def _flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def load_config(args: Sequence[str] = ()) -> Config:
    """Build a Config from `--config file.yaml`, `preset=NAME` and `dotted.key=value` arguments."""
    args = list(args)
    values: dict[str, Any] = {}
    while args:
        arg = args.pop(0)
        if arg == "--config":
            if not args:
                raise ConfigError("--config needs a file path")
            path = Path(args.pop(0))
            if not path.is_file():
                raise ConfigError(f"--config: no such file {path}")
            values.update(_flatten(yaml.safe_load(path.read_text()) or {}))
        elif "=" in arg:
            key, raw = arg.split("=", 1)
            values[key.lstrip("-")] = raw
        else:
            raise ConfigError(f"cannot read argument {arg!r}: expected key=value or --config FILE")
    cfg = Config()
    preset = str(values.pop("preset", "ibtpo"))
    if preset not in PRESETS:
        raise ConfigError(f"preset: unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    cfg.preset = preset
    for key, raw in {**PRESETS[preset], **values}.items():
        set_value(cfg, key, raw)
    if cfg.rollout.max_new_tokens == 0 and cfg.data.task in _choices()["data.task"]:
        from ibtpo_fast.loading import default_max_new_tokens

        cfg.rollout.max_new_tokens = default_max_new_tokens(cfg.data.task)
    validate(cfg)
    return cfg


def _get(cfg: Config, key: str) -> Any:
    obj = cfg
    for part in key.split("."):
        obj = getattr(obj, part)
    return obj


def validate(cfg: Config) -> None:
    from ibtpo_fast.sampler import check_tree

    for key, choices in _choices().items():
        if _get(cfg, key) not in choices:
            raise ConfigError(f"{key}: {_get(cfg, key)!r} is not one of {', '.join(choices)}")
    for key in _POSITIVE:
        if not _get(cfg, key) > 0:
            raise ConfigError(f"{key}: must be > 0, got {_get(cfg, key)}")
    for key in _NON_NEGATIVE:
        if not _get(cfg, key) >= 0:
            raise ConfigError(f"{key}: must be >= 0, got {_get(cfg, key)}")
    if cfg.rollout.top_p > 1:
        raise ConfigError(f"rollout.top_p: must be in (0, 1], got {cfg.rollout.top_p}")
    if cfg.rollout.sglang.mem_fraction_static >= 1:
        raise ConfigError(f"rollout.sglang.mem_fraction_static: must be in (0, 1), got {cfg.rollout.sglang.mem_fraction_static}")
    if not isinstance(yaml.safe_load(cfg.rollout.sglang.engine_args or "{}"), dict):
        raise ConfigError(f"rollout.sglang.engine_args: a YAML mapping of sglang.Engine arguments, got "
                          f"{cfg.rollout.sglang.engine_args!r}")
    if cfg.rollout.top_k == 0 or cfg.rollout.top_k < -1:
        raise ConfigError(f"rollout.top_k: must be -1 (off) or >= 1, got {cfg.rollout.top_k}")
    try:
        check_tree(cfg.rollout.strategy, cfg.rollout.tree)
    except ValueError as e:
        raise ConfigError(f"rollout.tree: {e}") from None
    if cfg.data.task == "file" and not cfg.data.train_files:
        raise ConfigError("data.train_files: required when data.task=file")
    _check_world(cfg, int(os.environ.get("WORLD_SIZE", "1")), "WORLD_SIZE" in os.environ)
    _check_precision(cfg, "WORLD_SIZE" in os.environ)
    _check_ref_offload(cfg, "WORLD_SIZE" in os.environ)


def _check_precision(cfg: Config, torchrun: bool) -> None:
    """Low-precision training keeps fp32 master weights and optimizer state, which FSDP2 holds (computing in
    model.dtype): pure bf16 weights would round away most updates at a small learning rate."""
    if cfg.model.dtype == "float32" or (torchrun and cfg.train.parallel in ("auto", "fsdp")):
        return
    how = "launch under torchrun (one GPU: torchrun --nproc-per-node 1 -m ibtpo_fast.train ...)" if not torchrun \
        else f"use train.parallel=fsdp (not {cfg.train.parallel})"
    raise ConfigError(f"model.dtype: {cfg.model.dtype} training needs fp32 master weights, or AdamW's small updates "
                      f"round away in {cfg.model.dtype}; {how}, where FSDP keeps them and computes in "
                      f"{cfg.model.dtype}, or train in model.dtype=float32")


def _check_ref_offload(cfg: Config, torchrun: bool) -> None:
    """Offloading moves FSDP2 shards, so it needs FSDP under torchrun and a reference model to move."""
    if not cfg.train.ref_offload:
        return
    if cfg.algo.kl_coef == 0:
        raise ConfigError("train.ref_offload: algo.kl_coef is 0, so the run has no reference model to offload")
    if not torchrun or cfg.train.parallel not in ("auto", "fsdp"):
        how = "launch under torchrun (one GPU: torchrun --nproc-per-node 1 -m ibtpo_fast.train ...)" if not torchrun \
            else f"use train.parallel=fsdp (not {cfg.train.parallel})"
        raise ConfigError(f"train.ref_offload: the reference model's FSDP shards are what moves to CPU memory; {how}")


def _check_world(cfg: Config, world: int, torchrun: bool) -> None:
    """Each rank of a torchrun world owns whole trees: the global batch must divide, into shares that
    fill every mini-batch."""
    if cfg.train.parallel in ("fsdp", "ddp") and not torchrun:
        raise ConfigError(f"train.parallel: {cfg.train.parallel} needs a process group; launch with torchrun "
                          "(torchrun --nproc-per-node N -m ibtpo_fast.train ...)")
    if cfg.data.batch_size % world:
        raise ConfigError(f"data.batch_size: {cfg.data.batch_size} trees do not divide over {world} ranks; "
                          f"use a multiple of {world}")
    if cfg.data.batch_size // world < cfg.train.mini_batches:
        raise ConfigError(f"train.mini_batches: {cfg.train.mini_batches} mini-batches need at least as many trees per "
                          f"rank, and {world} ranks get {cfg.data.batch_size // world} each")
    if cfg.train.parallel == "none" and world > 1:
        raise ConfigError(f"train.parallel: none cannot train on {world} ranks (their gradients would never meet); "
                          "use fsdp or ddp")


def to_dict(cfg: Config) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def dump_yaml(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)
