"""IBTree sampling on the bundled tiny model through the real TorchEngine."""
import time

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from ibtpo_fast import Forest, walk
from ibtpo_fast.engines.protocol import SamplingParams
from ibtpo_fast.engines.torch_engine import TorchEngine
from ibtpo_fast.sampler import IBTreeSampler, SamplerConfig, TreeSpec, _Batch
from ibtpo_fast.tasks import STEP_DELIMITER, compute_score, make_split, tiny_model_path


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    path = tiny_model_path()
    return AutoModelForCausalLM.from_pretrained(path), AutoTokenizer.from_pretrained(path)


class Spy:
    """Wraps the real engine and records what the sampler asks of it."""

    def __init__(self, engine):
        self.engine, self.calls = engine, []

    def generate(self, requests):
        self.calls.append(list(requests))
        return self.engine.generate(requests)

    def submit(self, requests):
        self.calls.append(list(requests))
        return self.engine.submit(requests)

    def poll(self):
        return self.engine.poll()

    @property
    def in_flight(self):
        return self.engine.in_flight

    def update_weights(self, named_tensors=None):
        self.engine.update_weights(named_tensors)

    def flush_cache(self):
        self.engine.flush_cache()


def make_sampler(tiny, problems, max_new_tokens=64, **kw):
    model, tok = tiny
    engine = Spy(TorchEngine(model, tokenizer=tok))
    reward_calls = []

    def reward_fn(trees, responses):
        reward_calls.append(len(trees))
        texts = tok.batch_decode([r.tolist() for r in responses], skip_special_tokens=True)
        return [compute_score("arithmetic", t, problems[i].answer) for i, t in zip(trees, texts)]

    cfg = SamplerConfig(max_new_tokens=max_new_tokens, sampling=SamplingParams(temperature=1.0), stop_token_ids=(tok.eos_token_id,),
                        step_delimiter=STEP_DELIMITER, **kw)
    return IBTreeSampler(engine, tok, reward_fn, cfg), engine, reward_calls


def prompts_of(tok, problems):
    return [tok.encode(p.prompt, add_special_tokens=False) for p in problems]


@pytest.mark.parametrize("schedule", ["lockstep", "continuous"])
def test_ib_rounds_shape_and_accounting(tiny, schedule):
    problems = make_split("train", 3)
    sampler, engine, reward_calls = make_sampler(tiny, problems, tree=TreeSpec(4, 3, 1, 2), schedule=schedule)
    rollout = sampler.sample(prompts_of(tiny[1], problems))
    f = rollout.forest
    if schedule == "lockstep":  # one engine call per round, holding every tree's requests
        assert [len(c) for c in engine.calls] == [12, 6, 6]
    else:  # round 1 together, then each tree's rounds as they come: 2 requests a tree a round
        assert len(engine.calls[0]) == 12 and sum(map(len, engine.calls)) == 24
        assert all(len(c) % 2 == 0 for c in engine.calls)
    assert reward_calls and sum(reward_calls) <= 3 * 8  # truncated leaves skip the reward function
    leaves = f.is_leaf
    for t in range(3):
        assert int((leaves & (f.tree == t)).sum()) == 8  # G = B0 + (L-1) K B
        steps = (f.tree == t) & (f.parent >= 0)
        assert rollout.generated_tokens[t] == f.num_tokens[steps].sum()  # every token counted once
    assert not np.isnan(f.reward[leaves]).any()
    # Round-2+ requests continue from a prefix of an existing node, never regenerating it.
    prefixes = {tuple(f.prefix_tokens(v)) for v in range(len(f)) if not leaves[v]}
    for req in sum(engine.calls[1:], []):
        assert tuple(req.prefix_ids) in prefixes
    assert rollout.metrics["rollout/prefix_cache_hit_rate"] > 0.5
    assert rollout.metrics["tree/trajectories"] == 8
    walk(f)  # a forest ready for the walk


