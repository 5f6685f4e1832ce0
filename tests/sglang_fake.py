"""A stand-in for the pinned `sglang.Engine` that holds to the release's protocol, each rule read from its source
into ibtpo_fast/engines/sglang_api.json ("protocol"; tests/test_sglang_rollouts.py checks the facts used here):
- update_weights_from_tensor answers (False, the release's message) outside begin_weight_update() /
  end_weight_update(), and those refuse a second open or a close without one;
- release_memory_occupation asserts that no request runs; flush_cache answers success=False while one does;
- sampling_seed is read only when the engine was started with enable_deterministic_inference;
- a prompt that fills the context, or with max_new_tokens past it, raises ValueError before it is scheduled;
- a request cancelled on the caller's loop runs on in the scheduler until abort_request stops it;
- shutdown kills every child process of the caller (the release's kill_process_tree(os.getpid(), ...));
- answers come in the release's shapes: {"output_ids", "meta_info"} with (logprob, token_id, None) log-probs.
It also refuses what would go wrong on a GPU: generating while its memory is released, inside a weight-update
session, with weights not sent since the memory came back, or from a cache older than the last update.
Subclasses give `_sample` (and `_load`, to take the weights sent)."""
from __future__ import annotations

import asyncio
import atexit
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from typing import Any

import psutil

from ibtpo_fast.engines.sglang_api import API_FILE

PROTOCOL = json.loads(API_FILE.read_text())["protocol"]
NOT_FLUSHED = "Cache not flushed because there are pending requests."


def kill_process_tree(parent_pid: int, include_parent: bool = True, skip_pid: int | None = None,
                      wait_timeout: float | None = 60) -> None:
    """The release's: kill every descendant of `parent_pid` (and it, with include_parent) and wait for them."""
    try:
        parent = psutil.Process(parent_pid)
        victims = [p for p in parent.children(recursive=True) if p.pid != skip_pid]
    except psutil.NoSuchProcess:
        return
    victims += [parent] if include_parent else []
    for p in victims:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(victims, timeout=wait_timeout)


@dataclass
class FlushCacheReqOutput:
    success: bool
    message: str = ""


class TokenizerManager:
    def __init__(self, engine: StrictEngine, context_len: int) -> None:
        self.engine, self.context_len = engine, context_len

    def abort_request(self, rid: str = "", abort_all: bool = False) -> None:
        self.engine.calls.append(("abort_request", {"rid": rid, "abort_all": abort_all}))
        self.engine.running = set() if abort_all else self.engine.running - {rid}


