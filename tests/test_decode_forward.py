"""TorchEngine's plain decode forward computes what the model's own forward computes, for each family it
takes, and every other model decodes through its own forward. (The engine tests check whole rollouts of
these families against an uncached full forward.)"""
import pytest
import torch
from accelerate.hooks import ModelHook, add_hook_to_module
from test_torch_engine import FAMILIES, assert_matches_reference, mixed_requests, tiny_model
from threads import one_thread  # noqa: F401  (autouse)

from ibtpo_fast.engines import TorchEngine
from ibtpo_fast.engines.batch_kv import BatchKV
from ibtpo_fast.engines.decode_forward import DecodeForward, decode_forward_for

ROWS, COLUMNS = 5, 20
PADS = [0, 3, 9, 1, 19]  # the last row's only token is the one it decodes


def random_batch(engine: TorchEngine, dtype: torch.dtype) -> BatchKV:
    g = torch.Generator().manual_seed(0)
    shape = (engine.n_layers, 2, ROWS, engine.kv_heads, COLUMNS + 4, engine.head_dim)
    kv = BatchKV(shape, PADS, COLUMNS, dtype, "cpu")
    kv.buffer.copy_(torch.randn(shape, generator=g))
    return kv


def decode_step(engine: TorchEngine, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits of one decode step over a random padded batch, and the K/V column it wrote."""
    kv = random_batch(engine, dtype)
    with torch.inference_mode():
        logits = engine._forward_decode(torch.tensor([3, 17, 250, 0, 99]), kv)
    return logits, kv.buffer[:, :, :, :, COLUMNS]


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2)])
def test_a_decode_step_equals_the_models_own_forward(family, dtype, tol):
    model = tiny_model(family).to(dtype)
    plain, own = TorchEngine(model), TorchEngine(model, plain_decode=False)
    assert isinstance(plain.decode_forward, DecodeForward) and own.decode_forward is None
    plain_logits, plain_kv = decode_step(plain, dtype)
    model_logits, model_kv = decode_step(own, dtype)
    assert plain_logits.dtype == model_logits.dtype == dtype
    torch.testing.assert_close(plain_kv, model_kv, rtol=tol, atol=tol)
    torch.testing.assert_close(plain_logits.float(), model_logits.float(), rtol=tol, atol=tol)
    assert not torch.equal(plain_logits[0], plain_logits[1])  # rows see their own tokens and K/V


class WrappedLinear(torch.nn.Linear):
    """A layer the plain forward does not know (as LoRA or a quantised layer would be)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) * 1.5


def test_models_it_does_not_know_decode_through_their_own_forward():
    model = tiny_model()
    attention = model.model.layers[1].self_attn
    wrapped = WrappedLinear(attention.v_proj.in_features, attention.v_proj.out_features)
    wrapped.load_state_dict(attention.v_proj.state_dict())
    attention.v_proj = wrapped
    assert decode_forward_for(model) is None
    engine = TorchEngine(model)
    assert engine.decode_forward is None
    requests = mixed_requests()
    assert_matches_reference(model, requests, engine.generate(requests))  # the wrapped layer counts


def test_a_model_dispatched_by_accelerate_decodes_through_its_own_forward():
    model = tiny_model()
    add_hook_to_module(model.model.layers[0], ModelHook())  # as device_map / offloading do
    assert decode_forward_for(model) is None


def test_flushing_rechecks_the_model():
    model = tiny_model()
    engine = TorchEngine(model)
    assert engine.decode_forward is not None
    seen = []
    hook = model.model.layers[0].mlp.register_forward_hook(lambda module, args, out: seen.append(out.shape))
    engine.flush_cache()
    assert engine.decode_forward is None
    engine.generate(mixed_requests()[:2])
    assert len(seen) > 2  # the hook ran at every decode step, not only at prefill
    hook.remove()
    engine.flush_cache()
    assert engine.decode_forward is not None
    off = TorchEngine(model, plain_decode=False)
    off.flush_cache()
    assert off.decode_forward is None


def test_gradient_checkpointings_embedding_hook_keeps_the_plain_forward():
    """transformers' gradient checkpointing (TRL turns it on) hooks the input embeddings; decoding is unaffected."""
    model = tiny_model()
    model.gradient_checkpointing_enable()
    assert model.model.embed_tokens._forward_hooks  # the hook is there
    engine = TorchEngine(model)
    assert engine.decode_forward is not None
    requests = mixed_requests()
    assert_matches_reference(model, requests, engine.generate(requests))
