"""A run killed with SIGKILL mid-step, or ended by a checkpoint write that failed, resumes from its last
checkpoint and continues exactly."""
import contextlib
import errno
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from loads import record_trust_remote_code

from ibtpo_fast.train import main as train_main

# The grader sleeps 50 ms an item (8 items a step, scored inline), so that on any machine a step lasts
# well past the moment the test kills the run inside it.
SLOW = f"{Path(__file__).resolve().parent / 'reward_fns.py'}:slow_arithmetic"
ARGS = ["data.batch_size=2", "data.val_size=4", "train.eval_k=2", "rollout.tree=2,3,1,1", "run.progress=off",
        "train.steps=4", "run.save_every=2", "run.name=r", f"data.reward_fn={SLOW}", "data.reward_workers=0"]


def launch(out_dir):
    return subprocess.Popen([sys.executable, "-m", "ibtpo_fast.train", *ARGS, f"run.out_dir={out_dir}"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def records(out_dir):
    lines = (out_dir / "r" / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r for r in map(json.loads, lines)}


def comparable(rec):
    return {k: v for k, v in rec.items() if not k.startswith(("timing/", "perf/"))}


def wait_inside_step_3(proc, out_dir):
    """Return once run `proc` (writing to out_dir/r) has published its step-2 checkpoint and begun step 3."""
    ckpt = out_dir / "r" / "checkpoints" / "global_step_2"
    deadline = time.time() + 600
    while not (ckpt / "trainer_state.pt").exists():  # step 3 starts right after this checkpoint
        assert proc.poll() is None and time.time() < deadline, "run ended before its step-2 checkpoint"
        time.sleep(0.05)
    time.sleep(0.3)


def test_sigkill_mid_step_then_resume_matches_uninterrupted(tmp_path):
    whole = launch(tmp_path / "whole")
    _, err = whole.communicate(timeout=600)
    assert whole.returncode == 0, err[-3000:]

    crashed = tmp_path / "crashed"
    proc = launch(crashed)
    wait_inside_step_3(proc, crashed)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert 3 not in records(crashed)  # killed inside step 3

    resumed = launch(crashed)
    out, err = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, err[-3000:]
    assert "resumed from step 2" in out
    want, got = records(tmp_path / "whole"), records(crashed)
    assert sorted(got) == [0, 1, 2, 3, 4]
    for step in (3, 4):
        assert comparable(got[step]) == comparable(want[step]), step


# Two short steps, a checkpoint after each; in process, so the test can make a write fail.
SHORT = ["data.batch_size=2", "data.val_size=2", "train.eval_k=1", "rollout.tree=2,3,1,1", "rollout.max_new_tokens=32",
         "run.progress=off", "train.steps=2", "train.eval_every=0", "run.save_every=1", "run.name=r"]


@pytest.fixture(scope="module")
def disk_full_at_step_2(tmp_path_factory):
    """A run whose step-2 checkpoint fails part-way, the disk full: (run dir, exit code, stderr)."""
    out = tmp_path_factory.mktemp("disk-full")
    real_save = torch.save

    def save(obj, f, *args, **kwargs):
        if "global_step_2" in str(f):
            Path(f).write_bytes(b"PK partial")
            raise OSError(errno.ENOSPC, "No space left on device", str(f))
        real_save(obj, f, *args, **kwargs)

    err = io.StringIO()
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stderr(err), pytest.raises(SystemExit) as ended:
        mp.setattr(torch, "save", save)
        mp.delenv("IBTPO_DEBUG", raising=False)
        train_main([*SHORT, f"run.out_dir={out}"])
    return out / "r", ended.value.code, err.getvalue()


def test_failed_checkpoint_write_ends_run_keeping_previous(disk_full_at_step_2):
    run_dir, code, err = disk_full_at_step_2
    ckpts = run_dir / "checkpoints"
    last = err.strip().splitlines()[-1]
    assert code == 2 and "Traceback" not in err, err[-3000:]
    assert last.startswith(f"error: cannot write checkpoint {ckpts / 'global_step_2'}: ") and "No space left" in last, last
    assert sorted(p.name for p in ckpts.iterdir()) == ["global_step_1", "latest"]  # no partial directory
    assert (ckpts / "latest").read_text() == "global_step_1"


def test_resume_after_failed_write_and_torn_metrics_line(disk_full_at_step_2, tmp_path, monkeypatch, capsys):
    shutil.copytree(disk_full_at_step_2[0], tmp_path / "r")
    metrics = tmp_path / "r" / "metrics.jsonl"
    lines = metrics.read_text().splitlines()
    assert [json.loads(ln)["step"] for ln in lines] == [0, 1, 2]  # step 2 was logged before its checkpoint failed
    metrics.write_text(f"{lines[0]}\n{lines[1]}\n{lines[2][: len(lines[2]) // 2]}")  # a crash mid-line
    loads = record_trust_remote_code(monkeypatch)
    assert train_main([*SHORT, f"run.out_dir={tmp_path}"]) == 0
    assert "resumed from step 1" in capsys.readouterr().out
    got = [json.loads(ln) for ln in metrics.read_text().splitlines()]  # every line whole JSON again
    assert [r["step"] for r in got] == [0, 1, 2]
    assert comparable(got[2]) == comparable(json.loads(lines[2]))  # step 2 again, to the bit
    assert (tmp_path / "r" / "plots" / "accuracy.png").is_file()
    assert {name for name, _ in loads} == {"AutoModelForCausalLM", "AutoTokenizer"}  # policy, tokenizer, resume
    assert all(trust is False for _, trust in loads), loads
