"""Atomic checkpoints: `checkpoints/global_step_N/` plus a `latest` pointer.

A checkpoint holds the model and optimizer state as `torch.distributed.checkpoint` shards (`dcp/`,
one file per rank that wrote it, loadable at any world size), a consolidated Hugging Face export of
the policy (`config.json`, `model.safetensors`, the tokenizer: `from_pretrained` loads it) and the
trainer state. Every rank writes its shards into one temporary sibling directory; rank 0 writes the
rest, then renames the directory into place and replaces `latest` atomically. So a crash mid-write,
on any rank, leaves only a temporary directory that `find_latest` never returns, and a write that
fails (no space left, no permission) removes what it wrote and raises CheckpointError, the previous
checkpoint and `latest` untouched. The trainer state holds only tensors and plain Python values, so
it loads with `torch.load(weights_only=True)`, which cannot run code.

Every checkpoint lists its files' sizes and SHA-256 digests in `manifest.json` (the ranks hash a
share of the files each); `verify_checkpoint` checks them, so that a file cut short or damaged after
the write is named before anything loads it. A run holds a lock on its run directory
(`lock_run_dir`) for its whole life, so a second run there refuses to start.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
import pickle
import random
import shutil
import socket
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from safetensors import SafetensorError
from torch.distributed.checkpoint import CheckpointException
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)

from ibtpo_fast.distributed import SINGLE, World
from ibtpo_fast.errors import CheckpointError, ConfigError
from ibtpo_fast.policy import causal_lm_of

PREFIX = "global_step_"
SHARDS = "dcp"  # the sharded model and optimizer state
STATE_FILE = "trainer_state.pt"  # written last: its presence marks a complete checkpoint
REQUIRED = ("config.json", "model.safetensors", f"{SHARDS}/.metadata", STATE_FILE)
MANIFEST = "manifest.json"  # {file: {"size", "sha256"}} of every other file
LOCK = ".lock"  # in the run directory: who runs there
# What a failed write raises: OSError from Python and torch, SafetensorError from the model's weights,
# CheckpointException from the sharded writers of any rank.
_WRITE_ERRORS = (OSError, SafetensorError, CheckpointException)


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": _numpy_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()  # this rank's device only: resumable on any number of GPUs
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    n = state["numpy"]
    np.random.set_state((n["name"], np.array(n["keys"], dtype=np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(_device_rng(state["cuda"]))


def _device_rng(saved: torch.Tensor | list[torch.Tensor]) -> torch.Tensor:
    """This rank's device RNG state; checkpoints written before held every visible GPU's, in a list."""
    if isinstance(saved, torch.Tensor):
        return saved
    device = torch.cuda.current_device()
    if device >= len(saved):
        raise CheckpointError(f"the checkpoint holds the RNG states of {len(saved)} GPUs and this process runs on "
                              f"GPU {device}; resume on at most {len(saved)} GPUs a machine, or with run.resume=never")
    return saved[device]


def _numpy_state() -> dict[str, Any]:
    # plain values, not the ndarray np.random.get_state() holds: weights_only loads them without numpy globals
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    return {"name": name, "keys": keys.tolist(), "pos": pos, "has_gauss": has_gauss, "gauss": gauss}


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(
    ckpt_root: Path, step: int, model: torch.nn.Module, tokenizer: Any, state: dict[str, Any],
    config_yaml: str, keep_last: int, *, optimizer: torch.optim.Optimizer | None = None, world: World = SINGLE,
) -> Path:
    """Write global_step_{step} atomically, point `latest` at it, keep the newest `keep_last`. Every rank
    calls it; `model` is the policy as it trains (a causal LM, or one wrapped or sharded for data parallelism)
    and `state` is rank 0's trainer state, to which each rank's RNG state is added.

    A write that fails leaves the previous checkpoints and `latest` as they were, removes its own
    files and raises CheckpointError naming the checkpoint."""
    final = ckpt_root / f"{PREFIX}{step}"
    tmp = ckpt_root / world.gather(f".tmp-{PREFIX}{step}-{os.getpid()}")[0]  # rank 0's name, on every rank
    try:
        if world.is_main:
            ckpt_root.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
        world.barrier()
        with _single_process_is_meant():
            dcp.save(_sharded_state(model, optimizer), checkpoint_id=tmp / SHARDS, no_dist=world.size == 1)
        full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        rngs = world.gather(rng_state())
        if world.is_main:
            _write(tmp, model, full, tokenizer, {**state, "global_step": step, "rng": rngs}, config_yaml)
        world.barrier()
        manifest = _manifest(tmp, world)
        if world.is_main:
            (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
            _fsync_dir(tmp)
            _publish(tmp, final)
    except _WRITE_ERRORS as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointError(f"cannot write checkpoint {final}: {_reason(e)}") from e
    world.barrier()  # no rank goes on until the checkpoint is published
    if world.is_main:
        _prune(ckpt_root, keep_last)
    return final


def load_checkpoint(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None) -> dict[str, Any]:
    """Load checkpoint `path`'s model (and optimizer) shards into `model` at this run's world size, whatever
    the size that wrote them; returns the trainer state."""
    sharded = _sharded_state(model, optimizer)
    try:
        with _single_process_is_meant():
            dcp.load(sharded, checkpoint_id=path / SHARDS, no_dist=not dist.is_initialized())
    except (CheckpointException, RuntimeError, KeyError) as e:  # shards of another model, or torn ones
        raise CheckpointError(f"cannot load {path / SHARDS} into this run's model: {_reason(e)}") from e
    if optimizer is None:
        set_model_state_dict(model, sharded["model"])
    else:
        set_state_dict(model, optimizer, model_state_dict=sharded["model"], optim_state_dict=sharded["optim"])
    return load_state(path)


@contextmanager
def _single_process_is_meant() -> Iterator[None]:
    """Without a process group the sharded writer and reader warn on every call that they assume one process:
    here that is the plan, not a slip."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def _reason(e: BaseException) -> str:
    """One line per failing rank, not the tracebacks a CheckpointException carries."""
    if isinstance(e, CheckpointException):
        return "; ".join(f"rank {rank}: {type(exc).__name__}: {exc}" for rank, (exc, _) in sorted(e.failures.items()))
    return str(e)


