"""Attention cost of one decoding step, dense vs Gaze Attention: attended KV entries, FLOPs and bytes.

For one new text query (batch 1) in one layer, with H query heads, H_kv KV heads of width D:

  attended entries   dense: text + every visual token (the dense baseline has no context tokens)
                     gaze : text + M * units + the tokens of the k largest regions (capped by the regions)
  attention FLOPs    4 * H * D * entries               (QK^T and PV, 2 FLOPs per multiply-add)
  routing FLOPs      2 * H * D * R                     (q . descriptor for all R regions; gaze only)
  KV bytes           2 * H_kv * D * entries * bytes    (K and V rows read from the cache)

GQA: with one selection per KV head (`shared_gqa`) a KV head reads text + context + k regions. With the
default independent per-query-head selection a KV head must read the *union* of its G = H / H_kv heads'
regions: at worst min(G * k, R) regions ("per-head worst"); a kernel that reads each KV head's rows once
and multiplies them batched over the group (masking each head to its own regions) also *executes* its
QK^T / PV products over that union, so its FLOPs lie between the attention figure (k regions per head)
and the per-head worst figure, depending on how much the heads of a group agree. The region descriptors
(float32, H_kv * R * D) are read once per step as well. `text` counts the text tokens in the cache
including the query's own.

The formulas are cross-checked by counting: `count_step_flops` runs a real decode step of
`gazelit.attention.decode_attention` (gaze) and of dense SDPA at the same shapes under
`torch.utils.flop_counter.FlopCounterMode` (the CPU flash-attention kernel, which FlopCounterMode does
not know, is counted with torch's own SDPA formula). With a shared selection (or one query head per KV
head) and grids the region size divides, the counted gaze FLOPs equal attention + routing exactly; with
per-head selection they lie between that and per-head worst + routing; edge regions are padded to the
largest region in the gather, so there the count is slightly higher. Bytes are by formula only.

`paper_example()` is the paper's section 3.5 setting: 8 frames x 576 tokens = 4,608, 6x6 regions
(16 per frame, 128 in all), M = 4 per frame.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

from gazelit.attention import GazeLayout, RegionShape, Unit, build_state, decode_attention
from gazelit.schema import ModelConfig
from gazelit.shapes import pooled_grid, projected_grid

# LLM attention shapes of hub checkpoints, from their config.json (model cards): so that `gazelit cost`
# needs no download. Anything else: a local checkpoint directory, `llm.config` in the recipe, or
# --llm-config CONFIG.json.  (layers, query heads, KV heads, head_dim)
KNOWN_LLMS: dict[str, tuple[int, int, int, int]] = {
    "Qwen/Qwen3-4B": (36, 32, 8, 128),
    "Qwen/Qwen3-4B-Instruct-2507": (36, 32, 8, 128),
    "Qwen/Qwen3-8B": (36, 32, 8, 128),
    "Qwen/Qwen2.5-3B": (36, 16, 2, 128),
    "Qwen/Qwen2.5-3B-Instruct": (36, 16, 2, 128),
    "Qwen/Qwen2.5-7B": (28, 28, 4, 128),
    "Qwen/Qwen2.5-7B-Instruct": (28, 28, 4, 128),
    "meta-llama/Meta-Llama-3-8B": (32, 32, 8, 128),
    "meta-llama/Meta-Llama-3-8B-Instruct": (32, 32, 8, 128),
}
# Vision checkpoints: (image_size, patch_size) -> a (size/patch)^2 token grid.
KNOWN_VISION: dict[str, tuple[int, int]] = {
    "google/siglip2-so400m-patch16-384": (384, 16),
    "google/siglip-so400m-patch14-384": (384, 14),
    "openai/clip-vit-large-patch14-336": (336, 14),
}
# FlopCounterMode counts SDPA only for the CUDA kernels; on CPU SDPA runs this one.
_CPU_SDPA = {
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: (
        lambda q, k, v, *args, out_shape=None, **kwargs: sdpa_flop_count(q, k, v)
    )
}


@dataclass(frozen=True)
class AttentionDims:
    """The LLM's attention shape."""

    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    name: str = ""

    def __post_init__(self):
        if min(self.layers, self.heads, self.kv_heads, self.head_dim) < 1 or self.heads % self.kv_heads:
            raise ValueError(f"bad attention shape {self}")

    @property
    def group(self) -> int:
        return self.heads // self.kv_heads

    def describe(self) -> str:
        name = f"{self.name}: " if self.name else ""
        return (f"{name}{self.layers} layers, {self.heads} query heads / {self.kv_heads} KV heads, "
                f"head_dim {self.head_dim}")


