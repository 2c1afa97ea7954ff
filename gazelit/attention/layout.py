"""Layout of a packed batch for Gaze Attention: which token is text, visual or context, and the regions.

A sequence holds text tokens and visual units (an image, or one frame of a video). Unit u occupies
`grid_h * grid_w` visual tokens in raster order starting at `start`, followed by `num_context` context
tokens. Each unit's grid is tiled into `region.h x region.w` regions (edge tiles are smaller when the grid
does not divide; no token is dropped). Frames of one video may be grouped `region.t` at a time, in time
order, so that one region spans the same tile of consecutive frames.

A region becomes *visible* to a query at position p once every unit it covers has ended before p
(its last token, context tokens included, is at a position < p). `ready[r]` stores that first position.

Positions at or beyond the layout's length are text (tokens generated after the prompt).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

TEXT, VISUAL, CONTEXT, PAD = 0, 1, 2, 3
KIND_NAMES = {TEXT: "text", VISUAL: "visual", CONTEXT: "context", PAD: "pad"}


@dataclass(frozen=True)
class RegionShape:
    """Region size in visual tokens: h rows x w columns of one unit's grid, over t consecutive frames."""

    h: int = 6
    w: int = 6
    t: int = 1

    def __post_init__(self):
        if min(self.h, self.w, self.t) < 1:
            raise ValueError(f"region sizes must be >= 1, got h={self.h} w={self.w} t={self.t}")

    @property
    def tokens(self) -> int:
        return self.h * self.w * self.t


@dataclass(frozen=True)
class Unit:
    """One visual unit of one sequence: visual tokens at [start, start + h*w), then its context tokens."""

    start: int
    grid: tuple[int, int]
    video: int = -1  # frames of one video share an id (unique within the batch); -1 for an image
    time: int = 0  # frame index within its video

    @property
    def num_visual(self) -> int:
        return self.grid[0] * self.grid[1]


@dataclass
class SampleLayout:
    """Python-side description of one sequence, used by planners that loop over segments."""

    units: list[Unit]
    unit_end: list[int]  # exclusive end of each unit's tokens (visual + context)
    num_context: int
    valid: tuple[int, int]  # [first, last + 1) of non-pad tokens
    region_ready: list[int] = field(default_factory=list)
    region_unit: list[int] = field(default_factory=list)  # last unit covered by the region
    # first position that may see each unit's visual tokens (its frame group's end): a unit grouped with
    # later frames stays invisible to text until the whole group has ended
    unit_ready: list[int] = field(default_factory=list)