@pytest.mark.parametrize("max_new_tokens", [6, 64])
def test_clip_ratio_is_the_share_of_cut_trajectories(tiny, max_new_tokens):
    problems = make_split("train", 2)
    sampler, _, _ = make_sampler(tiny, problems, max_new_tokens, tree=TreeSpec(2, 2, 1, 1))
    rollout = sampler.sample(prompts_of(tiny[1], problems))
    f = rollout.forest
    leaves = np.flatnonzero(f.is_leaf)
    cut = [f.response_lengths()[v] == max_new_tokens and rollout.finish_reason[v] == "length"
           for v in leaves]
    assert rollout.metrics["response_length/clip_ratio"] == pytest.approx(np.mean(cut))
    # 6 tokens are shorter than any solution; 64 hold most
    assert (rollout.metrics["response_length/clip_ratio"] == 1.0) == (max_new_tokens == 6)


def test_pick_follows_ib_score_and_tie_rules(tiny):
    # Root with chains rewarded 1, 0 and a two-child node: IB decides which node is expanded.
    sampler, _, _ = make_sampler(tiny, make_split("train", 1), tree=TreeSpec(2, 2, 2, 1))
    f = Forest()
    root = f.add_tree([1, 2])
    a = f.add_chain(root, [[3], [4], [5]], [-0.1, -2.0, -0.1])
    b = f.add_chain(root, [[3], [4]], [-0.1, -0.1])
    f.set_reward(a[-1], 1.0)
    f.set_reward(b[-1], 0.0)
    ib = walk(f).ib_score
    batch = _Batch(f, [0], [0], np.zeros(1, np.int64), np.zeros(1, np.int64))
    picked = [br.node for br in sampler._next_round(batch, [0], 1)]
    inner = [v for v in range(len(f)) if f.num_children[v] > 0 and f.parent[v] >= 0]  # the root keeps its B0
    depth = f.depth()
    want = sorted(inner, key=lambda v: (-ib[v], depth[v], v))[:2]
    assert picked == want



def forked_forest():
    """Root with children a (chain 3 steps, reward 1) and b (chain 2 steps, reward 0), where a's second
    node is a 2-child fork: four inner nodes at depths 0, 1, 1 and 2, with ties among them."""
    f = Forest()
    root = f.add_tree([1, 2])
    a = f.add_chain(root, [[3], [4], [5]], [-0.1, -0.1, -0.1])
    f.add_chain(a[0], [[4], [6]], [-0.1, -0.1])
    b = f.add_chain(root, [[3], [4]], [-0.1, -0.1])
    for leaf in np.flatnonzero(f.is_leaf):
        f.set_reward(leaf, 1.0 if leaf != b[-1] else 0.0)
    return f


@pytest.mark.parametrize("kw", [dict(), dict(branch_root=True), dict(tie_break="deep"), dict(ib_norm="sum"),
                                dict(min_branch_room=63)])
def test_candidates_and_order_follow_the_options(tiny, kw):
    """Each open choice of docs/algorithm.md section 9 changes the ranking as documented: the root leaves
    the candidates unless branch_root (or fewer than K others can branch), `deep` puts deeper nodes first
    among equal scores, `sum` ranks by the summed score, and min_branch_room drops nodes whose path leaves
    less room."""
    spec = TreeSpec(2, 2, 2, 2)
    sampler, _, _ = make_sampler(tiny, make_split("train", 1), tree=spec, **kw)
    f = forked_forest()
    ib = walk(f, ib_norm=kw.get("ib_norm", "mean"), branch_width=spec.B).ib_score
    batch = _Batch(f, [0], [0], np.zeros(1, np.int64), np.zeros(1, np.int64))
    picked = [br.node for br in sampler._next_round(batch, [0], 1)][:: spec.B]
    depth, room = f.depth(), 64 - f.response_lengths()
    cand = [v for v in range(1, len(f)) if f.num_children[v] > 0 and room[v] >= kw.get("min_branch_room", 1)]
    if kw.get("branch_root", False) or len(cand) < spec.K:  # the root: by option, or when too few others can branch
        cand = [0, *cand]
    sign = -1 if kw.get("tie_break") == "deep" else 1
    assert picked == sorted(cand, key=lambda v: (-ib[v], sign * depth[v], v))[: spec.K]
    assert [p.node for p in batch.picks] == picked and all(p.round == 2 for p in batch.picks)
    assert [p.depth for p in batch.picks] == [int(depth[v]) for v in picked]


