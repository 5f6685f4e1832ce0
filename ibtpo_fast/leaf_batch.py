"""One row per leaf of a walked forest: the batch every RL framework's loss takes.

TRL, verl and slime all train on independent (prompt, response) rows grouped by prompt. A tree's
leaves are such rows: each is its root's prompt plus the steps on the path to it, and each response
token carries the advantage of the step it belongs to. `leaf_batch` builds those rows once, in leaf
order (trees in order, each tree's leaves contiguous); the framework adapters only rename and reshape.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch

from ibtpo_fast.forest import Forest
from ibtpo_fast.walk import WalkResult


@dataclass
class LeafBatch:
    """N rows, one per leaf. Prompts are left-padded to P columns, responses right-padded to R."""

    prompt_ids: torch.Tensor  # [N, P] int64
    prompt_mask: torch.Tensor  # [N, P] int64: 1 on prompt tokens
    response_ids: torch.Tensor  # [N, R] int64
    response_mask: torch.Tensor  # [N, R] int64: 1 on response tokens
    rollout_logprobs: torch.Tensor  # [N, R] float32: the sampling engine's log-probs, 0 on padding
    advantages: torch.Tensor  # [N, R] float32: the step advantage of each response token, 0 on padding
    group: torch.Tensor  # [N] int64: the tree of each row
    reward: torch.Tensor  # [N] float32: the leaf's reward
    truncated: torch.Tensor  # [N] bool: the response was cut at its token limit (its reward is 0)
    leaf: torch.Tensor  # [N] int64: the leaf's node index in the forest

    def __len__(self) -> int:
        return len(self.group)

    @property
    def input_ids(self) -> torch.Tensor:
        """[N, P + R]: prompt then response, as a causal LM reads them."""
        return torch.cat([self.prompt_ids, self.response_ids], dim=1)

    @property
    def attention_mask(self) -> torch.Tensor:
        """[N, P + R]: 1 on real tokens of `input_ids`."""
        return torch.cat([self.prompt_mask, self.response_mask], dim=1)

    @property
    def response_lengths(self) -> torch.Tensor:
        return self.response_mask.sum(dim=1)

    def prompt_list(self, i: int) -> list[int]:
        return self.prompt_ids[i, self.prompt_mask[i].bool()].tolist()

    def response_list(self, i: int) -> list[int]:
        return self.response_ids[i, : int(self.response_lengths[i])].tolist()


def leaf_batch(forest: Forest, result: WalkResult, pad_id: int, finish_reason: Mapping[int, str] | None = None) -> LeafBatch:
    """The leaves of `forest` as training rows, with `result`'s step advantages on their tokens.

    `finish_reason` (leaf -> "stop" | "length", as `Rollout.finish_reason`) marks truncated rows.
    Raises ValueError if a leaf has no reward or a response token no advantage.
    """
    trajs = forest.trajectories()
    if not trajs:
        raise ValueError("the forest has no leaves")
    leaves = np.array([t.leaf for t in trajs])
    unrewarded = leaves[np.isnan(forest.reward[leaves])]
    if len(unrewarded):
        raise ValueError(f"leaves {unrewarded[:5].tolist()} have no reward: score every leaf before walking")
    n, width_p = len(trajs), max(t.prompt_len for t in trajs)
    width_r = max(len(t.input_ids) - t.prompt_len for t in trajs)
    prompt = np.full((n, width_p), pad_id, np.int64)
    response = np.full((n, width_r), pad_id, np.int64)
    prompt_mask, response_mask = np.zeros((n, width_p), np.int64), np.zeros((n, width_r), np.int64)
    logprobs, adv = np.zeros((n, width_r), np.float32), np.zeros((n, width_r), np.float32)
    for i, t in enumerate(trajs):
        p, r = t.prompt_len, len(t.input_ids) - t.prompt_len
        prompt[i, width_p - p :], prompt_mask[i, width_p - p :] = t.input_ids[:p], 1
        response[i, :r], response_mask[i, :r] = t.input_ids[p:], 1
        logprobs[i, :r] = t.old_logprobs[p:]
        adv[i, :r] = result.advantage[t.node_index[p:]]
    if np.isnan(adv).any():
        raise ValueError("a response token has no advantage (NaN): walk the same forest the batch is built from")
    finish = finish_reason or {}
    return LeafBatch(
        prompt_ids=torch.from_numpy(prompt), prompt_mask=torch.from_numpy(prompt_mask),
        response_ids=torch.from_numpy(response), response_mask=torch.from_numpy(response_mask),
        rollout_logprobs=torch.from_numpy(logprobs), advantages=torch.from_numpy(adv),
        group=torch.from_numpy(forest.tree[leaves].astype(np.int64)),
        reward=torch.from_numpy(forest.reward[leaves].astype(np.float32)),
        truncated=torch.tensor([finish.get(int(v)) == "length" for v in leaves], dtype=torch.bool),
        leaf=torch.from_numpy(leaves.astype(np.int64)),
    )


def check_leaves_per_tree(batch: LeafBatch, trees: int, size: int, *, expected: str, limit: str, setting: str) -> None:
    """ValueError naming the first of `trees` trees that did not grow `size` leaves (the framework's group
    size, spelt `expected`): a tree grows fewer when fewer than K of its nodes can branch."""
    counts = np.bincount(batch.group.numpy(), minlength=trees)
    short = np.flatnonzero(counts != size)
    if len(short):
        k = int(short[0])
        raise ValueError(f"tree {k} grew {counts[k]} leaves, not {expected}: fewer than K of its nodes could branch "
                         f"(single-step responses, or paths at {limit}); lower K in {setting}")
