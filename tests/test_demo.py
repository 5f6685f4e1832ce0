import subprocess
import sys


def test_demo_runs_and_prints_scores():
    out = subprocess.run([sys.executable, "-m", "ibtpo_fast.demo"], capture_output=True, text=True, check=True).stdout
    assert "ib/score_mean" in out and "trajectories 6" in out
