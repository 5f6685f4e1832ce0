"""Rollout engines: TorchEngine (default, CPU or one GPU) and SGLangEngine (optional GPU extra).

The engines load on first use, so importing the protocol stays light (no transformers, no sglang)."""
from importlib import import_module
from typing import Any

from ibtpo_fast.engines.protocol import Completion, Engine, Request, SamplingParams

_LAZY = {
    "RadixCache": "ibtpo_fast.engines.radix_cache",
    "SGLangEngine": "ibtpo_fast.engines.sglang_engine",
    "TorchEngine": "ibtpo_fast.engines.torch_engine",
}

__all__ = ["Completion", "Engine", "Request", "SamplingParams", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