@dataclass(frozen=True)
class VisualInput:
    """What one query sees: `units` images (video=False) or frames of one video, each a rows x cols grid
    followed by `num_context` context tokens; regions of region=(h, w, t); `text` text tokens."""

    units: int
    grid: tuple[int, int]
    region: tuple[int, int, int] = (6, 6, 1)
    num_context: int = 4
    text: int = 1
    video: bool = False
    name: str = ""

    def __post_init__(self):
        if self.units < 0 or min(self.grid) < 1 or self.text < 1:
            raise ValueError(f"bad input shape {self}")
        RegionShape(*self.region)

    @property
    def visual_tokens(self) -> int:
        return self.units * self.grid[0] * self.grid[1]

    def region_sizes(self) -> list[int]:
        """Tokens of every region, in layout order (edge tiles smaller, frames grouped t at a time)."""
        rows, cols = self.grid
        h, w, t = self.region
        tiles = [min(h, rows - r * h) * min(w, cols - c * w)
                 for r in range(math.ceil(rows / h)) for c in range(math.ceil(cols / w))]
        groups = [min(t, self.units - g) for g in range(0, self.units, t)] if self.video else [1] * self.units
        return [tile * frames for frames in groups for tile in tiles]

    def describe(self) -> str:
        kind = f"video of {self.units} frames" if self.video else f"{self.units} image{'s' * (self.units != 1)}"
        rows, cols = self.grid
        h, w, t = self.region
        return (f"{self.name + ': ' if self.name else ''}{kind} x {rows}x{cols} = {self.visual_tokens} visual "
                f"tokens, regions {h}x{w}x{t} ({len(self.region_sizes())}), M={self.num_context}, "
                f"text {self.text}")


@dataclass(frozen=True)
class Entries:
    """KV entries one query head attends to."""

    text: int
    context: int
    visual: int

    @property
    def total(self) -> int:
        return self.text + self.context + self.visual

    @property
    def kv_label(self) -> str:
        """The paper's "KV size" notation: selected visual + context entries, e.g. "144+4"; dense "576"."""
        return f"{self.visual}+{self.context}" if self.context else f"{self.visual}"


def attended(inp: VisualInput, k: int | None, dense: bool = False) -> Entries:
    """Entries per query head: dense (every visual token, no context tokens) or gaze with k regions
    (k None: every region)."""
    if dense:
        return Entries(inp.text, 0, inp.visual_tokens)
    sizes = sorted(inp.region_sizes(), reverse=True)
    chosen = sizes if k is None else sizes[:k]
    return Entries(inp.text, inp.num_context * inp.units, sum(chosen))


@dataclass
class StepCost:
    """Cost of one decoding step in one layer (multiply by layers for the model)."""

    name: str
    k: int | None
    entries: Entries
    attention_flops: int
    routing_flops: int
    kv_bytes: int  # dense, or gaze with one selection per KV head
    kv_bytes_per_head: int  # gaze with independent per-query-head selection: worst-case union per group
    descriptor_bytes: int
    attention_flops_per_head: int = 0  # executed over the worst-case union (per-head selection, batched kernel)
    counted_flops: int | None = None  # FlopCounterMode on a real step (attention + routing)

    @property
    def flops(self) -> int:
        return self.attention_flops + self.routing_flops


