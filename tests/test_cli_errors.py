"""A user's mistakes (data files, rows, fields, reward functions, missing packages, checkpoints) end
`python -m ibtpo_fast.train` and `python -m ibtpo_fast.evaluate` with one line naming what was wrong and
exit code 2, as a bad config key does; IBTPO_DEBUG=1 shows the traceback."""
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

FNS = Path(__file__).resolve().parent / "reward_fns.py"
GOOD = {"prompt": "Q: 1+1", "answer": "2"}


def write(path: Path, *rows) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def run(module: str, *args: str, debug: bool = False) -> subprocess.CompletedProcess:
    env = {**os.environ, "IBTPO_DEBUG": "1"} if debug else {k: v for k, v in os.environ.items() if k != "IBTPO_DEBUG"}
    return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, timeout=300, env=env)


def train(tmp_path: Path, *args: str, debug: bool = False) -> subprocess.CompletedProcess:
    return run("ibtpo_fast.train", f"run.out_dir={tmp_path}", "run.progress=off", "data.batch_size=1", *args,
               debug=debug)


def assert_one_line(out: subprocess.CompletedProcess, *fragments: str) -> None:
    assert out.returncode == 2, out.stderr[-3000:]
    assert "Traceback" not in out.stderr, out.stderr[-3000:]
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and all(f in last for f in fragments), last


def test_missing_data_file(tmp_path):
    missing = tmp_path / "absent.jsonl"
    assert_one_line(train(tmp_path, "data.task=file", f"data.train_files={missing}", f"data.reward_fn={FNS}:exact"),
                    str(missing), "no such data file")


def test_malformed_row_and_missing_field_name_file_and_line(tmp_path):
    bad_json = write(tmp_path / "bad.jsonl", GOOD, "{not json")
    assert_one_line(train(tmp_path, "data.task=file", f"data.train_files={bad_json}", f"data.reward_fn={FNS}:exact"),
                    str(bad_json), "line 2", "invalid JSON")
    no_answer = write(tmp_path / "noanswer.jsonl", GOOD, GOOD, {"prompt": "Q: 2+2"})
    assert_one_line(train(tmp_path, "data.task=file", f"data.train_files={no_answer}", f"data.reward_fn={FNS}:exact"),
                    str(no_answer), "line 3", "missing 'answer'")


def test_reward_function_that_cannot_be_imported(tmp_path):
    assert_one_line(train(tmp_path, "data.reward_fn=no_such_module_xyz:score"), "no_such_module_xyz", "cannot import")


@pytest.mark.skipif(importlib.util.find_spec("math_verify") is not None, reason="math-verify is installed")
def test_missing_optional_package(tmp_path):
    """Files without a reward_fn are graded by math-verify, which the dev install leaves out."""
    data = write(tmp_path / "d.jsonl", GOOD)
    assert_one_line(train(tmp_path, "data.task=file", f"data.train_files={data}"), "math-verify", "pip install")


def test_evaluate_missing_checkpoint(tmp_path):
    assert_one_line(run("ibtpo_fast.evaluate", "--model", str(tmp_path / "nowhere"), "--n", "1", "--k", "1"),
                    str(tmp_path / "nowhere"))


def test_debug_shows_the_traceback(tmp_path):
    out = train(tmp_path, "data.reward_fn=no_such_module_xyz:score", debug=True)
    assert out.returncode != 0 and "Traceback" in out.stderr and "RewardFnError" in out.stderr
