"""Held-out evaluation: avg@k and unbiased pass@k per data source."""
from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from math import comb
from typing import Any

import numpy as np

from ibtpo_fast.engines.protocol import Engine, Request, SamplingParams


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples with c correct: 1 - C(n - c, k) / C(n, k)."""
    if k > n:
        raise ValueError(f"pass@{k} needs at least {k} samples, got {n}")
    return 1.0 - comb(n - c, k) / comb(n, k)


def sample_scores(
    engine: Engine,
    tokenizer: Any,
    prompts: Sequence[Sequence[int]],
    rows: Sequence[Any],
    scorer: Any,
    *,
    k: int,
    max_new_tokens: int,
    sampling: SamplingParams,
    stop_token_ids: Sequence[int] = (),
    seed: int = 0,
    first_index: int = 0,
) -> np.ndarray:
    """Sample k responses per prompt and score them: [problems, k], truncated responses 0.
    `first_index` is the position of `prompts[0]` in the whole set: a problem's samples draw the same
    seeds whichever share of the set (one rank's) it is evaluated in."""
    requests = [
        Request(list(p), max_new_tokens, SamplingParams(sampling.temperature, sampling.top_p, sampling.top_k,
                                                          seed * 1_000_003 + (first_index + i) * k + j), tuple(stop_token_ids))
        for i, p in enumerate(prompts) for j in range(k)
    ]
    completions = engine.generate(requests)
    texts = tokenizer.batch_decode([c.token_ids.tolist() for c in completions], skip_special_tokens=True)
    expand = [rows[i // k] for i in range(len(requests))]
    scores = np.asarray(scorer([r.data_source for r in expand], texts, [r.ground_truth for r in expand],
                               [r.extra_info for r in expand]), np.float64)
    scores[[c.finish_reason == "length" for c in completions]] = 0.0  # truncated responses score 0
    return scores.reshape(len(prompts), k)


def summarise(scores: np.ndarray, rows: Sequence[Any]) -> dict[str, float]:
    """`val-core/<source>/acc/mean@k`, pass@k and pass@1 of scores [problems, k]."""
    k = scores.shape[1]
    out = {}
    for source in dict.fromkeys(r.data_source for r in rows):
        g = scores[[r.data_source == source for r in rows]]
        correct = (g > 0.5).sum(1)
        out[f"val-core/{source}/acc/mean@{k}"] = float(g.mean())
        out[f"val-core/{source}/acc/pass@{k}"] = float(np.mean([pass_at_k(k, int(c), k) for c in correct]))
        out[f"val-core/{source}/acc/pass@1"] = float(np.mean([pass_at_k(k, int(c), 1) for c in correct]))
    return out


def evaluate(engine: Engine, tokenizer: Any, prompts: Sequence[Sequence[int]], rows: Sequence[Any], scorer: Any,
             **kwargs: Any) -> dict[str, float]:
    """Sample k responses per prompt; score them; report `val-core/<source>/acc/mean@k` and pass@k
    (the keywords are `sample_scores`')."""
    return summarise(sample_scores(engine, tokenizer, prompts, rows, scorer, **kwargs), rows)


def correct_counts(scores: np.ndarray) -> list[int]:
    """Correct samples per problem of scores [problems, k]: what a report needs to re-score any share
    of an evaluation's problems."""
    return [int(c) for c in (scores > 0.5).sum(1)]


def merge_shares(shares: Sequence[tuple[dict[str, float], dict[str, int]]]) -> dict[str, float]:
    """One evaluation from the (metrics, problems per data source) of its shares: every metric is a mean
    over problems, so each share counts by its problems of that source."""
    totals: dict[str, float] = defaultdict(float)
    weights: dict[str, float] = defaultdict(float)
    for metrics, counts in shares:
        for key, value in metrics.items():
            n = counts[key[len("val-core/"):].rsplit("/acc/", 1)[0]]
            totals[key] += value * n
            weights[key] += n
    return {key: totals[key] / weights[key] for key in totals}
