"""Cut a response into reasoning steps at a text delimiter (docs/algorithm.md section 1).

A step ends on the token whose decoded text completes the delimiter, also when the delimiter sits
inside a larger token (".\\n\\n"). Decoding is per token, cached per tokenizer, so splitting costs
one dictionary look-up per token after warm-up.
"""
from __future__ import annotations

import weakref
from collections.abc import Sequence
from typing import Any

_piece_cache: weakref.WeakKeyDictionary[Any, dict[int, str]] = weakref.WeakKeyDictionary()


def _pieces(tokenizer: Any) -> dict[int, str]:
    try:
        return _piece_cache.setdefault(tokenizer, {})
    except TypeError:  # tokenizer not weak-referenceable: no cache
        return {}


def step_lengths(
    token_ids: Sequence[int], tokenizer: Any, delimiter: str = "\n\n", min_step_tokens: int = 1
) -> list[int]:
    """Token count of each step of `token_ids`; they sum to len(token_ids)."""
    if not delimiter:
        raise ValueError("delimiter must be a non-empty string")
    cache = _pieces(tokenizer)
    lengths: list[int] = []
    start, pending = 0, ""  # pending: text of the current step not yet matched against the delimiter
    for i, tok in enumerate(token_ids):
        tok = int(tok)
        piece = cache.get(tok)
        if piece is None:
            piece = cache[tok] = tokenizer.decode([tok])
        pending += piece
        if delimiter in pending:
            lengths.append(i + 1 - start)
            start, pending = i + 1, ""
        else:
            pending = pending[-(len(delimiter) - 1) :] if len(delimiter) > 1 else ""
    if start < len(token_ids):
        lengths.append(len(token_ids) - start)
    return _merge_short(lengths, min_step_tokens)


def _merge_short(lengths: list[int], min_tokens: int) -> list[int]:
    """Merge steps shorter than `min_tokens` into the next step (the last one into the previous)."""
    if min_tokens <= 1:
        return lengths
    out: list[int] = []
    carry = 0
    for n in lengths:
        carry += n
        if carry >= min_tokens:
            out.append(carry)
            carry = 0
    if carry:
        if out:
            out[-1] += carry
        else:
            out.append(carry)
    return out


def split_steps(
    token_ids: Sequence[int], tokenizer: Any, delimiter: str = "\n\n", min_step_tokens: int = 1
) -> list[list[int]]:
    """The steps of a response, as lists of token ids."""
    steps, k = [], 0
    for n in step_lengths(token_ids, tokenizer, delimiter, min_step_tokens):
        steps.append([int(t) for t in token_ids[k : k + n]])
        k += n
    return steps
