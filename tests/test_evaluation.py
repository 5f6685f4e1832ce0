"""avg@k and unbiased pass@k, and the evaluate command on the bundled model."""
import json
import subprocess
import sys
from math import comb

import pytest

from ibtpo_fast.evaluation import pass_at_k


@pytest.mark.parametrize("n, c, k", [(4, 0, 1), (4, 1, 1), (4, 2, 2), (8, 3, 4), (8, 8, 8), (5, 1, 5)])
def test_pass_at_k_is_unbiased_estimator(n, c, k):
    # Probability that a random k-subset of the n samples holds at least one correct one.
    assert pass_at_k(n, c, k) == pytest.approx(1 - comb(n - c, k) / comb(n, k))
    assert pass_at_k(n, c, 1) == pytest.approx(c / n)


def test_pass_at_k_needs_enough_samples():
    with pytest.raises(ValueError, match="pass@5 needs at least 5 samples"):
        pass_at_k(4, 1, 5)


def test_evaluate_command_on_the_bundled_model():
    out = subprocess.run([sys.executable, "-m", "ibtpo_fast.evaluate", "--n", "16", "--k", "2"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout)
    acc, p2 = result["val-core/arithmetic/acc/mean@2"], result["val-core/arithmetic/acc/pass@2"]
    assert 0.0 < acc <= p2 <= 1.0  # the bundled model solves some problems; pass@k >= avg@k


def test_evaluate_command_rejects_bad_k():
    out = subprocess.run([sys.executable, "-m", "ibtpo_fast.evaluate", "--k", "0"], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 2 and "--k" in out.stderr
