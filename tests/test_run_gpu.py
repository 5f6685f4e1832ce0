"""bench/run_gpu.sh with stand-in `python3` and `nvidia-smi` commands: a check that fails anywhere, inside a pipe
too, makes the script exit non-zero and name it; what is missing and does not install is said in one line."""
import os
import subprocess
from pathlib import Path

import pytest

SCRIPT = Path(__file__).parents[1] / "bench" / "run_gpu.sh"
# Each stand-in fails (exit 3) when its arguments match $FAIL_ON, and succeeds otherwise.
STUB = """#!/usr/bin/env bash
if [[ -n "${FAIL_ON:-}" && "$*" =~ $FAIL_ON ]]; then echo "stub failed: $*"; exit 3; fi
echo "stub: $*"
"""


def run_gpu(tmp_path: Path, fail_on: str = "") -> subprocess.CompletedProcess:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    for name in ("python3", "nvidia-smi"):
        (bin_dir / name).write_text(STUB)
        (bin_dir / name).chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "OUT": str(tmp_path / "out"), "FAIL_ON": fail_on}
    return subprocess.run(["bash", str(SCRIPT)], cwd=SCRIPT.parents[1], env=env, capture_output=True, text=True,
                          timeout=60)


def test_every_check_passing_exits_zero(tmp_path):
    result = run_gpu(tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "every check passed" in result.stdout
    assert (tmp_path / "out" / "gpu_tests.log").read_text().startswith("stub: -m pytest -q -m gpu")
    assert (tmp_path / "out" / "train-sdpa.log").read_text().startswith("stub: -m ibtpo_fast.train train.steps=3")


@pytest.mark.parametrize(("fail_on", "named"), [
    ("-m gpu -rs tests/", "gpu-tests"),  # its output goes through tee
    ("rollout.engine=sglang", "train-sglang"),  # through tail and tee
    ("attn_implementation=flex_attention", "train-flex_attention"),
    ("torch.distributed.run .*model.dtype=bfloat16", "train-bf16"),
    ("--benchmark-only", "gpu-bench"),
    ("-k regenerates", "sglang-fidelity"),
    ("cuda.is_available", "cuda-torch"),
])
def test_a_failing_check_fails_the_script_and_is_named(tmp_path, fail_on, named):
    result = run_gpu(tmp_path, fail_on)
    assert result.returncode == 1, result.stdout + result.stderr
    assert result.stdout.strip().splitlines()[-1] == f"run_gpu.sh: failed: {named}"


def test_a_missing_extra_is_installed_or_named_in_one_line(tmp_path):
    installed = run_gpu(tmp_path, r"^-c import sglang$")  # missing, and the stand-in pip installs it... in vain
    lines = installed.stdout.splitlines()
    assert any(line.startswith("run_gpu.sh: installing sglang-extra: python3 -m pip install") for line in lines)
    assert "run_gpu.sh: sglang-extra is missing and did not install (tried: python3 -m pip install -q -e .[dev,sglang]; " \
           f"see {tmp_path / 'out'}/install-sglang-extra.log)" in lines
    assert installed.returncode == 1 and lines[-1] == "run_gpu.sh: failed: sglang-extra"