def test_sum_norm_scales_by_children_over_branch_width():
    f = forked_forest()
    mean, total = walk(f).ib_score, walk(f, ib_norm="sum", branch_width=2).ib_score
    inner = f.num_children > 0
    np.testing.assert_allclose(total[inner], mean[inner] * f.num_children[inner] / 2, rtol=1e-12)
    with pytest.raises(ValueError, match="ib_norm"):
        walk(f, ib_norm="max")


@pytest.mark.parametrize("branch_root", [True, False])
def test_picks_say_where_the_branches_went(tiny, branch_root):
    problems = make_split("train", 3)
    sampler, _, _ = make_sampler(tiny, problems, tree=TreeSpec(2, 4, 1, 2), branch_root=branch_root)
    rollout = sampler.sample(prompts_of(tiny[1], problems))
    f, picks, m = rollout.forest, rollout.picks, rollout.metrics
    assert len(picks) == 3 * 3  # K = 1 pick per tree in each of rounds 2..4
    assert sorted(p.round for p in picks) == sorted([2, 3, 4] * 3)
    for p in picks:  # the records point at the picked nodes of the returned forest
        assert f.num_children[p.node] >= 2 and f.depth()[p.node] == p.depth
        assert f.response_lengths()[p.node] == p.response_len
    root_share = np.mean([p.depth == 0 for p in picks])
    assert m["tree/root_pick_share"] == pytest.approx(root_share)
    assert (root_share == 0) or branch_root
    leaves = f.is_leaf
    prefix = np.mean([p.response_len for p in picks]) / f.response_lengths()[leaves].mean()
    assert m["tree/pick_prefix_share"] == pytest.approx(prefix)



def test_single_step_trees_branch_at_the_root_and_keep_their_leaves(tiny):
    """A delimiter that never appears makes every response one step: the root is then the only node that
    can branch, and the tree still grows its G leaves (independent samples) instead of stopping at B0."""
    problems = make_split("train", 2)
    sampler, _, _ = make_sampler(tiny, problems, tree=TreeSpec(2, 3, 2, 1))
    sampler.cfg.step_delimiter = "\n\n"
    rollout = sampler.sample(prompts_of(tiny[1], problems))
    f = rollout.forest
    assert (f.depth()[f.is_leaf] == 1).all()  # flat: one step a response
    assert [int((f.is_leaf & (f.tree == t)).sum()) for t in range(2)] == [2 + 2 * 1 * 1] * 2  # root picked once a round
    assert rollout.metrics["tree/root_pick_share"] == 1.0

def test_independent_is_one_round(tiny):
    problems = make_split("train", 2)
    sampler, engine, _ = make_sampler(tiny, problems, strategy="independent", tree=TreeSpec(5, 1, 1, 1))
    f = sampler.sample(prompts_of(tiny[1], problems)).forest
    assert len(engine.calls) == 1 and int(f.is_leaf.sum()) == 10
    assert np.all(f.parent[f.parent >= 0][f.num_children[f.parent >= 0] == 0] >= 0)


@pytest.mark.parametrize("strategy", ["random", "entropy"])
def test_other_strategies_branch(tiny, strategy):
    problems = make_split("train", 2)
    sampler, engine, _ = make_sampler(tiny, problems, strategy=strategy, tree=TreeSpec(2, 3, 1, 1))
    f = sampler.sample(prompts_of(tiny[1], problems)).forest
    assert sum(map(len, engine.calls)) == 2 * 4 and int(f.is_leaf.sum()) == 2 * 4