class GazeLayout:
    """Token roles and region partition of a (B, L) batch, as tensors plus per-sample Python metadata.

    Tensors (all on `device`):
      kind (B, L): TEXT / VISUAL / CONTEXT / PAD per position.
      unit (B, L): unit index within the sample for visual and context tokens, -1 elsewhere.
      region (B, L): region index within the sample for visual tokens, -1 elsewhere.
      region_ready (B, R): first query position that may see region r; a huge value for padding regions.
      region_tokens (B, R, T): positions of the tokens of region r, -1 padded (T = largest region).
      region_count (B,): number of regions per sample.
    """

    NEVER = 2**62

    def __init__(self, samples: list[SampleLayout], length: int, region: RegionShape, device=None):
        self.samples = samples
        self.length = length
        self.region_shape = region
        self.batch_size = len(samples)
        device = torch.device(device) if device is not None else torch.device("cpu")
        b, l_ = self.batch_size, length
        kind = torch.full((b, l_), TEXT, dtype=torch.long)
        unit = torch.full((b, l_), -1, dtype=torch.long)
        reg = torch.full((b, l_), -1, dtype=torch.long)
        per_sample_regions: list[list[list[int]]] = []
        for i, s in enumerate(samples):
            lo, hi = s.valid
            kind[i, :lo] = PAD
            kind[i, hi:] = PAD
            tokens_of_region: list[list[int]] = []
            ready: list[int] = []
            last_unit: list[int] = []
            unit_ready = [0] * len(s.units)
            for u_idx, u in enumerate(s.units):
                kind[i, u.start : u.start + u.num_visual] = VISUAL
                kind[i, u.start + u.num_visual : s.unit_end[u_idx]] = CONTEXT
                unit[i, u.start : s.unit_end[u_idx]] = u_idx
            for group in unit_groups(s.units, region):
                first = group[0]
                gh, gw = s.units[first].grid
                nrh, nrw = math.ceil(gh / region.h), math.ceil(gw / region.w)
                base = len(tokens_of_region)
                tokens_of_region.extend([] for _ in range(nrh * nrw))
                end = max(s.unit_end[u] for u in group)
                ready.extend([end] * (nrh * nrw))
                last_unit.extend([max(group)] * (nrh * nrw))
                for u in group:
                    unit_ready[u] = end
                rows = torch.arange(gh).unsqueeze(1) // region.h
                cols = torch.arange(gw).unsqueeze(0) // region.w
                local = (rows * nrw + cols).flatten()  # region of each raster token within the unit
                for u in group:
                    start = s.units[u].start
                    reg[i, start : start + gh * gw] = base + local
                    for t, r in enumerate(local.tolist()):
                        tokens_of_region[base + r].append(start + t)
            s.region_ready = ready
            s.region_unit = last_unit
            s.unit_ready = unit_ready
            per_sample_regions.append(tokens_of_region)

        r_max = max((len(r) for r in per_sample_regions), default=0)
        t_max = max((len(t) for r in per_sample_regions for t in r), default=0)
        region_ready = torch.full((b, r_max), self.NEVER, dtype=torch.long)
        region_tokens = torch.full((b, r_max, max(t_max, 1)), -1, dtype=torch.long)
        for i, regions in enumerate(per_sample_regions):
            if regions:
                region_ready[i, : len(regions)] = torch.tensor(samples[i].region_ready)
            for r, toks in enumerate(regions):
                region_tokens[i, r, : len(toks)] = torch.tensor(toks)
        self.kind = kind.to(device)
        self.unit = unit.to(device)
        self.region = reg.to(device)
        self.region_ready = region_ready.to(device)
        self.region_tokens = region_tokens.to(device)
        self.region_count = torch.tensor([len(r) for r in per_sample_regions], dtype=torch.long, device=device)
        self.num_regions = r_max
        self._cache: dict = {}

    # ------------------------------------------------------------------ construction
    @classmethod
    def build(
        cls,
        units: list[list[Unit]],
        length: int,
        num_context: int,
        region: RegionShape = RegionShape(),
        valid: list[tuple[int, int]] | None = None,
        device=None,
    ) -> GazeLayout:
        """Layout from explicit units per sample. `valid[b]` is the [first, end) range of real tokens."""
        if num_context < 0:
            raise ValueError(f"num_context must be >= 0, got {num_context}")
        samples = []
        for b, sample_units in enumerate(units):
            lo, hi = valid[b] if valid is not None else (0, length)
            if not (0 <= lo <= hi <= length):
                raise ValueError(f"sample {b}: valid range {lo, hi} outside a sequence of length {length}")
            ordered = sorted(sample_units, key=lambda u: u.start)
            ends = []
            prev_end = lo
            for j, u in enumerate(ordered):
                if u.grid[0] < 1 or u.grid[1] < 1:
                    raise ValueError(f"sample {b} unit {j}: grid {u.grid} must be positive")
                end = u.start + u.num_visual + num_context
                if u.start < prev_end or end > hi:
                    raise ValueError(
                        f"sample {b} unit {j}: tokens [{u.start}, {end}) overlap another unit or fall outside "
                        f"the valid range [{lo}, {hi})"
                    )
                ends.append(end)
                prev_end = end
            samples.append(SampleLayout(units=ordered, unit_end=ends, num_context=num_context, valid=(lo, hi)))
        return cls(samples, length, region, device=device)

    @classmethod
    def from_token_kinds(
        cls,
        token_kind: torch.Tensor,
        unit_sample: torch.Tensor,
        unit_start: torch.Tensor,
        unit_grid: torch.Tensor,
        num_context: int,
        region: RegionShape = RegionShape(),
        unit_video: torch.Tensor | None = None,
        unit_time: torch.Tensor | None = None,
    ) -> GazeLayout:
        """Layout from the batch contract (see gazelit.batch), checking it against `token_kind`.

        Raises ValueError naming the sample, unit and position where the unit table and the token kinds
        disagree (e.g. a grid that does not match the number of visual tokens in the sequence).
        """
        kinds = token_kind.detach().cpu()
        b, length = kinds.shape
        n = unit_sample.numel()
        video = unit_video.tolist() if unit_video is not None else [-1] * n
        time = unit_time.tolist() if unit_time is not None else [0] * n
        per_sample: list[list[Unit]] = [[] for _ in range(b)]
        for j, (s, st, g, vd, tm) in enumerate(
            zip(unit_sample.tolist(), unit_start.tolist(), unit_grid.tolist(), video, time)
        ):
            if not 0 <= s < b:
                raise ValueError(f"unit {j}: sample index {s} outside the batch of {b}")
            per_sample[s].append(Unit(start=st, grid=(g[0], g[1]), video=vd, time=tm))
        valid = []
        for i in range(b):
            real = (kinds[i] != PAD).nonzero().flatten()
            lo, hi = (int(real[0]), int(real[-1]) + 1) if real.numel() else (0, 0)
            if real.numel() and real.numel() != hi - lo:
                raise ValueError(f"sample {i}: padding inside the sequence (pads must be at the start or end)")
            valid.append((lo, hi))
        layout = cls.build(per_sample, length, num_context, region, valid=valid, device=token_kind.device)
        mismatch = (layout.kind.cpu() != kinds).nonzero()
        if mismatch.numel():
            i, p = mismatch[0].tolist()
            raise ValueError(
                f"sample {i} position {p}: token_kind says {KIND_NAMES.get(int(kinds[i, p]), kinds[i, p])} but the "
                f"unit table (starts, grids, {num_context} context tokens per unit) implies "
                f"{KIND_NAMES[int(layout.kind[i, p])]}; {mismatch.shape[0]} positions disagree"
            )
        return layout

    # ------------------------------------------------------------------ queries about positions
    def kinds_at(self, positions: torch.Tensor) -> torch.Tensor:
        """(B, N) kinds for absolute positions (B, N) or (N,); positions past the layout are text."""
        return _take(self.kind, positions, TEXT)

    def units_at(self, positions: torch.Tensor) -> torch.Tensor:
        return _take(self.unit, positions, -1)

    def regions_at(self, positions: torch.Tensor) -> torch.Tensor:
        return _take(self.region, positions, -1)

    def to(self, device) -> GazeLayout:
        new = object.__new__(GazeLayout)
        new.__dict__.update(self.__dict__)
        for name in ("kind", "unit", "region", "region_ready", "region_tokens", "region_count"):
            setattr(new, name, getattr(self, name).to(device))
        new._cache = {}
        return new

    @property
    def device(self) -> torch.device:
        return self.kind.device


