"""The bundled arithmetic task's reward in verl's and slime's reward contracts.

verl:  reward.custom_reward_function.path=examples/rewards.py reward.custom_reward_function.name=compute_score
slime: --custom-rm-path examples.rewards.rm   (run from the repository root, so `examples` imports)
"""
from typing import Any

from ibtpo_fast.tasks import compute_score as arithmetic_score


def compute_score(data_source: str, solution_str: str, ground_truth: str, extra_info: dict | None = None) -> float:
    """verl's contract: 1.0 when the response ends with `A:<ground_truth>`."""
    return arithmetic_score(data_source, solution_str, ground_truth, extra_info)


async def rm(args: Any, sample: Any, **kwargs: Any) -> float:
    """slime's --custom-rm-path contract, awaited by slime's async_rm on each finished leaf."""
    return arithmetic_score("arithmetic", sample.response, sample.label)
