"""The rollout engine contract, shaped like SGLang's offline Engine so both fit it.

A request is prefix token ids + sampling params + stop rules + a token limit; branching is just
re-submitting prompt + path token ids, and the engine finds the shared prefix itself.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import numpy as np


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1  # -1: whole vocabulary
    seed: int | None = None  # per-request seed: the same seed gives the same tokens

    def __post_init__(self) -> None:
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k == 0 or self.top_k < -1:
            raise ValueError(f"top_k must be -1 (off) or >= 1, got {self.top_k}")


@dataclass(frozen=True)
class Request:
    prefix_ids: Sequence[int]
    max_new_tokens: int
    sampling: SamplingParams = field(default_factory=SamplingParams)
    stop_token_ids: Sequence[int] = ()  # e.g. EOS ids; the stop token is kept in the output
    stop_strings: Sequence[str] = ()  # the completion ends on the token that completes one

    def __post_init__(self) -> None:
        if len(self.prefix_ids) == 0:
            raise ValueError("prefix_ids is empty: a request needs at least one prompt token")
        if self.max_new_tokens <= 0:
            raise ValueError(f"max_new_tokens must be > 0, got {self.max_new_tokens}")


@dataclass
class Completion:
    token_ids: np.ndarray  # [n] int64, new tokens only
    # [n] float32: log_softmax(logits / temperature) at the sampled token, over the full vocabulary
    # (top-k / top-p truncation is not renormalised in), which is what the trainer recomputes.
    logprobs: np.ndarray
    entropies: np.ndarray | None  # [n] float32, entropy of softmax(logits / temperature), when known
    finish_reason: str  # "stop" (stop token or string) or "length"
    cached_tokens: int  # prefix tokens served from the prefix cache


@runtime_checkable
class Engine(Protocol):
    """Streaming: `submit` queues requests at any time (they join the running batch between decode steps)
    and `poll` returns (handle, completion) pairs as requests finish. `generate` is the simple form."""

    def submit(self, requests: Sequence[Request]) -> list[int]: ...

    def poll(self) -> list[tuple[int, Completion]]: ...

    @property
    def in_flight(self) -> int: ...

    def generate(self, requests: Sequence[Request]) -> list[Completion]: ...

    def update_weights(self, named_tensors: Mapping[str, Any] | None = None) -> None: ...

    def flush_cache(self) -> None: ...

    # True when the engine generates with the trained model's own parameters (no copy to update).
    weights_shared: bool

    def release_memory(self) -> None: ...  # before a training update: give the device memory to training

    def resume_memory(self) -> None: ...  # after it: take the memory back (then send the new weights)


def context_limit(prefix_len: int, max_new_tokens: int, context: int, index: int = 0) -> int:
    """The new tokens request `index` may generate in a `context`-token window: prefix and completion fit it
    together, the rule SGLang enforces, so every engine accepts the same requests and stops at the same
    length. A prefix that leaves no room for one token is refused."""
    if prefix_len >= context:
        raise ValueError(f"request {index}: prefix of {prefix_len} tokens leaves no room in the model's context of {context}")
    return min(max_new_tokens, context - prefix_len)


def generate_by_polling(engine: Engine, requests: Sequence[Request]) -> list[Completion]:
    """`generate` on top of `submit` and `poll`: every completion, in request order. Other requests must
    not be in flight, since their completions would have nowhere to go."""
    if engine.in_flight:
        raise RuntimeError(f"generate() with {engine.in_flight} streamed requests in flight; poll them first")
    slot = {handle: i for i, handle in enumerate(engine.submit(requests))}
    out: list[Completion | None] = [None] * len(requests)
    remaining = len(requests)
    while remaining:
        finished = engine.poll()
        if not finished:
            raise RuntimeError("the engine stopped with requests unfinished")
        for handle, completion in finished:
            out[slot[handle]] = completion
        remaining -= len(finished)
    return out  # type: ignore[return-value]
