"""ibtpo_fast: information-bottleneck tree rollouts and step-level advantages for LLM RL."""
from ibtpo_fast.forest import Forest, Trajectory
from ibtpo_fast.steps import split_steps, step_lengths
from ibtpo_fast.walk import WalkResult, walk

__all__ = ["Forest", "Trajectory", "WalkResult", "split_steps", "step_lengths", "walk"]
__version__ = "0.1.0"
