"""Sharded loading (gloo, 1 thread a rank): rank 0 alone reads the weights, every rank keeps its shards of the
policy and of a reference model copied from them, and training makes the one-process update, also with bf16
compute over fp32 master weights, micro-batches and activation checkpointing, and with the reference offloaded."""
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_distributed import env, torchrun

from ibtpo_fast.loading import load_policy

HERE = Path(__file__).resolve().parent
SCRIPT = str(HERE / "dist_sharded.py")


def launch(cmd):
    done = subprocess.run(cmd, capture_output=True, text=True, env=env(PYTHONPATH=f"{HERE.parent}:{HERE}"),
                          timeout=900)
    assert done.returncode == 0, done.stderr[-4000:]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """fp32 in one process (the whole-model path); bf16 under torchrun at 1 rank (FSDP keeps its master weights);
    every variant at 2 ranks."""
    one, one_fsdp, two = (tmp_path_factory.mktemp(n) for n in ("one", "one_fsdp", "two"))
    launch([sys.executable, SCRIPT, str(one), "fp32"])
    launch(torchrun(SCRIPT, str(one_fsdp), "bf16", nproc=1))
    launch(torchrun(SCRIPT, str(two), "fp32", "bf16", "offload"))
    return {(1, v): torch.load(one / f"{v}.pt") for v in ("fp32",)} | {(1, "bf16"): torch.load(one_fsdp / "bf16.pt")} \
        | {(2, v): torch.load(two / f"{v}.pt") for v in ("fp32", "bf16", "offload")}


def assert_same_weights(want, got, rtol=1e-5, atol=1e-7):
    assert want.keys() == got.keys()
    for name, w in want.items():
        torch.testing.assert_close(got[name], w, rtol=rtol, atol=atol, msg=name)


@pytest.mark.parametrize("variant", ["fp32", "offload"])
def test_two_sharded_ranks_make_the_one_process_weights_after_two_steps(runs, variant):
    want, got = runs[1, "fp32"], runs[2, variant]
    assert want["parallel"] == "none" and got["parallel"] == "fsdp"
    assert got["stats"][1]["actor/kl"] > 0  # the reference model took part
    assert_same_weights(want["weights"], got["weights"])


def test_only_rank_0_reads_the_weights_and_each_rank_holds_half(runs):
    whole, two = runs[1, "fp32"]["ranks"][0], runs[2, "fp32"]["ranks"]
    assert whole["loaded"] == 1 and [r["loaded"] for r in two] == [1, 0]
    for r in two:  # the trained state: the policy's shards and the reference's
        assert r["policy"] + r["ref"] <= 0.55 * (whole["policy"] + whole["ref"]), r
        assert r["replica_whole"] and r["replica_built"] > 0  # gathered from the shards for the rollout


def test_the_offloaded_reference_is_held_by_fsdp_cpu_offload(runs):
    assert runs[2, "offload"]["ref_offload"] == "CPUOffloadPolicy"
    assert runs[2, "fp32"]["ref_offload"] == "OffloadPolicy"  # the base class: no offloading


def test_bf16_two_ranks_equal_one_rank_with_micro_batches_and_checkpointing(runs):
    """bf16 products round differently when the ranks' partial sums meet in another order, so 2 ranks match 1 to
    1e-5 in absolute terms (the weights are O(0.1)), and within 2% of the update they made; fp32 against bf16
    differs several times more, so the comparison can tell a lost precision setting apart."""
    one, two, fp32 = runs[1, "bf16"], runs[2, "bf16"], runs[1, "fp32"]
    assert one["parallel"] == two["parallel"] == "fsdp" and one["ref_dtypes"] == ["torch.bfloat16"]
    assert_same_weights(one["weights"], two["weights"], rtol=0, atol=1e-5)
    start = load_policy("", torch.device("cpu"))[0].state_dict()

    def distance(a, b):
        return sum(float((a[k] - b[k]).norm() ** 2) for k in a) ** 0.5

    update = distance(one["weights"], start)
    assert distance(two["weights"], one["weights"]) < 0.02 * update
    assert distance(fp32["weights"], one["weights"]) > 2 * distance(two["weights"], one["weights"])