def test_token_budget_stops_branching(tiny):
    problems = make_split("train", 2)
    sampler, engine, _ = make_sampler(tiny, problems, tree=TreeSpec(2, 6, 1, 1), token_budget=1)
    rollout = sampler.sample(prompts_of(tiny[1], problems))
    assert len(engine.calls) == 1  # every tree spent its budget in round 1
    assert int(rollout.forest.is_leaf.sum()) == 4


def test_same_seed_same_forest(tiny):
    problems = make_split("train", 2)
    a = make_sampler(tiny, problems, tree=TreeSpec(2, 3, 1, 1), seed=7)[0].sample(prompts_of(tiny[1], problems))
    b = make_sampler(tiny, problems, tree=TreeSpec(2, 3, 1, 1), seed=7)[0].sample(prompts_of(tiny[1], problems))
    assert np.array_equal(a.forest.tokens, b.forest.tokens) and np.array_equal(a.forest.parent, b.forest.parent)


@pytest.mark.parametrize("kw, match", [
    (dict(strategy="greedy"), "unknown strategy 'greedy'"),
    (dict(tree="4,0,1,1"), "tree spec L must be >= 1"),
    (dict(tree="4,9,1"), "four numbers"),
    (dict(max_new_tokens=0), "max_new_tokens must be > 0"),
    (dict(strategy="independent", tree="4,9,1,1"), "L = 1"),
    (dict(token_budget=-5), "token_budget"),
])
def test_bad_config(kw, match):
    with pytest.raises(ValueError, match=match):
        SamplerConfig(**kw)


def test_bad_prompts(tiny):
    sampler, _, _ = make_sampler(tiny, make_split("train", 1))
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        sampler.sample([[1, 2], []])
    with pytest.raises(ValueError, match="prompts is empty"):
        sampler.sample([])
    too_long = [5] * (tiny[0].config.max_position_embeddings + 1)
    with pytest.raises(ValueError, match="context|max_position"):
        sampler.sample([too_long])


def test_each_response_is_graded_against_its_own_trees_row(tiny):
    """The rows passed to `sample` reach the reward function with each response: two samplers sharing
    one engine, each sampling its own batch, never see the other's rows."""
    model, tok = tiny
    engine = TorchEngine(model, tokenizer=tok)
    problems = make_split("train", 4)
    seen: list[tuple[str, int]] = []

    def reward_fn(rows, responses):
        seen.extend((row["batch"], row["tree"]) for row in rows)
        return [float(row["tree"] == 1) for row in rows]

    cfg = SamplerConfig(max_new_tokens=64, sampling=SamplingParams(temperature=1.0), stop_token_ids=(tok.eos_token_id,),
                        step_delimiter=STEP_DELIMITER, tree=TreeSpec(2, 3, 1, 1))
    a, b = IBTreeSampler(engine, tok, reward_fn, cfg), IBTreeSampler(engine, tok, reward_fn, cfg)
    rows_b = [{"batch": "b", "tree": t} for t in range(2)]
    out_a = a.sample(prompts_of(tok, problems[:2]), [{"batch": "a", "tree": t} for t in range(2)])
    out_b = b.sample(prompts_of(tok, problems[2:]), rows_b)
    assert {s for s, _ in seen} == {"a", "b"}
    for out in (out_a, out_b):
        f = out.forest
        done = [v for v in np.flatnonzero(f.is_leaf) if out.finish_reason[v] != "length"]
        assert done and all(f.reward[v] == float(f.tree[v] == 1) for v in done)
    with pytest.raises(ValueError, match="1 rows for 2 prompts"):
        b.sample(prompts_of(tok, problems[2:]), rows_b[:1])


