"""IBTPOTrainer inside the real TRL (1.16) GRPOTrainer, on the bundled tiny model and task, on CPU."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import GRPOTrainer

from ibtpo_fast import walk
from ibtpo_fast.integrations.trl import IBTPOConfig, IBTPOTrainer
from ibtpo_fast.leaf_batch import leaf_batch
from ibtpo_fast.tasks import STEP_DELIMITER, compute_score, make_split, tiny_model_path


def correct(completions, answer, **kwargs):
    return [compute_score("arithmetic", c, a) for c, a in zip(completions, answer)]


class Recording(IBTPOTrainer):
    """Keeps each generation's trees and what TRL's loss received."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.rollouts, self.loss_inputs, self.reward_rows = [], [], []

    def _generate_and_score_completions(self, inputs):
        out = super()._generate_and_score_completions(inputs)
        self.rollouts.append(self.last_rollout)
        return out

    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        rewards = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
        self.reward_rows.append(rewards.clone())
        return rewards

    def _compute_loss(self, model, inputs):
        self.loss_inputs.append({k: inputs[k].clone() for k in ("prompt_ids", "prompt_mask", "completion_ids",
                                                                "completion_mask", "advantages")})
        return super()._compute_loss(model, inputs)


def tiny():
    path = tiny_model_path()
    return AutoModelForCausalLM.from_pretrained(path), AutoTokenizer.from_pretrained(path)


def dataset(n=16):
    return Dataset.from_list([{"prompt": p.prompt, "answer": p.answer} for p in make_split("train", n)])


def config(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path), tree="2,3,1,2", num_generations=6, per_device_train_batch_size=12, max_steps=2,
                max_completion_length=64, use_cpu=True, report_to="none", save_strategy="no", learning_rate=1e-3,
                step_delimiter=STEP_DELIMITER, seed=0, beta=0.0, logging_steps=1)
    return IBTPOConfig(**(base | kw))


def rows_by_content(prompt_ids, prompt_mask, completion_ids, completion_mask, advantages):
    """(prompt, completion, advantages) per row, sorted: the rows as a set, whatever order TRL shuffled them in."""
    out = []
    for p, pm, c, cm, a in zip(prompt_ids, prompt_mask, completion_ids, completion_mask, advantages):
        n = int(cm.sum())
        out.append((tuple(p[pm.bool()].tolist()), tuple(c[:n].tolist()), tuple(np.round(a[:n].tolist(), 6))))
    return sorted(out)


def test_trl_trains_on_the_trees_with_the_walks_step_advantages(tmp_path):
    model, tok = tiny()
    before = [p.detach().clone() for p in model.parameters()]
    trainer = Recording(model=model, reward_funcs=[correct], train_dataset=dataset(), processing_class=tok,
                        args=config(tmp_path))
    trainer.train()
    assert trainer._engine.decode_forward is not None  # TRL's gradient checkpointing leaves decoding plain
    assert len(trainer.rollouts) == len(trainer.loss_inputs) == 2
    for rollout, got, rewards in zip(trainer.rollouts, trainer.loss_inputs, trainer.reward_rows):
        forest = rollout.forest
        assert forest.num_trees == 2 and int(forest.is_leaf.sum()) == 12 and len(forest) > 2 + 12  # branched, not flat
        ref = leaf_batch(forest, walk(forest, beta=5.0, lam=0.1, eps=1e-4), tok.pad_token_id, rollout.finish_reason)
        assert got["advantages"].shape == got["completion_ids"].shape  # per token, not per completion
        mine = rows_by_content(ref.prompt_ids, ref.prompt_mask, ref.response_ids, ref.response_mask, ref.advantages)
        assert rows_by_content(**got) == mine
        # TRL recorded the rewards the tree was scored with, leaf by leaf
        np.testing.assert_array_equal(rewards[:, 0].numpy(), forest.reward[forest.is_leaf])
        # step advantages differ within a response where the tree branched below its root
        assert any(len(set(adv)) > 1 for _, _, adv in mine)
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))


