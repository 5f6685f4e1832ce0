"""Reward functions in verl's contract and a scorer that survives bad ones.

A reward function is `compute_score(data_source, solution_str, ground_truth, extra_info=None)`
returning a float or a dict with a "score" key. `RewardScorer` runs it inline or in worker
processes with a per-item timeout; an item that raises, times out or returns a non-finite or
non-numeric score scores 0 and is counted in `stats()`.
"""
from __future__ import annotations

import hashlib
import importlib
import importlib.util
import logging
import math
import multiprocessing as mp
import pickle
import re
import signal
import sys
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import Any

import numpy as np

from ibtpo_fast.errors import MissingExtraError, RewardFnError

logger = logging.getLogger(__name__)

RewardFn = Callable[..., Any]

# module name -> source file, for reward functions loaded from a .py path: spawned workers
# load the same file under the same name so the function unpickles by reference
_FILE_MODULES: dict[str, str] = {}

# a spawned worker imports the parent's main module; with torch that can take a while
_START_TIMEOUT_S = 120.0


# ---------------------------------------------------------------- loading


def load_reward_fn(spec: str) -> RewardFn:
    """The function named by `"package.module:function"` or `"path/to/file.py:function"`."""
    target, sep, name = spec.rpartition(":")
    if not sep or not target or not name:
        raise RewardFnError(
            f"reward function {spec!r}: expected 'package.module:function' or 'path/to/file.py:function'"
        )
    if target.endswith(".py") or "/" in target or "\\" in target:
        module = _load_file_module(Path(target), spec)
    else:
        try:
            module = importlib.import_module(target)
        except Exception as e:
            raise RewardFnError(f"reward function {spec!r}: cannot import module {target!r}: {e}") from e
    fn = getattr(module, name, None)
    if fn is None:
        raise RewardFnError(f"reward function {spec!r}: {target!r} has no function {name!r}")
    if not callable(fn):
        raise RewardFnError(f"reward function {spec!r}: {name!r} is a {type(fn).__name__}, not a function")
    return fn


def _load_file_module(path: Path, spec: str):
    path = path.expanduser().resolve()
    if not path.is_file():
        raise RewardFnError(f"reward function {spec!r}: no such file {path}")
    digest = hashlib.sha1(str(path).encode()).hexdigest()[:10]
    stem = re.sub(r"\W", "_", path.stem)
    name = f"_ibtpo_reward_{stem}_{digest}"
    try:
        module = _exec_file_module(name, str(path))
    except Exception as e:
        raise RewardFnError(f"reward function {spec!r}: loading {path} failed: {e}") from e
    _FILE_MODULES[name] = str(path)
    return module


def _exec_file_module(name: str, path: str):
    if name in sys.modules:
        return sys.modules[name]
    module_spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[name] = module
    try:
        module_spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module


# ---------------------------------------------------------------- scoring


def _as_score(value: Any) -> float:
    """A finite float from a reward function's return value, or an exception saying what is wrong."""
    if isinstance(value, dict):
        if "score" not in value:
            raise KeyError(f"reward dict has no 'score' key (keys: {sorted(value)})")
        value = value["score"]
    # strings have no __float__ but float() would parse them: they are not scores
    if isinstance(value, (str, bytes)) or not hasattr(value, "__float__"):
        raise TypeError(f"reward function returned {type(value).__name__}, not a number")
    score = float(value)
    if not math.isfinite(score):
        raise ValueError(f"reward function returned {score}")
    return score


def _worker_main(conn: Connection, fn_bytes: bytes, file_modules: dict[str, str]) -> None:
    # Ctrl-C reaches the whole process group: let the parent handle it and close the workers
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        for name, path in file_modules.items():
            _exec_file_module(name, path)
        fn = pickle.loads(fn_bytes)
    except BaseException as e:
        conn.send(("init_error", f"{type(e).__name__}: {e}"))
        return
    conn.send(("ready", None))
    while True:
        try:
            args = conn.recv()
        except EOFError:  # parent went away
            return
        if args is None:
            return
        try:
            conn.send(("ok", _as_score(fn(*args))))
        except Exception as e:
            conn.send(("error", (type(e).__name__, str(e))))


