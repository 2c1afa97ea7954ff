"""Look spans (GazeVLM): the model names a box on a visual unit, and its text queries then look there.

A look span in the token stream is

    <look> <loc_x0> <loc_y0> <loc_x1> <loc_y1> ... local reasoning ... </look>

The four location tokens give a box on the unit's grid in `bins` equal bins per side, corners inclusive
(x0 <= x1, y0 <= y1). The span names the last visual unit that ends before its `<look>`.

Semantics (the paths' `looks=` argument; every clause is tested):

* A text query is *in the span* from the box's last location token (the query that predicts the first
  token after the box) up to, not including, `</look>`; a span not yet closed (generation) lasts to the
  end of the sequence. After `</look>` attention is normal again.
* A query in the span adds `bias` to its logits for every visual key (a grid token of any unit) outside the
  box: a negative float suppresses them softly, -inf masks them. A visual token is inside the box when
  its cell overlaps the box. Text and context tokens are not biased.
* With Gaze Attention on, the regions holding the box's tokens are forced into the selection of the
  queries in the span (in addition to their top-k), whenever they are candidates.
* Ill-formed spans (anything but four location tokens after `<look>`, or x0 > x1 / y0 > y1, or no unit
  before the span) have no effect. A `<look>` inside an open span closes it and starts a new one.

`LookSet` holds the spans of a batch. In training they are parsed from the input ids; during generation
`LookSet.feed` is given every new token before the layers run (the VLM hooks the input embedding), so a
span that opens or closes while generating changes the attention from the next query on.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from gazelit.attention.layout import GazeLayout

LOOK_OPEN, LOOK_CLOSE = "<look>", "</look>"


def loc_token(i: int) -> str:
    return f"<loc_{i:03d}>"


def look_token_strings(bins: int) -> list[str]:
    """The tokens a tokenizer gains for look spans with `bins` location bins per side."""
    return [LOOK_OPEN, LOOK_CLOSE] + [loc_token(i) for i in range(bins)]


@dataclass(frozen=True)
class LookTokens:
    """Token ids of `<look>`, `</look>` and the location tokens (id -> bin)."""

    open: int
    close: int
    locs: dict[int, int]

    @property
    def bins(self) -> int:
        return len(self.locs)

    @classmethod
    def from_tokenizer(cls, tokenizer, bins: int) -> LookTokens:
        ids = tokenizer.convert_tokens_to_ids(look_token_strings(bins))
        unk = getattr(tokenizer, "unk_token_id", None)
        missing = [t for t, i in zip(look_token_strings(bins), ids) if i is None or (unk is not None and i == unk)]
        if missing:
            raise ValueError(f"the tokenizer lacks the look tokens {missing[:3]}...; build the model with model.look")
        return cls(open=ids[0], close=ids[1], locs={i: b for b, i in enumerate(ids[2:])})

    def span_ids(self, box: tuple[int, int, int, int]) -> list[int]:
        """<look> and the four location tokens of a box in bins."""
        by_bin = {b: i for i, b in self.locs.items()}
        return [self.open] + [by_bin[c] for c in box]


@dataclass(frozen=True)
class Look:
    """One look span of one sequence: queries at positions [start, end) are biased towards `box`."""

    start: int  # position of the box's last location token
    end: int | None  # position of </look>; None while the span is open
    unit: int  # index of the named unit within its sample
    box: tuple[int, int, int, int]  # x0, y0, x1, y1 in bins, inclusive

    def covers(self, position: int) -> bool:
        return self.start <= position and (self.end is None or position < self.end)


def box_to_bins(box: list[float] | tuple[float, ...], bins: int) -> tuple[int, int, int, int]:
    """A normalised [x0, y0, x1, y1] box (0..1) -> the smallest bin box that covers it."""
    x0, y0, x1, y1 = (float(c) for c in box)
    lo = [min(bins - 1, max(0, int(c * bins))) for c in (x0, y0)]
    hi = [min(bins - 1, max(lo[i], -int(-c * bins) - 1)) for i, c in enumerate((x1, y1))]
    return lo[0], lo[1], hi[0], hi[1]


def bins_to_box(box: tuple[int, int, int, int], bins: int) -> tuple[float, float, float, float]:
    """Bin box -> normalised [x0, y0, x1, y1] (the area its bins cover)."""
    x0, y0, x1, y1 = box
    return x0 / bins, y0 / bins, (x1 + 1) / bins, (y1 + 1) / bins


def box_iou(a, b) -> float:
    """IoU of two normalised [x0, y0, x1, y1] boxes."""
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = w * h
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


@dataclass
class _Parser:
    """Incremental parser of one sequence's token stream."""

    tokens: LookTokens
    looks: list[Look] = field(default_factory=list)
    opened_at: int | None = None  # position of an open <look> whose box is still being read
    box: list[int] = field(default_factory=list)
    open_span: int | None = None  # index in `looks` of the span now open
    spans_opened: int = 0  # <look> tokens seen (well-formed or not)

    def feed(self, token: int, position: int, unit_before) -> None:
        t = self.tokens
        if token == t.open:
            self._close(position)
            self.opened_at, self.box = position, []
            self.spans_opened += 1
            return
        if self.opened_at is not None:  # reading the box
            if token not in t.locs:
                self.opened_at = None  # ill-formed: no effect
                return
            self.box.append(t.locs[token])
            if len(self.box) == 4:
                x0, y0, x1, y1 = self.box
                unit = unit_before(self.opened_at)
                if x0 <= x1 and y0 <= y1 and unit >= 0:
                    self.looks.append(Look(position, None, unit, (x0, y0, x1, y1)))
                    self.open_span = len(self.looks) - 1
                self.opened_at = None
            return
        if token == t.close:
            self._close(position)

    def _close(self, position: int) -> None:
        self.opened_at = None
        if self.open_span is not None:
            look = self.looks[self.open_span]
            self.looks[self.open_span] = Look(look.start, position, look.unit, look.box)
            self.open_span = None


