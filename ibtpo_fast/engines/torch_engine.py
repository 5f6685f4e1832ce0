"""The default rollout engine: any Hugging Face causal LM, CPU or one GPU, with a radix prefix cache.

Requests are submitted at any time and join the running batch between decode steps (`submit`, then
`poll` for completions as they finish; `generate` does both for one set of requests). The requests
admitted together are prefilled together: prefixes that several requests share (an
instruction, a system prompt, a tree's common steps) are computed once, into the radix cache, and
count in `cached_tokens` for every request that reads them from there. Then each distinct prefix
is matched against the cache, its cached K/V copied into a left-padded batch buffer, and only its
uncached suffix prefilled (requests with similar suffix lengths share one forward). Then every
live request decodes together, one batched forward per step, each sequence at its true positions.
A finished request's K/V (prefix + generated tokens) goes into the radix cache, so later branches
of the same tree reuse the response too, and it leaves the batch.
"""
from __future__ import annotations

import inspect
import itertools
import random
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ibtpo_fast.attention_impl import attention_implementation, head_dim
from ibtpo_fast.engines.batch_kv import BatchKV
from ibtpo_fast.engines.decode_attention import DECODE_ATTENTION
from ibtpo_fast.engines.decode_forward import DecodeForward, decode_forward_for
from ibtpo_fast.engines.protocol import Completion, Request, context_limit, generate_by_polling
from ibtpo_fast.engines.radix_cache import PrefixMatch, RadixCache, common_prefix_length
from ibtpo_fast.engines.token_sampler import TokenSampler

_PREFILL_TOKEN_BUDGET = 8192  # padded tokens (rows x window) in one prefill forward
_DECODE_ROOM = 256  # columns a batch buffer first holds for decoding
_NO_MATCH = PrefixMatch(0, [], None)
# A shared prefix is computed apart only when it saves at least this many tokens of each prefix
# sharing it: below that, the extra forward costs more than the recomputation it saves.
_MIN_SHARED_TOKENS = 16


@dataclass
class _Row:
    """One sequence of the batch: its request, what it has produced, and its random stream."""

    request: Request
    handle: int  # what `submit` returned for the request
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


@dataclass
class _Running:
    """The decoding batch: its rows, their K/V, the logits of each row's next token, their sampler."""

    rows: list[_Row]
    kv: BatchKV
    logits: torch.Tensor  # of each row's next token, unless `pending` still has to run
    sampler: TokenSampler
    pending: torch.Tensor | None = None  # the tokens sampled last step, not yet run through the model
    stale_sampler: bool = False  # rows left since the sampler was built