def step_cost(dims: AttentionDims, inp: VisualInput, k: int | None, dense: bool = False,
              dtype_bytes: int = 2) -> StepCost:
    """Formula cost of one decoding step per layer (see the module docstring)."""
    e = attended(inp, k, dense)
    row = 2 * dims.kv_heads * dims.head_dim * dtype_bytes  # one K and one V row of every KV head
    attention = 4 * dims.heads * dims.head_dim * e.total
    if dense:
        return StepCost("dense", None, e, attention, 0, row * e.total, row * e.total, 0, attention)
    regions = len(inp.region_sizes())
    union_k = None if k is None else min(dims.group * k, regions)
    union = attended(inp, union_k)
    return StepCost(
        name=f"gaze k={'all' if k is None else k}", k=k, entries=e, attention_flops=attention,
        routing_flops=2 * dims.heads * dims.head_dim * regions, kv_bytes=row * e.total,
        kv_bytes_per_head=row * union.total, descriptor_bytes=dims.kv_heads * regions * dims.head_dim * 4,
        attention_flops_per_head=4 * dims.heads * dims.head_dim * union.total,
    )


# ---------------------------------------------------------------------------------------------- counting
def decode_layout(inp: VisualInput) -> GazeLayout:
    """A batch-1 layout: the prompt's text (text - 1 tokens) then the units; the query comes next."""
    per_unit = inp.grid[0] * inp.grid[1] + inp.num_context
    prefix = inp.text - 1
    units = [Unit(start=prefix + i * per_unit, grid=inp.grid, video=0 if inp.video else -1,
                  time=i if inp.video else 0) for i in range(inp.units)]
    return GazeLayout.build([units], prefix + inp.units * per_unit, inp.num_context, RegionShape(*inp.region))


