"""IB-TPO inside other RL frameworks: each adapter grows trees with `IBTreeSampler` and hands the
framework one row per leaf (`ibtpo_fast.leaf_batch`) with per-token step advantages.

`trl`: a `GRPOTrainer` subclass. `verl`: an advantage estimator and a tree-growing agent loop.
`slime`: a rollout function and a custom advantage function. Each framework is imported only by its
own module, so none of them is needed to use the others.
"""
