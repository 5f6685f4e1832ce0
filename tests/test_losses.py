"""The PPO-clip loss and its aggregations against hand computation."""
import math

import pytest
import torch

from ibtpo_fast.losses import kl_k3, ppo_clip_loss, token_coefficients


def test_loss_equals_hand_computation():
    logp = torch.tensor([-1.0, -0.5, -2.0, -0.1])
    old = torch.tensor([-1.2, -0.5, -1.5, -0.1])
    adv = torch.tensor([1.0, -1.0, 2.0, -0.5])
    ref = torch.tensor([-1.1, -0.4, -1.8, -0.3])
    coef = token_coefficients("token-mean", torch.ones(4), torch.full((4,), 0.5), 2)
    loss, stats = ppo_clip_loss(logp, old, adv, coef, clip_low=0.2, clip_high=0.28, ref_logp=ref, kl_coef=0.1)
    want = 0.0
    clipped = 0
    for lp, o, a, r in zip(logp.tolist(), old.tolist(), adv.tolist(), ref.tolist()):
        ratio = math.exp(lp - o)
        c = min(max(ratio, 0.8), 1.28)
        clipped += c * a < ratio * a
        d = r - lp
        want += (-min(ratio * a, c * a) + 0.1 * (math.exp(d) - d - 1)) / 4
    assert loss.item() == pytest.approx(want, rel=1e-6)
    assert stats["actor/pg_clipfrac"] == pytest.approx(clipped / 4)


def test_seq_mean_token_mean_weights_each_sequence_equally():
    # Two trajectories of 3 and 1 tokens: each token's share is 1 / its trajectory's length.
    share = torch.tensor([1 / 3, 1 / 3, 1 / 3, 1.0])
    coef = token_coefficients("seq-mean-token-mean", torch.ones(4), share, 2)
    assert coef.tolist() == pytest.approx([1 / 6, 1 / 6, 1 / 6, 1 / 2])
    assert token_coefficients("token-mean", torch.ones(4), share, 2).tolist() == pytest.approx([0.25] * 4)
    # A shared token standing for two trajectories counts twice under token-mean.
    assert token_coefficients("token-mean", torch.tensor([2.0, 1.0, 1.0]), share[:3], 2).tolist() == pytest.approx([0.5, 0.25, 0.25])
    with pytest.raises(ValueError, match="unknown loss aggregation"):
        token_coefficients("sum", torch.ones(4), share, 2)


def test_gradient_raises_logprob_of_positive_advantage():
    logp = torch.tensor([-1.0, -1.0], requires_grad=True)
    loss, _ = ppo_clip_loss(logp, logp.detach(), torch.tensor([1.0, -1.0]), torch.tensor([0.5, 0.5]))
    loss.backward()
    assert logp.grad[0] < 0 < logp.grad[1]  # descending the loss raises logp of the A > 0 token


def test_kl_k3_is_nonnegative_and_zero_at_equality():
    x = torch.randn(100)
    y = torch.randn(100)
    assert (kl_k3(x, y) >= 0).all() and kl_k3(x, x).abs().max() == 0


def test_entropy_bonus_lowers_loss():
    lp = torch.tensor([-1.0])
    base, _ = ppo_clip_loss(lp, lp, torch.tensor([0.0]), torch.tensor([1.0]), entropy=torch.tensor([2.0]))
    bonus, s = ppo_clip_loss(lp, lp, torch.tensor([0.0]), torch.tensor([1.0]), entropy=torch.tensor([2.0]), entropy_coef=0.1)
    assert bonus.item() == pytest.approx(base.item() - 0.2) and s["actor/entropy"] == 2.0
