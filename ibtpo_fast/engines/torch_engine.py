"""The default rollout engine: any Hugging Face causal LM, CPU or one GPU, with a radix prefix cache.

One `generate` call runs all its requests as one batch. Each distinct prefix is matched against the
radix cache, its cached K/V copied into a left-padded batch buffer, and only its uncached suffix
prefilled (requests with similar suffix lengths share one forward). Then every live request decodes
together, one batched forward per step, each sequence at its true positions. A finished request's
K/V (prefix + generated tokens) goes into the radix cache, so later branches of the same tree reuse
the response too, and it leaves the batch.
"""
from __future__ import annotations

import inspect
import random
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator, Mapping, Sequence

import numpy as np
import torch
from transformers.cache_utils import Cache

from ibtpo_fast.engines.protocol import Completion, Request, SamplingParams
from ibtpo_fast.engines.radix_cache import PrefixMatch, RadixCache

_NUCLEUS_CANDIDATES = 1024  # top-p is first tried within this many top tokens, avoiding a full-vocab sort
_PREFILL_TOKEN_BUDGET = 8192  # padded tokens (rows x window) in one prefill forward
_DECODE_ROOM = 256  # columns a batch buffer first holds for decoding
_MIN_GROWTH = 64  # columns added to the batch buffer when decoding outruns it
_NO_MATCH = PrefixMatch(0, [], None)


