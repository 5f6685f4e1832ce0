"""Prompt data: loading jsonl / json / parquet rows, encoding prompts, and a resumable stream.

Two row formats load unchanged:
- verl: `{"prompt": str | [{"role", "content"}, ...], "reward_model": {"ground_truth": ...},
  "data_source": str, "extra_info": {...}}`
- plain: `{"prompt": ..., "answer": ...}`; `data_source` defaults to the file stem.
"""
from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ibtpo_fast.errors import DataError, MissingExtraError


@dataclass
class PromptRow:
    prompt: str | list[dict]
    ground_truth: str
    data_source: str
    extra_info: dict
    index: int  # row number in its file, from 0
    file: str = field(default="", compare=False)  # where the row came from, for error messages

    def where(self) -> str:
        return f"{self.file or '<memory>'} row {self.index} (data_source {self.data_source!r})"


# ---------------------------------------------------------------- loading


def load_rows(path: str | Path, default_source: str | None = None) -> list[PromptRow]:
    """Rows of one `.jsonl`, `.json` (a list of objects) or `.parquet` file."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such data file")
    source = default_source if default_source is not None else path.stem
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        records = _read_jsonl(path)
    elif suffix == ".json":
        records = _read_json_list(path)
    elif suffix == ".parquet":
        records = _read_parquet(path)
    else:
        raise DataError(f"{path}: unsupported data file type {suffix!r} (use .jsonl, .json or .parquet)")
    if not records:
        raise DataError(f"{path}: no rows")
    return [_to_row(rec, path, where, i, source) for i, (where, rec) in enumerate(records)]


def load_files(spec: str) -> list[PromptRow]:
    """Rows of several files given as a comma-separated list, in order."""
    paths = [p.strip() for p in spec.split(",") if p.strip()]
    if not paths:
        raise DataError(f"no data files in {spec!r}")
    rows: list[PromptRow] = []
    for p in paths:
        rows.extend(load_rows(p))
    return rows


def _read_jsonl(path: Path) -> list[tuple[str, Any]]:
    records = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                records.append((f"line {lineno}", json.loads(line)))
            except json.JSONDecodeError as e:
                raise DataError(f"{path} line {lineno}: invalid JSON ({e})") from None
    return records


def _read_json_list(path: Path) -> list[tuple[str, Any]]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: invalid JSON ({e})") from None
    if not isinstance(data, list):
        raise DataError(f"{path}: a .json data file must hold a list of rows, got {type(data).__name__}")
    return [(f"row {i + 1}", rec) for i, rec in enumerate(data)]


def _read_parquet(path: Path) -> list[tuple[str, Any]]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise MissingExtraError(f"reading {path} needs pyarrow: pip install pyarrow") from None
    records = pq.read_table(path).to_pylist()
    return [(f"row {i + 1}", rec) for i, rec in enumerate(records)]


def _to_row(rec: Any, path: Path, where: str, index: int, default_source: str) -> PromptRow:
    def bad(msg: str) -> DataError:
        return DataError(f"{path} {where}: {msg}")

    if not isinstance(rec, dict):
        raise bad(f"expected a JSON object, got {type(rec).__name__}")
    if rec.get("prompt") is None:
        raise bad("missing 'prompt'")
    prompt = _check_prompt(rec["prompt"], bad)
    data_source = rec.get("data_source")
    if data_source is None:
        data_source = default_source
    elif not isinstance(data_source, str):
        raise bad(f"'data_source' must be a string, got {type(data_source).__name__}")
    extra_info = rec.get("extra_info")
    if extra_info is None:
        extra_info = {}
    elif not isinstance(extra_info, dict):
        raise bad(f"'extra_info' must be an object, got {type(extra_info).__name__}")
    return PromptRow(prompt, _ground_truth(rec, bad), data_source, extra_info, index, str(path))


def _check_prompt(prompt: Any, bad) -> str | list[dict]:
    if isinstance(prompt, str):
        if not prompt:
            raise bad("empty 'prompt'")
        return prompt
    if not isinstance(prompt, list) or not prompt:
        raise bad(f"'prompt' must be a string or a non-empty chat list, got {type(prompt).__name__}")
    for i, msg in enumerate(prompt):
        if not (isinstance(msg, dict) and isinstance(msg.get("role"), str) and isinstance(msg.get("content"), str)):
            raise bad(f"'prompt' message {i} must be an object with string 'role' and 'content', got {msg!r}")
    return [{"role": m["role"], "content": m["content"]} for m in prompt]


def _ground_truth(rec: dict, bad) -> str:
    if "reward_model" in rec and rec["reward_model"] is not None:
        rm = rec["reward_model"]
        if not isinstance(rm, dict) or rm.get("ground_truth") is None:
            raise bad("'reward_model' must be an object with a 'ground_truth'")
        value, name = rm["ground_truth"], "reward_model.ground_truth"
    elif rec.get("answer") is not None:
        value, name = rec["answer"], "answer"
    else:
        raise bad("missing 'answer' (or verl's 'reward_model.ground_truth')")
    # numbers are common answers in plain files; bool would be a mistake, not an answer
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise bad(f"'{name}' must be a string or a number, got {type(value).__name__}")
    return str(value)


# ---------------------------------------------------------------- encoding


def encode_prompt(row: PromptRow, tokenizer, max_prompt_tokens: int) -> list[int]:
    """Token ids of a row's prompt.

    A chat list goes through the tokenizer's chat template with the generation prompt; without a
    template its contents are joined by newlines. Plain text (and that fallback) is encoded with
    the tokenizer's own special-token rule when it defines a BOS token (e.g. Llama prepends one)
    and with no special tokens otherwise, so a BOS-less tokenizer never gains a stray EOS.
    """
    if isinstance(row.prompt, list) and getattr(tokenizer, "chat_template", None):
        ids = _input_ids(tokenizer.apply_chat_template(row.prompt, add_generation_prompt=True, tokenize=True))
    else:
        text = row.prompt if isinstance(row.prompt, str) else "\n".join(m["content"] for m in row.prompt)
        ids = list(tokenizer.encode(text, add_special_tokens=getattr(tokenizer, "bos_token", None) is not None))
    if not ids:
        raise DataError(f"{row.where()}: prompt encodes to no tokens")
    if len(ids) > max_prompt_tokens:
        raise DataError(
            f"{row.where()}: prompt has {len(ids)} tokens, over max_prompt_tokens={max_prompt_tokens}"
        )
    return ids


def _input_ids(out: Any) -> list[int]:
    # transformers 5 returns a BatchEncoding by default; older versions a plain list
    if hasattr(out, "keys"):
        out = out["input_ids"]
    if hasattr(out, "tolist"):
        out = out.tolist()
    if out and isinstance(out[0], list):
        out = out[0]
    return [int(t) for t in out]


# ---------------------------------------------------------------- stream


class PromptStream:
    """Batches of rows from shuffled epochs; the permutation of epoch e depends only on (seed, e).

    An epoch yields len(rows) // batch_size batches; the remainder is dropped so every batch has
    the same size, and reshuffling lets the dropped rows appear in later epochs.
    """

    def __init__(self, rows: list, batch_size: int, seed: int):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if batch_size > len(rows):
            raise DataError(f"batch_size {batch_size} is larger than the data ({len(rows)} rows)")
        self.rows = rows
        self.batch_size = batch_size
        self.seed = seed
        self.epoch = 0
        self.position = 0
        self._order = self._permutation(0)

    @property
    def batches_per_epoch(self) -> int:
        return len(self.rows) // self.batch_size

    def _permutation(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(len(self.rows))

    def next_batch(self) -> list:
        if self.position + self.batch_size > len(self.rows):
            self.epoch += 1
            self.position = 0
            self._order = self._permutation(self.epoch)
        idx = self._order[self.position : self.position + self.batch_size]
        self.position += self.batch_size
        return [self.rows[i] for i in idx]

    def __iter__(self) -> Iterator[list]:
        while True:
            yield self.next_batch()

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        epoch, position = int(state["epoch"]), int(state["position"])
        if epoch < 0 or not 0 <= position <= len(self.rows):
            raise ValueError(f"invalid PromptStream state {state!r} for {len(self.rows)} rows")
        self.epoch, self.position = epoch, position
        self._order = self._permutation(epoch)
