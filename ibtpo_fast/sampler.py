"""IBTree sampling (docs/algorithm.md section 3): grow one tree per prompt, round by round.

Round 1 samples B0 complete responses per prompt; each later round walks the tree, picks its top-K
nodes by the strategy's score, and samples B continuations from each; a round's leaves are rewarded
before the next round's scoring. Trees advance on their own (`schedule="continuous"`, the default):
a tree's next round joins the engine's running batch as soon as its last one is rewarded, while
other trees still decode; with `async_rewards` a finished round is graded on a background thread while
the engine decodes on. `schedule="lockstep"` runs every tree's round r as one engine call, then
round r + 1; both grow the same trees, since a tree's picks depend on that tree alone and its
samples on its own seeds. Shared prefixes are never regenerated; the engine's prefix cache serves them.
"""
from __future__ import annotations

import dataclasses
import time
import warnings
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ibtpo_fast.engines.protocol import Completion, Engine, Request, SamplingParams
from ibtpo_fast.forest import Forest
from ibtpo_fast.metrics import Parts, mean_of, reduce_parts
from ibtpo_fast.steps import step_lengths
from ibtpo_fast.walk import IB_NORMS, walk

STRATEGIES = ("ib", "independent", "random", "entropy")
# continuous: each tree's next round joins the running decode batch as soon as its last round is rewarded;
# lockstep: every tree's round r in one engine call, then round r + 1 (the same trees, more wall time)
SCHEDULES = ("continuous", "lockstep")
# which of two equal scores is picked first: the shallower node or the deeper one (then the lower index)
TIE_BREAKS = ("shallow", "deep")

# reward_fn(rows, response_token_ids) -> one reward per response, where rows[i] is what the caller passed
# to `sample` for response i's tree (its tree index when the caller passed nothing)
RewardFn = Callable[[Sequence[Any], Sequence[np.ndarray]], Sequence[float]]


@dataclass(frozen=True)
class TreeSpec:
    """(B0, L, K, B): initial samples, rounds, nodes expanded per round, continuations per node."""

    B0: int = 4
    L: int = 9
    K: int = 1
    B: int = 1

    def __post_init__(self) -> None:
        for name in ("B0", "L", "K", "B"):
            if getattr(self, name) < 1:
                raise ValueError(f"tree spec {name} must be >= 1, got {getattr(self, name)} (spec {self})")

    @classmethod
    def parse(cls, spec: str | Sequence[int] | TreeSpec) -> TreeSpec:
        if isinstance(spec, TreeSpec):
            return spec
        parts = [int(x) for x in spec.split(",")] if isinstance(spec, str) else [int(x) for x in spec]
        if len(parts) != 4:
            raise ValueError(f"tree spec needs four numbers B0,L,K,B, got {spec!r}")
        return cls(*parts)

    @property
    def trajectories(self) -> int:
        return self.B0 + (self.L - 1) * self.K * self.B


def check_tree(strategy: str, tree: str | Sequence[int] | TreeSpec) -> TreeSpec:
    """The parsed tree spec, if `strategy` can grow it; ValueError otherwise."""
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}; choose one of {', '.join(STRATEGIES)}")
    spec = TreeSpec.parse(tree)
    if strategy == "independent" and spec.L != 1:
        raise ValueError(f"strategy 'independent' samples B0 responses in one round: tree spec needs L = 1, got {spec}")
    return spec


