"""The engine contract on an async client whose coroutines run on another thread's event loop (the base
of the verl and slime adapters' engines): answers in the order they come, failures that leave nothing
in flight, and the host framework's operations refused."""
import asyncio
import threading

import numpy as np
import pytest

from ibtpo_fast.engines.loop_client import LoopClientEngine
from ibtpo_fast.engines.protocol import Completion, Request


class DelayedEcho(LoopClientEngine):
    """Answers a request after prefix_ids[0] milliseconds with its prefix reversed; a prefix starting with
    0 fails."""

    owner = "the test's host manages these servers"

    def __init__(self) -> None:
        super().__init__(asyncio.new_event_loop())
        threading.Thread(target=self.loop.run_forever, daemon=True).start()
        self.cancelled = 0

    async def _complete(self, request: Request, handle: int) -> Completion:
        delay = int(request.prefix_ids[0])
        if delay == 0:
            raise ValueError(f"request {handle} failed")
        try:
            await asyncio.sleep(delay / 1000)
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        ids = np.asarray(request.prefix_ids[::-1], np.int64)
        return Completion(ids, np.zeros(len(ids), np.float32), None, "stop", 0)


def test_answers_come_as_they_finish_and_generate_keeps_the_order():
    engine = DelayedEcho()
    handles = engine.submit([Request([300, 1], 4), Request([5, 2], 4)])
    assert engine.in_flight == 2
    first = engine.poll()
    assert [h for h, _ in first] == [handles[1]]  # the faster request answers first
    assert first[0][1].token_ids.tolist() == [2, 5]
    assert [h for h, _ in engine.poll()] == [handles[0]]
    assert engine.in_flight == 0 and engine.poll() == []
    out = engine.generate([Request([40, 7], 4), Request([1, 8], 4), Request([20, 9], 4)])
    assert [c.token_ids.tolist() for c in out] == [[7, 40], [8, 1], [9, 20]]


def test_a_failed_request_cancels_the_others_and_raises():
    engine = DelayedEcho()
    engine.submit([Request([2000, 1], 4), Request([0, 2], 4), Request([3000, 3], 4)])
    with pytest.raises(ValueError, match="request 1 failed"):
        engine.poll()
    assert engine.in_flight == 0
    handle = engine.submit([Request([1, 4], 4)])[0]  # the engine stays usable
    assert [h for h, _ in engine.poll()] == [handle]
    assert engine.cancelled == 2


@pytest.mark.parametrize("call", ["update_weights", "flush_cache", "release_memory", "resume_memory"])
def test_the_host_frameworks_operations_are_refused(call):
    engine = DelayedEcho()
    assert engine.weights_shared is False
    with pytest.raises(RuntimeError, match=rf"DelayedEcho\.{call}: the test's host manages these servers"):
        getattr(engine, call)()
