"""IBTPOTrainer inside the real TRL (1.16) GRPOTrainer, on the bundled tiny model and task, on CPU."""
import asyncio
import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import GRPOTrainer
from trl.distributed import DistributedBackend
from trl.models import unwrap_model_for_generation

import ibtpo_fast.integrations.trl as adapter
from ibtpo_fast import walk
from ibtpo_fast.integrations.trl import IBTPOConfig, IBTPOTrainer, check_generation_backend
from ibtpo_fast.leaf_batch import leaf_batch
from ibtpo_fast.metrics import reduce_parts
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
    flat = [log["tree/flat_share"] for log in trainer.state.log_history if "tree/flat_share" in log]
    assert len(flat) == 2 and all(share < 1 for share in flat)


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
    (dict(per_device_train_batch_size=9), "= 9 rows a process generates at once must be a multiple of num_generations = 6"),
    (dict(per_device_train_batch_size=4, gradient_accumulation_steps=2), r"4 \* 2 = 8 rows .* multiple of num_generations"),
    (dict(tree="4,2,1,1", branch_strategy="independent", num_generations=5), "needs L = 1"),
    (dict(repetition_penalty=1.1), "unset repetition_penalty"),
    (dict(min_p=0.1), "unset min_p"),
    (dict(generation_kwargs={"num_beams": 2}), "unset generation_kwargs"),
    (dict(cache_implementation="static"), "unset cache_implementation"),
    (dict(use_transformers_continuous_batching=True), "unset use_transformers_continuous_batching"),
    (dict(transformers_continuous_batching_config={"max_batch_tokens": 64}), "unset transformers_continuous_batching_config"),
    (dict(use_vllm=True), "unset use_vllm"),
    (dict(scale_rewards="batch"), "scale_rewards = 'batch'"),
    (dict(scale_rewards=False), "scale_rewards = 'none'"),
    (dict(multi_objective_aggregation="normalize_then_sum"), "only 'sum_then_normalize'"),
])
def test_misconfigurations_are_refused_by_name(tmp_path, kw, match):
    with pytest.raises(ValueError, match=match):
        config(tmp_path, **kw)


def test_the_defaults_follow_the_tree(tmp_path):
    args = IBTPOConfig(output_dir=str(tmp_path), use_cpu=True, report_to="none")
    assert args.num_generations == args.per_device_train_batch_size == 12  # the default tree 4,9,1,1
    assert config(tmp_path, num_generations=None).num_generations == 6
    assert config(tmp_path, scale_rewards=True).scale_rewards == "group"  # GRPO's default, the walk's scaling
    assert config(tmp_path, per_device_train_batch_size=3, generation_batch_size=6).steps_per_generation == 2


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
    for logged, step0, step1 in zip(ranks[0]["logged"], ranks[0]["steps"], ranks[1]["steps"]):
        # tree metrics are every process's, reduced exactly: a ratio of totals, not a mean of the ranks' ratios
        both = reduce_parts([{k: tuple(v) for k, v in step["parts"].items()} for step in (step0, step1)])
        assert logged == pytest.approx(both)
        assert logged["tree/generated_tokens"] == pytest.approx(
            (step0["parts"]["tree/generated_tokens"][0] + step1["parts"]["tree/generated_tokens"][0]) / 2)


def test_a_tree_short_of_leaves_is_refused_with_the_adapters_message(tmp_path):
    """Without the step delimiter every response is one step, so only the root can branch: K = 2 nodes a round
    cannot be found and the tree grows 4 leaves, not 6."""
    model, tok = tiny()
    trainer = IBTPOTrainer(model=model, reward_funcs=[correct], train_dataset=dataset(), processing_class=tok,
                           args=config(tmp_path, tree="2,3,2,1", step_delimiter="@@", max_steps=1))
    with pytest.raises(ValueError, match="tree 0 grew 4 leaves, not num_generations = 6: .* lower K in tree"):
        trainer.train()


def test_flat_trees_warn_and_are_logged(tmp_path):
    model, tok = tiny()
    trainer = IBTPOTrainer(model=model, reward_funcs=[correct], train_dataset=dataset(), processing_class=tok,
                           args=config(tmp_path, step_delimiter="@@", max_steps=2))
    with pytest.warns(RuntimeWarning, match="step_delimiter='@@'.* every tree is flat") as caught:
        trainer.train()
    assert sum("every tree is flat" in str(w.message) for w in caught) == 1  # once, not every step
    assert [log["tree/flat_share"] for log in trainer.state.log_history if "tree/flat_share" in log] == [1.0, 1.0]


def test_async_reward_functions_run_on_trls_event_loop(tmp_path):
    model, tok = tiny()
    loops = []

    async def correct_async(completions, answer, **kwargs):
        loops.append(asyncio.get_running_loop())
        await asyncio.sleep(0)
        return correct(completions, answer)

    def length(completions, **kwargs):
        return [len(c) / 100 for c in completions]

    trainer = Recording(model=model, reward_funcs=[correct_async, length], train_dataset=dataset(), processing_class=tok,
                        args=config(tmp_path, max_steps=1, reward_weights=[1.0, 0.5]))
    trainer.train()
    assert loops and all(loop is trainer.async_loop for loop in loops)
    (rollout,), (rewards,) = trainer.rollouts, trainer.reward_rows
    forest = rollout.forest
    np.testing.assert_allclose((rewards[:, 0] + 0.5 * rewards[:, 1]).numpy(), forest.reward[forest.is_leaf], atol=1e-6)
    assert rewards[:, 1].abs().sum() > 0  # the sync function's column is its own


