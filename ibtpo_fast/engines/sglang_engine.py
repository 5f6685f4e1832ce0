"""Rollouts through SGLang's offline `sglang.Engine` (CUDA only; `pip install ibtpo_fast[sglang]`).

SGLang keeps its own copy of the weights and its own radix prefix cache; this adapter only maps the
engine contract onto its API. Two behaviours differ from TorchEngine: SGLang also stops at the
checkpoint's EOS tokens, and a seed is honoured only by SGLang versions with `sampling_seed`.
Log-probs are SGLang's default, log_softmax(logits / temperature) over the full vocabulary (leave
SGLANG_RETURN_ORIGINAL_LOGPROB unset).
"""
from __future__ import annotations

import asyncio
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from ibtpo_fast.engines.protocol import Completion, Request
from ibtpo_fast.errors import MissingExtraError

NamedTensors = Mapping[str, Any] | Iterable[tuple[str, Any]]
SGLANG_VERSION = "0.5.23"  # the `sglang` extra's pin; sglang_api.json records this release's API
_INSTALL_HINT = "SGLangEngine needs SGLang: pip install ibtpo_fast[sglang] (on a CUDA machine)"


class SGLangEngine:
    def __init__(self, model_path: str, *, weight_bucket_bytes: int = 1 << 30, **engine_kwargs: Any) -> None:
        """Start `sglang.Engine(model_path=..., **engine_kwargs)`. Weight updates are sent in buckets
        of at most `weight_bucket_bytes` (one tensor larger than that goes alone)."""
        try:
            import sglang
        except ImportError as error:
            raise MissingExtraError(_INSTALL_HINT) from error
        self.engine = sglang.Engine(model_path=model_path, **engine_kwargs)
        self.weight_bucket_bytes = weight_bucket_bytes
        self._tasks: dict[int, asyncio.Task] = {}  # handle -> async_generate task on the engine's loop
        self._next_handle = 0

    def submit(self, requests: Sequence[Request]) -> list[int]:
        """One `async_generate` task a request, on the engine's own event loop: SGLang's scheduler batches
        the requests in flight by itself. They are sent when `poll` next runs the loop."""
        handles = list(range(self._next_handle, self._next_handle + len(requests)))
        self._next_handle += len(requests)
        for handle, request in zip(handles, requests):
            self._tasks[handle] = self.engine.loop.create_task(self.engine.async_generate(
                input_ids=[int(t) for t in request.prefix_ids], sampling_params=sampling_params(request),
                return_logprob=True))
        return handles

    def poll(self) -> list[tuple[int, Completion]]:
        """Run the engine's loop until at least one request finishes; the (handle, completion) pairs that did."""
        if not self._tasks:
            return []
        self.engine.loop.run_until_complete(asyncio.wait(self._tasks.values(), return_when=asyncio.FIRST_COMPLETED))
        done = [h for h, task in self._tasks.items() if task.done()]
        return [(h, to_completion(self._tasks.pop(h).result(), h)) for h in done]

    @property
    def in_flight(self) -> int:
        return len(self._tasks)

    def generate(self, requests: Sequence[Request]) -> list[Completion]:
        """One batched `generate` call, the offline engine's own simple form."""
        if self._tasks:
            raise RuntimeError(f"generate() with {len(self._tasks)} streamed requests in flight; poll them first")
        if not requests:
            return []
        outputs = self.engine.generate(
            input_ids=[[int(t) for t in r.prefix_ids] for r in requests],
            sampling_params=[sampling_params(r) for r in requests],
            return_logprob=True,
        )
        return [to_completion(output, i) for i, output in enumerate(outputs)]

    def update_weights(self, named_tensors: NamedTensors | None = None) -> None:
        """Send `named_tensors` to SGLang bucket by bucket, then flush its prefix cache once."""
        if named_tensors is not None:
            items = named_tensors.items() if isinstance(named_tensors, Mapping) else named_tensors
            for bucket in _buckets(items, self.weight_bucket_bytes):
                _check(self.engine.update_weights_from_tensor(named_tensors=bucket, flush_cache=False))
        self.flush_cache()

    # SGLang holds its own copy of the weights: each update must be sent (update_weights with tensors).
    weights_shared = False

    def release_memory(self) -> None:
        """Hand the GPU memory of SGLang's weights and KV cache to training (the engine must have been started
        with enable_memory_saver=True)."""
        if self._tasks:
            raise RuntimeError(f"release_memory with {len(self._tasks)} requests in flight")
        self.engine.release_memory_occupation()

    def resume_memory(self) -> None:
        """Take the memory back after the update; the weights must then be sent again."""
        self.engine.resume_memory_occupation()

    def flush_cache(self) -> None:
        if self._tasks:
            raise RuntimeError(f"flush_cache with {len(self._tasks)} requests in flight")
        self.engine.flush_cache()

    def shutdown(self) -> None:
        self.engine.shutdown()


def sampling_params(request: Request) -> dict[str, Any]:
    """Every parameter explicit: SGLang would otherwise take defaults from the checkpoint's
    generation config (e.g. its top_k / repetition_penalty)."""
    s = request.sampling
    params = {
        "temperature": s.temperature,
        "top_p": s.top_p,
        "top_k": s.top_k,
        "min_p": 0.0,
        "max_new_tokens": request.max_new_tokens,
        "min_new_tokens": 0,
        "stop_token_ids": [int(t) for t in request.stop_token_ids],
        "stop": list(request.stop_strings),
        "ignore_eos": False,  # True would also ignore stop_token_ids
        "no_stop_trim": True,  # keep the stop token / string, as TorchEngine does
        "repetition_penalty": 1.0,
        "frequency_penalty": 0.0,
        "presence_penalty": 0.0,
        "n": 1,
    }
    if s.seed is not None:
        params["sampling_seed"] = s.seed
    return params


def to_completion(output: Mapping[str, Any], index: int = 0) -> Completion:
    """One `sglang.Engine.generate` output -> Completion."""
    meta = output["meta_info"]
    logprobs = meta["output_token_logprobs"]  # [(logprob, token_id, text or None), ...]
    reason = meta["finish_reason"]
    reason = reason.get("type") if isinstance(reason, Mapping) else reason
    if reason not in ("stop", "length"):
        raise RuntimeError(f"SGLang did not finish request {index}: {meta['finish_reason']}")
    return Completion(
        token_ids=np.asarray([int(item[1]) for item in logprobs], dtype=np.int64),
        logprobs=np.asarray([item[0] for item in logprobs], dtype=np.float32),
        entropies=None,
        finish_reason=reason,
        cached_tokens=int(meta.get("cached_tokens", 0)),
    )


def _buckets(items: Iterable[tuple[str, Any]], max_bytes: int) -> Iterable[list[tuple[str, Any]]]:
    bucket, size = [], 0
    for name, tensor in items:
        nbytes = tensor.numel() * tensor.element_size()
        if bucket and size + nbytes > max_bytes:
            yield bucket
            bucket, size = [], 0
        bucket.append((name, tensor))
        size += nbytes
    if bucket:
        yield bucket


def _check(result: Any) -> None:
    """SGLang answers weight updates with (success, message) (or a dict in some versions)."""
    if isinstance(result, Mapping):
        ok, message = result.get("success", True), result.get("message", "")
    elif isinstance(result, tuple) and result:
        ok, message = result[0], result[1] if len(result) > 1 else ""
    else:
        return
    if not ok:
        raise RuntimeError(f"SGLang weight update failed: {message}")
