"""The batch's K/V buffer: a left-padded [layers, 2, rows, kv_heads, columns, head_dim] tensor that a
transformers `Cache` writes each forward's new K/V into, so decoding never re-copies the batch."""
from __future__ import annotations

import torch
from transformers.cache_utils import Cache

_MIN_GROWTH = 64  # columns added to the buffer when decoding outruns it


class BatchKV(Cache):
    """K/V of a whole batch in one buffer [layers, 2, rows, kv_heads, columns, head_dim].

    Rows are left-padded so that all rows end in the same column: a decode step writes one column for
    every row. Row i's tokens occupy columns [pads[i], cursor); attention reads columns [start, cursor),
    start being the first column any live row uses. Pad columns are zero (never NaN) and masked;
    columns from the cursor on hold whatever memory held until a forward writes them.
    Rows only ever move within the buffer, which is allocated once per batch and grown only when
    decoding outruns it: fresh memory is costly (page faults), copies of a few rows are not.
    """

    def __init__(self, shape: tuple[int, ...], pads: list[int], cursor: int, dtype, device) -> None:
        super().__init__(layers=[])
        # Only the prefix columns need zeros: every later column is written before it is read.
        self.buffer = torch.empty(shape, dtype=dtype, device=device)
        self.buffer.narrow(4, 0, cursor).zero_()
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
        written = self.buffer.narrow(4, 0, self.cursor)
        written.index_copy_(2, rows, written.index_select(2, index))
        self.pads = torch.cat([self.pads, self.pads[index]])
        self.rows += len(sources)
        self.focus(0, self.rows, self.cursor)

    def merge(self, other: BatchKV) -> None:
        """Append `other`'s rows (requests admitted while this batch decodes), aligned so that every row
        ends at the cursor. In place when the buffer has spare rows and `other`'s rows fit left of the
        cursor; otherwise one new buffer, with room for as many rows again."""
        mine, theirs = self.cursor - self.start, other.cursor - other.start
        rows = self.rows + other.rows
        if theirs > self.cursor or rows > self.buffer.shape[2]:
            self._regrow(max(mine, theirs), 2 * rows)
        first = self.cursor - theirs  # other's live columns end at the cursor; everything left of them is pad
        new = self.buffer.narrow(2, self.rows, other.rows)
        new.narrow(4, 0, first).zero_()
        new.narrow(4, first, theirs).copy_(other.buffer[:, :, : other.rows, :, other.start : other.cursor])
        self.pads = torch.cat([self.pads, other.pads + (first - other.start)])
        self.rows = rows
        self.start = int(self.pads.min())
        self.focus(0, self.rows, self.cursor)

    def _regrow(self, live: int, row_capacity: int) -> None:
        """A new buffer holding `row_capacity` rows, this batch's live columns moved to end at column `live`."""
        mine = self.cursor - self.start
        shape = list(self.buffer.shape)
        shape[2] = row_capacity
        shape[4] = live + max(self.buffer.shape[4] - self.cursor, _MIN_GROWTH)
        grown = torch.empty(shape, dtype=self.buffer.dtype, device=self.buffer.device)
        grown[:, :, : self.rows, :, : live - mine].zero_()
        grown[:, :, : self.rows, :, live - mine : live] = self.buffer[:, :, : self.rows, :, self.start : self.cursor]
        self.buffer = grown
        self.pads += live - mine - self.start
        self.cursor, self.start = live, live - mine

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
        if holes:  # columns before `start` are no live row's, columns after `cursor` are unwritten
            live_columns = self.buffer.narrow(4, self.start, self.cursor - self.start)
            moved = live_columns.index_select(2, torch.tensor(movers, device=device))
            live_columns.index_copy_(2, torch.tensor(holes, device=device), moved)
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
        shape = list(self.buffer.shape)  # the spare rows stay, for requests that join later
        shape[4] = self.cursor - self.start + max(columns, _MIN_GROWTH, capacity // 2)
        grown = torch.empty(shape, dtype=self.buffer.dtype, device=self.buffer.device)
        # Live columns move to the front; later columns are written before they are read.
        live = self.cursor - self.start
        grown[:, :, : self.rows, :, :live] = self.buffer[:, :, : self.rows, :, self.start : self.cursor]
        self.buffer = grown
        self.pads -= self.start
        self.cursor -= self.start
        self.start = 0
        self.focus(0, self.rows, self.cursor)

    def row_kv(self, row: int, n_tokens: int) -> torch.Tensor:
        """View of row `row`'s first `n_tokens` tokens: [layers, 2, kv_heads, n_tokens, head_dim]."""
        first = int(self.pads[row])
        return self.buffer[:, :, row, :, first : first + n_tokens]