@torch.no_grad()
def count_step_flops(dims: AttentionDims, inp: VisualInput, k: int | None, dense: bool = False,
                     shared: bool = False, seed: int = 0) -> int:
    """FLOPs of one real decoding step in one layer, counted with FlopCounterMode (random q, K, V);
    `shared`: one region selection per KV head (`shared_gqa`)."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(1, dims.heads, 1, dims.head_dim, generator=g)
    if dense:
        s = attended(inp, None, dense=True).total
        k_cache = torch.randn(1, dims.kv_heads, s, dims.head_dim, generator=g)
        v_cache = torch.randn_like(k_cache)
        with FlopCounterMode(display=False, custom_mapping=_CPU_SDPA) as counter:
            F.scaled_dot_product_attention(q, k_cache, v_cache, enable_gqa=dims.heads != dims.kv_heads)
        return counter.get_total_flops()
    layout = decode_layout(inp)
    length = layout.length
    k_cache = torch.randn(1, dims.kv_heads, length + 1, dims.head_dim, generator=g)
    v_cache = torch.randn_like(k_cache)
    state = build_state(k_cache, v_cache, layout, length)
    with FlopCounterMode(display=False, custom_mapping=_CPU_SDPA) as counter:
        decode_attention(q, k_cache, v_cache, layout, state, k, q_offset=length, shared=shared)
    return counter.get_total_flops()


def compare(dims: AttentionDims, inp: VisualInput, ks: list[int | None], dtype_bytes: int = 2,
            count: bool = True, shared: bool = False) -> list[StepCost]:
    """Dense, then gaze for every k, with FLOPs counted on a real step (selection per query head, or per
    KV head with `shared`) when `count`."""
    rows = [step_cost(dims, inp, None, dense=True, dtype_bytes=dtype_bytes)]
    rows += [step_cost(dims, inp, k, dtype_bytes=dtype_bytes) for k in ks]
    if count:
        for row in rows:
            row.counted_flops = count_step_flops(dims, inp, row.k, dense=row.name == "dense", shared=shared)
    return rows


# ---------------------------------------------------------------------------------------------- report
def format_table(dims: AttentionDims, inp: VisualInput, rows: list[StepCost], dtype_bytes: int = 2) -> str:
    """A text table: per query entries, their fraction of dense, and per-step model FLOPs / KV bytes."""
    dense = rows[0]
    lines = [
        inp.describe(),
        (f"LLM {dims.describe()}; KV cache {dtype_bytes} bytes/value; per decoding step, whole model "
         f"({dims.layers} layers)"),
        (f"{'':14}{'entries':>9}{'KV size':>10}{'visual %':>10}{'total %':>9}{'attn GFLOP':>12}"
         f"{'per-head':>10}{'routing':>9}{'counted/layer':>15}{'KV MB':>9}{'per-head':>10}{'desc MB':>9}"),
    ]
    for r in rows:
        counted = "-" if r.counted_flops is None else f"{r.counted_flops:,}"
        visual_pct = 100 * (r.entries.visual + r.entries.context) / max(dense.entries.visual, 1)
        lines.append(
            f"{r.name:14}{r.entries.total:>9,}{r.entries.kv_label:>10}{visual_pct:>9.1f}%"
            f"{100 * r.entries.total / dense.entries.total:>8.1f}%"
            f"{r.attention_flops * dims.layers / 1e9:>12.4f}{r.attention_flops_per_head * dims.layers / 1e9:>10.4f}"
            f"{r.routing_flops * dims.layers / 1e9:>9.4f}"
            f"{counted:>15}{r.kv_bytes * dims.layers / 2**20:>9.2f}{r.kv_bytes_per_head * dims.layers / 2**20:>10.2f}"
            f"{r.descriptor_bytes * dims.layers / 2**20:>9.2f}"
        )
    lines.append(
        "entries = text + context + visual per query head; 'visual %' = (selected + context) / dense visual "
        "(the paper's KV-size ratio); 'per-head' = GFLOP / KV MB when each query head selects on its own "
        "and a kernel reads the union of a GQA group's regions (worst case); counted = FlopCounterMode on "
        "one real step of one layer (attention + routing)."
    )
    return "\n".join(lines)


def paper_example(text: int = 1) -> VisualInput:
    """Section 3.5: an 8-frame video, 24 x 24 = 576 tokens per frame (4,608), 6x6 regions, M = 4."""
    return VisualInput(units=8, grid=(24, 24), region=(6, 6, 1), num_context=4, text=text, video=True,
                       name="paper section 3.5")


def paper_summary(ks: tuple[int, ...] = (4, 8, 16)) -> str:
    """One line per k: attended visual + context entries and their fraction of the 4,608 dense entries."""
    inp = paper_example()
    lines = [f"{inp.describe()} (text excluded, as in the paper)"]
    for k in ks:
        e = attended(inp, k)
        lines.append(f"  k={k:>2}: {k} x 36 + 4 x 8 = {e.visual + e.context:>4} of {inp.visual_tokens} entries "
                     f"= {100 * (e.visual + e.context) / inp.visual_tokens:.1f}% of dense attention FLOPs")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- recipes
def llm_dims(config: ModelConfig, llm_config: dict[str, Any] | str | Path | None = None) -> AttentionDims:
    """Attention shape of the recipe's LLM without building it. In order: `llm_config` (a dict or a
    config.json path), the recipe's `llm.config` fields, `llm.pretrained` as a local directory with a
    config.json, the KNOWN_LLMS table; otherwise a ValueError asking for --llm-config."""
    spec = config.llm
    name = spec.pretrained or (spec.config or {}).get("model_type", "config")
    fields: dict[str, Any] | None = None
    if isinstance(llm_config, (str, Path)):
        fields, name = json.loads(Path(llm_config).read_text()), str(llm_config)
    elif llm_config is not None:
        fields = dict(llm_config)
    elif spec.config is not None:
        fields = dict(spec.config)
    elif spec.pretrained and (Path(spec.pretrained) / "config.json").is_file():
        fields = json.loads((Path(spec.pretrained) / "config.json").read_text())
    elif spec.pretrained in KNOWN_LLMS:
        layers, heads, kv, dim = KNOWN_LLMS[spec.pretrained]
        return AttentionDims(layers, heads, kv, dim, name=spec.pretrained)
    if fields is None:
        raise ValueError(
            f"unknown LLM {spec.pretrained!r}: pass its config.json with --llm-config (known without a "
            f"download: {', '.join(sorted(KNOWN_LLMS))})"
        )
    fields = fields.get("text_config", fields)  # multimodal configs nest the LLM
    heads = int(fields["num_attention_heads"])
    head_dim = fields.get("head_dim") or int(fields["hidden_size"]) // heads
    return AttentionDims(int(fields["num_hidden_layers"]), heads, int(fields.get("num_key_value_heads") or heads),
                         int(head_dim), name=str(name))


def visual_grid(config: ModelConfig, grid: tuple[int, int] | None = None) -> tuple[int, int]:
    """Visual tokens per unit on the LLM side: encoder grid -> projector -> pooling, from the config
    (`grid` overrides the encoder grid for checkpoints not known here)."""

    if grid is None:
        v = config.vision
        size = v.options.get("image_size")
        if v.config is not None:
            size, patch = size or v.config["image_size"], v.config["patch_size"]
        elif v.pretrained and (Path(v.pretrained) / "config.json").is_file():
            fields = json.loads((Path(v.pretrained) / "config.json").read_text())
            fields = fields.get("vision_config", fields)
            size, patch = size or fields["image_size"], fields["patch_size"]
        elif v.pretrained in KNOWN_VISION:
            size = size or KNOWN_VISION[v.pretrained][0]
            patch = KNOWN_VISION[v.pretrained][1]
        else:
            raise ValueError(f"unknown vision checkpoint {v.pretrained!r}: pass the encoder grid with --grid RxC")
        grid = (int(size) // int(patch), int(size) // int(patch))
    return pooled_grid(projected_grid(config.projector.kind, grid), config.visual_pool)


def recipe_inputs(config: ModelConfig, grid: tuple[int, int], frames: int, text: int) -> list[VisualInput]:
    """The recipe's image shape (one unit) and video shape (`frames` frames)."""
    common = dict(grid=grid, region=_region(config), num_context=config.num_context, text=text)
    return [VisualInput(units=1, name="image", **common), VisualInput(units=frames, video=True, name="video", **common)]


