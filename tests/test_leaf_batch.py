"""leaf_batch: the per-leaf rows every framework adapter hands its loss, from a real rollout."""
import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from ibtpo_fast import walk
from ibtpo_fast.engines.protocol import SamplingParams
from ibtpo_fast.engines.torch_engine import TorchEngine
from ibtpo_fast.forest import Forest
from ibtpo_fast.leaf_batch import check_leaves_per_tree, leaf_batch
from ibtpo_fast.sampler import IBTreeSampler, SamplerConfig
from ibtpo_fast.tasks import STEP_DELIMITER, compute_score, make_split, tiny_model_path


@pytest.fixture(scope="module")
def rollout():
    path = tiny_model_path()
    model, tok = AutoModelForCausalLM.from_pretrained(path), AutoTokenizer.from_pretrained(path)
    problems = make_split("test", 3)

    def reward_fn(rows, responses):
        texts = tok.batch_decode([r.tolist() for r in responses], skip_special_tokens=True)
        return [compute_score("arithmetic", t, problems[i].answer) for i, t in zip(rows, texts)]

    cfg = SamplerConfig(tree="2,3,1,2", max_new_tokens=40, sampling=SamplingParams(temperature=1.0),
                        stop_token_ids=[tok.eos_token_id], step_delimiter=STEP_DELIMITER)
    sampler = IBTreeSampler(TorchEngine(model, tokenizer=tok), tok, reward_fn, cfg)
    prompts = [tok.encode(p.prompt, add_special_tokens=False) for p in problems]
    return sampler.sample(prompts), prompts, tok.pad_token_id


def test_rows_are_the_trajectories_with_their_step_advantages(rollout):
    ro, prompts, pad = rollout
    result = walk(ro.forest, beta=5.0, lam=0.1)
    batch = leaf_batch(ro.forest, result, pad, ro.finish_reason)
    trajs = ro.forest.trajectories()
    assert len(batch) == len(trajs) == 3 * 6
    assert batch.group.tolist() == sorted(batch.group.tolist()) == [t for t in range(3) for _ in range(6)]
    for i, t in enumerate(trajs):
        assert batch.prompt_list(i) == prompts[t.tree]
        assert batch.response_list(i) == t.input_ids[t.prompt_len :].tolist()
        n = int(batch.response_lengths[i])
        # each response token carries the advantage of the step (node) it belongs to
        step_adv = result.advantage[t.node_index[t.prompt_len :]].astype(np.float32)
        np.testing.assert_array_equal(batch.advantages[i, :n].numpy(), step_adv)
        np.testing.assert_array_equal(batch.rollout_logprobs[i, :n].numpy(), t.old_logprobs[t.prompt_len :])
        assert (batch.advantages[i, n:] == 0).all() and (batch.response_ids[i, n:] == pad).all()
        assert batch.reward[i] == ro.forest.reward[t.leaf]
        assert bool(batch.truncated[i]) == (ro.finish_reason[t.leaf] == "length")
    # left-padded prompts, right-padded responses: input_ids reads prompt then response
    row = batch.input_ids[0][batch.attention_mask[0].bool()].tolist()
    assert row == trajs[0].input_ids.tolist()
    assert batch.advantages.dtype == torch.float32 and batch.response_ids.dtype == torch.int64


def test_an_unrewarded_leaf_is_refused():
    f = Forest()
    root = f.add_tree([1, 2])
    f.add_chain(root, [[3], [4]], [-0.1, -0.2])
    leaf = f.add_chain(root, [[5]], [-0.3])[-1]
    f.set_reward(leaf, 1.0)
    with pytest.raises(ValueError, match="no reward"):
        leaf_batch(f, walk(f), pad_id=0)


def test_a_tree_short_of_the_group_size_is_named(rollout):
    ro, _, pad = rollout
    batch = leaf_batch(ro.forest, walk(ro.forest, beta=5.0, lam=0.1), pad, ro.finish_reason)
    check_leaves_per_tree(batch, 3, 6, expected="6", limit="the cap", setting="the tree")
    with pytest.raises(ValueError, match=r"tree 0 grew 6 leaves, not rollout.n = 7: .*paths at the cap\); lower K in the tree"):
        check_leaves_per_tree(batch, 3, 7, expected="rollout.n = 7", limit="the cap", setting="the tree")
    with pytest.raises(ValueError, match="tree 3 grew 0 leaves, not 6"):
        check_leaves_per_tree(batch, 4, 6, expected="6", limit="the cap", setting="the tree")
