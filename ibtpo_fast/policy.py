"""Per-token log-probs and entropies of a Hugging Face causal LM, through the fused kernel.

The decoder runs once over the batch; the LM head is applied only at loss positions, inside
`logprob_entropy`, which never materialises [tokens x vocab] logits for the whole batch.
"""
from __future__ import annotations

import torch

from ibtpo_fast.kernels import logprob_entropy
from ibtpo_fast.packing import TrainBatch


def decoder_and_head(model: torch.nn.Module) -> tuple[torch.nn.Module, torch.nn.Linear]:
    head = model.get_output_embeddings()
    base = getattr(model, model.base_model_prefix, None)
    if head is None or base is None:
        raise ValueError(f"{type(model).__name__}: need a causal LM with a base model and an LM head")
    return base, head


def token_logprobs(model: torch.nn.Module, batch: TrainBatch, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(logp, entropy) of every loss token of `batch`, under softmax(logits / temperature)."""
    base, head = decoder_and_head(model)
    device = head.weight.device
    mask = batch.attention_mask.to(device)
    if mask.ndim == 4:
        mask = mask.to(head.weight.dtype)
    out = base(input_ids=batch.input_ids.to(device), attention_mask=mask, position_ids=batch.position_ids.to(device))
    hidden = out.last_hidden_state[batch.rows.to(device), batch.pred_cols.to(device)]
    return logprob_entropy(hidden, head.weight, batch.targets.to(device), temperature=temperature, bias=head.bias)


# Attention implementations that honour a custom 4D mask and explicit position ids.
TREE_PACKED_ATTENTION = ("sdpa", "eager")


def supports_tree_packing(model: torch.nn.Module) -> bool:
    """Tree-packed training needs an ancestor mask: sdpa and eager attention take one as is
    (the Llama, Qwen2 and Qwen3 families, and other models built on transformers' masking utils);
    flash-attention kernels take no arbitrary mask."""
    return getattr(model.config, "_attn_implementation", None) in TREE_PACKED_ATTENTION