class LookSet:
    """The look spans of a batch, for one layout, with the bias queries in a span give outside the box."""

    def __init__(self, layout: GazeLayout, tokens: LookTokens, bias: float):
        if not bias < 0:
            raise ValueError(f"look bias must be negative (or -inf), got {bias}")
        self.layout = layout
        self.tokens = tokens
        self.bias = float(bias)
        self._parsers = [_Parser(tokens) for _ in range(layout.batch_size)]
        self._next = [0] * layout.batch_size  # next position to feed, per sample
        self._tables: dict = {}

    @classmethod
    def from_ids(cls, layout: GazeLayout, tokens: LookTokens, bias: float, input_ids: torch.Tensor) -> LookSet:
        """Spans of a whole (B, L) batch of ids (training, or a prompt before generation)."""
        looks = cls(layout, tokens, bias)
        looks.feed(input_ids, 0)
        return looks

    def feed(self, input_ids: torch.Tensor, position: int | None = None) -> None:
        """Give the tokens (B, n) at positions [position, position + n) (default: where the last feed ended)."""
        has_open = (input_ids == self.tokens.open).any(-1).tolist()
        for b in range(input_ids.shape[0]):
            start = self._next[b] if position is None else position
            parser = self._parsers[b]
            if not has_open[b] and parser.opened_at is None and parser.open_span is None:
                self._next[b] = start + input_ids.shape[1]  # nothing to parse: no span opens or is open
                continue
            row = input_ids[b].tolist()
            units = self.layout.samples[b]
            lo, hi = units.valid
            for j, token in enumerate(row):
                p = start + j
                if p < lo or (p >= hi and hi < self.layout.length):
                    continue  # padding
                parser.feed(token, p, lambda at, s=units: _unit_before(s, at))
            self._next[b] = start + len(row)
        self._tables.clear()

    def spans(self, sample: int) -> list[Look]:
        return list(self._parsers[sample].looks)

    def opened(self, sample: int) -> int:
        """`<look>` tokens seen in a sample, well-formed or not."""
        return self._parsers[sample].spans_opened

    def any_in(self, q_offset: int, q_len: int) -> bool:
        return any(self.rows(b, q_offset, q_len) for b in range(self.layout.batch_size))

    def rows(self, sample: int, q_offset: int, q_len: int) -> list[tuple[int, int, Look]]:
        """(first, end, look) query rows of one sample in [q_offset, q_offset + q_len) under a span."""
        out = []
        for look in self._parsers[sample].looks:
            a = max(look.start, q_offset)
            z = q_offset + q_len if look.end is None else min(look.end, q_offset + q_len)
            if a < z:
                out.append((a, z, look))
        return out

    def inside(self, sample: int, look: Look, kv_len: int, device) -> torch.Tensor:
        """(S,) bool: visual keys of the named unit whose cells overlap the box."""
        key = ("inside", sample, look, kv_len)
        if key not in self._tables:
            unit = self.layout.samples[sample].units[look.unit]
            rows, cols = unit.grid
            n = self.tokens.bins
            x0, y0, x1, y1 = look.box
            ys, xs = torch.arange(rows), torch.arange(cols)
            in_y = (ys * n < (y1 + 1) * rows) & ((ys + 1) * n > y0 * rows)
            in_x = (xs * n < (x1 + 1) * cols) & ((xs + 1) * n > x0 * cols)
            cells = (in_y[:, None] & in_x[None, :]).flatten()
            mask = torch.zeros(kv_len, dtype=torch.bool)
            stop = min(unit.start + rows * cols, kv_len)
            mask[unit.start : stop] = cells[: stop - unit.start]
            self._tables[key] = mask.to(device)
        return self._tables[key]

    def named_regions(self, sample: int, look: Look, device) -> torch.Tensor:
        """(R,) bool: regions holding a token inside the box."""
        key = ("regions", sample, look)
        if key not in self._tables:
            layout = self.layout
            inside = self.inside(sample, look, layout.length, layout.device)
            regions = layout.region[sample, inside]
            table = torch.zeros(max(layout.num_regions, 1), dtype=torch.bool, device=layout.device)
            table[regions[regions >= 0]] = True
            self._tables[key] = table[: layout.num_regions].to(device)
        return self._tables[key]

    def position_tables(self, positions: torch.Tensor, kv_len: int, device):
        """Dense tables for query positions (B, N): (active (B, N), inside (B, N, S), named (B, N, R)), or None
        when no position is under a span."""
        b, n = positions.shape
        r = self.layout.num_regions
        active = torch.zeros(b, n, dtype=torch.bool, device=device)
        inside = torch.zeros(b, n, kv_len, dtype=torch.bool, device=device)
        named = torch.zeros(b, n, r, dtype=torch.bool, device=device)
        found = False
        for i in range(b):
            for look in self._parsers[i].looks:
                covered = positions[i] >= look.start
                if look.end is not None:
                    covered &= positions[i] < look.end
                if not bool(covered.any()):
                    continue
                found = True
                active[i, covered] = True
                inside[i, covered] = self.inside(i, look, kv_len, device)
                named[i, covered] = self.named_regions(i, look, device)
        return (active, inside, named) if found else None


def _unit_before(sample, position: int) -> int:
    """Index of the last unit of a sample whose tokens end at or before `position`; -1 if none."""
    found = -1
    for u, end in enumerate(sample.unit_end):
        if end <= position:
            found = u
    return found