@dataclass
class SamplerConfig:
    strategy: str = "ib"
    tree: TreeSpec = field(default_factory=TreeSpec)
    max_new_tokens: int = 256  # per response: a continuation gets what its prefix left
    sampling: SamplingParams = field(default_factory=SamplingParams)
    stop_token_ids: Sequence[int] = ()
    stop_strings: Sequence[str] = ()
    step_delimiter: str = "\n\n"
    min_step_tokens: int = 1
    token_budget: int | None = None  # per tree: stop branching once spent
    beta: float = 5.0
    step_prob: str = "product"
    ib_norm: str = "mean"  # IB-Score over a node's children: their mean, or their sum / B (docs/algorithm.md section 2)
    branch_root: bool = False  # True: the root stays a candidate after round 1 (default: it keeps its B0 children)
    tie_break: str = "shallow"
    min_branch_room: int = 1  # a candidate's path leaves at least this many response tokens under max_new_tokens
    seed: int = 0
    schedule: str = "continuous"
    # continuous schedule: grade each finished round on a background thread while the engine keeps decoding
    # (for reward functions that wait, on worker processes or a server); the trees are the same
    async_rewards: bool = False

    def __post_init__(self) -> None:
        self.tree = check_tree(self.strategy, self.tree)
        if self.schedule not in SCHEDULES:
            raise ValueError(f"unknown schedule {self.schedule!r}; choose one of {', '.join(SCHEDULES)}")
        if self.ib_norm not in IB_NORMS:
            raise ValueError(f"unknown ib_norm {self.ib_norm!r}; choose one of {', '.join(IB_NORMS)}")
        if self.tie_break not in TIE_BREAKS:
            raise ValueError(f"unknown tie_break {self.tie_break!r}; choose one of {', '.join(TIE_BREAKS)}")
        if self.min_branch_room < 1:
            raise ValueError(f"min_branch_room must be >= 1, got {self.min_branch_room}")
        if self.max_new_tokens <= 0:
            raise ValueError(f"max_new_tokens must be > 0, got {self.max_new_tokens}")
        if self.token_budget is not None and self.token_budget <= 0:
            raise ValueError(f"token_budget must be > 0 or None, got {self.token_budget}")


@dataclass(frozen=True)
class Pick:
    """One node picked for expansion: where each rule spends its branches."""

    node: int  # in the rollout's forest
    round: int  # the round its continuations belong to (2 .. L)
    depth: int  # steps from the root (0: the root)
    response_len: int  # response tokens already on its path
    cov_eta: float  # Cov(eta1, eta2) over its children when it was picked (NaN with fewer than 2)


@dataclass
class Rollout:
    forest: Forest
    generated_tokens: np.ndarray  # per tree
    metrics: dict[str, float]
    finish_reason: dict[int, str]  # per leaf
    picks: list[Pick] = field(default_factory=list)
    parts: dict[str, Parts] = field(default_factory=dict)  # `metrics` as parts, for reducing over ranks


@dataclass
class _Branch:
    tree: int
    node: int  # the node continued from (a root in round 1)
    response_len: int  # response tokens already on the path
    number: int  # the tree's branch count when it was made: with the tree's id, it seeds the request


@dataclass
class _Batch:
    """What one `sample` call grows and counts."""

    forest: Forest
    rows: Sequence[Any]
    tree_ids: list[int]
    generated: np.ndarray  # per tree
    branches_made: np.ndarray  # per tree
    finish: dict[int, str] = field(default_factory=dict)
    picks: list[Pick] = field(default_factory=list)
    timing: dict[str, float] = field(default_factory=lambda: {"reward": 0.0, "walk": 0.0})
    prefix_tokens: int = 0
    cached_tokens: int = 0

    def branches(self, tree: int, picks: Sequence[tuple[int, int]], copies: int) -> list[_Branch]:
        """`copies` branches from each (node, response length) of `picks`, numbered in order."""
        out = []
        for node, response_len in picks:
            for _ in range(copies):
                out.append(_Branch(tree, node, response_len, int(self.branches_made[tree])))
                self.branches_made[tree] += 1
        return out


