"""Checkpoints verify against their manifest: resume names a corrupt file and falls back to the newest intact
checkpoint (or refuses, by option), evaluation names it in one line; a run directory holds one run at a time."""
import json
import os
import subprocess
import sys

import pytest
from test_checkpoint import tiny

from ibtpo_fast.checkpoint import MANIFEST, save_checkpoint, verify_checkpoint
from ibtpo_fast.config import ConfigError, load_config
from ibtpo_fast.errors import CheckpointError
from ibtpo_fast.evaluate import main as evaluate_main
from ibtpo_fast.trainer import Trainer

SHORT = ["data.batch_size=2", "data.val_size=2", "train.eval_k=1", "rollout.tree=2,3,1,1", "rollout.max_new_tokens=32",
         "run.progress=off", "train.eval_every=0", "run.name=r"]


def cut(file):
    file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])


def test_manifest_lists_every_file_and_names_a_damaged_one(tmp_path):
    model, tok = tiny()
    path = save_checkpoint(tmp_path, 1, model, tok, {}, "", keep_last=1)
    manifest = json.loads((path / MANIFEST).read_text())
    files = sorted(str(f.relative_to(path)) for f in path.rglob("*") if f.is_file() and f.name != MANIFEST)
    assert sorted(manifest) == files and "dcp/.metadata" in files and "model.safetensors" in files
    assert all(manifest[f]["size"] == (path / f).stat().st_size for f in files)
    verify_checkpoint(path)
    weights = path / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1  # same size, one bit off
    weights.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="model.safetensors does not match its manifest's SHA-256"):
        verify_checkpoint(path)
    cut(weights)
    with pytest.raises(CheckpointError, match=rf"checkpoint {path} is corrupt: model.safetensors has \d+ bytes, its "
                                              r"manifest says \d+"):
        verify_checkpoint(path)
    (path / "dcp" / "__0_0.distcp").unlink()
    with pytest.raises(CheckpointError, match="dcp/__0_0.distcp is missing"):
        verify_checkpoint(path)


@pytest.fixture(scope="module")
def two_checkpoints(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    tr = Trainer(load_config([*SHORT, f"run.out_dir={out}", "train.steps=2", "run.save_every=1"]))
    tr.train()
    return out / "r" / "checkpoints"


def test_resume_falls_back_past_a_corrupt_checkpoint(two_checkpoints, tmp_path):
    import shutil

    shutil.copytree(two_checkpoints.parent, tmp_path / "r")
    ckpts = tmp_path / "r" / "checkpoints"
    cut(ckpts / "global_step_2" / "dcp" / "__0_0.distcp")
    args = [*SHORT, f"run.out_dir={tmp_path}", "train.steps=3"]
    with pytest.raises(CheckpointError, match=r"global_step_2 is corrupt: dcp/__0_0.distcp has \d+ bytes.*"
                                              r"run.on_corrupt=fallback"):
        Trainer(load_config([*args, "run.on_corrupt=refuse"]))
    with pytest.warns(RuntimeWarning, match=r"global_step_2 is corrupt: dcp/__0_0.distcp .*trying an earlier"):
        tr = Trainer(load_config(args))
    assert tr.global_step == 1
    tr.release()
    cut(ckpts / "global_step_1" / "model.safetensors")
    with pytest.warns(RuntimeWarning), pytest.raises(CheckpointError, match="no intact checkpoint"):
        Trainer(load_config(args))


def test_evaluate_names_a_corrupt_export_in_one_line(two_checkpoints, tmp_path, capsys, monkeypatch):
    import shutil

    monkeypatch.delenv("IBTPO_DEBUG", raising=False)
    ckpt = tmp_path / "c"
    shutil.copytree(two_checkpoints / "global_step_2", ckpt)
    cut(ckpt / "model.safetensors")
    with pytest.raises(SystemExit) as ended:
        evaluate_main(["--model", str(ckpt), "--n", "1", "--k", "1"])
    err = capsys.readouterr().err.strip()
    assert ended.value.code == 2 and len(err.splitlines()) == 1 and "Traceback" not in err
    assert f"checkpoint {ckpt} is corrupt: model.safetensors has" in err


def test_a_second_run_on_the_same_directory_refuses_naming_the_first(tmp_path):
    first = Trainer(load_config([*SHORT, f"run.out_dir={tmp_path}", "train.steps=0"]))
    with pytest.raises(ConfigError, match=rf"run directory {tmp_path / 'r'} is in use by pid {os.getpid()} on "):
        Trainer(load_config([*SHORT, f"run.out_dir={tmp_path}"]))
    second = subprocess.run([sys.executable, "-m", "ibtpo_fast.train", *SHORT, f"run.out_dir={tmp_path}"],
                            capture_output=True, text=True, timeout=300)
    lines = second.stderr.strip().splitlines()
    assert second.returncode == 2 and len(lines) == 1, second.stderr[-2000:]
    assert f"is in use by pid {os.getpid()} on " in lines[0]
    first.train()  # the first run ends, and with it the lock
    Trainer(load_config([*SHORT, f"run.out_dir={tmp_path}", "train.steps=0"])).release()
