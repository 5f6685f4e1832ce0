"""IBTree sampling (docs/algorithm.md section 3): grow one tree per prompt, round by round.

Round 1 samples B0 complete responses per prompt; each later round walks the forest, picks the
top-K nodes per tree by the strategy's score, and samples B continuations from each. Every round
is one engine call holding every tree's requests, and the new leaves are rewarded before the next
round's scoring. Shared prefixes are never regenerated; the engine's prefix cache serves them.
"""
from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ibtpo_fast.engines.protocol import Completion, Engine, Request, SamplingParams
from ibtpo_fast.forest import Forest
from ibtpo_fast.steps import step_lengths
from ibtpo_fast.walk import walk

STRATEGIES = ("ib", "independent", "random", "entropy")

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
    step_prob: str = "geomean"
    seed: int = 0

    def __post_init__(self) -> None:
        self.tree = check_tree(self.strategy, self.tree)
        if self.max_new_tokens <= 0:
            raise ValueError(f"max_new_tokens must be > 0, got {self.max_new_tokens}")
        if self.token_budget is not None and self.token_budget <= 0:
            raise ValueError(f"token_budget must be > 0 or None, got {self.token_budget}")


@dataclass
class Rollout:
    forest: Forest
    generated_tokens: np.ndarray  # per tree
    metrics: dict[str, float]
    finish_reason: dict[int, str]  # per leaf


@dataclass
class _Branch:
    tree: int
    node: int  # the node continued from (a root in round 1)
    response_len: int  # response tokens already on the path