class IBTreeSampler:
    def __init__(self, engine: Engine, tokenizer: Any, reward_fn: RewardFn, config: SamplerConfig) -> None:
        if config.schedule == "continuous" and not all(hasattr(engine, a) for a in ("submit", "poll", "in_flight")):
            raise TypeError(f"schedule='continuous' needs an engine with submit / poll / in_flight (the streaming form "
                            f"of the engine protocol); {type(engine).__name__} has none: use schedule='lockstep'")
        self.engine, self.tokenizer, self.reward_fn, self.cfg = engine, tokenizer, reward_fn, config
        self._trees_sampled = 0  # default tree ids continue from here, so every call draws new samples
        self._warned_surprisal = False

    def state_dict(self) -> dict[str, Any]:
        return {"trees_sampled": self._trees_sampled}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._trees_sampled = int(state["trees_sampled"])

    def sample(self, prompts: Sequence[Sequence[int]], rows: Sequence[Any] | None = None,
               tree_ids: Sequence[int] | None = None) -> Rollout:
        """One tree per prompt. `rows` (one per prompt: data source, ground truth, ...) reach the reward
        function with each response, so nothing outside this call decides which row a response grades
        against. `tree_ids` name the trees for their random streams (default: a count of the trees this
        sampler has grown), so a tree draws the same samples whichever batch or process grows it."""
        if len(prompts) == 0:
            raise ValueError("prompts is empty")
        rows = range(len(prompts)) if rows is None else rows
        if len(rows) != len(prompts):
            raise ValueError(f"got {len(rows)} rows for {len(prompts)} prompts")
        for i, p in enumerate(prompts):
            if len(p) == 0:
                raise ValueError(f"prompt {i} is empty")
        if tree_ids is None:
            tree_ids = range(self._trees_sampled, self._trees_sampled + len(prompts))
            self._trees_sampled += len(prompts)
        elif len(tree_ids) != len(prompts):
            raise ValueError(f"got {len(tree_ids)} tree ids for {len(prompts)} prompts")
        forest = Forest()
        for p in prompts:
            forest.add_tree(p)
        n = len(prompts)
        batch = _Batch(forest, rows, [int(t) for t in tree_ids], np.zeros(n, np.int64), np.zeros(n, np.int64))
        start = time.perf_counter()
        if self.cfg.schedule == "lockstep":
            self._lockstep(batch)
        else:
            self._continuous(batch)
        # rollout: everything but rewards and branch scoring (engine calls, requests, attaching steps),
        # so the three parts sum to the call's wall time
        batch.timing["rollout"] = time.perf_counter() - start - batch.timing["reward"] - batch.timing["walk"]
        forest, new_index = batch.forest.tree_major()
        finish = {int(new_index[v]): reason for v, reason in batch.finish.items()}
        picks = [dataclasses.replace(p, node=int(new_index[p.node])) for p in batch.picks]
        parts = self._metric_parts(forest, batch, finish, picks)
        return Rollout(forest, batch.generated, reduce_parts([parts]), finish, picks, parts)

    # ---- schedules -------------------------------------------------------------------------
    def _lockstep(self, batch: _Batch) -> None:
        """Every tree's round r in one engine call, then every tree's round r + 1."""
        cfg, forest = self.cfg, batch.forest
        branches = [b for t, root in enumerate(forest.roots) for b in batch.branches(t, [(root, 0)], cfg.tree.B0)]
        for round_idx in range(1, cfg.tree.L + 1):
            if not branches:
                return
            completions = self._generate(batch, branches)
            leaves = [self._attach(batch, b, c) for b, c in zip(branches, completions)]
            self._score(batch, leaves)
            if round_idx < cfg.tree.L:
                branches = self._next_round(batch, range(forest.num_trees), round_idx)

    def _continuous(self, batch: _Batch) -> None:
        """Each tree on its own: when all branches of its round are back, they are rewarded and its next
        branches join the engine's running batch while other trees still decode. A tree's rounds, picks
        and samples are those of the lock-step schedule; only the wall time differs."""
        cfg, forest = self.cfg, batch.forest
        rounds = np.ones(forest.num_trees, np.int64)
        waiting: dict[int, tuple[int, int]] = {}  # engine handle -> (tree, slot in the tree's round)
        branches: dict[int, list[_Branch]] = {}  # tree -> its current round's branches
        returned: dict[int, list[Completion | None]] = {}  # tree -> their completions, by slot
        grading: dict[Future, list[int]] = {}  # rewards being computed -> the trees they are for

        def submit(new: list[_Branch]) -> None:
            requests = [self._request(batch, b) for b in new]
            batch.prefix_tokens += sum(len(r.prefix_ids) for r in requests)
            for b, handle in zip(new, self.engine.submit(requests)):
                branches.setdefault(b.tree, []).append(b)
                waiting[handle] = (b.tree, len(returned.setdefault(b.tree, [])))
                returned[b.tree].append(None)

        def grow(trees: list[int]) -> None:
            """The next round of `trees`, whose leaves are rewarded."""
            trees = [t for t in trees if rounds[t] < cfg.tree.L]
            nxt = []
            for r in sorted({int(rounds[t]) for t in trees}):  # one walk for the trees that finished round r
                nxt += self._next_round(batch, [t for t in trees if rounds[t] == r], r)
            rounds[trees] += 1
            if nxt:
                submit(nxt)

        submit([b for t, root in enumerate(forest.roots) for b in batch.branches(t, [(root, 0)], cfg.tree.B0)])
        pool = ThreadPoolExecutor(1, thread_name_prefix="ibtpo-reward") if cfg.async_rewards else None
        try:
            while waiting or grading:
                done_trees = []
                if waiting:
                    for handle, completion in self.engine.poll():
                        t, slot = waiting.pop(handle)
                        returned[t][slot] = completion
                        batch.cached_tokens += completion.cached_tokens
                        if all(c is not None for c in returned[t]):
                            done_trees.append(t)
                else:  # nothing to decode: the sampler waits on the rewards
                    t0 = time.perf_counter()
                    wait(grading, return_when=FIRST_COMPLETED)
                    batch.timing["reward"] += time.perf_counter() - t0
                if done_trees:
                    # The round's branches attach in their order, as in lock-step, whatever order they finished in.
                    leaves = [self._attach(batch, b, c)
                              for t in done_trees for b, c in zip(branches.pop(t), returned.pop(t))]
                    grading[self._grade_round(batch, leaves, pool)] = done_trees
                for job in [job for job in grading if job.done()]:
                    self._set_rewards(batch, *job.result())
                    grow(grading.pop(job))
        finally:
            if pool is not None:
                pool.shutdown(cancel_futures=True)

    def _generate(self, batch: _Batch, branches: list[_Branch]) -> list[Completion]:
        requests = [self._request(batch, b) for b in branches]
        completions = self.engine.generate(requests)
        batch.prefix_tokens += sum(len(r.prefix_ids) for r in requests)
        batch.cached_tokens += sum(c.cached_tokens for c in completions)
        return completions

    # ---- one round -------------------------------------------------------------------------
    def _request(self, batch: _Batch, b: _Branch) -> Request:
        cfg = self.cfg
        sp = SamplingParams(cfg.sampling.temperature, cfg.sampling.top_p, cfg.sampling.top_k,
                            branch_seed(cfg.seed, batch.tree_ids[b.tree], b.number))
        return Request(
            prefix_ids=batch.forest.prefix_tokens(b.node).tolist(),
            max_new_tokens=cfg.max_new_tokens - b.response_len,
            sampling=sp,
            stop_token_ids=tuple(cfg.stop_token_ids),
            stop_strings=tuple(cfg.stop_strings),
        )

    def _attach(self, batch: _Batch, b: _Branch, c: Completion) -> int:
        ids = np.asarray(c.token_ids, np.int64)
        lengths = step_lengths(ids, self.tokenizer, self.cfg.step_delimiter, self.cfg.min_step_tokens)
        bounds = np.cumsum(lengths)[:-1]
        nodes = batch.forest.add_chain(b.node, np.split(ids, bounds), c.logprobs, c.entropies)
        batch.generated[b.tree] += len(ids)
        batch.finish[nodes[-1]] = c.finish_reason
        return nodes[-1]

    def _score(self, batch: _Batch, leaves: list[int]) -> None:
        """Reward new leaves; truncated responses score 0 without calling the reward function."""
        self._set_rewards(batch, *self._grade_round(batch, leaves).result())

    def _grade_round(self, batch: _Batch, leaves: list[int], pool: ThreadPoolExecutor | None = None) -> Future:
        """The grades of new leaves, (leaves, rewards) for `_set_rewards`: computed on `pool`, or here, as
        reward time, without one. Truncated responses score 0 here, without the reward function."""
        done, rows, responses = self._to_grade(batch, leaves)
        if pool is not None:
            return pool.submit(lambda: (done, self._grade(rows, responses)))
        t0, job = time.perf_counter(), Future()
        job.set_result((done, self._grade(rows, responses)))
        batch.timing["reward"] += time.perf_counter() - t0
        return job

    def _to_grade(self, batch: _Batch, leaves: list[int]) -> tuple[list[int], list[Any], list[np.ndarray]]:
        """The leaves that need the reward function (truncated ones score 0 here), their rows and responses."""
        forest, finish = batch.forest, batch.finish
        for v in leaves:
            if finish[v] == "length":
                forest.set_reward(v, 0.0)
        done = [v for v in leaves if finish[v] != "length"]
        responses = [forest.prefix_tokens(v)[forest.num_tokens[forest.roots[forest.tree[v]]]:] for v in done]
        return done, [batch.rows[int(forest.tree[v])] for v in done], responses

    def _grade(self, rows: list[Any], responses: list[np.ndarray]) -> list[float]:
        if not responses:
            return []
        rewards = self.reward_fn(rows, responses)
        if len(rewards) != len(responses):
            raise ValueError(f"reward_fn returned {len(rewards)} rewards for {len(responses)} responses")
        return [float(r) for r in rewards]

    @staticmethod
    def _set_rewards(batch: _Batch, leaves: list[int], rewards: list[float]) -> None:
        for v, r in zip(leaves, rewards):
            batch.forest.set_reward(v, r)

    # ---- branching -------------------------------------------------------------------------
    def _next_round(self, batch: _Batch, trees: Sequence[int], round_idx: int) -> list[_Branch]:
        """Branches of round `round_idx + 1` for `trees`: the top-K candidates of each by the strategy's
        score (ties by `tie_break`, then lower index), B continuations each. Scored on a forest of `trees`
        alone: a tree's picks depend on that tree only, and other trees may be mid-round."""
        t0, cfg = time.perf_counter(), self.cfg
        sub, nodes = batch.forest.trees_only(trees)
        w = walk(sub, beta=cfg.beta, step_prob=cfg.step_prob, ib_norm=cfg.ib_norm, branch_width=cfg.tree.B)
        score = w.ib_score if cfg.strategy == "ib" else self._node_scores(sub, [batch.tree_ids[t] for t in trees], round_idx)
        depth = sub.depth()
        response_len = sub.response_lengths()
        open_node = self._candidates(sub, response_len, batch.generated[np.asarray(trees)][sub.tree])
        tie = depth if cfg.tie_break == "shallow" else -depth
        branches = []
        for k, t in enumerate(trees):
            cand = np.flatnonzero(open_node & (sub.tree == k))
            # lexsort: last key is primary -> score descending, then the tie rule, then index ascending
            for v in cand[np.lexsort((cand, tie[cand], -score[cand]))[: cfg.tree.K]]:
                batch.picks.append(Pick(int(nodes[v]), round_idx + 1, int(depth[v]), int(response_len[v]),
                                        float(w.cov_eta[v])))
                branches += batch.branches(t, [(int(nodes[v]), int(response_len[v]))], cfg.tree.B)
        batch.timing["walk"] += time.perf_counter() - t0
        return branches

    def _candidates(self, forest: Forest, response_len: np.ndarray, tree_generated: np.ndarray) -> np.ndarray:
        """Nodes that may be expanded (docs/algorithm.md section 3): non-leaves with room left on their path, in
        trees that have not spent their token budget. The root is one with `branch_root`, or in a tree with
        fewer than K other candidates (single-step responses), so every tree still grows its G leaves."""
        cfg = self.cfg
        ok = (forest.num_children > 0) & (cfg.max_new_tokens - response_len >= cfg.min_branch_room)
        if cfg.token_budget is not None:
            ok &= tree_generated < cfg.token_budget
        if not cfg.branch_root:
            root = forest.parent < 0
            below = np.bincount(forest.tree[ok & ~root], minlength=forest.num_trees)
            ok &= ~root | (below[forest.tree] < cfg.tree.K)
        return ok

    def _node_scores(self, forest: Forest, tree_ids: Sequence[int], round_idx: int) -> np.ndarray:
        """The random and entropy strategies' score of every node, on a forest whose tree k has id
        `tree_ids[k]` (the random strategy's draws are seeded by the tree's id and the round)."""
        cfg = self.cfg
        if cfg.strategy == "random":
            score = np.zeros(len(forest))
            for k, tree_id in enumerate(tree_ids):
                mine = np.flatnonzero(forest.tree == k)
                score[mine] = np.random.default_rng([cfg.seed % 2**64, tree_id, round_idx]).random(len(mine))
            return score
        # entropy: mean token entropy (surprisal where the engine gave none) of a node's next steps
        per_tok = forest.token_entropies.astype(np.float64)
        missing = np.isnan(per_tok)
        generated = np.repeat(forest.parent >= 0, forest.num_tokens)  # a prompt has no sampled entropies
        if (missing & generated).any() and not self._warned_surprisal:
            self._warned_surprisal = True
            warnings.warn("strategy=entropy: the engine returns no token entropies (SGLang does not), so nodes are "
                          "scored by the sampled tokens' surprisal, -log p, instead", RuntimeWarning, stacklevel=2)
        per_tok[missing] = -forest.token_logprobs[missing]
        node_of_tok = np.repeat(np.arange(len(forest)), forest.num_tokens)
        node_mean = np.bincount(node_of_tok, per_tok, len(forest)) / np.maximum(forest.num_tokens, 1)
        steps = forest.parent >= 0
        total = np.bincount(forest.parent[steps], node_mean[steps], len(forest))
        return total / np.maximum(forest.num_children, 1)

    # ---- accounting ------------------------------------------------------------------------
    def _metric_parts(self, forest: Forest, batch: _Batch, finish: dict[int, str], picks: list[Pick]) -> dict[str, Parts]:
        """The rollout's metrics as parts (ibtpo_fast.metrics), which reduce exactly over ranks."""
        leaves = forest.is_leaf
        resp_len = forest.response_lengths()[leaves]
        trajectories, trees, resp_total = float(leaves.sum()), float(forest.num_trees), float(resp_len.sum())
        total_gen = float(batch.generated.sum())
        per_tree = [forest.reward[leaves & (forest.tree == t)] for t in range(forest.num_trees)]
        return {
            "tree/trajectories": (trajectories, trees),
            "tree/generated_tokens": (total_gen, trees),
            "tree/trajectories_per_1k_tokens": (1000.0 * trajectories, total_gen),
            "tree/unique_token_ratio": (total_gen, resp_total),
            "tree/eff_rate": (float(sum(r.min() != r.max() for r in per_tree)), trees),
            "critic/score/mean": (float(forest.reward[leaves].sum()), trajectories),
            "response_length/mean": (resp_total, trajectories),
            # share of trajectories cut at max_new_tokens (they score 0)
            "response_length/clip_ratio": (float(sum(finish[v] == "length" for v in np.flatnonzero(leaves))), trajectories),
            "rollout/prefix_cache_hit_rate": (float(batch.cached_tokens), float(batch.prefix_tokens)),
            **pick_parts(picks, resp_total, trajectories),
            **{f"timing/{k}": (v,) for k, v in batch.timing.items()},
        }


def pick_parts(picks: Sequence[Pick], response_tokens: float, trajectories: float) -> dict[str, Parts]:
    """Where a rollout's branches went: the share picked at the root, the response tokens already on a
    picked node's path as a share of the mean response length (`response_tokens` over `trajectories`: how
    much of a response each continuation skips), and the mean Cov(eta1, eta2) at picked nodes with two or
    more children (NaN without picks)."""
    return {
        "tree/root_pick_share": (float(sum(p.depth == 0 for p in picks)), float(len(picks))),
        "tree/pick_prefix_share": (float(sum(p.response_len for p in picks)), float(len(picks)), response_tokens,
                                   trajectories),
        "ib/cov_eta_picked": mean_of(np.array([p.cov_eta for p in picks], np.float64)),
    }


def branch_seed(seed: int, tree_id: int, branch: int) -> int:
    """The sampling seed of a tree's `branch`-th request: a function of the sampler's seed, the tree and the
    branch alone, so a tree draws the same tokens in any batch, schedule or process."""
    return int(np.random.SeedSequence([seed % 2**64, tree_id, branch]).generate_state(1, np.uint64)[0] >> 1)
