"""model.dtype=bfloat16 trains fp32 master weights and optimizer state under FSDP, computing and decoding in bf16;
without FSDP it is refused, naming the fix."""
import socket

import pytest
import torch
import torch.distributed as dist

from ibtpo_fast.config import ConfigError, load_config
from ibtpo_fast.distributed import close_world, whole
from ibtpo_fast.trainer import Trainer

FAST = ["data.batch_size=2", "data.val_size=2", "train.eval_k=1", "rollout.tree=2,3,1,1", "run.progress=off",
        "rollout.max_new_tokens=32"]


def test_bf16_without_fsdp_is_refused_naming_the_fix(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.raises(ConfigError, match=r"model.dtype: bfloat16 training needs fp32 master weights.*torchrun "
                                          r"--nproc-per-node 1 -m ibtpo_fast.train"):
        load_config(["model.dtype=bfloat16"])
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match=r"use train.parallel=fsdp \(not ddp\)"):
        load_config(["model.dtype=bfloat16", "train.parallel=ddp"])
    assert load_config(["model.dtype=bfloat16"]).train.parallel == "auto"


@pytest.fixture
def one_rank_group(monkeypatch):
    """A torchrun world of one in this process (gloo), as `torchrun --nproc-per-node 1` starts."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for k, v in {"WORLD_SIZE": "1", "RANK": "0", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                 "MASTER_PORT": str(port)}.items():
        monkeypatch.setenv(k, v)
    yield
    close_world()


def test_bf16_trains_fp32_master_weights_and_decodes_in_bf16(tmp_path, one_rank_group):
    tr = Trainer(load_config([*FAST, f"run.out_dir={tmp_path}", "model.dtype=bfloat16", "train.lr=1e-6",
                              "train.warmup_steps=0", "algo.kl_coef=0.001"]))
    assert dist.is_initialized() and tr.parallel == "fsdp"
    assert {p.dtype for p in tr.policy.parameters()} == {torch.float32}  # the master weights
    assert {p.dtype for p in tr.engine_model.parameters()} == {torch.bfloat16}  # the replica the engine decodes
    assert {p.dtype for p in tr.ref_model.parameters()} == {torch.bfloat16}
    before = {n: whole(p).detach().clone() for n, p in tr.model.named_parameters()}
    m = tr.step()
    assert m["actor/grad_norm"] > 0
    assert {s["exp_avg"].dtype for s in tr.optimizer.state.values()} == {torch.float32}
    changed = [float((whole(p).detach() != before[n]).float().mean()) for n, p in tr.model.named_parameters()]
    assert min(changed) > 0.5  # lr 1e-6 moves most weights; in bf16 it would round nearly all such steps away
    fp32_mb = sum(p.numel() for p in before.values()) * 4 / 2**20
    assert m["perf/rollout_weights_mb"] == pytest.approx(fp32_mb / 2)
    for (name, p), q in zip(tr.model.named_parameters(), tr.engine_model.parameters()):  # synced after the step
        assert torch.equal(q, whole(p).detach().to(torch.bfloat16)), name