@contextmanager
def _eval_mode(model: torch.nn.Module) -> Iterator[None]:
    """The model in eval mode inside the block. Switching walks every module, which costs as much as a
    decode step of a small model: callers that poll often put the model in eval mode themselves."""
    if not model.training:
        yield
        return
    model.eval()
    try:
        yield
    finally:
        model.train()


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
        plain_decode: bool = True,
    ) -> None:
        """`device` / `dtype`, when given, move / cast `model` in place. `max_cache_tokens` caps the
        prefix cache; `max_batch_size` caps how many requests decode together (the rest wait);
        `tokenizer` (anything with `.decode(ids)`) is needed only for stop strings. `plain_decode`: decode
        steps of a Llama-family model run as plain tensor ops (`decode_forward`), skipping transformers'
        module plumbing; False, or any other model, runs every step through the model's own forward."""
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
        self.plain_decode = plain_decode
        self.decode_forward: DecodeForward | None = decode_forward_for(model) if plain_decode else None
        self._queue: list[tuple[int, Request]] = []  # submitted, waiting for room in the batch
        self._running: _Running | None = None
        self._next_handle = 0
        self.reset_stats()

    def _read_config(self, config) -> None:
        self.n_layers = config.num_hidden_layers
        self.kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        self.head_dim = head_dim(config)
        self.max_positions = config.max_position_embeddings
        self.vocab = self.model.get_input_embeddings().num_embeddings  # valid input token ids
        self.layer_types = list(getattr(config, "layer_types", None) or ["full_attention"] * self.n_layers)
        unknown = set(self.layer_types) - {"full_attention", "sliding_attention"}
        if unknown:
            raise NotImplementedError(f"TorchEngine runs full and sliding attention layers, not {unknown}")
        self.sliding_window = getattr(config, "sliding_window", None)
        # Decoding passes explicit padded masks, which sdpa and eager take: a model loaded with another
        # attention (flex_attention or flash-attention, for training) decodes through sdpa, and every
        # decode step (one query a row) through grouped-query matmuls.
        self.attn_impl = "eager" if config._attn_implementation == "eager" else DECODE_ATTENTION

    # ---- Engine protocol -------------------------------------------------------------------------

    def submit(self, requests: Sequence[Request]) -> list[int]:
        """Queue `requests`; they join the running batch at the next decode step. Returns their handles."""
        self._validate(requests)
        handles = list(range(self._next_handle, self._next_handle + len(requests)))
        self._next_handle += len(requests)
        self._queue.extend(zip(handles, requests))
        return handles

    def poll(self) -> list[tuple[int, Completion]]:
        """Decode until at least one request finishes; the (handle, completion) pairs that did.
        Empty when nothing is queued or running."""
        with torch.inference_mode(), _eval_mode(self.model):
            while self._queue or self._running is not None:
                t0 = time.perf_counter()
                done = self._step()
                self._counts["decode_seconds"] += time.perf_counter() - t0
                self._counts["decode_steps"] += 1
                if done:
                    return done
        return []

    @property
    def in_flight(self) -> int:
        """Requests submitted and not yet returned by `poll`."""
        return len(self._queue) + (len(self._running.rows) if self._running is not None else 0)

    def generate(self, requests: Sequence[Request]) -> list[Completion]:
        return generate_by_polling(self, requests)

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

    # Generates with the training model's own parameters: an update needs only a flush, never a copy.
    weights_shared = True

    def release_memory(self) -> None:
        """Before an update: drop the cached K/V, which the update would make stale anyway."""
        self.flush_cache()

    def resume_memory(self) -> None:
        """After an update: nothing to take back; the cache refills as requests arrive."""

    def flush_cache(self) -> None:
        if self.in_flight:
            raise RuntimeError(f"flush_cache with {self.in_flight} requests in flight: their K/V would mix weights")
        self.cache.reset()
        if self.plain_decode:  # the model's modules may have been replaced since
            self.decode_forward = decode_forward_for(self.model)

    # ---- statistics ------------------------------------------------------------------------------

    def stats(self) -> dict[str, float]:
        """Counters since the last reset: prefill_tokens counts prefix tokens actually computed,
        decode_tokens the rows of all decode steps; admit_seconds is spent prefilling requests that join
        the batch, decode_seconds in decode steps (sampling, stop tests, the forward)."""
        counts = self._counts
        rate = counts["cached_tokens"] / counts["prefix_tokens"] if counts["prefix_tokens"] else 0.0
        return {"prefix_cache_hit_rate": rate, **counts, "cache_size_tokens": self.cache.num_tokens}

    def reset_stats(self) -> None:
        self._counts = dict.fromkeys(("prefix_tokens", "cached_tokens", "prefill_tokens", "decode_tokens", "decode_steps",
                                      "admit_seconds", "decode_seconds"), 0)

    # ---- one batch -------------------------------------------------------------------------------

    def _validate(self, requests: Sequence[Request]) -> None:
        for i, request in enumerate(requests):
            context_limit(len(request.prefix_ids), request.max_new_tokens, self.max_positions, i)
            if min(request.prefix_ids) < 0 or max(request.prefix_ids) >= self.vocab:
                raise ValueError(f"request {i}: prefix token ids must be in [0, {self.vocab})")
            if request.stop_strings and self.tokenizer is None:
                raise ValueError(f"request {i}: stop_strings need TorchEngine(..., tokenizer=...)")

    def _admit(self) -> None:
        """Move queued requests into the batch, as many as `max_batch_size` leaves room for: prefill them
        together (shared prefixes computed once, identical ones once), then merge them into the running rows."""
        live = len(self._running.rows) if self._running else 0
        room = len(self._queue) if self.max_batch_size is None else self.max_batch_size - live
        if not self._queue or room <= 0:
            return
        # With a batch running, requests that only need their last prefix token run join the next decode step
        admitted = []
        for queued in self._queue:
            if len(admitted) == room:
                break
            if not (live and self._join_match([int(t) for t in queued[1].prefix_ids])):
                admitted.append(queued)
        if not admitted:
            return
        taken = {h for h, _ in admitted}
        self._queue = [q for q in self._queue if q[0] not in taken]
        t0 = time.perf_counter()
        rows, kv, logits = self._start_rows(admitted)
        self._counts["admit_seconds"] += time.perf_counter() - t0
        if self._running is None:
            self._running = _Running(rows, kv, logits, self._token_sampler(rows, logits))
            return
        run = self._running
        run.kv.merge(kv)
        run.rows += rows
        run.logits = torch.cat([run.logits, logits])
        run.sampler = self._token_sampler(run.rows, run.logits)

    def _start_rows(self, admitted: list[tuple[int, Request]]) -> tuple[list[_Row], BatchKV, torch.Tensor]:
        """Rows for `admitted`, their prefixes' K/V in a new batch buffer and their first logits."""
        requests = [r for _, r in admitted]
        prefixes, owners = self._distinct_prefixes(requests)
        if self.use_cache:
            self._cache_shared_prefixes(prefixes)
        # The last prefix token is always run, for the logits of the first new token.
        matches = [self.cache.match_prefix(ids[:-1]) if self.use_cache else _NO_MATCH for ids in prefixes]
        locked = [m.node for m in matches if m.length]
        for node in locked:  # held while their K/V is copied into the batch
            self.cache.lock(node)
        try:
            room = max(r.max_new_tokens for r in requests)
            kv, logits, order = self._prefill(prefixes, matches, len(requests), room)
        finally:
            for node in locked:
                self.cache.unlock(node)
        rows = [self._new_row(admitted[owners[u][0]], prefixes[u], matches[u].length) for u in order]
        sources = []  # further samples of a prefix continue a copy of its row, computing nothing
        for r, u in enumerate(order):
            for i in owners[u][1:]:
                rows.append(self._new_row(admitted[i], prefixes[u], len(prefixes[u])))
                sources.append(r)
        if sources:
            kv.add_copies(sources)
            logits = torch.cat([logits, logits[sources]])
        for row in rows:
            self._counts["prefix_tokens"] += len(row.ids)
            self._counts["cached_tokens"] += row.cached_tokens
        return rows, kv, logits

    def _distinct_prefixes(self, requests: Sequence[Request]) -> tuple[list[list[int]], list[list[int]]]:
        """Distinct prefixes and the requests (indices into `requests`) of each: identical prefixes (several
        samples of one prompt) are prefilled once. Without the cache every request computes its own."""
        owners: dict[tuple[int, ...] | int, list[int]] = {}
        prefixes: dict[tuple[int, ...] | int, list[int]] = {}
        for i, request in enumerate(requests):
            ids = [int(t) for t in request.prefix_ids]
            key = tuple(ids) if self.use_cache else i
            prefixes.setdefault(key, ids)
            owners.setdefault(key, []).append(i)
        return list(prefixes.values()), list(owners.values())

    def _cache_shared_prefixes(self, prefixes: list[list[int]]) -> None:
        """Compute once, into the cache, the uncached prefixes that several of `prefixes` share, so that
        each of those is served from the cache instead of prefilled again with every prefix."""
        shared = [ids for ids in _shared_prefixes(prefixes)
                  if len(ids) <= self.cache.max_tokens  # else it would be evicted before it is read
                  and len(ids) - self.cache.match_prefix(ids).length >= _MIN_SHARED_TOKENS]
        if not shared:
            return
        self._cache_shared_prefixes(shared)  # the prefixes these share in turn come first
        matches = [self.cache.match_prefix(ids[:-1]) for ids in shared]
        kv, _, order = self._prefill(shared, matches, len(shared), room=0)
        for row, u in enumerate(order):
            self.cache.insert(shared[u], kv.row_kv(row, len(shared[u])))

    def _new_row(self, admitted: tuple[int, Request], ids: list[int], cached: int) -> _Row:
        handle, request = admitted
        seed = request.sampling.seed
        if seed is None:
            seed = int(torch.randint(0, 2**62, ()))  # follows torch.manual_seed
        limit = context_limit(len(ids), request.max_new_tokens, self.max_positions)
        stop_ids = frozenset(int(t) for t in request.stop_token_ids)
        return _Row(request, handle, ids, cached, random.Random(seed), limit, stop_ids)

    def _prefill(self, prefixes: list[list[int]], matches: list[PrefixMatch], batch: int, room: int):
        """Copy each prefix's cached K/V into a buffer with rows for the whole `batch` and run the rest;
        returns the buffer, the last prefix token's logits per row, and the prefix index of each row
        (sorted by uncached suffix length)."""
        suffix = [len(ids) - m.length for ids, m in zip(prefixes, matches)]
        order = sorted(range(len(prefixes)), key=suffix.__getitem__)
        width = max(len(ids) for ids in prefixes)
        shape = (self.n_layers, 2, batch, self.kv_heads, width + min(room, _DECODE_ROOM), self.head_dim)
        kv = BatchKV(shape, [width - len(prefixes[u]) for u in order], width, self._dtype(), self._device())
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

    def _copy_cached(self, kv: BatchKV, row: int, match: PrefixMatch, n_tokens: int) -> None:
        """Copy the first `n_tokens` cached tokens of a prefix into its row."""
        column = int(kv.pads[row])
        for chunk in match.kv:
            if n_tokens <= 0:
                break
            n = min(n_tokens, chunk.shape[3])
            kv.buffer[:, :, row, :, column : column + n] = chunk[:, :, :, :n]
            column, n_tokens = column + n, n_tokens - n

    def _forward_prefill(self, kv: BatchKV, prefixes: list[list[int]], window: int) -> torch.Tensor:
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

    def _forward(self, ids, positions, mask, distance, kv: BatchKV) -> torch.Tensor:
        """Run the model on `ids` [rows, q] with a boolean `mask` [rows, 1, q, kv_len]; returns the last
        position's logits [rows, vocab]."""
        masks = self._layer_masks(mask, distance)
        if self.attn_impl == "eager":
            low = torch.finfo(self._dtype()).min
            masks = {
                kind: torch.zeros(m.shape, dtype=self._dtype(), device=m.device).masked_fill_(~m, low)
                for kind, m in masks.items()
            }
        # A dict of prepared masks is what hybrid models accept; a single 4D mask is what every model accepts.
        attention_mask = masks if len(masks) > 1 else masks["full_attention"]
        with attention_implementation(self.model.config, self.attn_impl):
            out = self.model(
                input_ids=ids, attention_mask=attention_mask, position_ids=positions,
                use_cache=True, logits_to_keep=1, **{self._cache_arg: kv},
            )
        return out.logits[:, -1]

    def _layer_masks(self, mask: torch.Tensor, distance: torch.Tensor) -> dict[str, torch.Tensor]:
        """The boolean attention mask of each kind of layer the model has (sliding layers see a window)."""
        masks = {"full_attention": mask}
        if "sliding_attention" in self.layer_types:
            masks["sliding_attention"] = mask & (distance < self.sliding_window)
        return masks

    def _token_sampler(self, rows: list[_Row], logits: torch.Tensor) -> TokenSampler:
        return TokenSampler([row.request.sampling for row in rows], logits.shape[1], logits.device)

    def _step(self) -> list[tuple[int, Completion]]:
        """One decode step: run the tokens sampled last step (with queued branches joining), admit queued
        requests that need a prefill, sample every row's next token and retire the rows that finished
        (their K/V into the prefix cache). Completions return before their batch runs on, so that work
        submitted in answer to them joins the very next forward."""
        run = self._running
        if run is not None and run.pending is not None:
            tokens, run.pending = run.pending, None
            joined = self._join(run)
            if joined is not None:
                tokens = torch.cat([tokens, joined])
            run.kv.reserve(1)
            run.logits = self._forward_decode(tokens, run.kv)
            if run.stale_sampler or joined is not None:
                run.sampler, run.stale_sampler = self._token_sampler(run.rows, run.logits), False
        self._admit()
        run = self._running
        if run is None:
            return []
        uniforms = torch.tensor([row.rng.random() for row in run.rows], dtype=torch.float32, device=run.logits.device)
        tokens, logprobs, entropies = run.sampler.sample(run.logits, uniforms)
        host = torch.stack([tokens.double(), logprobs.double(), entropies.double()]).cpu().tolist()
        self._counts["decode_tokens"] += len(run.rows)
        finished, done = [], []
        for i, row in enumerate(run.rows):
            reason = row.add(int(host[0][i]), host[1][i], host[2][i], self.tokenizer)
            if reason is None:
                continue
            finished.append(i)
            if self.use_cache:  # the last token was sampled but never run, so it has no K/V yet
                n = len(row.ids) + len(row.tokens) - 1
                self.cache.insert(row.ids + row.tokens[:-1], run.kv.row_kv(i, n))
            done.append((row.handle, row.completion(reason)))
        if len(finished) == len(run.rows):
            self._running = None
            return done
        if finished:
            order = run.kv.remove(finished)
            run.rows = [run.rows[i] for i in order]
            tokens = tokens[order]
            run.stale_sampler = True
        run.pending = tokens
        return done

    def _join_match(self, ids: list[int]) -> PrefixMatch | None:
        """The cache's match of `ids` when it holds all but the last token (the request can join a decode
        step), else None."""
        if not (self.use_cache and len(ids) > 1):
            return None
        match = self.cache.match_prefix(ids[:-1])
        return match if match.length == len(ids) - 1 else None

    def _join(self, run: _Running) -> torch.Tensor | None:
        """Queued requests whose prefix the cache holds but for its last token (a tree's branches) join this
        decode step instead of a prefill of their own: their cached K/V is copied into the batch and their
        last prefix token runs with the rows' sampled tokens. Returns those tokens, or None if none joined."""
        if not (self.use_cache and self._queue):
            return None
        room = len(self._queue) if self.max_batch_size is None else self.max_batch_size - len(run.rows)
        joining, waiting = [], []
        for handle, request in self._queue:
            ids = [int(t) for t in request.prefix_ids]
            match = self._join_match(ids) if len(joining) < room else None
            (waiting if match is None else joining).append((handle, request, ids, match))
        if not joining:
            return None
        self._queue = [(h, r) for h, r, _, _ in waiting]
        width = max(len(ids) - 1 for _, _, ids, _ in joining)
        shape = (self.n_layers, 2, len(joining), self.kv_heads, width, self.head_dim)
        kv = BatchKV(shape, [width - len(ids) + 1 for _, _, ids, _ in joining], width, self._dtype(), self._device())
        for r, (_, _, ids, match) in enumerate(joining):
            self._copy_cached(kv, r, match, len(ids) - 1)
        run.kv.merge(kv)
        for handle, request, ids, _ in joining:
            run.rows.append(self._new_row((handle, request), ids, len(ids) - 1))
            self._counts["prefix_tokens"] += len(ids)
            self._counts["cached_tokens"] += len(ids) - 1
            self._counts["prefill_tokens"] += 1
        return torch.tensor([ids[-1] for _, _, ids, _ in joining], device=run.logits.device)

    def _forward_decode(self, tokens: torch.Tensor, kv: BatchKV) -> torch.Tensor:
        columns = torch.arange(kv.start, kv.cursor + 1, device=tokens.device)
        mask = (columns[None, :] >= kv.pads[:, None])[:, None, None]
        distance = kv.cursor - columns
        positions = kv.cursor - kv.pads
        if self.decode_forward is not None:
            logits = self.decode_forward(tokens, positions, self._layer_masks(mask, distance), kv)
        else:
            logits = self._forward(tokens[:, None], positions[:, None], mask, distance, kv)
        kv.cursor += 1
        return logits

    def _device(self) -> torch.device:
        return self.model.get_input_embeddings().weight.device

    def _dtype(self) -> torch.dtype:
        return self.model.get_input_embeddings().weight.dtype


def _shared_prefixes(prefixes: list[list[int]]) -> list[list[int]]:
    """The distinct prefixes of at least _MIN_SHARED_TOKENS tokens that two or more of `prefixes` share,
    each shorter than those it is shared by (their last token is always run): the longest common
    prefixes of neighbours in sorted order, which are the branch points of the prefixes' trie."""
    ordered = sorted(prefixes)
    shared: dict[tuple[int, ...], list[int]] = {}
    for a, b in itertools.pairwise(ordered):
        n = min(common_prefix_length(a, b), len(a) - 1, len(b) - 1)
        if n >= _MIN_SHARED_TOKENS:
            shared.setdefault(tuple(a[:n]), a[:n])
    return list(shared.values())
