"""Fused kernels of ibtpo_fast (installed as `ibtpo_fast.kernels`)."""
from .logprob_entropy import logprob_entropy, logprob_entropy_from_logits
from .segment import segment_sum

__all__ = ["logprob_entropy", "logprob_entropy_from_logits", "segment_sum"]