def _take(table: torch.Tensor, positions: torch.Tensor, fill: int) -> torch.Tensor:
    b, length = table.shape
    pos = positions if positions.dim() == 2 else positions.unsqueeze(0).expand(b, -1)
    inside = pos < length
    got = table.gather(1, pos.clamp(max=length - 1)) if length else torch.full_like(pos, fill)
    return torch.where(inside, got, torch.full_like(got, fill))


def unit_groups(units: list[Unit], region: RegionShape) -> list[list[int]]:
    """Units sharing regions: images alone; frames of one video in runs of `region.t`, in time order."""
    groups: list[list[int]] = []
    videos: dict[int, list[int]] = {}
    order: list[tuple[int, int]] = []  # (first unit index, key) to keep regions in sequence order
    for i, u in enumerate(units):
        if u.video < 0 or region.t == 1:
            order.append((i, -1 - i))
            videos[-1 - i] = [i]
        else:
            if u.video not in videos:
                order.append((i, u.video))
                videos[u.video] = []
            videos[u.video].append(i)
    for _, key in sorted(order):
        members = videos[key]
        if key < 0:
            groups.append(members)
            continue
        members = sorted(members, key=lambda i: (units[i].time, units[i].start))
        for g in range(0, len(members), region.t):
            chunk = members[g : g + region.t]
            grids = {units[i].grid for i in chunk}
            if len(grids) > 1:
                raise ValueError(f"frames of video {key} grouped into one region have different grids {grids}")
            groups.append(chunk)
    return groups
