"""Atomic checkpoints: `checkpoints/global_step_N/` plus a `latest` pointer.

A checkpoint is written into a temporary sibling directory and renamed into place once every
file is on disk, then `latest` is replaced atomically; so a crash mid-write leaves only a
temporary directory that `find_latest` never returns. The policy is saved in Hugging Face format,
loadable with `AutoModelForCausalLM.from_pretrained`.
"""
from __future__ import annotations

import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

PREFIX = "global_step_"
STATE_FILE = "trainer_state.pt"  # written last: its presence marks a complete checkpoint
REQUIRED = ("config.json", "model.safetensors", STATE_FILE)


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(
    ckpt_root: Path, step: int, model: torch.nn.Module, tokenizer: Any, state: dict[str, Any],
    config_yaml: str, keep_last: int,
) -> Path:
    """Write global_step_{step} atomically, point `latest` at it, keep the newest `keep_last`."""
    ckpt_root.mkdir(parents=True, exist_ok=True)
    final = ckpt_root / f"{PREFIX}{step}"
    tmp = ckpt_root / f".tmp-{PREFIX}{step}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    (tmp / "config.yaml").write_text(config_yaml)
    torch.save({**state, "global_step": step, "rng": rng_state()}, tmp / STATE_FILE)
    _fsync_dir(tmp)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    pointer = ckpt_root / ".latest.tmp"
    pointer.write_text(final.name)
    os.replace(pointer, ckpt_root / "latest")
    _fsync_dir(ckpt_root)
    _prune(ckpt_root, keep_last)
    return final


def is_complete(path: Path) -> bool:
    return path.is_dir() and path.name.startswith(PREFIX) and all((path / f).is_file() for f in REQUIRED)


def _step_of(path: Path) -> int:
    try:
        return int(path.name[len(PREFIX):])
    except ValueError:
        return -1


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
    return torch.load(path / STATE_FILE, map_location="cpu", weights_only=False)


def _prune(ckpt_root: Path, keep_last: int) -> None:
    for old in list_checkpoints(ckpt_root)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    for tmp in ckpt_root.glob(f".tmp-{PREFIX}*"):
        if not tmp.name.endswith(f"-{os.getpid()}"):
            shutil.rmtree(tmp, ignore_errors=True)  # left by a crashed writer