def kv_label(config: ModelConfig, grid: tuple[int, int], k: int | None, units: int = 1, video: bool = False) -> str:
    """The "KV size" a model attends per query for `units` units: "144+4" (gaze), "576" (dense)."""
    inp = VisualInput(units=units, grid=grid, region=_region(config), num_context=config.num_context, video=video)
    return attended(inp, k, dense=not config.gaze.enabled).kv_label


def _region(config: ModelConfig) -> tuple[int, int, int]:
    shape = RegionShape(*config.gaze.region)
    return shape.h, shape.w, shape.t


@dataclass
class CostReport:
    dims: AttentionDims
    tables: list[tuple[VisualInput, list[StepCost]]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        def row(r: StepCost) -> dict[str, Any]:
            return {"name": r.name, "k": r.k, "entries": r.entries.total, "kv_size": r.entries.kv_label,
                    "attention_flops_per_layer": r.attention_flops, "routing_flops_per_layer": r.routing_flops,
                    "attention_flops_per_layer_per_head_selection": r.attention_flops_per_head,
                    "counted_flops_per_layer": r.counted_flops, "kv_bytes_per_layer": r.kv_bytes,
                    "kv_bytes_per_layer_per_head_selection": r.kv_bytes_per_head,
                    "descriptor_bytes_per_layer": r.descriptor_bytes}

        return {"llm": self.dims.__dict__, "inputs": [{"input": inp.__dict__, "rows": [row(r) for r in rows]}
                                                      for inp, rows in self.tables]}
