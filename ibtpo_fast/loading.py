"""What a run loads before it samples: the policy and its tokenizer, the task's rows and its grader,
and the rollout engine.

Training and `python -m ibtpo_fast.evaluate` both load through here, so they agree on the model's
stop tokens, on which grader a task uses, on how many processes score rewards and on the engine.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from ibtpo_fast.data import PromptRow, load_files
from ibtpo_fast.errors import CheckpointError, MissingExtraError
from ibtpo_fast.rewards import RewardFn, RewardScorer, default_math_reward, load_reward_fn

TASKS = ("arithmetic", "arithmetic_hard", "carries", "word_problems", "file")  # a bundled task, or jsonl / parquet files
ENGINES = ("torch", "sglang")
DTYPES = ("float32", "bfloat16", "float16")
BUNDLED_TRAIN_ROWS = 4096
FILE_MAX_NEW_TOKENS = 256  # a file task's response length unless rollout.max_new_tokens says otherwise


@dataclass
class Task:
    train: list[PromptRow]
    val: list[PromptRow]
    reward_fn: RewardFn
    # Worker processes scoring rewards; 0 scores inline. The bundled grader is trusted and cheap; any
    # other (a user's function, the math grader) runs in processes with a per-item timeout.
    reward_workers: int

    def scorer(self, timeout_s: float) -> RewardScorer:
        return RewardScorer(self.reward_fn, timeout_s=timeout_s, workers=self.reward_workers)


def load_task(task: str, *, train_files: str = "", val_files: str = "", val_size: int, reward_fn: str = "",
              reward_workers: int = 2) -> Task:
    """The rows and the grader of `task`: a bundled task, or jsonl / parquet files (`file`).
    `reward_fn` ("module:function" or "file.py:function") replaces the task's grader."""
    if task not in TASKS:
        raise ValueError(f"task must be one of {', '.join(TASKS)}, got {task!r}")
    if task != "file":
        from ibtpo_fast.tasks import BUNDLED

        own = BUNDLED[task]
        train, val, bundled = own.prompt_rows("train", BUNDLED_TRAIN_ROWS), own.prompt_rows("test", val_size), own.compute_score
    else:
        train = load_files(train_files) if train_files else []
        val = load_files(val_files)[:val_size] if val_files else []
        bundled = None
    if reward_fn:
        return Task(train, val, load_reward_fn(reward_fn), reward_workers)
    if bundled is not None:
        return Task(train, val, bundled, 0)
    return Task(train, val, default_math_reward(), reward_workers)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def default_max_new_tokens(task: str) -> int:
    """A task's response length: a bundled task's longest solution, with room to spare."""
    from ibtpo_fast.tasks import BUNDLED

    return BUNDLED[task].max_new_tokens if task in BUNDLED else FILE_MAX_NEW_TOKENS


def model_dir(path: str, task: str = "arithmetic") -> Path:
    """The checkpoint directory (or GGUF file) `path`; empty: the bundled model of `task` (the default task's for
    files)."""
    if path:
        return Path(path)
    from ibtpo_fast.tasks import BUNDLED

    return BUNDLED.get(task, BUNDLED["arithmetic"]).model_path


def _folder(path: str, task: str) -> tuple[Path, Path, dict[str, str]]:
    """(what `path` names, the folder to load from, the GGUF file argument): a .gguf file loads through its
    folder (transformers de-quantises it; needs `gguf`)."""
    where = model_dir(path, task)
    return (where, where.parent, {"gguf_file": where.name}) if where.suffix == ".gguf" else (where, where, {})


def load_tokenizer(path: str, trust_remote_code: bool = False, task: str = "arithmetic") -> Any:
    """The tokenizer of the checkpoint `load_policy` would load."""
    where, folder, gguf = _folder(path, task)
    try:
        return AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code, **gguf)
    except OSError as e:
        raise CheckpointError(f"cannot load a tokenizer from {str(where)!r}: {e}") from e


def load_policy(path: str, device: torch.device, dtype: str = "float32", attn_implementation: str = "sdpa",
                trust_remote_code: bool = False, task: str = "arithmetic") -> tuple[torch.nn.Module, Any]:
    """A causal LM and its tokenizer from a Hugging Face checkpoint directory (empty: `task`'s bundled tiny
    model). `trust_remote_code` lets the directory's own Python code run; off, only transformers' classes load."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    where, folder, gguf = _folder(path, task)
    try:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=getattr(torch, dtype),
                                                     attn_implementation=attn_implementation,
                                                     trust_remote_code=trust_remote_code, **gguf)
        tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code, **gguf)
    except OSError as e:  # no such directory, or one without weights, config or tokenizer
        raise CheckpointError(f"cannot load a model and tokenizer from {str(where)!r}: {e}") from e
    return model.to(device), tokenizer


def stop_token_ids(model: torch.nn.Module, tokenizer: Any) -> tuple[int, ...]:
    """The tokenizer's EOS and every EOS of the model's generation config (chat models end turns on their own)."""
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if eos is not None:
        ids |= set(eos if isinstance(eos, list) else [eos])
    return tuple(sorted(ids))


def _cuda() -> bool:
    return torch.cuda.is_available()


def check_engine(name: str) -> None:
    """Fail before any work when engine `name` cannot run here, naming what to install."""
    if name not in ENGINES:
        raise ValueError(f"engine must be one of {', '.join(ENGINES)}, got {name!r}")
    if name == "sglang":
        import importlib.util

        if importlib.util.find_spec("sglang") is None:
            raise MissingExtraError("rollout.engine=sglang needs SGLang: pip install 'ibtpo_fast[sglang]' on a CUDA "
                                    "machine (or rollout.engine=torch)")
        if not _cuda():
            raise MissingExtraError("rollout.engine=sglang runs on CUDA only and this machine has no GPU; use "
                                    "rollout.engine=torch")


def build_engine(name: str, model: torch.nn.Module, tokenizer: Any, *, model_path: Path, dtype: str = "float32",
                 seed: int = 0, local_rank: int = 0, max_cache_tokens: int = 1_000_000, sglang: Any = None) -> Any:
    """The rollout engine `name` for `model`: a TorchEngine on the model itself, or an SGLangEngine that loads
    `model_path` onto this rank's GPU (`sglang`: the run's rollout.sglang settings)."""
    check_engine(name)
    if name == "torch":
        from ibtpo_fast.engines.torch_engine import TorchEngine

        return TorchEngine(model, tokenizer=tokenizer, max_cache_tokens=max_cache_tokens)
    import yaml

    from ibtpo_fast.engines.sglang_engine import SGLangEngine

    args = {"mem_fraction_static": sglang.mem_fraction_static, "enable_memory_saver": True, "dtype": dtype,
            "random_seed": seed, "base_gpu_id": local_rank, "port": 30000 + 100 * local_rank,
            "enable_deterministic_inference": sglang.deterministic,
            **yaml.safe_load(sglang.engine_args or "{}")}
    return SGLangEngine(str(model_path), weight_bucket_bytes=sglang.weight_bucket_mb << 20, **args)