class TRLsOwnAdvantages(IBTPOTrainer):
    """Keeps, per generation, TRL's own GRPO advantages on the same leaves and rewards next to the tree's."""

    pairs: list

    def _generate_and_score_completions(self, inputs):
        self._inputs, self._leaves = inputs, None
        out = GRPOTrainer._generate_and_score_completions(self, inputs)
        mine = self._token_advantages(out["completion_ids"].shape[1])
        self.pairs = [*getattr(self, "pairs", []), (out["advantages"].clone(), mine, out["completion_mask"])]
        out["advantages"] = mine
        return out


def test_independent_sampling_without_ib_gives_trls_own_grpo_advantages(tmp_path):
    model, tok = tiny()
    args = config(tmp_path, tree="6,1,1,1", branch_strategy="independent", ib_lambda=0.0, max_steps=1)
    trainer = TRLsOwnAdvantages(model=model, reward_funcs=[correct], train_dataset=dataset(), processing_class=tok, args=args)
    trainer.train()
    (grpo, mine, mask), = trainer.pairs
    assert grpo.dim() == 1 and grpo.abs().sum() > 0
    torch.testing.assert_close(mine, grpo[:, None] * mask, rtol=0, atol=1e-6)


@pytest.mark.parametrize("kw,match", [
    (dict(num_generations=8), "has 6 leaves .* set num_generations = 6"),
    (dict(per_device_train_batch_size=9), "multiple of num_generations = 6"),
    (dict(tree="4,2,1,1", branch_strategy="independent", num_generations=5), "needs L = 1"),
    (dict(repetition_penalty=1.1), "repetition_penalty"),
])
def test_misconfigurations_are_refused_with_what_to_change(tmp_path, kw, match):
    with pytest.raises(ValueError, match=match):
        config(tmp_path, **kw)


def test_a_reward_that_is_none_or_a_reward_model_is_refused(tmp_path):
    model, tok = tiny()

    def unsure(completions, **kwargs):
        return [None] * len(completions)

    trainer = IBTPOTrainer(model=model, reward_funcs=[unsure], train_dataset=dataset(), processing_class=tok,
                           args=config(tmp_path, max_steps=1))
    with pytest.raises(ValueError, match="'unsure' must return one number per completion"):
        trainer.train()
    with pytest.raises(ValueError, match="reward models"):
        IBTPOTrainer(model=model, reward_funcs=[correct, AutoModelForCausalLM.from_pretrained(tiny_model_path())],
                     train_dataset=dataset(), processing_class=tok, args=config(tmp_path))


def test_two_processes_each_grow_the_trees_of_their_own_prompts(tmp_path):
    """Under torchrun (gloo, 2 ranks): each rank grows trees for its share of the prompts, TRL's loss gets
    that rank's step advantages, the tree metrics logged are both ranks', and the ranks end with the same
    weights."""
    script = Path(__file__).resolve().parent / "trl_two_ranks.py"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--standalone", str(script),
           str(tmp_path)]
    run = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=600)
    assert run.returncode == 0, run.stderr[-4000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert all(len(rank["steps"]) == 2 for rank in ranks)
    for step0, step1 in zip(ranks[0]["steps"], ranks[1]["steps"]):
        assert step0["advantages_are_the_walks"] and step1["advantages_are_the_walks"]
        assert len(step0["prompts"]) == len(step1["prompts"]) == 1  # 6 rows a rank: one tree of 6 leaves
        assert step0["prompts"] != step1["prompts"]
    assert ranks[0]["checksum"] == ranks[1]["checksum"] != ranks[0]["before"]
    mean = [(a["generated_tokens"] + b["generated_tokens"]) / 2 for a, b in zip(*(rank["steps"] for rank in ranks))]
    assert ranks[0]["logged"] == pytest.approx(mean)  # tree metrics are every process's, not rank 0's
