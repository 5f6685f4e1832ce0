"""Tree-packed training equals flattened-trajectory training: same loss, same gradients."""
import numpy as np
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from ibtpo_fast import Forest, walk
from ibtpo_fast.losses import ppo_clip_loss, token_coefficients
from ibtpo_fast.packing import flatten, pack_trees
from ibtpo_fast.policy import supports_tree_packing, token_logprobs
from forests import random_forest

VOCAB = 100


def tiny_model(kind: str, attn: str):
    torch.manual_seed(0)
    common = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=256, attn_implementation=attn)
    cfg = Qwen2Config(**common) if kind == "qwen2" else LlamaConfig(**common)
    return (Qwen2ForCausalLM if kind == "qwen2" else LlamaForCausalLM)(cfg).float()


def forest_with_branches(seed: int):
    f = random_forest(np.random.default_rng(seed), num_trees=3, nodes_per_tree=25)
    assert (f.depth()[f.num_children >= 2] >= 1).any()  # branches below the root, at several depths
    return f


def loss_and_grads(model, batch, agg):
    model.zero_grad()
    logp, entropy = token_logprobs(model, batch, temperature=0.7)
    coef = token_coefficients(agg, batch.mult, batch.seq_share, batch.num_traj) * batch.prefix_w
    old = batch.old_logp  # the forest's random rollout log-probs: ratios spread around, some clipped
    loss, _ = ppo_clip_loss(logp, old, batch.advantages, coef, ref_logp=old.detach() - 0.1, kl_coef=0.01,
                            entropy=entropy, entropy_coef=0.01)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("kind, attn", [("qwen2", "sdpa"), ("qwen2", "eager"), ("llama", "sdpa")])
@pytest.mark.parametrize("agg, weighting", [("token-mean", "none"), ("seq-mean-token-mean", "none"), ("token-mean", "sqrt")])
def test_tree_packed_equals_flattened(kind, attn, agg, weighting):
    model = tiny_model(kind, attn)
    assert supports_tree_packing(model)
    f = forest_with_branches(1)
    w = walk(f)
    flat = flatten(f, w.advantage, w.leaves, 0, weighting)
    tree = pack_trees(f, w.advantage, w.leaves, 0, weighting)
    assert tree.tokens_processed < 0.7 * flat.tokens_processed  # shared prefixes computed once
    assert tree.num_traj == flat.num_traj == int(f.is_leaf.sum())
    l_flat, g_flat = loss_and_grads(model, flat, agg)
    l_tree, g_tree = loss_and_grads(model, tree, agg)
    torch.testing.assert_close(l_tree, l_flat, rtol=1e-5, atol=1e-7)
    for name in g_flat:
        torch.testing.assert_close(g_tree[name], g_flat[name], rtol=1e-5, atol=1e-6, msg=name)


def test_logprobs_match_per_token():
    model = tiny_model("qwen2", "sdpa")
    f = forest_with_branches(2)
    w = walk(f)
    flat, tree = flatten(f, w.advantage, w.leaves, 0), pack_trees(f, w.advantage, w.leaves, 0)
    with torch.no_grad():
        lf, _ = token_logprobs(model, flat, 1.0)
        lt, _ = token_logprobs(model, tree, 1.0)
    # Sum over trajectories (flat) equals the multiplicity-weighted sum over unique tokens (tree).
    torch.testing.assert_close((lt * tree.mult).sum(), lf.sum(), rtol=1e-5, atol=1e-5)


def test_minibatch_select_keeps_rows():
    f = Forest()  # one big tree and two small ones, which share a row
    for prompt_len, steps in ((5, 10), (2, 2), (2, 2)):
        root = f.add_tree(list(range(1, prompt_len + 1)))
        for _ in range(2):
            nodes = f.add_chain(root, [[7, 8, 9]] * steps, [-0.5] * (3 * steps))
            f.set_reward(nodes[-1], float(steps % 3 == 0))
    w = walk(f)
    tree = pack_trees(f, w.advantage, w.leaves, 0)
    assert tree.num_rows < f.num_trees  # small trees share a row
    assert tree.num_traj == int(f.is_leaf.sum())
    last = tree.num_rows - 1
    mb = tree.select(np.array([last, 0]))
    assert mb.num_rows == 2 and mb.num_traj == int(tree.traj_of_row[[0, last]].sum())
    assert torch.equal(mb.targets, tree.targets[torch.isin(tree.rows, torch.tensor([0, last]))])


def test_flash_attention_is_not_tree_packable():
    model = tiny_model("qwen2", "sdpa")
    model.config._attn_implementation = "flash_attention_2"
    assert not supports_tree_packing(model)
