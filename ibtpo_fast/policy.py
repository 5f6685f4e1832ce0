"""Per-token log-probs and entropies of a Hugging Face causal LM, through the fused kernel.

The decoder runs once over the batch; the LM head is applied only at loss positions, inside
`logprob_entropy`, which never materialises [tokens x vocab] logits for the whole batch.
"""
from __future__ import annotations

import contextlib

import torch

from ibtpo_fast.attention_impl import attention_implementation, head_dim
from ibtpo_fast.kernels import logprob_entropy
from ibtpo_fast.packing import TrainBatch
from ibtpo_fast.tree_attention import GATHER_ATTENTION, TREE_ATTENTION_BACKENDS

# Attention implementations a model may be loaded with for tree-packed training: transformers routes
# their layers through its attention interface (which `gather` hooks) and passes 4D masks through.
TREE_PACKED_ATTENTION = ("sdpa", "eager", "flex_attention")
MODEL_ATTENTION = TREE_PACKED_ATTENTION + ("flash_attention_2",)  # flash-attention models train on flat rows
FLEX_MIN_HEAD_DIM = 32  # smaller heads fail to compile in FlexAttention on CUDA (torch 2.11: 8 refused, 16 in fp32)


def decoder_and_head(model: torch.nn.Module) -> tuple[torch.nn.Module, torch.nn.Linear]:
    head = model.get_output_embeddings()
    base = getattr(model, model.base_model_prefix, None)
    if head is None or base is None:
        raise ValueError(f"{type(model).__name__}: need a causal LM with a base model and an LM head")
    return base, head


def supports_tree_packing(model: torch.nn.Module) -> bool:
    """The Llama, Qwen2 and Qwen3 families (and other models built on transformers' attention
    interface) loaded with sdpa, eager or flex_attention; flash-attention kernels take no tree mask."""
    return getattr(model.config, "_attn_implementation", None) in TREE_PACKED_ATTENTION


def resolve_tree_attention(model: torch.nn.Module, choice: str = "auto") -> str:
    """The tree attention backend for `model`. `auto` is flex on CUDA, where its block-sparse kernels
    train fastest, and gather elsewhere: torch has no FlexAttention backward on CPU, and its kernels
    need heads of at least 32 dimensions."""
    impl, dim = getattr(model.config, "_attn_implementation", None), head_dim(model.config)
    if choice == "auto":
        on_cuda = next(model.parameters()).is_cuda
        return "flex" if on_cuda and dim >= FLEX_MIN_HEAD_DIM else "gather"
    if choice not in TREE_ATTENTION_BACKENDS:
        raise ValueError(f"tree_attention must be auto or one of {TREE_ATTENTION_BACKENDS}, got {choice!r}")
    if choice == "flex" and dim < FLEX_MIN_HEAD_DIM:
        raise ValueError(f"tree_attention=flex needs heads of at least {FLEX_MIN_HEAD_DIM} dimensions, the model's "
                         f"have {dim}; use gather")
    if choice == "mask" and impl not in ("sdpa", "eager"):
        raise ValueError(f"tree_attention=mask needs sdpa or eager attention, not {impl!r}")
    return choice


def _decode(base: torch.nn.Module, batch: TrainBatch, device: torch.device, dtype: torch.dtype,
            tree_attention: str) -> torch.Tensor:
    """Final hidden states [R, W, hidden] of the decoder over `batch`."""
    ids, pos = batch.input_ids.to(device), batch.position_ids.to(device)
    if batch.tree is None:
        return base(input_ids=ids, attention_mask=batch.attention_mask.to(device), position_ids=pos,
                    use_cache=False).last_hidden_state
    backend = resolve_tree_attention(base, tree_attention)
    if backend == "mask":
        mask = batch.tree.dense(dtype).to(device)
        return base(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False).last_hidden_state
    if backend == "flex":  # whatever attention the model was loaded with: one set of weights
        with attention_implementation(base.config, "flex_attention"):
            return base(input_ids=ids, attention_mask=batch.tree.block_mask(device), position_ids=pos,
                        use_cache=False).last_hidden_state
    chains = batch.tree.chains().to(device)
    with attention_implementation(base.config, GATHER_ATTENTION):
        hidden = base(input_ids=ids, position_ids=pos, tree_chains=chains, use_cache=False).last_hidden_state
    if chains.calls == 0:  # the layers never asked transformers' attention interface: nothing was masked
        raise ValueError(f"{type(base).__name__} does not route attention through transformers' attention "
                         "interface; set train.tree_attention=mask or train.layout=flat")
    return hidden


def token_logprobs(model: torch.nn.Module, batch: TrainBatch, temperature: float,
                   tree_attention: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """(logp, entropy) of every loss token of `batch`, under softmax(logits / temperature).
    `tree_attention` picks how tree-packed rows are masked (see `ibtpo_fast.tree_attention`)."""
    base, head = decoder_and_head(model)
    device = head.weight.device
    out = _decode(base, batch, device, head.weight.dtype, tree_attention)
    hidden = out[batch.rows.to(device), batch.pred_cols.to(device)]
    return logprob_entropy(hidden, head.weight, batch.targets.to(device), temperature=temperature, bias=head.bias)


class TokenLogprobs(torch.nn.Module):
    """`token_logprobs` of a causal LM as a module's forward: the unit data-parallel wrappers (DDP, FSDP2)
    hook, since the loss runs the decoder and the LM head apart rather than through the LM's own forward."""

    def __init__(self, lm: torch.nn.Module) -> None:
        super().__init__()
        self.lm = lm

    def forward(self, batch: TrainBatch, temperature: float, tree_attention: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
        return token_logprobs(self.lm, batch, temperature, tree_attention)


def as_logprob_module(model: torch.nn.Module) -> torch.nn.Module:
    """`model` if it already computes token log-probs (a TokenLogprobs, sharded or wrapped), else a TokenLogprobs of it."""
    inner = getattr(model, "module", model)  # DistributedDataParallel keeps the module it wraps here
    return model if isinstance(inner, TokenLogprobs) else TokenLogprobs(model)


def checkpoint_activations(lm: torch.nn.Module) -> None:
    """Recompute each decoder layer's activations in the backward instead of keeping them; decoding runs in
    eval mode and is unaffected. The recompute runs outside the forward's attention switch (tree attention
    is chosen for the forward's length only), so each layer recomputes under the attention it ran with."""
    if not getattr(lm, "supports_gradient_checkpointing", False):
        raise ValueError(f"{type(lm).__name__} does not support activation checkpointing; "
                         "set train.activation_checkpointing=false")
    config = decoder_and_head(lm)[0].config

    def same_attention() -> tuple[contextlib.AbstractContextManager, contextlib.AbstractContextManager]:
        return contextlib.nullcontext(), attention_implementation(config, config._attn_implementation)

    enable = getattr(lm, "activation_checkpointing_enable", None) or lm.gradient_checkpointing_enable
    enable({"use_reentrant": False, "context_fn": same_attention})


def causal_lm_of(model: torch.nn.Module) -> tuple[torch.nn.Module, str]:
    """The causal LM inside a policy (itself, or inside a TokenLogprobs, sharded or wrapped) and the prefix
    its parameter names carry in the policy's state dict."""
    inner = getattr(model, "module", model)
    return (inner.lm, "lm.") if isinstance(inner, TokenLogprobs) else (inner, "")