class _BatchKV(Cache):
    """K/V of a whole batch in one buffer [layers, 2, rows, kv_heads, columns, head_dim].

    Rows are left-padded so that all rows end in the same column: a decode step writes one column for
    every row. Row i's tokens occupy columns [pads[i], cursor); attention reads columns [start, cursor),
    start being the first column any live row uses. Pad columns are zero (never NaN) and masked.
    Rows only ever move within the buffer, which is allocated once per batch and grown only when
    decoding outruns it: fresh memory is costly (page faults), copies of a few rows are not.
    """

    def __init__(self, shape: tuple[int, ...], pads: list[int], cursor: int, dtype, device) -> None:
        super().__init__(layers=[])
        self.buffer = torch.zeros(shape, dtype=dtype, device=device)
        self.pads = torch.tensor(pads, device=device)
        self.rows = len(pads)
        self.start = 0
        self.cursor = cursor
        self.focus(0, self.rows, cursor)

    def focus(self, first: int, last: int, cursor: int) -> None:
        """Let the next forward see rows [first, last) only, writing from column `cursor`."""
        self._focus, self.cursor = (first, last), cursor
        self._layers = [(layer[0].narrow(0, first, last - first), layer[1].narrow(0, first, last - first))
                        for layer in self.buffer]

    def focused_pads(self) -> torch.Tensor:
        return self.pads[self._focus[0] : self._focus[1]]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        keys, values = self._layers[layer_idx]
        end = self.cursor + key_states.shape[2]
        keys.narrow(2, self.cursor, key_states.shape[2]).copy_(key_states)
        values.narrow(2, self.cursor, value_states.shape[2]).copy_(value_states)
        return keys.narrow(2, self.start, end - self.start), values.narrow(2, self.start, end - self.start)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.cursor - self.start

    def add_copies(self, sources: list[int]) -> None:
        """Append rows copying rows `sources` (several samples continuing one prefix)."""
        index = torch.tensor(sources, device=self.pads.device)
        rows = torch.arange(self.rows, self.rows + len(sources), device=index.device)
        self.buffer.index_copy_(2, rows, self.buffer.index_select(2, index))
        self.pads = torch.cat([self.pads, self.pads[index]])
        self.rows += len(sources)
        self.focus(0, self.rows, self.cursor)

    def remove(self, dead: list[int]) -> list[int]:
        """Drop rows `dead` by moving the last live rows into their places; returns, for each remaining
        row, the row it was before."""
        dead_set, live = set(dead), self.rows - len(dead)
        holes = [r for r in dead if r < live]
        movers = [r for r in range(live, self.rows) if r not in dead_set]
        order = list(range(live))
        for hole, mover in zip(holes, movers):
            order[hole] = mover
        device = self.pads.device
        if holes:
            moved = self.buffer.index_select(2, torch.tensor(movers, device=device))
            self.buffer.index_copy_(2, torch.tensor(holes, device=device), moved)
        self.pads = self.pads[torch.tensor(order, device=device)]
        self.rows = live
        if live:
            self.start = int(self.pads.min())  # columns every live row pads are never read again
        self.focus(0, live, self.cursor)
        return order

    def reserve(self, columns: int) -> None:
        """Make room for `columns` more tokens after the cursor."""
        capacity = self.buffer.shape[4]
        if self.cursor + columns <= capacity:
            return
        shape = list(self.buffer.shape)
        shape[2] = self.rows
        shape[4] = self.cursor - self.start + max(columns, _MIN_GROWTH, capacity // 2)
        grown = torch.empty(shape, dtype=self.buffer.dtype, device=self.buffer.device)
        # Live columns move to the front; later columns are written before they are read.
        live = self.cursor - self.start
        grown[..., :live, :] = self.buffer[:, :, : self.rows, :, self.start : self.cursor]
        self.buffer = grown
        self.pads -= self.start
        self.cursor -= self.start
        self.start = 0
        self.focus(0, self.rows, self.cursor)

    def row_kv(self, row: int, n_tokens: int) -> torch.Tensor:
        """View of row `row`'s first `n_tokens` tokens: [layers, 2, kv_heads, n_tokens, head_dim]."""
        first = int(self.pads[row])
        return self.buffer[:, :, row, :, first : first + n_tokens]


@dataclass
class _Row:
    """One sequence of the batch: its request, what it has produced, and its random stream."""

    request: Request
    slot: int  # index of the request in the generate call
    ids: list[int]  # prefix token ids
    cached_tokens: int
    rng: random.Random
    limit: int  # max_new_tokens, clipped to the model's context
    stop_ids: frozenset[int]
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    entropies: list[float] = field(default_factory=list)
    text_checked: int = 0  # decoded characters already searched for stop strings

    def add(self, token: int, logprob: float, entropy: float, tokenizer) -> str | None:
        """Record a sampled token; returns the finish reason if the sequence ends on it."""
        self.tokens.append(token)
        self.logprobs.append(logprob)
        self.entropies.append(entropy)
        if token in self.stop_ids or self._hits_stop_string(tokenizer):
            return "stop"
        return "length" if len(self.tokens) >= self.limit else None

    def _hits_stop_string(self, tokenizer) -> bool:
        stops = self.request.stop_strings
        if not stops:
            return False
        text = tokenizer.decode(self.tokens)
        # A stop string can only end in the new text; look back far enough to catch one straddling it.
        start = max(0, min(self.text_checked, len(text)) - max(map(len, stops)) - 8)
        self.text_checked = len(text)
        return any(s in text[start:] for s in stops)

    def completion(self, finish_reason: str) -> Completion:
        return Completion(
            token_ids=np.asarray(self.tokens, dtype=np.int64),
            logprobs=np.asarray(self.logprobs, dtype=np.float32),
            entropies=np.asarray(self.entropies, dtype=np.float32),
            finish_reason=finish_reason,
            cached_tokens=self.cached_tokens,
        )


class _Sampler:
    """Per-row temperature / top-k / top-p sampling for the rows of a batch, by inverse CDF with one
    uniform per row drawn from the row's own seeded stream."""

    def __init__(self, params: list[SamplingParams], vocab: int, device) -> None:
        self.device = device
        self.temperature = torch.tensor([[p.temperature] for p in params], device=device)
        self.all_unit_temperature = all(p.temperature == 1.0 for p in params)
        truncated = [i for i, p in enumerate(params) if (0 < p.top_k < vocab) or p.top_p < 1.0]
        self.truncated = torch.tensor(truncated, dtype=torch.long, device=device) if truncated else None
        self.full = len(truncated) < len(params)
        self.top_k = [min(params[i].top_k, vocab) for i in truncated]  # -1: off
        self.top_p = torch.tensor([params[i].top_p for i in truncated], device=device)

    def sample(self, logits: torch.Tensor, uniforms: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """logits [rows, vocab] -> (tokens, logprobs, entropies), logprobs and entropies over the full
        vocabulary of softmax(logits / temperature), in fp32."""
        scaled = logits.float()
        if not self.all_unit_temperature:
            scaled = scaled / self.temperature
        logp = torch.log_softmax(scaled, dim=-1)
        probs = logp.exp()
        entropies = -(probs * logp).nan_to_num_(0.0).sum(-1)  # nan only where p = 0 and logp = -inf
        if self.truncated is None:
            tokens = _inverse_cdf(probs, uniforms)
        else:
            tokens = torch.empty(len(probs), dtype=torch.long, device=self.device)
            if self.full:
                tokens.copy_(_inverse_cdf(probs, uniforms))
            candidates, ids = self._truncate(probs.index_select(0, self.truncated))
            picked = _inverse_cdf(candidates, uniforms.index_select(0, self.truncated))
            tokens.index_copy_(0, self.truncated, ids.gather(1, picked[:, None]).squeeze(1))
        logprobs = logp.gather(1, tokens[:, None]).squeeze(1)
        return tokens, logprobs, entropies

    def _truncate(self, probs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Probabilities of each row's top-k / top-p candidates, sorted descending and zero outside the
        kept set, with their token ids. Top-p applies to the top-k renormalised distribution."""
        vocab = probs.shape[1]
        top_k = torch.tensor([k if k > 0 else vocab for k in self.top_k], device=self.device)
        width = min(vocab, max(k if k > 0 else vocab for k in self.top_k))
        if width > _NUCLEUS_CANDIDATES:
            values, ids = probs.topk(_NUCLEUS_CANDIDATES, dim=-1)
            # Enough when each row keeps at most that many by top-k, or those tokens already reach top-p.
            unlimited = torch.tensor([k == -1 for k in self.top_k], device=self.device)
            fits = (top_k <= _NUCLEUS_CANDIDATES) | (unlimited & (values.sum(-1) >= self.top_p))
            if not bool(fits.all()):
                values, ids = probs.topk(width, dim=-1)
        else:
            values, ids = probs.topk(width, dim=-1)
        rank = torch.arange(values.shape[1], device=self.device)
        values = values.masked_fill(rank >= top_k[:, None], 0.0)
        # Mass of the top-k set: the whole row when top-k is off (the candidates may be cut short).
        total = torch.where(top_k >= vocab, probs.sum(-1), values.sum(-1))
        mass_before = values.cumsum(-1) - values
        return values.masked_fill(mass_before >= (self.top_p * total)[:, None], 0.0), ids


def _inverse_cdf(probs: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """Index of the first token whose cumulative probability exceeds u * total (never a p = 0 token)."""
    cdf = probs.cumsum(-1)
    total = cdf[:, -1:]
    target = torch.minimum(uniforms[:, None] * total, total.nextafter(torch.zeros_like(total)))
    return torch.searchsorted(cdf, target, right=True).squeeze(1).clamp_max_(probs.shape[1] - 1)


@contextmanager
def _eval_mode(model: torch.nn.Module) -> Iterator[None]:
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


class TorchEngine:
    """Rollouts from a live Hugging Face causal LM (zero-copy: it reads the model's own parameters).

    Sampling is reproducible per request: a request's seed fixes its stream of uniforms, so the same
    seed gives the same tokens whatever the batch, except where batch-shape-dependent floating-point
    rounding (~1e-6) moves a cumulative probability across that uniform, which is rare.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        *,
        max_cache_tokens: int = 32768,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        use_cache: bool = True,
        max_batch_size: int | None = None,
        tokenizer: Any = None,
    ) -> None:
        """`device` / `dtype`, when given, move / cast `model` in place. `max_cache_tokens` caps the
        prefix cache; `max_batch_size` caps how many requests decode together (the rest wait);
        `tokenizer` (anything with `.decode(ids)`) is needed only for stop strings."""
        if max_batch_size is not None and max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        if device is not None or dtype is not None:
            model.to(device=device, dtype=dtype)
        self.model = model
        self.tokenizer = tokenizer
        self.use_cache = use_cache
        self.max_batch_size = max_batch_size
        self.cache = RadixCache(max_cache_tokens)
        self._read_config(model.config.get_text_config())
        forward_args = inspect.signature(model.forward).parameters
        self._cache_arg = "cache" if "cache" in forward_args else "past_key_values"
        self.reset_stats()

    def _read_config(self, config) -> None:
        self.n_layers = config.num_hidden_layers
        self.kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        self.max_positions = config.max_position_embeddings
        self.vocab = self.model.get_input_embeddings().num_embeddings  # valid input token ids
        self.layer_types = list(getattr(config, "layer_types", None) or ["full_attention"] * self.n_layers)
        unknown = set(self.layer_types) - {"full_attention", "sliding_attention"}
        if unknown:
            raise NotImplementedError(f"TorchEngine runs full and sliding attention layers, not {unknown}")
        self.sliding_window = getattr(config, "sliding_window", None)
        self.attn_impl = config._attn_implementation or "eager"
        if self.attn_impl not in ("sdpa", "eager"):
            raise ValueError(
                f"TorchEngine needs attn_implementation 'sdpa' or 'eager' (it passes explicit padded masks), "
                f"got {self.attn_impl!r}"
            )

    # ---- Engine protocol -------------------------------------------------------------------------

    def generate(self, requests: Sequence[Request]) -> list[Completion]:
        self._validate(requests)
        results: list[Completion | None] = [None] * len(requests)
        wave = self.max_batch_size or max(len(requests), 1)
        with torch.inference_mode(), _eval_mode(self.model):
            for start in range(0, len(requests), wave):
                slots = range(start, min(start + wave, len(requests)))
                for slot, completion in self._run_batch(requests, slots):
                    results[slot] = completion
        return results  # type: ignore[return-value]

    def update_weights(
        self, named_tensors: Mapping[str, Any] | Iterable[tuple[str, Any]] | None = None
    ) -> None:
        """Copy `named_tensors` (a mapping or (name, tensor) pairs) into the model, then flush the prefix
        cache, whose K/V the old weights computed. With none, only flush (the model was updated in place)."""
        if named_tensors is not None:
            with torch.no_grad():
                result = self.model.load_state_dict(dict(named_tensors), strict=False)
            if result.unexpected_keys:
                raise KeyError(f"update_weights: the model has no parameters named {result.unexpected_keys}")
        self.flush_cache()

    def flush_cache(self) -> None:
        self.cache.reset()

    # ---- statistics ------------------------------------------------------------------------------

    def stats(self) -> dict[str, float]:
        """Counters since the last reset; prefill_tokens counts prefix tokens actually computed."""
        counts = self._counts
        rate = counts["cached_tokens"] / counts["prefix_tokens"] if counts["prefix_tokens"] else 0.0
        return {"prefix_cache_hit_rate": rate, **counts, "cache_size_tokens": self.cache.num_tokens}

    def reset_stats(self) -> None:
        self._counts = dict.fromkeys(("prefix_tokens", "cached_tokens", "prefill_tokens", "decode_tokens"), 0)

    # ---- one batch -------------------------------------------------------------------------------

    def _validate(self, requests: Sequence[Request]) -> None:
        for i, request in enumerate(requests):
            n = len(request.prefix_ids)
            if n > self.max_positions:
                raise ValueError(
                    f"request {i}: prefix of {n} tokens exceeds the model's context of {self.max_positions}"
                )
            if min(request.prefix_ids) < 0 or max(request.prefix_ids) >= self.vocab:
                raise ValueError(f"request {i}: prefix token ids must be in [0, {self.vocab})")
            if request.stop_strings and self.tokenizer is None:
                raise ValueError(f"request {i}: stop_strings need TorchEngine(..., tokenizer=...)")

    def _run_batch(self, requests: Sequence[Request], slots: range) -> Iterator[tuple[int, Completion]]:
        prefixes, owners = self._distinct_prefixes(requests, slots)
        # The last prefix token is always run, for the logits of the first new token.
        matches = [self.cache.match_prefix(ids[:-1]) if self.use_cache else _NO_MATCH for ids in prefixes]
        locked = [m.node for m in matches if m.length]
        for node in locked:
            self.cache.lock(node)
        try:
            room = max(requests[s].max_new_tokens for s in slots)
            kv, logits, order = self._prefill(prefixes, matches, len(slots), room)
            rows = [self._new_row(requests, owners[u][0], prefixes[u], matches[u].length) for u in order]
            sources = []  # further samples of a prefix continue a copy of its row, computing nothing
            for r, u in enumerate(order):
                for slot in owners[u][1:]:
                    rows.append(self._new_row(requests, slot, prefixes[u], len(prefixes[u])))
                    sources.append(r)
            if sources:
                kv.add_copies(sources)
                logits = torch.cat([logits, logits[sources]])
            for row in rows:
                self._counts["prefix_tokens"] += len(row.ids)
                self._counts["cached_tokens"] += row.cached_tokens
            yield from self._decode(rows, kv, logits)
        finally:
            for node in locked:
                self.cache.unlock(node)

    def _distinct_prefixes(
        self, requests: Sequence[Request], slots: range
    ) -> tuple[list[list[int]], list[list[int]]]:
        """Distinct prefixes and the requests of each: identical prefixes (several samples of one prompt)
        are prefilled once. Without the cache every request computes its own."""
        owners: dict[tuple[int, ...] | int, list[int]] = {}
        prefixes: dict[tuple[int, ...] | int, list[int]] = {}
        for slot in slots:
            ids = [int(t) for t in requests[slot].prefix_ids]
            key = tuple(ids) if self.use_cache else slot
            prefixes.setdefault(key, ids)
            owners.setdefault(key, []).append(slot)
        return list(prefixes.values()), list(owners.values())

    def _new_row(self, requests: Sequence[Request], slot: int, ids: list[int], cached: int) -> _Row:
        request = requests[slot]
        seed = request.sampling.seed
        if seed is None:
            seed = int(torch.randint(0, 2**62, ()))  # follows torch.manual_seed
        limit = min(request.max_new_tokens, self.max_positions - len(ids) + 1)
        stop_ids = frozenset(int(t) for t in request.stop_token_ids)
        return _Row(request, slot, ids, cached, random.Random(seed), limit, stop_ids)

    def _prefill(self, prefixes: list[list[int]], matches: list[PrefixMatch], batch: int, room: int):
        """Copy each prefix's cached K/V into a buffer with rows for the whole `batch` and run the rest;
        returns the buffer, the last prefix token's logits per row, and the prefix index of each row
        (sorted by uncached suffix length)."""
        suffix = [len(ids) - m.length for ids, m in zip(prefixes, matches)]
        order = sorted(range(len(prefixes)), key=suffix.__getitem__)
        width = max(len(ids) for ids in prefixes)
        shape = (self.n_layers, 2, batch, self.kv_heads, width + min(room, _DECODE_ROOM), self.head_dim)
        kv = _BatchKV(shape, [width - len(prefixes[u]) for u in order], width, self._dtype(), self._device())
        logits = None
        for first, last, window in self._prefill_groups([suffix[u] for u in order]):
            group = order[first:last]
            for row, u in zip(range(first, last), group):
                self._copy_cached(kv, row, matches[u], len(prefixes[u]) - window)
            kv.focus(first, last, width - window)
            group_logits = self._forward_prefill(kv, [prefixes[u] for u in group], window)
            if logits is None:
                logits = group_logits.new_empty(len(order), group_logits.shape[1], dtype=torch.float32)
            logits[first:last] = group_logits
            self._counts["prefill_tokens"] += sum(min(window, len(prefixes[u])) for u in group)
        kv.focus(0, len(order), width)
        return kv, logits, order

    def _prefill_groups(self, suffixes: list[int]) -> Iterator[tuple[int, int, int]]:
        """Split rows sorted by uncached suffix length into (first, last, window) forwards: a group's
        window is its longest suffix, and shorter suffixes recompute some cached tokens to fill it, so
        a group closes before that waste exceeds its useful work (or the token budget)."""
        first, useful = 0, 0
        for r, s in enumerate(suffixes):
            padded = (r - first + 1) * s
            if r > first and (padded > 2 * (useful + s) + 256 or padded > _PREFILL_TOKEN_BUDGET):
                yield first, r, suffixes[r - 1]
                first, useful = r, 0
            useful += s
        if suffixes:
            yield first, len(suffixes), suffixes[-1]

    def _copy_cached(self, kv: _BatchKV, row: int, match: PrefixMatch, n_tokens: int) -> None:
        """Copy the first `n_tokens` cached tokens of a prefix into its row."""
        column = int(kv.pads[row])
        for chunk in match.kv:
            if n_tokens <= 0:
                break
            n = min(n_tokens, chunk.shape[3])
            kv.buffer[:, :, row, :, column : column + n] = chunk[:, :, :, :n]
            column, n_tokens = column + n, n_tokens - n

    def _forward_prefill(self, kv: _BatchKV, prefixes: list[list[int]], window: int) -> torch.Tensor:
        device = self._device()
        ids = [p[-window:] if len(p) >= window else [0] * (window - len(p)) + p for p in prefixes]
        lengths = torch.tensor([len(p) for p in prefixes], device=device)
        steps = torch.arange(window, device=device)
        positions = (lengths[:, None] - window + steps).clamp_min_(0)
        pads = kv.focused_pads()
        columns = torch.arange(kv.cursor + window, device=device)
        query_columns = kv.cursor + steps
        causal = columns[None, :] <= query_columns[:, None]
        # Pad queries see themselves only, so no softmax row is empty (their output is discarded).
        own = columns[None, None, :] >= pads[:, None, None]
        visible = own | (columns[None, :] == query_columns[:, None])
        distance = query_columns[:, None] - columns[None, :]
        mask = (causal & visible)[:, None]
        logits = self._forward(torch.tensor(ids, device=device), positions, mask, distance, kv)
        kv.cursor += window
        return logits

    def _forward(self, ids, positions, mask, distance, kv: _BatchKV) -> torch.Tensor:
        """Run the model on `ids` [rows, q] with a boolean `mask` [rows, 1, q, kv_len]; returns the last
        position's logits [rows, vocab]."""
        masks = {"full_attention": mask}
        if "sliding_attention" in self.layer_types:
            masks["sliding_attention"] = mask & (distance < self.sliding_window)
        if self.attn_impl == "eager":
            low = torch.finfo(self._dtype()).min
            masks = {
                kind: torch.zeros(m.shape, dtype=self._dtype(), device=m.device).masked_fill_(~m, low)
                for kind, m in masks.items()
            }
        # A dict of prepared masks is what hybrid models accept; a single 4D mask is what every model accepts.
        attention_mask = masks if len(masks) > 1 else masks["full_attention"]
        out = self.model(
            input_ids=ids, attention_mask=attention_mask, position_ids=positions,
            use_cache=True, logits_to_keep=1, **{self._cache_arg: kv},
        )
        return out.logits[:, -1]

    def _decode(
        self, rows: list[_Row], kv: _BatchKV, logits: torch.Tensor
    ) -> Iterator[tuple[int, Completion]]:
        device = self._device()
        vocab = logits.shape[1]
        sampler = _Sampler([row.request.sampling for row in rows], vocab, device)
        while True:
            uniforms = torch.tensor([row.rng.random() for row in rows], dtype=torch.float32, device=device)
            tokens, logprobs, entropies = sampler.sample(logits, uniforms)
            host = torch.stack([tokens.double(), logprobs.double(), entropies.double()]).cpu().tolist()
            self._counts["decode_tokens"] += len(rows)
            finished = []
            for i, row in enumerate(rows):
                reason = row.add(int(host[0][i]), host[1][i], host[2][i], self.tokenizer)
                if reason is None:
                    continue
                finished.append(i)
                if self.use_cache:  # the last token was sampled but never run, so it has no K/V yet
                    n = len(row.ids) + len(row.tokens) - 1
                    self.cache.insert(row.ids + row.tokens[:-1], kv.row_kv(i, n))
                yield row.slot, row.completion(reason)
            if len(finished) == len(rows):
                return
            if finished:
                order = kv.remove(finished)
                rows = [rows[i] for i in order]
                tokens = tokens[order]
                sampler = _Sampler([row.request.sampling for row in rows], vocab, device)
            kv.reserve(1)
            logits = self._forward_decode(tokens, kv)

    def _forward_decode(self, tokens: torch.Tensor, kv: _BatchKV) -> torch.Tensor:
        columns = torch.arange(kv.start, kv.cursor + 1, device=tokens.device)
        mask = (columns[None, :] >= kv.pads[:, None])[:, None, None]
        distance = kv.cursor - columns
        positions = (kv.cursor - kv.pads)[:, None]
        logits = self._forward(tokens[:, None], positions, mask, distance, kv)
        kv.cursor += 1
        return logits

    def _device(self) -> torch.device:
        return self.model.get_input_embeddings().weight.device

    def _dtype(self) -> torch.dtype:
        return self.model.get_input_embeddings().weight.dtype