class StrictEngine:
    """`calls` records (method, kwargs) in order; `running` holds the requests SGLang's scheduler works on."""

    context_len = 256

    def __init__(self, **kwargs: Any) -> None:
        self.calls: list[tuple[str, dict]] = [("__init__", kwargs)]
        self.deterministic = bool(kwargs.get("enable_deterministic_inference"))
        self.loop = asyncio.new_event_loop()  # sglang.Engine runs its tokenizer manager on its own loop
        self.tokenizer_manager = TokenizerManager(self, kwargs.get("context_length") or self.context_len)
        self.running: set[str] = set()
        self.session = self.released = False
        self.weights_current = self.cache_current = True
        self.children: list[subprocess.Popen] = []  # stand-ins for the scheduler and detokenizer processes
        self._requests = 0
        atexit.register(self.shutdown)

    def _sample(self, input_ids: list[int], sampling_params: dict, seed: int | None) -> tuple[list, list, dict, int]:
        """(token ids, log-probs, finish_reason, cached tokens) of one request."""
        raise NotImplementedError

    def _load(self, named_tensors: list[tuple[str, Any]]) -> None:
        pass

    async def _work(self, input_ids: list[int]) -> None:
        await asyncio.sleep(0)

    # ---- generation
    def _admit(self, input_ids: list[int], sampling_params: dict) -> str:
        """The release's context rule (sglang_api.json context_checks), then the request is scheduled."""
        n, context = len(input_ids), self.tokenizer_manager.context_len
        if n >= context:
            raise ValueError(f"The input ({n} tokens) is longer than the model's context length ({context} tokens).")
        if n + sampling_params["max_new_tokens"] > context:
            raise ValueError(f"Requested token count exceeds the model's maximum context length of {context} tokens.")
        if self.released or self.session or not self.weights_current or not self.cache_current:
            raise AssertionError(f"generate with released={self.released}, session open={self.session}, weights "
                                 f"current={self.weights_current}, cache current={self.cache_current}")
        self._requests += 1
        rid = f"req-{self._requests}"
        self.running.add(rid)
        return rid

    def _answer(self, rid: str, input_ids: list[int], sampling_params: dict) -> dict:
        seed = sampling_params.get("sampling_seed") if self.deterministic else None  # the seed gate
        tokens, logprobs, finish, cached = self._sample(list(input_ids), sampling_params, seed)
        self.running.discard(rid)
        return {"output_ids": list(tokens), "meta_info": {
            "id": rid, "finish_reason": finish, "prompt_tokens": len(input_ids), "weight_version": "default",
            "completion_tokens": len(tokens), "cached_tokens": cached,
            "output_token_logprobs": [(float(lp), int(t), None) for lp, t in zip(logprobs, tokens)]}}

    def generate(self, **kwargs: Any) -> list[dict]:
        self.calls.append(("generate", kwargs))
        pairs = list(zip(kwargs["input_ids"], kwargs["sampling_params"]))
        rids = [self._admit(ids, sp) for ids, sp in pairs]
        return [self._answer(rid, ids, sp) for rid, (ids, sp) in zip(rids, pairs)]

    async def async_generate(self, **kwargs: Any) -> dict:
        self.calls.append(("async_generate", kwargs))
        rid = self._admit(kwargs["input_ids"], kwargs["sampling_params"])
        await self._work(kwargs["input_ids"])  # cancelled here, the request stays in `running`
        return self._answer(rid, kwargs["input_ids"], kwargs["sampling_params"])

    # ---- weights, cache, memory
    def begin_weight_update(self, selector: str = "all") -> tuple[bool, str]:
        self.calls.append(("begin_weight_update", {}))
        if self.session:
            return False, PROTOCOL["refusals"]["begin_weight_update"]
        self.session = True
        return True, "Success"

    def end_weight_update(self) -> tuple[bool, str]:
        self.calls.append(("end_weight_update", {}))
        if not self.session:
            return False, PROTOCOL["refusals"]["end_weight_update"]
        self.session = False
        return True, "Success"

    def update_weights_from_tensor(self, named_tensors, load_format=None, flush_cache=True) -> tuple[bool, str]:
        self.calls.append(("update_weights_from_tensor", {"named_tensors": [n for n, _ in named_tensors],
                                                          "load_format": load_format, "flush_cache": flush_cache}))
        if not self.session:
            return False, PROTOCOL["refusals"]["update_weights_from_tensor"]
        if self.released:
            raise AssertionError("weights sent into released memory")
        self._load(list(named_tensors))
        self.weights_current, self.cache_current = True, False
        if flush_cache and self.flush_cache().success is False:
            return False, NOT_FLUSHED
        return True, "Success"

    def flush_cache(self) -> FlushCacheReqOutput:
        self.calls.append(("flush_cache", {}))
        if self.running:
            return FlushCacheReqOutput(False, NOT_FLUSHED)
        self.cache_current = True
        return FlushCacheReqOutput(True)

    def release_memory_occupation(self, tags=None) -> None:
        self.calls.append(("release_memory_occupation", {}))
        assert not self.running, PROTOCOL["release_needs_idle"]
        self.released = True

    def resume_memory_occupation(self, tags=None) -> None:
        self.calls.append(("resume_memory_occupation", {}))
        self.released, self.weights_current = False, False  # the memory is back; what it held must be sent again

    # ---- processes
    def spawn_children(self, n: int) -> None:
        for _ in range(n):
            self.children.append(subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"]))

    def get_all_child_pids(self) -> list[int]:
        return [p.pid for p in self.children]

    def shutdown(self) -> None:
        self.calls.append(("shutdown", {}))
        kill_process_tree(os.getpid(), include_parent=False, wait_timeout=60)
