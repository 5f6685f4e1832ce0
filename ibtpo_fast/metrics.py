"""Metrics that reduce exactly over ranks. A process reports each metric as its parts (a ratio's numerator
and denominator, a count, a maximum); the parts reduce over ranks as the registry says, and the metric is
computed from the reduced parts, so N ranks log what one process would over the union of their data.
One process runs the same path over a single rank's parts.
"""
from __future__ import annotations

import fnmatch
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

Parts = tuple[float, ...]
STEP = "timing/step"  # the key that names the slowest rank


@dataclass(frozen=True)
class Reduction:
    """How one metric reduces: an op per part over ranks (`sum`, `max`, `min`, or `slowest`: the part of the
    rank with the longest `timing/step`, so that one rank's timings, which sum to its step, are kept
    together), then `value` of the reduced parts."""

    ops: tuple[str, ...]
    value: Callable[..., float]


def _divide(num: float, den: float) -> float:
    return num / den if den else math.nan


SUM = Reduction(("sum",), float)
MAX = Reduction(("max",), float)
RATIO = Reduction(("sum", "sum"), _divide)  # a mean: (sum, count); any ratio of totals: (numerator, denominator)
# a ratio of two means, (sum_a, count_a, sum_b, count_b) -> mean_a / mean_b
QUOTIENT = Reduction(("sum",) * 4, lambda a, na, b, nb: _divide(a, na) / max(_divide(b, nb), 1e-12))
RATE = Reduction(("sum", "max"), lambda amount, seconds: amount / max(seconds, 1e-9))  # ranks run concurrently
SLOWEST = Reduction(("slowest",), float)

# Metric name (or fnmatch pattern, tried after the exact names, in order) -> its reduction.
REDUCTIONS: dict[str, Reduction] = {
    "critic/score/mean": RATIO,
    "response_length/mean": RATIO,
    "response_length/clip_ratio": RATIO,
    "tree/trajectories": RATIO,
    "tree/generated_tokens": RATIO,
    "tree/trajectories_per_1k_tokens": RATIO,
    "tree/unique_token_ratio": RATIO,
    "tree/eff_rate": RATIO,
    "tree/flat_share": RATIO,
    "tree/root_pick_share": RATIO,
    "tree/pick_prefix_share": QUOTIENT,
    "ib/score_mean": RATIO,
    "ib/cov_eta": RATIO,
    "ib/cov_eta_picked": RATIO,
    "rollout/prefix_cache_hit_rate": RATIO,
    "perf/tokens_per_s": RATE,
    "perf/rollout_weights_mb": MAX,
    "train/tokens_processed": SUM,
    "train/bad_steps": MAX,  # agreed over ranks: the same everywhere
    "reward/errors": SUM,
    "reward/timeouts": SUM,
    "actor/ratio_max": MAX,
    "actor/lr": MAX,
    "timing/*": SLOWEST,
    "actor/*": RATIO,  # loss statistics, weighted by each rank's loss weight
}

_OPS: dict[str, Callable[[np.ndarray], float]] = {"sum": np.sum, "max": np.max, "min": np.min}


def reduction(key: str, registry: Mapping[str, Reduction] = REDUCTIONS) -> Reduction:
    """The reduction `registry` gives metric `key`."""
    if key in registry:
        return registry[key]
    for pattern, r in registry.items():
        if fnmatch.fnmatchcase(key, pattern):
            return r
    raise KeyError(f"metric {key!r} has no reduction: add it to ibtpo_fast.metrics.REDUCTIONS")


def mean_of(x: np.ndarray) -> Parts:
    """A mean's parts over the non-NaN entries of `x`: (sum, count)."""
    x = np.asarray(x, np.float64)
    x = x[~np.isnan(x)]
    return float(x.sum()), float(len(x))


def parts_of(values: Mapping[str, float], weight: float = 1.0) -> dict[str, Parts]:
    """Parts of finished local values: a ratio's as a mean weighted by `weight`, a one-part metric's as itself."""
    out = {}
    for key, v in values.items():
        r = reduction(key)
        if r is RATIO:
            out[key] = (float(v) * weight, float(weight))
        elif len(r.ops) == 1:
            out[key] = (float(v),)
        else:
            raise ValueError(f"metric {key!r} needs its parts, not a finished value")
    return out


def reduce_parts(ranks: Sequence[Mapping[str, Parts]],
                 registry: Mapping[str, Reduction] = REDUCTIONS) -> dict[str, float]:
    """The metrics of every rank's parts (`ranks[i]`: rank i's), each reduced as `registry` says."""
    keys = set(ranks[0])
    if any(set(r) != keys for r in ranks):
        odd = set().union(*ranks) - set.intersection(*(set(r) for r in ranks))
        raise ValueError(f"the ranks report different metrics: {', '.join(sorted(odd))}")
    slowest = int(np.argmax([r[STEP][0] for r in ranks])) if STEP in keys else 0
    out = {}
    for key in sorted(keys):
        r = reduction(key, registry)
        table = np.array([ranks[i][key] for i in range(len(ranks))], np.float64)
        if table.shape[1] != len(r.ops):
            raise ValueError(f"metric {key!r} has {table.shape[1]} parts, its reduction {len(r.ops)}")
        reduced = [table[slowest, j] if op == "slowest" else _OPS[op](table[:, j]) for j, op in enumerate(r.ops)]
        out[key] = float(r.value(*(float(p) for p in reduced)))
    return out