def test_gradient_accumulation_splits_whole_trees_over_micro_steps(tmp_path):
    """per_device_train_batch_size=3, gradient_accumulation_steps=2: each process generates 6 rows, one tree,
    and TRL's loss takes them 3 at a time."""
    model, tok = tiny()
    trainer = Recording(model=model, reward_funcs=[correct], train_dataset=dataset(), processing_class=tok,
                        args=config(tmp_path, per_device_train_batch_size=3, gradient_accumulation_steps=2))
    trainer.train()
    assert len(trainer.rollouts) == 2 and len(trainer.loss_inputs) == 4
    for k, rollout in enumerate(trainer.rollouts):
        forest = rollout.forest
        assert forest.num_trees == 1 and int(forest.is_leaf.sum()) == 6
        ref = leaf_batch(forest, walk(forest, beta=5.0, lam=0.1, eps=1e-4), tok.pad_token_id, rollout.finish_reason)
        got = [rows_by_content(**micro) for micro in trainer.loss_inputs[2 * k: 2 * k + 2]]
        assert [len(g) for g in got] == [3, 3]
        assert sorted(got[0] + got[1]) == rows_by_content(ref.prompt_ids, ref.prompt_mask, ref.response_ids,
                                                          ref.response_mask, ref.advantages)


def test_two_generations_in_one_optimizer_step_draw_distinct_trees(tmp_path):
    """steps_per_generation=1 < gradient_accumulation_steps=2: two generations per optimizer step, each with
    its own tree ids (the ids seed the samples)."""
    ids = []

    class Ids(IBTPOTrainer):
        def _tree_id(self, k):
            ids.append(super()._tree_id(k))
            return ids[-1]

    model, tok = tiny()
    trainer = Ids(model=model, reward_funcs=[correct], train_dataset=dataset(), processing_class=tok,
                  args=config(tmp_path, per_device_train_batch_size=6, gradient_accumulation_steps=2,
                              steps_per_generation=1, max_steps=1))
    trainer.train()
    assert ids == [0, 1]


def test_log_extra_lines_up_with_the_completions(tmp_path):
    """A reward function logs a column derived from each completion; it is graded round by round on a few
    leaves at a time, yet TRL's table gets each value in its completion's row (None for a truncated leaf,
    which is never graded)."""
    model, tok = tiny()

    def echo(completions, answer, log_extra, **kwargs):
        log_extra("echo", list(completions))
        return correct(completions, answer)

    trainer = IBTPOTrainer(model=model, reward_funcs=[echo], train_dataset=dataset(), processing_class=tok,
                           args=config(tmp_path, max_steps=1, max_completion_length=27))
    trainer.train()
    completions, echoed = list(trainer._logs["completion"]), list(trainer._logs["extra"]["echo"])
    assert len(completions) == len(echoed) == 12
    assert any(e is not None for e in echoed) and any(e is None for e in echoed)
    assert all(e is None or e == c for c, e in zip(completions, echoed))


def test_generation_runs_inside_trls_unwrap_model_for_generation(tmp_path, monkeypatch):
    """The tree engine decodes the model TRL's context yields (ZeRO-3 gathers the shards there)."""
    inside, yielded = [False], []

    @contextlib.contextmanager
    def recording(*args, **kwargs):
        with unwrap_model_for_generation(*args, **kwargs) as model:
            inside[0] = True
            yielded.append(model)
            yield model
            inside[0] = False

    def graded_inside(completions, answer, **kwargs):
        assert inside[0]
        return correct(completions, answer)

    monkeypatch.setattr(adapter, "unwrap_model_for_generation", recording)
    model, tok = tiny()
    trainer = IBTPOTrainer(model=model, reward_funcs=[graded_inside], train_dataset=dataset(), processing_class=tok,
                           args=config(tmp_path, max_steps=1))
    trainer.train()
    assert len(yielded) == 1 and trainer._engine.model is yielded[0] is model


def _backend(zero_stage=0, fsdp_version=None):
    state = SimpleNamespace(deepspeed_plugin=SimpleNamespace(zero_stage=zero_stage) if zero_stage else None,
                            fsdp_plugin=SimpleNamespace(fsdp_version=fsdp_version) if fsdp_version else None)
    return DistributedBackend(SimpleNamespace(state=state))


def test_sharded_training_is_gathered_for_generation_or_refused(tmp_path):
    args = config(tmp_path)
    check_generation_backend(_backend(), args)
    check_generation_backend(_backend(zero_stage=2), args)
    check_generation_backend(_backend(zero_stage=3), args)  # gathered by unwrap_model_for_generation
    with pytest.raises(ValueError, match="ds3_gather_for_generation=True"):
        check_generation_backend(_backend(zero_stage=3), config(tmp_path, ds3_gather_for_generation=False))
    for version in (1, 2):
        with pytest.raises(ValueError, match=f"FSDP \\(version {version}\\) is not supported"):
            check_generation_backend(_backend(fsdp_version=version), args)