@dataclass
class _Worker:
    proc: Any
    conn: Connection
    since: float  # spawn time until ready, then dispatch time of the current item
    ready: bool = False
    item: int | None = None


class RewardScorer:
    """Scores solutions with a verl-style reward function.

    workers == 0: inline in this process (no timeout; for trusted, cheap functions).
    workers >= 1: that many "spawn" worker processes, started lazily (or by `start()`) and reused
    across calls; an item running longer than `timeout_s` scores 0, its worker is terminated and
    replaced when more work arrives. `fn` must then pickle by reference (a module-level function).
    """

    def __init__(self, fn: RewardFn, timeout_s: float = 10.0, workers: int = 0):
        if workers < 0:
            raise ValueError(f"workers must be >= 0, got {workers}")
        if not timeout_s > 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
        self.fn = fn
        self.timeout_s = float(timeout_s)
        self.workers = workers
        self._errors = 0
        self._timeouts = 0
        self._warned: set[str] = set()
        self._pool: list[_Worker] = []
        self._fn_bytes: bytes | None = None

    def __call__(
        self,
        data_sources: Sequence[str],
        solutions: Sequence[str],
        ground_truths: Sequence[str],
        extra_infos: Sequence[dict | None] | None = None,
    ) -> np.ndarray:
        n = len(solutions)
        if extra_infos is None:
            extra_infos = [None] * n
        if not len(data_sources) == len(ground_truths) == len(extra_infos) == n:
            raise ValueError(
                f"reward inputs differ in length: {len(data_sources)} data_sources, {n} solutions, "
                f"{len(ground_truths)} ground_truths, {len(extra_infos)} extra_infos"
            )
        items = list(zip(data_sources, solutions, ground_truths, extra_infos))
        scores = self._score_pool(items) if self.workers else [self._score_inline(i, it) for i, it in enumerate(items)]
        return np.asarray(scores, dtype=np.float64)

    def stats(self) -> dict[str, int]:
        return {"reward/errors": self._errors, "reward/timeouts": self._timeouts}

    def _score_inline(self, i: int, item: tuple) -> float:
        try:
            return _as_score(self.fn(*item))
        except Exception as e:
            self._error(i, item, type(e).__name__, str(e))
            return 0.0

    def _error(self, i: int, item: tuple, kind: str, msg: str) -> None:
        self._errors += 1
        self._warn_once(kind, f"reward function failed on item {i} (data_source {item[0]!r}): {kind}: {msg}")

    def _warn_once(self, kind: str, msg: str) -> None:
        if kind not in self._warned:
            self._warned.add(kind)
            logger.warning("%s; it scores 0 (later %s failures are counted, not logged)", msg, kind)

    # ------------------------------------------------------------ worker pool

    def start(self) -> None:
        """Launch the worker processes now (they load in the background) instead of on first use."""
        if self.workers:
            self._grow(self.workers)

    def _grow(self, wanted: int) -> None:
        if self._fn_bytes is None:
            try:
                self._fn_bytes = pickle.dumps(self.fn)
            except Exception as e:
                raise ValueError(
                    f"reward workers need a module-level reward function (pickled by reference); "
                    f"{self.fn!r} cannot be pickled: {e}"
                ) from e
        mod = getattr(self.fn, "__module__", None)
        file_modules = {mod: _FILE_MODULES[mod]} if mod in _FILE_MODULES else {}
        ctx = mp.get_context("spawn")  # the parent holds torch threads: never fork it
        while len(self._pool) < min(self.workers, wanted):
            parent, child = ctx.Pipe()
            proc = ctx.Process(
                target=_worker_main, args=(child, self._fn_bytes, file_modules), daemon=True, name="ibtpo-reward"
            )
            proc.start()
            child.close()  # so the parent sees EOF when the worker dies
            self._pool.append(_Worker(proc, parent, time.monotonic()))

    def _score_pool(self, items: list[tuple]) -> list[float]:
        scores = [0.0] * len(items)
        todo = deque(range(len(items)))
        while todo or any(w.item is not None for w in self._pool):
            if todo:
                self._grow(len(todo))
            for w in self._pool:
                if todo and w.ready and w.item is None:
                    self._dispatch(w, todo.popleft(), items)
            self._collect(scores, items)
        return scores

    def _dispatch(self, w: _Worker, i: int, items: list[tuple]) -> None:
        w.item, w.since = i, time.monotonic()
        try:
            w.conn.send(items[i])
        except (pickle.PicklingError, TypeError, AttributeError) as e:
            w.item = None
            self._error(i, items[i], type(e).__name__, f"item cannot be sent to a worker: {e}")
        except OSError:  # the worker died while idle: _collect sees its EOF and counts the item
            pass

    def _collect(self, scores: list[float], items: list[tuple]) -> None:
        active = [w for w in self._pool if not w.ready or w.item is not None]
        if not active:
            return
        now = time.monotonic()
        deadline = min(w.since + (self.timeout_s if w.ready else _START_TIMEOUT_S) for w in active)
        readable = set(wait([w.conn for w in active], timeout=max(0.0, deadline - now)))
        for w in active:
            if w.conn in readable:
                self._receive(w, scores, items)
        now = time.monotonic()
        for w in list(self._pool):
            if w.ready and w.item is not None and now - w.since > self.timeout_s:
                self._timeouts += 1
                self._warn_once("timeout", f"reward function timed out after {self.timeout_s:g} s on item {w.item}")
                self._kill(w)
            elif not w.ready and now - w.since > _START_TIMEOUT_S:
                self.close()
                raise RuntimeError(f"reward worker did not start within {_START_TIMEOUT_S:g} s")

    def _receive(self, w: _Worker, scores: list[float], items: list[tuple]) -> None:
        try:
            kind, payload = w.conn.recv()
        except (EOFError, OSError):
            code = w.proc.exitcode
            self._kill(w)
            if not w.ready:
                self.close()
                raise RuntimeError(f"reward worker exited while starting (exit code {code})") from None
            if w.item is not None:
                self._error(w.item, items[w.item], "WorkerDied", f"worker process exited (exit code {code})")
            return
        if kind == "ready":
            w.ready = True
        elif kind == "init_error":
            self.close()
            raise RuntimeError(f"reward worker could not load the reward function: {payload}")
        elif kind == "ok":
            scores[w.item] = payload
            w.item = None
        else:
            self._error(w.item, items[w.item], *payload)
            w.item = None

    def _kill(self, w: _Worker) -> None:
        self._pool.remove(w)
        w.proc.terminate()
        w.proc.join(2.0)
        if w.proc.is_alive():
            w.proc.kill()
            w.proc.join()
        w.conn.close()

    def close(self) -> None:
        """Stop the worker processes; a later call starts new ones."""
        for w in self._pool:
            try:
                w.conn.send(None)
            except OSError:
                pass
        deadline = time.monotonic() + 2.0
        for w in list(self._pool):
            w.proc.join(max(0.0, deadline - time.monotonic()))
            self._kill(w)

    def __enter__(self) -> RewardScorer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# ---------------------------------------------------------------- bundled reward functions


