"""Rollouts through SGLang's offline `sglang.Engine` (CUDA only; `pip install ibtpo_fast[sglang]`).

SGLang keeps its own copy of the weights and its own radix prefix cache; this adapter maps the engine contract
onto the pinned release's API and protocol (both read from its source into sglang_api.json): weights are sent
inside one weight-update session, every answer's success flag is checked, requests are clipped to the context
by the rule TorchEngine uses, and shutdown stops SGLang's own processes only. Two behaviours differ from
TorchEngine: SGLang also stops at the checkpoint's EOS tokens, and it reads `sampling_seed` only when started
with enable_deterministic_inference (without it its rollouts are not seed-reproducible, and the adapter warns).
Log-probs are SGLang's default, log_softmax(logits / temperature) over the full vocabulary (leave
SGLANG_RETURN_ORIGINAL_LOGPROB unset).
"""
from __future__ import annotations

import asyncio
import atexit
import logging
import os
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import replace
from typing import Any

import numpy as np

from ibtpo_fast.engines.protocol import Completion, Request, context_limit
from ibtpo_fast.errors import ConfigError, EngineError, MissingExtraError

logger = logging.getLogger(__name__)
NamedTensors = Mapping[str, Any] | Iterable[tuple[str, Any]]
SGLANG_VERSION = "0.5.23"  # the `sglang` extra's pin; sglang_api.json records this release's API
_INSTALL_HINT = "SGLangEngine needs SGLang: pip install ibtpo_fast[sglang] (on a CUDA machine)"
# The release's DETERMINISTIC_ATTENTION_BACKEND_CHOICES (the tests compare it with sglang_api.json).
DETERMINISTIC_ATTENTION_BACKENDS = ("ascend", "fa3", "fa4", "flashinfer", "intel_xpu", "triton")
# fp32 runs on SGLang's generic kernels only: fa3, fa4, flashinfer and the trtllm kernels take fp16 / bf16.
FP32_ATTENTION_BACKENDS = ("triton", "torch_native")
_BACKEND_KEYS = ("attention_backend", "prefill_attention_backend", "decode_attention_backend")
NOT_REPRODUCIBLE = ("SGLang rollouts are not seed-reproducible: without enable_deterministic_inference SGLang ignores "
                    "each request's sampling_seed (rollout.sglang.deterministic=true turns it on)")