class IBTreeSampler:
    def __init__(self, engine: Engine, tokenizer: Any, reward_fn: RewardFn, config: SamplerConfig) -> None:
        self.engine, self.tokenizer, self.reward_fn, self.cfg = engine, tokenizer, reward_fn, config
        self._rng = np.random.default_rng(config.seed)
        self._requests_made = 0

    def state_dict(self) -> dict[str, Any]:
        return {"rng": self._rng.bit_generator.state, "requests_made": self._requests_made}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._rng.bit_generator.state = state["rng"]
        self._requests_made = state["requests_made"]

    def sample(self, prompts: Sequence[Sequence[int]], rows: Sequence[Any] | None = None) -> Rollout:
        """One tree per prompt. `rows` (one per prompt: data source, ground truth, ...) reach the reward
        function with each response, so nothing outside this call decides which row a response grades against."""
        if len(prompts) == 0:
            raise ValueError("prompts is empty")
        rows = range(len(prompts)) if rows is None else rows
        if len(rows) != len(prompts):
            raise ValueError(f"got {len(rows)} rows for {len(prompts)} prompts")
        for i, p in enumerate(prompts):
            if len(p) == 0:
                raise ValueError(f"prompt {i} is empty")
        cfg, forest = self.cfg, Forest()
        roots = [forest.add_tree(p) for p in prompts]
        generated = np.zeros(len(prompts), np.int64)
        finish: dict[int, str] = {}
        timing = {"reward": 0.0, "walk": 0.0}
        start = time.perf_counter()
        prefix_total = cached_total = 0
        branches = [_Branch(t, r, 0) for t, r in enumerate(roots) for _ in range(cfg.tree.B0)]
        for round_idx in range(cfg.tree.L):
            if round_idx > 0:
                t0 = time.perf_counter()
                branches = self._pick(forest, generated)
                timing["walk"] += time.perf_counter() - t0
            if not branches:
                break
            requests = [self._request(forest, b) for b in branches]
            completions = self.engine.generate(requests)
            prefix_total += sum(len(r.prefix_ids) for r in requests)
            cached_total += sum(c.cached_tokens for c in completions)
            leaves = [self._attach(forest, b, c, generated, finish) for b, c in zip(branches, completions)]
            t0 = time.perf_counter()
            self._score(forest, leaves, finish, rows)
            timing["reward"] += time.perf_counter() - t0
        # rollout: everything but rewards and branch scoring (engine calls, requests, attaching steps),
        # so the three parts sum to the call's wall time
        timing["rollout"] = time.perf_counter() - start - timing["reward"] - timing["walk"]
        metrics = self._metrics(forest, generated, prefix_total, cached_total, timing, finish)
        return Rollout(forest, generated, metrics, finish)

    # ---- one round -------------------------------------------------------------------------
    def _request(self, forest: Forest, b: _Branch) -> Request:
        cfg = self.cfg
        # One seed per request, from the sampler's seed and a running count: reproducible runs,
        # distinct samples for every branch.
        seed = (cfg.seed * 1_000_003 + self._requests_made) % (2**63)
        self._requests_made += 1
        sp = SamplingParams(cfg.sampling.temperature, cfg.sampling.top_p, cfg.sampling.top_k, seed)
        return Request(
            prefix_ids=forest.prefix_tokens(b.node).tolist(),
            max_new_tokens=cfg.max_new_tokens - b.response_len,
            sampling=sp,
            stop_token_ids=tuple(cfg.stop_token_ids),
            stop_strings=tuple(cfg.stop_strings),
        )

    def _attach(self, forest: Forest, b: _Branch, c: Completion, generated: np.ndarray, finish: dict) -> int:
        ids = np.asarray(c.token_ids, np.int64)
        lengths = step_lengths(ids, self.tokenizer, self.cfg.step_delimiter, self.cfg.min_step_tokens)
        bounds = np.cumsum(lengths)[:-1]
        nodes = forest.add_chain(b.node, np.split(ids, bounds), c.logprobs, c.entropies)
        generated[b.tree] += len(ids)
        finish[nodes[-1]] = c.finish_reason
        return nodes[-1]

    def _score(self, forest: Forest, leaves: list[int], finish: dict, rows: Sequence[Any]) -> None:
        """Reward new leaves; truncated responses score 0 without calling the reward function."""
        done = [v for v in leaves if finish[v] != "length"]
        for v in leaves:
            if finish[v] == "length":
                forest.set_reward(v, 0.0)
        if not done:
            return
        responses = [forest.prefix_tokens(v)[forest.num_tokens[forest.roots[forest.tree[v]]]:] for v in done]
        rewards = self.reward_fn([rows[int(forest.tree[v])] for v in done], responses)
        if len(rewards) != len(done):
            raise ValueError(f"reward_fn returned {len(rewards)} rewards for {len(done)} responses")
        for v, r in zip(done, rewards):
            forest.set_reward(v, float(r))

    # ---- branching -------------------------------------------------------------------------
    def _pick(self, forest: Forest, generated: np.ndarray) -> list[_Branch]:
        """Top-K expandable nodes per tree by the strategy's score; ties: shallower, then lower index."""
        cfg = self.cfg
        score = self._node_scores(forest)
        depth = forest.depth()
        response_len = forest.response_lengths()
        open_node = (forest.num_children > 0) & (response_len < cfg.max_new_tokens)
        if cfg.token_budget is not None:
            open_node &= generated[forest.tree] < cfg.token_budget
        branches = []
        for t in range(forest.num_trees):
            cand = np.flatnonzero(open_node & (forest.tree == t))
            if len(cand) == 0:
                continue
            # lexsort: last key is primary -> score descending, depth ascending, index ascending
            order = np.lexsort((cand, depth[cand], -score[cand]))
            for v in cand[order[: cfg.tree.K]]:
                branches += [_Branch(t, int(v), int(response_len[v]))] * cfg.tree.B
        return branches

    def _node_scores(self, forest: Forest) -> np.ndarray:
        cfg = self.cfg
        if cfg.strategy == "ib":
            return walk(forest, beta=cfg.beta, step_prob=cfg.step_prob).ib_score
        if cfg.strategy == "random":
            return self._rng.random(len(forest))
        # entropy: mean token entropy (surprisal where the engine gave none) of a node's next steps
        per_tok = forest.token_entropies.astype(np.float64)
        missing = np.isnan(per_tok)
        per_tok[missing] = -forest.token_logprobs[missing]
        node_of_tok = np.repeat(np.arange(len(forest)), forest.num_tokens)
        node_mean = np.bincount(node_of_tok, per_tok, len(forest)) / np.maximum(forest.num_tokens, 1)
        steps = forest.parent >= 0
        total = np.bincount(forest.parent[steps], node_mean[steps], len(forest))
        return total / np.maximum(forest.num_children, 1)

    # ---- accounting ------------------------------------------------------------------------
    def _metrics(
        self, forest: Forest, generated: np.ndarray, prefix: int, cached: int, timing: dict, finish: dict
    ) -> dict:
        leaves = forest.is_leaf
        resp_len = forest.response_lengths()[leaves]
        trajectories = int(leaves.sum())
        total_gen = int(generated.sum())
        rewards = forest.reward[leaves]
        per_tree = [forest.reward[leaves & (forest.tree == t)] for t in range(forest.num_trees)]
        return {
            "tree/trajectories": trajectories / forest.num_trees,
            "tree/generated_tokens": total_gen / forest.num_trees,
            "tree/trajectories_per_1k_tokens": 1000.0 * trajectories / max(total_gen, 1),
            "tree/unique_token_ratio": total_gen / max(int(resp_len.sum()), 1),
            "tree/eff_rate": float(np.mean([r.min() != r.max() for r in per_tree])),
            "critic/score/mean": float(rewards.mean()),
            "response_length/mean": float(resp_len.mean()),
            # share of trajectories cut at max_new_tokens (they score 0)
            "response_length/clip_ratio": float(np.mean([finish[v] == "length" for v in np.flatnonzero(leaves)])),
            "rollout/prefix_cache_hit_rate": cached / max(prefix, 1),
            **{f"timing/{k}": v for k, v in timing.items()},
        }