def default_math_reward() -> RewardFn:
    """`math_verify_score`, checked up front: a missing grader would otherwise score every item 0."""
    if importlib.util.find_spec("math_verify") is None:
        raise MissingExtraError("the default math grader needs math-verify: pip install 'ibtpo_fast[math]', "
                          "or name a grader with data.reward_fn=module:function")
    return math_verify_score


def math_verify_score(data_source: str, solution_str: str, ground_truth: str, extra_info: dict | None = None) -> float:
    """1.0 when math-verify finds the solution's answer equal to the ground truth, else 0.0.

    The ground truth is read as LaTeX (boxed unless it already is); the solution's last answer
    as LaTeX or a plain expression. Needs `pip install math-verify`; math-verify times out with
    SIGALRM, so call it from a main thread (RewardScorer does, inline or in its workers).
    """
    try:
        from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify
    except ImportError:
        raise ImportError("math_verify_score needs the math-verify package: pip install math-verify") from None
    gt = str(ground_truth)
    gold = parse(gt if "\\boxed" in gt else f"\\boxed{{{gt}}}", [LatexExtractionConfig()])
    if not gold:
        raise ValueError(f"math-verify cannot parse the ground truth {gt!r}")
    pred = parse(str(solution_str), [ExprExtractionConfig(), LatexExtractionConfig()])
    return float(bool(pred) and verify(gold, pred))