def _sharded_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer | None) -> dict[str, Any]:
    if optimizer is None:
        return {"model": get_model_state_dict(model)}
    model_sd, optim_sd = get_state_dict(model, optimizer)
    return {"model": model_sd, "optim": optim_sd}


def _files(path: Path) -> list[str]:
    return sorted(str(f.relative_to(path)) for f in path.rglob("*") if f.is_file() and f.name != MANIFEST)


def _digest(file: Path) -> str:
    with open(file, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _manifest(path: Path, world: World) -> dict[str, dict[str, Any]]:
    """Size and digest of every file in `path`, each rank hashing every size-th file; the whole on every rank."""
    files = world.gather(_files(path) if world.is_main else None)[0]
    mine = {f: {"size": (path / f).stat().st_size, "sha256": _digest(path / f)} for f in files[world.rank::world.size]}
    return {f: entry for part in world.gather(mine) for f, entry in part.items()}


def verify_checkpoint(path: Path, world: World = SINGLE, shards: bool = True) -> None:
    """Check checkpoint `path`'s files against its manifest (split over the ranks; `shards=False` skips the
    sharded training state, which an evaluation never reads); raise CheckpointError naming the first bad
    file. A directory without a manifest (a plain Hugging Face checkpoint) has nothing to check."""
    if not (path / MANIFEST).is_file():
        return
    try:
        want = json.loads((path / MANIFEST).read_text())
    except ValueError as e:
        raise CheckpointError(f"checkpoint {path} is corrupt: {MANIFEST} is not JSON ({e})") from None
    files = [f for f in sorted(want) if shards or not f.startswith(f"{SHARDS}/")]
    problems = [_problem(path, f, want[f]) for f in files[world.rank::world.size]]
    found = sorted(p for part in world.gather([p for p in problems if p]) for p in part)
    if found:
        raise CheckpointError(f"checkpoint {path} is corrupt: {found[0]}")


def _problem(path: Path, name: str, want: dict[str, Any]) -> str:
    file = path / name
    if not file.is_file():
        return f"{name} is missing"
    size = file.stat().st_size
    if size != want["size"]:
        return f"{name} has {size} bytes, its manifest says {want['size']}"
    if _digest(file) != want["sha256"]:
        return f"{name} does not match its manifest's SHA-256"
    return ""


def lock_run_dir(run_dir: Path) -> IO[str]:
    """Hold an exclusive lock on `run_dir` while the returned file stays open (the process's end releases it);
    if another run holds it, raise ConfigError naming that run."""
    run_dir.mkdir(parents=True, exist_ok=True)
    f = open(run_dir / LOCK, "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = f.read().strip() or "another process"
        f.close()
        raise ConfigError(f"run.name: the run directory {run_dir} is in use by {holder}; wait for that run to end "
                          "or choose another run.name") from None
    f.seek(0)
    f.truncate()
    f.write(f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
    f.flush()
    return f


def _write(tmp: Path, model: torch.nn.Module, full: dict[str, torch.Tensor], tokenizer: Any, state: dict[str, Any],
           config_yaml: str) -> None:
    lm, prefix = causal_lm_of(model)
    # Tied parameters once, as their owner names them: gathered shards no longer share storage, which is how
    # save_pretrained would otherwise tell them apart, so the export is the same at any world size.
    own = {n for n, _ in lm.named_parameters()} | {n for n, _ in lm.named_buffers()}
    state_dict = {k[len(prefix):]: v for k, v in full.items() if k[len(prefix):] in own}
    lm.save_pretrained(tmp, state_dict=state_dict, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    (tmp / "config.yaml").write_text(config_yaml)
    torch.save(state, tmp / STATE_FILE)
    _fsync_dir(tmp)


def _publish(tmp: Path, final: Path) -> None:
    """Rename `tmp` to `final` and point `latest` at it; if that fails, `final` is gone and `latest` unchanged."""
    root = final.parent
    pointer = root / ".latest.tmp"
    try:
        pointer.write_text(final.name)  # before the rename: a full disk fails here, with nothing published
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        try:
            os.replace(pointer, root / "latest")
        except OSError:
            shutil.rmtree(final, ignore_errors=True)  # renamed but never pointed at: take it back
            raise
    finally:
        pointer.unlink(missing_ok=True)
    _fsync_dir(root)


def is_complete(path: Path) -> bool:
    return path.is_dir() and path.name.startswith(PREFIX) and all((path / f).is_file() for f in REQUIRED)


def _step_of(path: Path) -> int:
    try:
        return int(path.name[len(PREFIX):])
    except ValueError:
        return -1


def checkpoints_newest_first(ckpt_root: Path) -> list[Path]:
    """Complete checkpoints to resume from, in the order to try them: `latest`, then the others, newest first."""
    latest = find_latest(ckpt_root)
    return [latest] + [p for p in reversed(list_checkpoints(ckpt_root)) if p != latest] if latest else []


def list_checkpoints(ckpt_root: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    if not ckpt_root.is_dir():
        return []
    found = [p for p in ckpt_root.iterdir() if is_complete(p) and _step_of(p) >= 0]
    return sorted(found, key=_step_of)


def find_latest(ckpt_root: Path) -> Path | None:
    """The `latest` checkpoint if complete, else the newest complete one, else None."""
    pointer = ckpt_root / "latest"
    if pointer.is_file():
        target = ckpt_root / pointer.read_text().strip()
        if is_complete(target):
            return target
    found = list_checkpoints(ckpt_root)
    return found[-1] if found else None


def load_state(path: Path) -> dict[str, Any]:
    """The trainer state of checkpoint `path`. Loaded with weights_only, so a file holding anything but
    tensors and plain Python values (one crafted to run code when unpickled) is refused, not run."""
    file = path / STATE_FILE
    try:
        return torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        found = [ln.strip() for ln in str(e).splitlines() if "GLOBAL" in ln]
        raise CheckpointError(f"refusing to load {file}: it holds more than tensors and plain Python values, "
                              f"so loading it could run code ({found[0] if found else e})") from e


def _prune(ckpt_root: Path, keep_last: int) -> None:
    for old in list_checkpoints(ckpt_root)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    for tmp in ckpt_root.glob(f".tmp-{PREFIX}*"):
        if not tmp.name.endswith(f"-{os.getpid()}"):
            shutil.rmtree(tmp, ignore_errors=True)  # left by a crashed writer