def test_timing_parts_sum_to_the_call(tiny):
    sampler, _, _ = make_sampler(tiny, make_split("train", 2), tree=TreeSpec(2, 3, 1, 1))
    t0 = time.perf_counter()
    m = sampler.sample(prompts_of(tiny[1], make_split("train", 2))).metrics
    wall = time.perf_counter() - t0
    parts = m["timing/rollout"] + m["timing/reward"] + m["timing/walk"]
    assert min(m["timing/rollout"], m["timing/reward"], m["timing/walk"]) > 0
    assert parts == pytest.approx(wall, rel=0.05)


def grow(tiny, problems, schedule, engine, delay=0.0, **kw):
    """The forest of `problems`; `delay` (s) makes the reward function of tree i take i * delay a call."""
    model, tok = tiny

    def reward_fn(rows, responses):
        time.sleep(delay * max(rows))
        texts = tok.batch_decode([r.tolist() for r in responses], skip_special_tokens=True)
        return [compute_score("arithmetic", t, problems[i].answer) for i, t in zip(rows, texts)]

    cfg = SamplerConfig(max_new_tokens=64, stop_token_ids=(tok.eos_token_id,), step_delimiter=STEP_DELIMITER,
                        schedule=schedule, seed=3, **kw)
    return IBTreeSampler(engine, tok, reward_fn, cfg).sample(prompts_of(tok, problems))


def same_tree(a, b, t: int) -> bool:
    fa, _ = a.forest.trees_only([t])
    fb, _ = b.forest.trees_only([t])
    return (np.array_equal(fa.parent, fb.parent) and np.array_equal(fa.tokens, fb.tokens)
            and np.array_equal(fa.reward, fb.reward, equal_nan=True)
            and a.generated_tokens[t] == b.generated_tokens[t])


@pytest.mark.parametrize("kw", [dict(strategy="ib", tree=TreeSpec(3, 4, 1, 1)), dict(strategy="random", tree=TreeSpec(2, 4, 2, 1)),
                                dict(strategy="entropy", tree=TreeSpec(2, 3, 1, 2)), dict(tree=TreeSpec(2, 5, 1, 1), token_budget=60),
                                dict(tree=TreeSpec(2, 4, 1, 1), branch_root=True, ib_norm="sum", tie_break="deep",
                                     step_prob="geomean")])
def test_continuous_grows_the_lockstep_forest(tiny, kw):
    """Continuous and lock-step schedules grow the same trees: same picks, rounds, tokens, rewards and
    accounting. Requests decoded one at a time from scratch make tokens a function of prefix and seed
    alone, so the two must agree exactly."""
    problems = make_split("train", 3)

    def exact(schedule, **more):
        return grow(tiny, problems, schedule, TorchEngine(tiny[0], use_cache=False, max_batch_size=1), **kw, **more)

    a = exact("lockstep")
    # rewards graded on a thread, slower for later trees, come back in another order: the same trees
    for b in (exact("continuous"), exact("continuous", async_rewards=True, delay=0.01)):
        assert all(same_tree(a, b, t) for t in range(len(problems)))
        assert np.array_equal(a.forest.tokens, b.forest.tokens)  # both in tree-major order
        assert a.finish_reason == b.finish_reason
        for key in ("tree/trajectories", "tree/generated_tokens", "critic/score/mean", "tree/eff_rate"):
            assert a.metrics[key] == b.metrics[key], key


def test_async_rewards_are_graded_while_the_engine_decodes(tiny):
    model, tok = tiny
    problems = make_split("train", 4)
    engine = TorchEngine(model, tokenizer=tok)
    progress = []

    def slow_reward(rows, responses):
        before = engine.stats()["decode_steps"]
        time.sleep(0.03)
        progress.append(engine.stats()["decode_steps"] - before)
        return [0.0] * len(rows)

    cfg = SamplerConfig(max_new_tokens=64, stop_token_ids=(tok.eos_token_id,), step_delimiter=STEP_DELIMITER,
                        tree=TreeSpec(2, 3, 1, 1), async_rewards=True)
    t0 = time.perf_counter()
    m = IBTreeSampler(engine, tok, slow_reward, cfg).sample(prompts_of(tok, problems)).metrics
    wall = time.perf_counter() - t0
    assert len(progress) >= 4 and max(progress) > 0  # decode steps ran while a round was being graded
    # timing/reward is the time the sampler waited on rewards with nothing to decode, so the parts still sum
    assert m["timing/rollout"] + m["timing/reward"] + m["timing/walk"] == pytest.approx(wall, rel=0.05)
    assert m["timing/reward"] < 0.03 * len(progress)