class SGLangEngine:
    def __init__(self, model_path: str, *, weight_bucket_bytes: int = 1 << 30, **engine_kwargs: Any) -> None:
        """Start `sglang.Engine(model_path=..., **engine_kwargs)` in a combination the release runs
        (`supported_engine_args`). Weight updates are sent in buckets of at most `weight_bucket_bytes` (one
        tensor larger than that goes alone)."""
        try:
            import sglang
        except ImportError as error:
            raise MissingExtraError(_INSTALL_HINT) from error
        engine_kwargs = supported_engine_args(engine_kwargs)
        if not engine_kwargs.get("enable_deterministic_inference"):
            logger.warning(NOT_REPRODUCIBLE)
        self.engine = sglang.Engine(model_path=model_path, **engine_kwargs)
        # The release shuts itself down at exit, killing every child of this process: this shutdown replaces it.
        atexit.unregister(self.engine.shutdown)
        atexit.register(self.shutdown)
        self._closed = False
        self.context = int(self.engine.tokenizer_manager.context_len)
        self.weight_bucket_bytes = weight_bucket_bytes
        self._tasks: dict[int, asyncio.Task] = {}  # handle -> async_generate task on the engine's loop
        self._next_handle = 0

    def submit(self, requests: Sequence[Request]) -> list[int]:
        """One `async_generate` task a request, on the engine's own event loop: SGLang's scheduler batches
        the requests in flight by itself. They are sent when `poll` next runs the loop."""
        requests = self._clipped(requests)
        handles = list(range(self._next_handle, self._next_handle + len(requests)))
        self._next_handle += len(requests)
        for handle, request in zip(handles, requests):
            self._tasks[handle] = self.engine.loop.create_task(self.engine.async_generate(
                input_ids=[int(t) for t in request.prefix_ids], sampling_params=sampling_params(request),
                return_logprob=True))
        return handles

    def poll(self) -> list[tuple[int, Completion]]:
        """Run the engine's loop until at least one request finishes; the (handle, completion) pairs that did.
        A failed request cancels every other in flight and raises: nothing is left running in SGLang."""
        if not self._tasks:
            return []
        self.engine.loop.run_until_complete(asyncio.wait(self._tasks.values(), return_when=asyncio.FIRST_COMPLETED))
        done = {h: self._tasks.pop(h) for h, task in list(self._tasks.items()) if task.done()}
        try:
            return [(h, to_completion(task.result(), h)) for h, task in done.items()]
        except BaseException:
            self._cancel_in_flight()
            raise

    @property
    def in_flight(self) -> int:
        return len(self._tasks)

    def generate(self, requests: Sequence[Request]) -> list[Completion]:
        """One batched `generate` call, the offline engine's own simple form."""
        if self._tasks:
            raise RuntimeError(f"generate() with {len(self._tasks)} streamed requests in flight; poll them first")
        if not requests:
            return []
        requests = self._clipped(requests)
        outputs = self.engine.generate(
            input_ids=[[int(t) for t in r.prefix_ids] for r in requests],
            sampling_params=[sampling_params(r) for r in requests],
            return_logprob=True,
        )
        return [to_completion(output, i) for i, output in enumerate(outputs)]

    def update_weights(self, named_tensors: NamedTensors | None = None) -> None:
        """Send `named_tensors` bucket by bucket inside one weight-update session (the release refuses tensors
        outside one), then flush the prefix cache once. A refusal raises EngineError naming the call."""
        if named_tensors is not None:
            self._send(named_tensors.items() if isinstance(named_tensors, Mapping) else named_tensors)
        self.flush_cache()

    def _send(self, items: Iterable[tuple[str, Any]]) -> None:
        _check("begin_weight_update", self.engine.begin_weight_update())
        try:
            for i, bucket in enumerate(_buckets(items, self.weight_bucket_bytes), 1):
                _check(f"update_weights_from_tensor (bucket {i})",
                       self.engine.update_weights_from_tensor(named_tensors=bucket, flush_cache=False))
        except BaseException:
            self.engine.end_weight_update()  # the session closes on error too; the failure above is the one reported
            raise
        _check("end_weight_update", self.engine.end_weight_update())

    # SGLang holds its own copy of the weights: each update must be sent (update_weights with tensors).
    weights_shared = False

    def release_memory(self) -> None:
        """Hand the GPU memory of SGLang's weights and KV cache to training (the engine must have been started
        with enable_memory_saver=True; SGLang asserts it is idle)."""
        if self._tasks:
            raise RuntimeError(f"release_memory with {len(self._tasks)} requests in flight")
        self.engine.release_memory_occupation()

    def resume_memory(self) -> None:
        """Take the memory back after the update; the weights must then be sent again."""
        self.engine.resume_memory_occupation()

    def flush_cache(self) -> None:
        """Drop SGLang's prefix cache (it refuses while requests run, answering success=False)."""
        if self._tasks:
            raise RuntimeError(f"flush_cache with {len(self._tasks)} requests in flight")
        _check("flush_cache", self.engine.flush_cache())

    def shutdown(self) -> None:
        """Stop SGLang's processes and leave this process's others (the trainer's reward workers) running: the
        release's shutdown kills every child of this process, so its kill is narrowed to the engine's own."""
        if self._closed:
            return
        self._closed = True
        module = sys.modules[type(self.engine).shutdown.__module__]  # where the release defines it
        kill_tree = module.kill_process_tree
        own = list(self.engine.get_all_child_pids())

        def kill_own(parent_pid: int, include_parent: bool = True, **kwargs: Any) -> None:
            if parent_pid != os.getpid() or include_parent:
                return kill_tree(parent_pid, include_parent=include_parent, **kwargs)
            for pid in own:
                kill_tree(pid, include_parent=True, **kwargs)

        module.kill_process_tree = kill_own
        try:
            self.engine.shutdown()
        finally:
            module.kill_process_tree = kill_tree

    def _clipped(self, requests: Sequence[Request]) -> list[Request]:
        return [replace(r, max_new_tokens=context_limit(len(r.prefix_ids), r.max_new_tokens, self.context, i))
                for i, r in enumerate(requests)]

    def _cancel_in_flight(self) -> None:
        """Cancel the requests still in flight here and abort them in SGLang's scheduler, which would otherwise
        run them on (and refuse to release memory or flush the cache while it does)."""
        tasks = list(self._tasks.values())
        self._tasks.clear()
        if not tasks:
            return
        for task in tasks:
            task.cancel()
        self.engine.loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
        self.engine.tokenizer_manager.abort_request(abort_all=True)


def supported_engine_args(args: Mapping[str, Any]) -> dict[str, Any]:
    """`args` in a combination the pinned release runs. float32 needs an fp32 attention backend: triton when
    none is named (logged), a half-precision one refused; deterministic inference needs one of its backends.
    A refused combination raises ConfigError naming the way out."""
    args = dict(args)
    if str(args.get("dtype", "auto")).lower() in ("float32", "float"):  # "auto" never picks fp32
        half_only = [f"{k}={args[k]}" for k in _BACKEND_KEYS if args.get(k) and args[k] not in FP32_ATTENTION_BACKENDS]
        if half_only:
            raise ConfigError(f"SGLang with dtype float32: {', '.join(half_only)} takes fp16 / bf16 only; use model.dtype="
                              f"bfloat16, or attention_backend {' or '.join(FP32_ATTENTION_BACKENDS)}")
        if not args.get("attention_backend"):
            args["attention_backend"] = "triton"
            logger.warning("SGLang with dtype float32: attention_backend=triton (SGLang's default backend on a recent "
                           "GPU takes fp16 / bf16 only)")
    backend = args.get("attention_backend")
    if args.get("enable_deterministic_inference") and backend and backend not in DETERMINISTIC_ATTENTION_BACKENDS:
        raise ConfigError(f"SGLang's deterministic inference (rollout.sglang.deterministic) runs on the attention backends "
                          f"{', '.join(DETERMINISTIC_ATTENTION_BACKENDS)}, not {backend}; pick one of them, or set "
                          "rollout.sglang.deterministic=false (rollouts then are not seed-reproducible)")
    return args


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


def _check(call: str, answer: Any) -> None:
    """The pinned release answers the session calls with (success, message) and flush_cache with an object
    holding success and message; anything else is no answer to trust."""
    if isinstance(answer, tuple) and len(answer) == 2:
        ok, message = answer
    elif hasattr(answer, "success"):
        ok, message = answer.success, getattr(answer, "message", "")
    else:
        raise EngineError(f"SGLang {call}: unexpected answer {answer!r}")
    if not ok:
        raise EngineError(f"SGLang refused {call}: {message}")
