"""A decode step's forward for Llama-family models (Llama, Qwen2, Qwen3, Mistral), as plain tensor ops.

A decode step runs one token a row. For a small model, or a small batch of a large one, the step's
time is then the fixed cost of its few dozen operations a layer, and transformers' module calls,
keyword plumbing, mask and cache bookkeeping around them cost about as much again. This forward runs the same
operations on the model's own parameters (read live, so training updates need no copy) with none of
that around them, and writes K/V into the engine's batch buffer directly. Prefill, and every model
whose modules it does not recognise, stays on the model's own forward.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from ibtpo_fast.engines.batch_kv import BatchKV
from ibtpo_fast.engines.decode_attention import attention_bias, grouped_decode_attention

_ARCHITECTURES = {"LlamaForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM", "MistralForCausalLM"}
# transformers' gradient checkpointing hooks the input embeddings to make their output require grad, which
# decoding under inference_mode never sees; any other hook may change what a module computes.
_INERT_HOOKS = {"PreTrainedModel.enable_input_require_grads.<locals>.make_inputs_require_grads"}


class _Layer(NamedTuple):
    kind: str  # full_attention or sliding_attention
    input_norm: torch.nn.Module
    q: torch.nn.Linear
    k: torch.nn.Linear
    v: torch.nn.Linear
    o: torch.nn.Linear
    q_norm: torch.nn.Module | None  # Qwen3 normalises each head's query and key
    k_norm: torch.nn.Module | None
    post_norm: torch.nn.Module
    gate: torch.nn.Linear
    up: torch.nn.Linear
    down: torch.nn.Linear


class DecodeForward:
    """`decode(tokens, positions, masks, kv)`: one decode step of a supported model."""

    def __init__(self, model: torch.nn.Module) -> None:
        config = model.config.get_text_config()
        self.model = model
        self.heads = config.num_attention_heads
        self.kv_heads = getattr(config, "num_key_value_heads", None) or self.heads
        self.head_dim = model.model.layers[0].self_attn.head_dim
        self.scaling = model.model.layers[0].self_attn.scaling
        kinds = list(getattr(config, "layer_types", None) or ["full_attention"] * config.num_hidden_layers)
        self.layers = [_Layer(kind, layer.input_layernorm, *_projections(layer.self_attn),
                              getattr(layer.self_attn, "q_norm", None), getattr(layer.self_attn, "k_norm", None),
                              layer.post_attention_layernorm, layer.mlp.gate_proj, layer.mlp.up_proj,
                              layer.mlp.down_proj)
                       for kind, layer in zip(kinds, model.model.layers)]
        self._signs: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}  # of rotate-half, by device / dtype

    def __call__(self, tokens: torch.Tensor, positions: torch.Tensor, masks: dict[str, torch.Tensor],
                 kv: BatchKV) -> torch.Tensor:
        """tokens, positions [rows]; a boolean mask [rows, 1, 1, columns] per layer kind (True: attended);
        returns the next token's logits [rows, vocab]. Writes each layer's K/V at the buffer's cursor."""
        rows = tokens.shape[0]
        inner = self.model.model
        h = F.embedding(tokens, inner.embed_tokens.weight)
        bias = {kind: attention_bias(mask, self.kv_heads, h.dtype) for kind, mask in masks.items()}
        cos, sin = inner.rotary_emb(h, positions[:, None])  # [rows, 1, head_dim]
        sin = sin * self._sign(sin)
        for i, layer in enumerate(self.layers):
            x = _rms_norm(h, layer.input_norm)
            q = _linear(x, layer.q).view(rows, self.heads, self.head_dim)
            k = _linear(x, layer.k).view(rows, self.kv_heads, self.head_dim)
            v = _linear(x, layer.v).view(rows, self.kv_heads, self.head_dim)
            if layer.q_norm is not None:
                q, k = _rms_norm(q, layer.q_norm), _rms_norm(k, layer.k_norm)
            keys, values = kv.update(_rope(k, cos, sin)[:, :, None], v[:, :, None], i)
            out = grouped_decode_attention(_rope(q, cos, sin), keys, values, bias[layer.kind], self.scaling)
            h = h + _linear(out.view(rows, -1), layer.o)
            x = _rms_norm(h, layer.post_norm)
            h = h + _linear(F.silu(_linear(x, layer.gate)) * _linear(x, layer.up), layer.down)
        return _linear(_rms_norm(h, inner.norm), self.model.lm_head)


    def _sign(self, like: torch.Tensor) -> torch.Tensor:
        """-1 on the first half of a head, +1 on the second: rotate-half is then a flip of the halves."""
        key = (like.device, like.dtype)
        if key not in self._signs:
            half = self.head_dim // 2
            self._signs[key] = torch.tensor([-1.0] * half + [1.0] * half, dtype=like.dtype, device=like.device)
        return self._signs[key]


def decode_forward_for(model: torch.nn.Module) -> DecodeForward | None:
    """The plain decode forward of `model` when it is a transformers Llama / Qwen2 / Qwen3 / Mistral
    causal LM built of its stock modules (no adapters, quantised layers, hooks or accelerate dispatch),
    else None."""
    if type(model).__name__ not in _ARCHITECTURES or not type(model).__module__.startswith("transformers."):
        return None
    config = model.config.get_text_config()
    if config.hidden_act != "silu" or getattr(config, "pretraining_tp", 1) != 1:
        return None
    for module in model.modules():
        hooks = [*module._forward_hooks.values(), *module._forward_pre_hooks.values()]
        if any(getattr(hook, "__qualname__", None) not in _INERT_HOOKS for hook in hooks):
            return None
        if hasattr(module, "_hf_hook"):  # accelerate's device placement or offloading wraps its forward
            return None
        if isinstance(module, torch.nn.Linear) and type(module) is not torch.nn.Linear:  # LoRA, quantised, ...
            return None
    return DecodeForward(model)


def _projections(attention: torch.nn.Module) -> tuple[torch.nn.Linear, ...]:
    return attention.q_proj, attention.k_proj, attention.v_proj, attention.o_proj


def _linear(x: torch.Tensor, layer: torch.nn.Linear) -> torch.Tensor:
    return F.linear(x, layer.weight, layer.bias)


def _rms_norm(x: torch.Tensor, norm: torch.nn.Module) -> torch.Tensor:
    """transformers' RMSNorm: normalised in fp32, cast back, then scaled (one fused op in fp32)."""
    if x.dtype == torch.float32:
        return F.rms_norm(x, x.shape[-1:], norm.weight, norm.variance_epsilon)
    return norm.weight * F.rms_norm(x.float(), x.shape[-1:], eps=norm.variance_epsilon).to(x.dtype)


def _rope(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """x * cos + rotate_half(x) * sin, rotate_half being the halves swapped with the sign in `signed_sin`."""
    rows, heads, dim = x.shape
    swapped = x.view(rows, heads, 2, dim // 2).flip(2).view(rows, heads, dim)
    return torch.addcmul(x * cos, swapped, signed_sin)
