"""Metric reduction over ranks: parts reduce as the registry says, then the metric is computed, so unequal
ranks log the metric of the union of their data."""
import math

import numpy as np
import pytest

from ibtpo_fast.metrics import MAX, RATIO, Reduction, mean_of, parts_of, reduce_parts, reduction


def test_a_mean_over_unequal_ranks_is_the_mean_of_the_union():
    # rank 0: rewards 1, 0, 1, 0; rank 1: a single reward of 1. Mean of means 0.75, of the union 0.6.
    got = reduce_parts([{"critic/score/mean": (2.0, 4.0)}, {"critic/score/mean": (1.0, 1.0)}])
    assert got == {"critic/score/mean": pytest.approx(0.6, abs=1e-15)}


def test_each_kind_reduces_its_parts():
    ranks = [
        {"train/tokens_processed": (100.0,), "actor/ratio_max": (1.5,), "perf/tokens_per_s": (300.0, 2.0),
         "tree/pick_prefix_share": (10.0, 2.0, 40.0, 4.0), "rollout/prefix_cache_hit_rate": (0.0, 0.0),
         "timing/rollout": (2.0,), "timing/update": (1.0,), "timing/step": (3.0,)},
        {"train/tokens_processed": (50.0,), "actor/ratio_max": (2.5,), "perf/tokens_per_s": (100.0, 4.0),
         "tree/pick_prefix_share": (20.0, 1.0, 20.0, 4.0), "rollout/prefix_cache_hit_rate": (0.0, 0.0),
         "timing/rollout": (3.5,), "timing/update": (0.1,), "timing/step": (3.6,)},
    ]
    got = reduce_parts(ranks)
    assert got["train/tokens_processed"] == 150.0
    assert got["actor/ratio_max"] == 2.5
    assert got["perf/tokens_per_s"] == 400.0 / 4.0  # every rank's tokens over the longest rollout
    assert got["tree/pick_prefix_share"] == pytest.approx((30.0 / 3.0) / (60.0 / 8.0))
    assert math.isnan(got["rollout/prefix_cache_hit_rate"])  # nothing counted: no rate
    # one rank's timings, the slowest's, so that they still sum to its step; not the parts' maxima (4.5 > 3.6)
    assert (got["timing/rollout"], got["timing/update"], got["timing/step"]) == (3.5, 0.1, 3.6)


def test_the_registry_carries_min_and_sums_of_squares():
    std = Reduction(("sum", "sum", "sum"), lambda n, s, ss: math.sqrt(ss / n - (s / n) ** 2))
    registry = {"x/std": std, "x/min": Reduction(("min",), float), "x/*": MAX}
    a, b = np.array([1.0, 2.0, 4.0]), np.array([8.0, -3.0])
    ranks = [{"x/std": (len(v), v.sum(), (v * v).sum()), "x/min": (v.min(),), "x/last": (v[-1],)} for v in (a, b)]
    got = reduce_parts(ranks, registry)
    union = np.concatenate([a, b])
    assert got["x/std"] == pytest.approx(union.std(), rel=1e-12)
    assert got["x/min"] == -3.0 and got["x/last"] == 4.0


@pytest.mark.parametrize("seed", range(5))
def test_any_split_of_the_data_gives_the_one_process_mean(seed):
    rng = np.random.default_rng(seed)
    data = rng.normal(size=int(rng.integers(5, 50)))
    data[rng.random(len(data)) < 0.2] = np.nan  # as the walk leaves NaN at nodes without a score
    cuts = np.sort(rng.integers(0, len(data), size=3))
    ranks = [{"ib/score_mean": mean_of(x)} for x in np.split(data, cuts)]
    assert reduce_parts(ranks)["ib/score_mean"] == pytest.approx(np.nanmean(data), abs=1e-12)


def test_finished_values_become_parts():
    parts = parts_of({"actor/pg_loss": 0.5, "actor/ratio_max": 1.2, "reward/errors": 3}, weight=8.0)
    assert parts == {"actor/pg_loss": (4.0, 8.0), "actor/ratio_max": (1.2,), "reward/errors": (3.0,)}
    with pytest.raises(ValueError, match="needs its parts"):
        parts_of({"tree/pick_prefix_share": 0.3})


def test_reductions_refuse_what_they_cannot_reduce():
    with pytest.raises(KeyError, match="'made/up' has no reduction"):
        reduction("made/up")
    assert reduction("actor/entropy") is RATIO and reduction("timing/anything").ops == ("slowest",)
    with pytest.raises(ValueError, match="different metrics: reward/errors"):
        reduce_parts([{"reward/errors": (1.0,)}, {}])
    with pytest.raises(ValueError, match="has 1 parts, its reduction 2"):
        reduce_parts([{"critic/score/mean": (1.0,)}])
