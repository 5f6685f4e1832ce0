"""The engine contract on a host framework's rollout servers, reached through an async client.

Each request is one coroutine on an event loop that another thread runs, so the sampler's thread only
waits on answers, and a tree's next round reaches the servers as soon as it is rewarded. The host
framework (verl, slime) owns the servers: it syncs their weights and manages their memory itself.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
from collections.abc import Mapping, Sequence
from typing import Any

from ibtpo_fast.engines.protocol import Completion, Request, generate_by_polling


class LoopClientEngine:
    """Subclasses give `_complete(request, handle)`, the coroutine answering one request, and `owner`,
    the sentence saying who manages the servers (weight updates, cache flushes and memory are refused)."""

    owner = "the host framework manages the rollout servers"
    # The servers hold their own weights, which the host framework sends them.
    weights_shared = False

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self._pending: dict[int, concurrent.futures.Future] = {}
        self._next_handle = 0

    async def _complete(self, request: Request, handle: int) -> Completion:
        raise NotImplementedError

    def submit(self, requests: Sequence[Request]) -> list[int]:
        handles = list(range(self._next_handle, self._next_handle + len(requests)))
        self._next_handle += len(requests)
        for handle, request in zip(handles, requests):
            self._pending[handle] = asyncio.run_coroutine_threadsafe(self._complete(request, handle), self.loop)
        return handles

    def poll(self) -> list[tuple[int, Completion]]:
        """Wait until at least one request is answered; the (handle, completion) pairs that are. A failed
        request cancels every other in flight and raises: nothing is left to answer into a later call."""
        if not self._pending:
            return []
        concurrent.futures.wait(self._pending.values(), return_when=concurrent.futures.FIRST_COMPLETED)
        done = {h: self._pending.pop(h) for h, future in list(self._pending.items()) if future.done()}
        failed = [e for e in (future.exception() for future in done.values()) if e is not None]
        if failed:
            for future in self._pending.values():
                future.cancel()
            self._pending.clear()
            raise failed[0]
        return [(h, future.result()) for h, future in done.items()]

    @property
    def in_flight(self) -> int:
        return len(self._pending)

    def generate(self, requests: Sequence[Request]) -> list[Completion]:
        return generate_by_polling(self, requests)

    def update_weights(self, named_tensors: Mapping[str, Any] | None = None) -> None:
        self._refuse("update_weights")

    def flush_cache(self) -> None:
        self._refuse("flush_cache")

    def release_memory(self) -> None:
        self._refuse("release_memory")

    def resume_memory(self) -> None:
        self._refuse("resume_memory")

    def _refuse(self, what: str) -> None:
        raise RuntimeError(f"{type(self).__name__}.{what}: {self.owner}")
