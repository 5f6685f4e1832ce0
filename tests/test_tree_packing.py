"""Tree-packed training equals flattened-trajectory training: same loss, same gradients, under
each tree attention backend."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from forests import random_forest
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM

from ibtpo_fast import Forest, walk
from ibtpo_fast.losses import ppo_clip_loss, token_coefficients
from ibtpo_fast.packing import flatten, pack_trees
from ibtpo_fast.policy import resolve_tree_attention, supports_tree_packing, token_logprobs
from ibtpo_fast.tree_attention import gather_attention_forward

VOCAB = 100
MODELS = {"qwen2": (Qwen2Config, Qwen2ForCausalLM), "llama": (LlamaConfig, LlamaForCausalLM),
          "qwen3": (Qwen3Config, Qwen3ForCausalLM)}


def tiny_model(kind: str, attn: str, head_dim: int = 8):
    torch.manual_seed(0)
    config_cls, model_cls = MODELS[kind]
    cfg = config_cls(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, head_dim=head_dim, max_position_embeddings=256, attn_implementation=attn)
    return model_cls(cfg).float()


def forest_with_branches(seed: int):
    f = random_forest(np.random.default_rng(seed), num_trees=3, nodes_per_tree=25)
    assert (f.depth()[f.num_children >= 2] >= 1).any()  # branches below the root, at several depths
    return f


def loss_and_grads(model, batch, agg, backend="auto"):
    model.zero_grad()
    logp, entropy = token_logprobs(model, batch, temperature=0.7, tree_attention=backend)
    dev = logp.device
    coef = (token_coefficients(agg, batch.mult, batch.seq_share, batch.num_traj) * batch.prefix_w).to(dev)
    old = batch.old_logp.to(dev)  # the forest's random rollout log-probs: ratios spread around, some clipped
    loss, _ = ppo_clip_loss(logp, old, batch.advantages.to(dev), coef, ref_logp=old - 0.1, kl_coef=0.01,
                            entropy=entropy, entropy_coef=0.01)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("kind, attn, backend", [
    ("qwen2", "sdpa", "gather"), ("qwen2", "sdpa", "mask"), ("qwen2", "eager", "mask"), ("llama", "sdpa", "gather"),
    ("qwen3", "eager", "gather")])
@pytest.mark.parametrize("agg, weighting", [("token-mean", "none"), ("seq-mean-token-mean", "none"), ("token-mean", "sqrt")])
def test_tree_packed_equals_flattened(kind, attn, backend, agg, weighting):
    model = tiny_model(kind, attn)
    assert supports_tree_packing(model)
    f = forest_with_branches(1)
    w = walk(f)
    flat = flatten(f, w.advantage, w.leaves, 0, weighting)
    tree = pack_trees(f, w.advantage, w.leaves, 0, weighting, None if backend == "mask" else 2)  # as the trainer packs
    assert tree.tokens_processed < 0.7 * flat.tokens_processed  # shared prefixes computed once
    assert tree.num_traj == flat.num_traj == int(f.is_leaf.sum())
    l_flat, g_flat = loss_and_grads(model, flat, agg)
    l_tree, g_tree = loss_and_grads(model, tree, agg, backend)
    torch.testing.assert_close(l_tree, l_flat, rtol=1e-5, atol=1e-7)
    for name in g_flat:
        torch.testing.assert_close(g_tree[name], g_flat[name], rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("attn, backend", [("sdpa", "gather"), ("flex_attention", "flex"), ("sdpa", "flex")])
def test_logprobs_match_per_token(attn, backend):
    """Forward only: FlexAttention runs forward on CPU, its backward needs CUDA (see the gpu test)."""
    model = tiny_model("qwen2", attn, head_dim=32 if backend == "flex" else 8)
    assert supports_tree_packing(model) and resolve_tree_attention(model, backend) == backend
    f = forest_with_branches(2)
    w = walk(f)
    flat, tree = flatten(f, w.advantage, w.leaves, 0), pack_trees(f, w.advantage, w.leaves, 0, num_rows=1)
    with torch.no_grad():
        lf, _ = token_logprobs(model, flat, 1.0)
        lt, _ = token_logprobs(model, tree, 1.0, backend)
    # Sum over trajectories (flat) equals the multiplicity-weighted sum over unique tokens (tree).
    torch.testing.assert_close((lt * tree.mult).sum(), lf.sum(), rtol=1e-5, atol=1e-5)
    assert model.config._attn_implementation == attn  # the flex forward restores what the model was loaded with


@pytest.mark.parametrize("num_rows", [None, 2])
def test_minibatch_select_keeps_rows(num_rows):
    f = Forest()  # one big tree and two small ones, which share a row
    for prompt_len, steps in ((5, 10), (2, 2), (2, 2)):
        root = f.add_tree(list(range(1, prompt_len + 1)))
        for _ in range(2):
            nodes = f.add_chain(root, [[7, 8, 9]] * steps, [-0.5] * (3 * steps))
            f.set_reward(nodes[-1], float(steps % 3 == 0))
    w = walk(f)
    tree = pack_trees(f, w.advantage, w.leaves, 0, num_rows=num_rows)
    assert tree.num_rows < f.num_trees  # small trees share a row
    assert tree.num_traj == int(f.is_leaf.sum())
    last = tree.num_rows - 1
    mb = tree.select(np.array([last, 0]))
    assert mb.num_rows == 2 and mb.num_traj == int(tree.traj_of_row[[0, last]].sum())
    picked = torch.isin(tree.rows, torch.tensor([0, last]))
    assert torch.equal(mb.targets, tree.targets[picked])
    model = tiny_model("qwen2", "sdpa")
    with torch.no_grad():  # a mini-batch's rows see the same context as in the whole batch
        for backend in ("gather", "mask") if num_rows is None else ("gather",):
            torch.testing.assert_close(token_logprobs(model, mb, 1.0, backend)[0],
                                       token_logprobs(model, tree, 1.0, backend)[0][picked])


def test_flash_attention_is_not_tree_packable():
    model = tiny_model("qwen2", "sdpa")
    model.config._attn_implementation = "flash_attention_2"
    assert not supports_tree_packing(model)


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("kv_heads, num_rows", [(4, None), (2, None), (2, 1), (4, 2)])
def test_gather_attention_equals_dense_mask(seed, kv_heads, num_rows):
    """The gathered chains compute, column by column, what the dense ancestor mask computes."""
    rng = np.random.default_rng(seed)
    f = random_forest(rng, num_trees=int(rng.integers(1, 4)), nodes_per_tree=int(rng.integers(2, 30)))
    w = walk(f)
    mask = pack_trees(f, w.advantage, w.leaves, 0, num_rows=num_rows).tree
    R, W = mask.node_at.shape
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(R, 4, W, 8, generator=g, requires_grad=True)
    k, v = (torch.randn(R, kv_heads, W, 8, generator=g, requires_grad=True) for _ in range(2))
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=mask.dense(torch.float32), enable_gqa=kv_heads != 4)
    ref = ref.transpose(1, 2)  # [R, W, H, D], as transformers' attention functions return
    out, _ = gather_attention_forward(torch.nn.Identity(), q, k, v, None, tree_chains=mask.chains())
    real = mask.node_at >= 0
    torch.testing.assert_close(out[real], ref[real], rtol=1e-5, atol=1e-6)
    upstream = torch.randn(out[real].shape, generator=g)
    grads = torch.autograd.grad((out[real] * upstream).sum(), (q, k, v))
    grads_ref = torch.autograd.grad((ref[real] * upstream).sum(), (q, k, v))
    for a, b in zip(grads, grads_ref):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_chains_cover_every_token_once():
    f = forest_with_branches(3)
    w = walk(f)
    mask = pack_trees(f, w.advantage, w.leaves, 0).tree
    chains = mask.chains()
    covered = chains.q_index[chains.q_valid]
    assert sorted(covered.tolist()) == torch.nonzero(mask.node_at.flatten() >= 0).flatten().tolist()
    assert len(chains.q_index) < len(f)  # a chain spans several nodes


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("backend", ["flex", "gather"])
def test_tree_packed_equals_flattened_cuda(backend):
    model = tiny_model("qwen2", "sdpa", head_dim=32).cuda()
    assert resolve_tree_attention(model) == "flex"  # the default on CUDA
    assert resolve_tree_attention(tiny_model("qwen2", "sdpa", head_dim=16).cuda()) == "gather"  # too small for flex
    f = forest_with_branches(1)
    w = walk(f)
    flat, tree = flatten(f, w.advantage, w.leaves, 0), pack_trees(f, w.advantage, w.leaves, 0)
    l_flat, g_flat = loss_and_grads(model, flat, "token-mean")
    l_tree, g_tree = loss_and_grads(model, tree, "token-mean", backend)
    torch.testing.assert_close(l_tree, l_flat, rtol=1e-5, atol=1e-6)
    for name in g_flat:
        torch.testing.assert_close(g_tree[name], g_flat[name], rtol=1e-4, atol=1e-5, msg=name)


def test_tree_attention_choice_is_checked():
    sdpa, flex = tiny_model("qwen2", "sdpa"), tiny_model("qwen2", "flex_attention")
    assert resolve_tree_attention(sdpa) == resolve_tree_attention(flex) == "gather"  # flex trains on CUDA only
    # the forward switches the attention for its length, for any model with heads flex can take
    assert resolve_tree_attention(tiny_model("qwen2", "sdpa", head_dim=32), "flex") == "flex"
    with pytest.raises(ValueError, match="at least 32 dimensions"):
        resolve_tree_attention(tiny_model("qwen2", "sdpa", head_dim=16), "flex")
    with pytest.raises(ValueError, match="sdpa or eager"):
        resolve_tree_attention(flex, "mask")
    with pytest.raises(ValueError, match="tree_attention"):
        resolve_tree_attention(sdpa, "dense")


def test_gather_refuses_a_model_that_bypasses_the_attention_interface():
    model = tiny_model("qwen2", "sdpa")
    for layer in model.model.layers:  # attention that never asks transformers' registry: the mask would be lost
        layer.self_attn.forward = lambda hidden_states, *a, **k: (hidden_states, None)
    f = forest_with_branches(1)
    w = walk(f)
    with pytest.raises(ValueError, match="attention interface"):
        token_logprobs(model, pack_trees(f, w.advantage, w.leaves, 0), 1.0)
