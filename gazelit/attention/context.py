"""GazeContext: what one forward pass (or one generation) tells the attention backend, and what it keeps.

The layout and k travel to every attention layer either as the forward kwarg `gaze=ctx` (training and
direct calls: transformers passes unknown kwargs down to the attention function) or through
`with use_gaze(ctx): model.generate(...)` (transformers' `generate` rejects unknown kwargs).

Across the forwards of one generation the context remembers where the new queries sit in the cache and,
per layer, the decode state (descriptors, compact non-visual K/V), rebuilt whenever a forward starts a new
sequence or brings new units. One context serves one batch of sequences (its layout).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field

import torch

from gazelit.attention.decode import DecodeState
from gazelit.attention.layout import GazeLayout
from gazelit.attention.look import LookSet

IMPLEMENTATIONS = ("auto", "reference", "segmented", "flex")
DECODE_PATHS = ("auto", "torch", "triton")
SELECTIONS = ("dynamic", "static")


@dataclass
class RoutingRecord:
    """Regions selected by the last query row of one forward in one layer."""

    layer: int
    position: int  # absolute position of the query row
    indices: torch.Tensor  # (B, Hq, kk) region indices, -1 = none
    scores: torch.Tensor  # (B, Hq, kk) q . descriptor


@dataclass
class GazeContext:
    layout: GazeLayout
    top_k: int | None = None  # None: every available region (dense over visual tokens)
    shared_gqa: bool = False
    impl: str = "auto"
    chunk: int = 128
    # "dynamic": every generated token re-selects its regions (the method); "static": the selection of the
    # first generated token is kept for the rest of the generation (an eviction-style baseline, as HERMES
    # and InfiniPot-V select once)
    selection: str = "dynamic"
    # cached decode steps: "auto" runs the fused Triton kernels on CUDA and the torch path elsewhere;
    # "triton" forces the kernels (on CPU tensors they need TRITON_INTERPRET=1: tests)
    decode: str = "auto"
    # look spans (GazeVLM): queries inside a span are biased towards the box it names
    looks: LookSet | None = None
    record_routing: bool = False
    collect_stats: bool = False
    # called after every gaze attention call with layer, query, key, value, layout, q_offset, scale,
    # top_k (analysis: dense attention maps, gaze-head scores); must not modify its arguments
    probe: Callable[..., None] | None = None
    seen: dict[int, int] = field(default_factory=dict)
    query_window: tuple[int, int] | None = None  # (cache offset, length) of this forward's queries
    decode_states: dict[int, DecodeState] = field(default_factory=dict)
    routing: list[RoutingRecord] = field(default_factory=list)
    stats: dict[str, float] = field(default_factory=dict)
    static_routing: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> (B, Hq, 1, kk)

    def __post_init__(self):
        if self.selection not in SELECTIONS:
            raise ValueError(f"unknown gaze selection {self.selection!r}; choose one of {SELECTIONS}")
        if self.decode not in DECODE_PATHS:
            raise ValueError(f"unknown gaze decode path {self.decode!r}; choose one of {DECODE_PATHS}")
        if self.impl not in IMPLEMENTATIONS:
            raise ValueError(f"unknown gaze implementation {self.impl!r}; choose one of {IMPLEMENTATIONS}")
        if self.top_k is not None and self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 or None (all regions), got {self.top_k}")

    def attended_visual_fraction(self) -> float | None:
        """Mean over routed text queries, heads and layers of selected / available visual tokens."""
        avail = self.stats.get("available_visual", 0)
        return self.stats.get("attended_visual", 0) / avail if avail else None


_ACTIVE: ContextVar[GazeContext | None] = ContextVar("gazelit_gaze_context", default=None)


@contextmanager
def use_gaze(ctx: GazeContext) -> Iterator[GazeContext]:
    """Make `ctx` the context of every gaze attention call inside the block (e.g. around generate())."""
    token = _ACTIVE.set(ctx)
    try:
        yield ctx
    finally:
        _ACTIVE.reset(token)


def active_context() -> GazeContext | None:
    return _ACTIVE.get()