def test_async_reward_errors_reach_the_caller(tiny):
    model, tok = tiny
    cfg = SamplerConfig(max_new_tokens=64, stop_token_ids=(tok.eos_token_id,), step_delimiter=STEP_DELIMITER,
                        tree=TreeSpec(2, 3, 1, 1), async_rewards=True)
    prompts = prompts_of(tok, make_split("train", 2))

    def failing(rows, responses):
        raise RuntimeError("grader down")

    with pytest.raises(RuntimeError, match="grader down"):
        IBTreeSampler(TorchEngine(model, tokenizer=tok), tok, failing, cfg).sample(prompts)
    with pytest.raises(ValueError, match="reward_fn returned 1 rewards for 2 responses"):
        IBTreeSampler(TorchEngine(model, tokenizer=tok), tok, lambda rows, responses: [1.0], cfg).sample(prompts)


def test_continuous_with_the_batched_cached_engine(tiny):
    """With the default engine (batched, cached), a tree draws its own seeds in either schedule: trees
    agree but where batch-shape rounding flips a sampled token, which is rare."""
    problems = make_split("train", 6)
    runs = {s: grow(tiny, problems, s, TorchEngine(tiny[0]), tree=TreeSpec(4, 4, 1, 1)) for s in ("lockstep", "continuous")}
    a, b = runs["lockstep"], runs["continuous"]
    assert sum(same_tree(a, b, t) for t in range(len(problems))) >= len(problems) - 1
    assert a.metrics["tree/trajectories"] == b.metrics["tree/trajectories"] == 7


def test_a_tree_samples_the_same_in_any_batch(tiny):
    """Seeds come from the tree's id and branch number: a tree grown alone, or in another batch
    position with the same id, draws what it draws in the full batch."""
    problems = make_split("train", 3)
    model, tok = tiny
    engine = TorchEngine(model, use_cache=False, max_batch_size=1)
    cfg = SamplerConfig(max_new_tokens=64, stop_token_ids=(tok.eos_token_id,), step_delimiter=STEP_DELIMITER,
                        tree=TreeSpec(2, 3, 1, 1))
    sampler = IBTreeSampler(engine, tok, lambda rows, responses: [0.5] * len(rows), cfg)
    prompts = prompts_of(tok, problems)
    full = sampler.sample(prompts, tree_ids=[10, 11, 12])
    alone = sampler.sample(prompts[2:], tree_ids=[12])
    assert np.array_equal(full.forest.trees_only([2])[0].tokens, alone.forest.tokens)
    fresh = sampler.sample(prompts[2:])  # default ids count the trees grown so far: new samples
    assert not np.array_equal(fresh.forest.tokens, alone.forest.tokens)
    with pytest.raises(ValueError, match="2 tree ids for 1 prompts"):
        sampler.sample(prompts[:1], tree_ids=[1, 2])


def test_continuous_needs_a_streaming_engine(tiny):
    class GenerateOnly:
        def generate(self, requests):
            raise AssertionError("not reached")

    with pytest.raises(TypeError, match="schedule='lockstep'"):
        IBTreeSampler(GenerateOnly(), tiny[1], lambda rows, responses: [], SamplerConfig())
    IBTreeSampler(GenerateOnly(), tiny[1], lambda rows, responses: [], SamplerConfig(schedule="lockstep"))
