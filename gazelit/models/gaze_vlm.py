"""GazeVLM: vision encoder -> projector -> visual tokens and context tokens spliced into the LLM's input,
with the LLM attending through Gaze Attention.

A batch follows gazelit.batch: every unit (image or video frame) is encoded, projected to the LLM width
on the projected grid (optionally average-pooled: the token-matched dense baseline), written over its
VISUAL positions, and the M learnable context-token embeddings are written over its CONTEXT positions.
The layout the attention sees is built from the same unit table, so its grid is the projected grid.

With `gaze.enabled: false` the model is the dense baseline with an identical architecture: the LLM's own
attention and no context tokens.

With `look.enabled` (GazeVLM look spans, gazelit.attention.look) the tokenizer gains `<look>`, `</look>` and
the location tokens (the LLM's embeddings grow to match), spans are parsed from the input ids in training
and from every generated token while generating, and the attention biases the queries in a span towards
the box it names (the dense baseline then runs the gaze backend with every region selected).
"""

from __future__ import annotations

import copy
import json
import logging
import math
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from gazelit.attention import (
    BACKEND_NAME,
    CONTEXT,
    VISUAL,
    GazeContext,
    GazeLayout,
    LookSet,
    LookTokens,
    RegionShape,
    TEXT,
    RoutingRecord,
    use_gaze,
)
from gazelit.attention.look import Look, bins_to_box, look_token_strings
from gazelit.batch import check_batch
from gazelit.schema import MODEL_CONFIG_FILE, MODEL_WEIGHTS_FILE, ModelConfig, resolve_top_k
from gazelit.shapes import pooled_grid
from gazelit.models.llm import build_llm, decoder_layer_class
from gazelit.models.projectors import Projector, build_projector
from gazelit.models.sharded_loading import covers, load_safetensors_shards, materialize
from gazelit.models.vision import VisionEncoder, build_vision_encoder
from gazelit.tokenizer import build_tiny_tokenizer, load_tokenizer

log = logging.getLogger(__name__)
CONFIG_FILE, WEIGHTS_FILE = MODEL_CONFIG_FILE, MODEL_WEIGHTS_FILE
LLM_DIR = "llm"  # the LLM as a standard transformers directory inside a model directory
LLM_PREFIX = "llm."


# default of `gaze_k`: the model's own k (GazeVLM.top_k), whatever the schedule has set it to
MODEL_K = object()


@dataclass
class RoutingTrace:
    """Regions selected for every generated token: (T, layers, heads, k) tensors, -1 where none.

    `region` are region indices of the sample's layout; `unit[...]` the (last) unit holding the region and
    `tile[...]` its tile index within that unit's grid (row-major over ceil(rows/r_h) x ceil(cols/r_w)).
    """

    region: torch.Tensor
    score: torch.Tensor
    unit: torch.Tensor
    tile: torch.Tensor
    unit_grids: list[tuple[int, int]]
    region_shape: tuple[int, int, int]
    tokens: list[str] = field(default_factory=list)
    # look spans generated (positions counted from the first generated token), with their boxes normalised
    looks: list[GeneratedLook] = field(default_factory=list)

    def tile_box(self, unit: int, tile: int) -> tuple[float, float, float, float]:
        """Normalised (x0, y0, x1, y1) of a tile on its unit's grid."""
        rows, cols = self.unit_grids[unit]
        rh, rw, _ = self.region_shape
        per_row = math.ceil(cols / rw)
        r, c = divmod(tile, per_row)
        return c * rw / cols, r * rh / rows, min((c + 1) * rw, cols) / cols, min((r + 1) * rh, rows) / rows


@dataclass
class GeneratedLook:
    """A look span the model generated: its box on its unit (x0, y0, x1, y1 in 0..1), the generated-token
    steps it covers [start, end) (end None: never closed), and the text inside it."""

    unit: int
    box: tuple[float, float, float, float]
    start: int
    end: int | None
    text: str = ""


@dataclass
class GenerationOutput:
    text: str  # the answer: generated text outside look spans, special tokens removed
    token_ids: list[int]
    trace: RoutingTrace | None
    looks: list[GeneratedLook] = field(default_factory=list)
    looks_opened: int = 0  # <look> tokens generated, well-formed or not


class GazeVLM(nn.Module):
    def __init__(
        self,
        config: ModelConfig,
        vision: VisionEncoder,
        projector: Projector,
        llm: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
    ):
        super().__init__()
        self.config = config.validate()
        self.vision = vision
        self.projector = projector
        self.llm = llm
        self.tokenizer = tokenizer
        hidden = llm.get_input_embeddings().embedding_dim
        m = config.num_context
        std = getattr(llm.config, "initializer_range", 0.02)
        self.context_tokens = nn.Parameter(torch.randn(m, hidden) * std)
        self.pending_weights: dict[str, str] = {}  # component -> directory whose weights are still to be read
        self.top_k: int | None = config.gaze.top_k  # resolved by config.validate(); the k schedule lowers it
        self.look_tokens = LookTokens.from_tokenizer(tokenizer, config.look.bins) if config.look.enabled else None
        if len(tokenizer) > llm.get_input_embeddings().num_embeddings:
            raise ValueError(
                f"the tokenizer has {len(tokenizer)} tokens but the LLM's embedding table only "
                f"{llm.get_input_embeddings().num_embeddings}"
            )

    # ------------------------------------------------------------------ construction
    @classmethod
    def build(
        cls, config: ModelConfig, tokenizer: PreTrainedTokenizerBase | None = None, *, empty_pretrained: bool = False
    ) -> GazeVLM:
        """The model a recipe's `model:` describes. `empty_pretrained` (sharded training): components with
        a local `pretrained` directory get their parameters on the meta device and no weights; after
        sharding, `load_pretrained_shards` gives each rank its shards from the safetensors files. Everything
        else (projector, context tokens, components from a config) is built and initialised as usual."""
        config.validate()
        v = config.vision
        uses_backend = config.gaze.enabled or config.look.enabled
        attn = BACKEND_NAME if uses_backend else config.llm.options.get("attn_implementation", "sdpa")
        llm_options = {k: val for k, val in config.llm.options.items() if k != "attn_implementation"}
        vision, vision_empty = _pretrained_part(
            lambda empty: build_vision_encoder(
                v.family, pretrained=v.pretrained, config=v.config, feature_layer=v.feature_layer,
                trainable=v.trainable, options=v.options, empty=empty),
            v.pretrained, empty_pretrained, lambda part: part.model)  # fmt: skip
        llm, llm_empty = _pretrained_part(
            lambda empty: build_llm(
                pretrained=config.llm.pretrained, config=config.llm.config, attn_implementation=attn,
                dtype=config.llm.dtype, options=llm_options, empty=empty),
            config.llm.pretrained, empty_pretrained, lambda part: part)  # fmt: skip
        pending = {name: path for name, path, empty in (("vision.model", v.pretrained, vision_empty),
                                                         ("llm", config.llm.pretrained, llm_empty)) if empty}  # fmt: skip
        hidden = llm.get_input_embeddings().embedding_dim
        projector = build_projector(config.projector.kind, vision.hidden_size, hidden)
        if tokenizer is None:
            tokenizer = cls._load_tokenizer(config)
        if config.look.enabled:
            tokenizer = _with_look_tokens(tokenizer, llm, config.look.bins, empty="llm" in pending)
        model = cls(config, vision, projector, llm, tokenizer)
        model.pending_weights = pending
        return model

    def load_pretrained_shards(self, device: torch.device | str = "cpu") -> None:
        """Fill in the parameters `build(empty_pretrained=True)` left on the meta device: storage on `device`
        for every meta parameter (each rank only its shards once FSDP2 has sharded them), then each
        component's weights read from its safetensors files, each rank reading only its own rows."""
        if not self.pending_weights:
            return
        materialize(self, device)
        for name, directory in self.pending_weights.items():
            count = load_safetensors_shards(self.get_submodule(name), directory)
            log.info("%s: %d tensors read from %s", name, count, directory)
        self.pending_weights = {}

    @staticmethod
    def _load_tokenizer(config: ModelConfig) -> PreTrainedTokenizerBase:
        t = config.tokenizer
        if t.pretrained or config.llm.pretrained:
            return load_tokenizer(t.pretrained or config.llm.pretrained,
                                  trust_remote_code=config.llm.options.get("trust_remote_code", False))
        if t.tiny_corpus:
            text = Path(t.tiny_corpus).read_text(encoding="utf-8").splitlines()
            return build_tiny_tokenizer(text, vocab_size=t.vocab_size)
        raise ValueError("model.tokenizer: a config-built LLM needs `tokenizer.pretrained` or `tokenizer.tiny_corpus`")

    # ------------------------------------------------------------------ shapes the data pipeline needs
    @property
    def gaze_enabled(self) -> bool:
        return self.config.gaze.enabled

    @property
    def num_context(self) -> int:
        return self.context_tokens.shape[0]

    def projected_grid(self, encoder_grid: tuple[int, int] | None = None) -> tuple[int, int]:
        """Visual tokens per unit on the LLM side: encoder grid -> projector -> pooling."""
        return pooled_grid(self.projector.output_grid(encoder_grid or self.vision.token_grid()), self.config.visual_pool)

    @property
    def visual_grid(self) -> tuple[int, int]:
        return self.projected_grid()

    def image_transform(self):
        return self.vision.preprocessor()

    def block_classes(self) -> tuple[type[nn.Module], type[nn.Module]]:
        """(vision block, LLM decoder layer): units of FSDP sharding and activation checkpointing."""
        return self.vision.block_class, decoder_layer_class(self.llm)

    # ------------------------------------------------------------------ forward
    def encode_units(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) -> (N, rows*cols, D_llm) visual tokens on the projected (and pooled) grid."""
        features = self.vision(pixel_values)
        grid = self.vision.token_grid(pixel_values.shape[-1])
        tokens = self.projector(features.to(self._projector_dtype()), grid)
        s = self.config.visual_pool
        if s > 1:
            rows, cols = self.projector.output_grid(grid)
            x = tokens.transpose(1, 2).reshape(tokens.shape[0], -1, rows, cols)
            x = F.avg_pool2d(x, kernel_size=s, stride=s, ceil_mode=True)
            tokens = x.flatten(2).transpose(1, 2)
        return tokens

    def _projector_dtype(self) -> torch.dtype:
        return next(self.projector.parameters()).dtype

    def embed(self, batch: dict) -> tuple[torch.Tensor, GazeLayout]:
        """Input embeddings with visual and context tokens spliced in, and the layout that describes them."""
        check_batch(batch)
        if batch["num_context"] != self.num_context:
            raise ValueError(
                f"the batch has {batch['num_context']} context tokens per unit but the model makes {self.num_context}"
            )
        kinds = batch["token_kind"]
        region = RegionShape(*self.config.gaze.region)
        if not self.gaze_enabled:  # the dense baseline (under look spans): no frame groups, every token a candidate
            region = RegionShape(region.h, region.w, 1)
        layout = GazeLayout.from_token_kinds(
            kinds, batch["unit_sample"], batch["unit_start"], batch["unit_grid"], self.num_context,
            region, batch["unit_video"], batch["unit_time"],
        )
        embeds = self.llm.get_input_embeddings()(batch["input_ids"])
        b, length, hidden = embeds.shape
        n = batch["pixel_values"].shape[0]
        if n:
            tokens = self.encode_units(batch["pixel_values"])  # (N, rows*cols, D)
            grid = self.visual_grid
            grids = batch["unit_grid"].tolist()
            if any(tuple(g) != grid for g in grids):
                bad = next(i for i, g in enumerate(grids) if tuple(g) != grid)
                raise ValueError(
                    f"unit {bad} has grid {tuple(grids[bad])} in the batch but the model produces {grid} "
                    f"visual tokens per unit (encoder {self.vision.token_grid()}, projector "
                    f"{self.config.projector.kind}, pool {self.config.visual_pool})"
                )
            per_unit = grid[0] * grid[1]
            offsets = torch.arange(per_unit, device=embeds.device)
            base = batch["unit_sample"].to(embeds.device) * length + batch["unit_start"].to(embeds.device)
            visual_rows = (base[:, None] + offsets[None]).reshape(-1)
            rows = [visual_rows]
            values = [tokens.reshape(-1, hidden).to(embeds.dtype)]
            if self.num_context:
                ctx_rows = base[:, None] + per_unit + torch.arange(self.num_context, device=embeds.device)[None]
                rows.append(ctx_rows.reshape(-1))
                values.append(self.context_tokens.to(embeds.dtype).repeat(n, 1))
            flat = embeds.reshape(b * length, hidden).index_copy(0, torch.cat(rows), torch.cat(values))
            embeds = flat.view(b, length, hidden)
            expected = (kinds == VISUAL).sum().item(), (kinds == CONTEXT).sum().item()
            if expected != (n * per_unit, n * self.num_context):
                raise ValueError(
                    f"token_kind marks {expected[0]} visual / {expected[1]} context positions but {n} units "
                    f"give {n * per_unit} / {n * self.num_context}"
                )
        elif bool(((kinds == VISUAL) | (kinds == CONTEXT)).any()):
            raise ValueError("token_kind marks visual or context positions but the batch has no pixel_values")
        elif self.training or _distributed():
            # Every rank runs the same modules every step, whatever its batch holds: under FSDP the vision
            # tower and projector are sharded units whose forward is a collective, so a rank with a
            # text-only batch passes one blank image through them (and touches the context tokens), all
            # times zero: the loss and every gradient are exactly those of the text alone.
            dummy = self.encode_units(self._blank_image(embeds)).sum()
            if self.num_context:
                dummy = dummy + self.context_tokens.sum()
            embeds = embeds + 0.0 * dummy.to(embeds.dtype)
        return embeds, layout

    def _blank_image(self, like: torch.Tensor) -> torch.Tensor:
        size = self.vision.image_size
        return torch.zeros(1, 3, size, size, device=like.device, dtype=next(self.vision.parameters()).dtype)

    def context(self, layout: GazeLayout, gaze_k: int | None | object = MODEL_K, **kwargs) -> GazeContext:
        """The GazeContext of one forward or generation; `gaze_k` (regions per query head, None = all)
        defaults to the model's own k."""
        g = self.config.gaze
        k = self.top_k if gaze_k is MODEL_K else gaze_k
        if not self.gaze_enabled:
            k = None  # the dense baseline under look spans: every region
        return GazeContext(layout, top_k=k, shared_gqa=g.shared_gqa, impl=g.impl, chunk=g.chunk,
                           selection=g.selection, decode=g.decode, **kwargs)

    def look_set(self, layout: GazeLayout, input_ids: torch.Tensor) -> LookSet | None:
        """The look spans of a batch's ids (None without `look.enabled`)."""
        if self.look_tokens is None:
            return None
        return LookSet.from_ids(layout, self.look_tokens, self.config.look.bias, input_ids)

    def forward(
        self, batch: dict, gaze_k: int | None | object = MODEL_K, collect_stats: bool = False, probe=None,
        num_items_in_batch: int | torch.Tensor | None = None,
    ):
        """Causal-LM output (loss on `labels`, logits). With `collect_stats` also the GazeContext, whose
        `attended_visual_fraction()` is the mean selected / available visual tokens per routed query.
        `probe` is called after every attention layer (see GazeContext.probe). `num_items_in_batch`
        (transformers' loss argument): the loss is the sum over supervised tokens divided by it, instead
        of their mean."""
        embeds, layout = self.embed(batch)
        kwargs = dict(inputs_embeds=embeds, attention_mask=batch["attention_mask"], labels=batch.get("labels"),
                      use_cache=False)
        if num_items_in_batch is not None:
            kwargs["num_items_in_batch"] = num_items_in_batch
        looks = self.look_set(layout, batch["input_ids"])
        spans = looks is not None and looks.any_in(0, layout.length)
        if not self.gaze_enabled and not spans:
            out = self.llm(**kwargs)
            return (out, None) if collect_stats else out
        ctx = self.context(layout, gaze_k, collect_stats=collect_stats, probe=probe, looks=looks)
        with use_gaze(ctx):
            out = self.llm(**kwargs)
        return (out, ctx) if collect_stats else out

    # ------------------------------------------------------------------ generation
    @torch.no_grad()
    def generate_from_batch(
        self,
        batch: dict,
        max_new_tokens: int = 64,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_p: float = 1.0,
        gaze_k: int | None | object = MODEL_K,
        trace: bool = True,
        cache_implementation: str = "static",
        probe=None,
        **generate_kwargs,
    ) -> list[GenerationOutput]:
        """Generate for a left-padded prompt batch (no labels needed) with the cached decode path.

        Returns per sample the text, the new token ids and (with `trace`) the regions every head of every
        layer selected for each generated token. Further keyword arguments go to transformers' `generate`
        (e.g. `logits_processor`, `prefix_allowed_tokens_fn`).
        """
        embeds, layout = self.embed(batch)
        gen = dict(
            inputs_embeds=embeds, attention_mask=batch["attention_mask"], max_new_tokens=max_new_tokens,
            do_sample=do_sample, pad_token_id=self.tokenizer.pad_token_id, eos_token_id=self.tokenizer.eos_token_id,
            cache_implementation=cache_implementation, **generate_kwargs,
        )
        if do_sample:
            gen.update(temperature=temperature, top_p=top_p, top_k=0)
        looks = self.look_set(layout, batch["input_ids"])
        if not self.gaze_enabled and looks is None:
            ids = self.llm.generate(**gen)
            return [self._output(ids[i], None) for i in range(ids.shape[0])]
        ctx = self.context(layout, gaze_k, record_routing=trace and self.gaze_enabled, probe=probe, looks=looks)
        in_prompt = [looks.opened(i) for i in range(layout.batch_size)] if looks is not None else []
        # every generated token reaches the input embedding before the layers run: the look spans follow it
        hook = None if looks is None else self.llm.get_input_embeddings().register_forward_pre_hook(
            lambda _module, args: looks.feed(args[0]))  # fmt: skip
        try:
            with use_gaze(ctx):
                ids = self.llm.generate(**gen)
        finally:
            if hook is not None:
                hook.remove()
        outputs = []
        for i in range(ids.shape[0]):
            tr = self._trace(ctx.routing, layout, i, ids[i]) if trace and self.gaze_enabled else None
            spans = looks.spans(i) if looks is not None else []
            opened = looks.opened(i) - in_prompt[i] if looks is not None else 0
            outputs.append(self._output(ids[i], tr, [s for s in spans if s.start >= layout.length], layout, opened))
        return outputs

    def _output(self, ids: torch.Tensor, trace: RoutingTrace | None, looks: list[Look] = (),
                layout: GazeLayout | None = None, opened: int = 0) -> GenerationOutput:
        ids = ids.tolist()
        eos = self.tokenizer.eos_token_id
        if eos in ids:
            ids = ids[: ids.index(eos) + 1]
        generated = []
        for look in looks:
            start, end = look.start - layout.length, None if look.end is None else look.end - layout.length
            inner = ids[start + 1 : end] if end is not None else ids[start + 1 :]
            generated.append(GeneratedLook(unit=look.unit, box=bins_to_box(look.box, self.look_tokens.bins),
                                           start=start, end=end,
                                           text=self.tokenizer.decode(inner, skip_special_tokens=True)))  # fmt: skip
        text = self.tokenizer.decode(self._outside_looks(ids), skip_special_tokens=True)
        if trace is not None:
            steps = min(len(ids), trace.region.shape[0])
            trace.region, trace.score = trace.region[:steps], trace.score[:steps]
            trace.unit, trace.tile = trace.unit[:steps], trace.tile[:steps]
            trace.tokens = [self.tokenizer.decode([t]) for t in ids[:steps]]
            trace.looks = generated
        return GenerationOutput(text=text, token_ids=ids, trace=trace, looks=generated, looks_opened=opened)

    def _outside_looks(self, ids: list[int]) -> list[int]:
        """Token ids outside look spans (`<look>` through `</look>`; an unclosed span runs to the end)."""
        if self.look_tokens is None:
            return ids
        kept, inside = [], False
        for t in ids:
            if t == self.look_tokens.open:
                inside = True
            elif t == self.look_tokens.close:
                inside = False
            elif not inside:
                kept.append(t)
        return kept

    def _trace(self, records: list[RoutingRecord], layout: GazeLayout, sample: int, ids) -> RoutingTrace:
        layers = self.llm.config.num_hidden_layers
        steps = len(records) // layers
        region = torch.stack([r.indices[sample] for r in records[: steps * layers]]).cpu()
        score = torch.stack([r.scores[sample] for r in records[: steps * layers]]).float().cpu()
        region = region.view(steps, layers, *region.shape[1:])
        score = score.view(steps, layers, *score.shape[1:])
        info = layout.samples[sample]
        region_unit = torch.tensor(info.region_unit + [-1], dtype=torch.long)
        starts, start = [], 0  # a unit group's regions are contiguous: tile = region - first region
        for r, u in enumerate(info.region_unit):
            if r and info.region_unit[r - 1] != u:
                start = r
            starts.append(start)
        group_start = torch.tensor(starts + [0], dtype=torch.long)
        safe = region.clamp(min=0)
        unit = torch.where(region >= 0, region_unit[safe], -1)
        tile = torch.where(region >= 0, safe - group_start[safe], -1)
        shape = RegionShape(*self.config.gaze.region)
        return RoutingTrace(
            region=region, score=score, unit=unit, tile=tile,
            unit_grids=[u.grid for u in info.units], region_shape=(shape.h, shape.w, shape.t),
        )

    @torch.no_grad()
    def trace_row(self, batch: dict, row: int, sample: int = 0) -> RoutingTrace | None:
        """The regions every layer and head select (at the model's k) for the query at `row` of a full
        forward of `batch`, as a one-step RoutingTrace of `sample`: e.g. at the prompt's word that names an
        object, which generation traces do not cover. None where that row routes nothing (not a text row,
        or no region before it)."""
        from gazelit.attention.routing import region_descriptors, region_scores, select_regions

        records: list[RoutingRecord] = []
        state: dict = {}

        def probe(*, layer, query, key, layout, q_offset=0, **_):
            state["layout"] = layout
            if q_offset or int(layout.kind[sample, row]) != TEXT:
                return
            available = layout.region_ready[sample] <= row
            if not bool(available.any()):
                return
            scores = region_scores(query[sample, :, row : row + 1], region_descriptors(key, layout, sample))
            idx, chosen = select_regions(scores, available, self.top_k, key.shape[1], shared=self.config.gaze.shared_gqa)
            indices = idx.new_full((layout.batch_size, *idx[:, 0].shape), -1)
            indices[sample] = idx[:, 0]  # (B, Hq, kk) as the decode records are; only `sample` is filled
            values = chosen.new_zeros(indices.shape)
            values[sample] = chosen[:, 0]
            records.append(RoutingRecord(layer, row, indices, values))

        self(batch, probe=probe)
        if len(records) != self.llm.config.num_hidden_layers:
            return None
        return self._trace(records, state["layout"], sample, None)

    # ------------------------------------------------------------------ save / load
    def save_pretrained(self, directory: str | Path) -> Path:
        """A model directory: gazelit_config.json (with the backbones' configs), model.safetensors (vision
        tower, projector, context tokens), the tokenizer, and `llm/`, the LLM as a standard transformers
        directory (config.json, safetensors, tokenizer) that `AutoModelForCausalLM.from_pretrained` and
        serving stacks load as a text model. Every file is readable by the group (0644)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        config = self.config.to_dict()
        # rebuild from the configs actually in use (random init, then these weights): no downloads on load
        vision_config = self.vision.model.config.to_dict()
        config["vision"].update(pretrained=None, config=_config_fields(vision_config), feature_layer=-1)
        config["llm"].update(pretrained=None, config=_config_fields(self.llm.config.to_dict()))
        config["tokenizer"].update(pretrained=None, tiny_corpus=None)
        config["llm"]["dtype"] = str(next(self.llm.parameters()).dtype).replace("torch.", "")
        state = {k: v.detach().contiguous() for k, v in self.state_dict().items() if not k.startswith(LLM_PREFIX)}
        save_file(_untie(state), str(directory / WEIGHTS_FILE), metadata={"format": "pt"})
        (directory / CONFIG_FILE).write_text(json.dumps({"model": config, "top_k": _k_str(self.top_k)}, indent=2))
        self.tokenizer.save_pretrained(str(directory))
        llm_dir = directory / LLM_DIR
        attn = self.llm.config._attn_implementation
        try:  # the exported LLM is a plain transformers model: its own attention, not the gaze backend
            self.llm.config._attn_implementation = "sdpa"
            self.llm.save_pretrained(str(llm_dir), safe_serialization=True)
        finally:
            self.llm.config._attn_implementation = attn
        self.tokenizer.save_pretrained(str(llm_dir))
        for path in directory.rglob("*"):
            path.chmod(0o755 if path.is_dir() else 0o644)
        return directory

    @classmethod
    def from_pretrained(cls, directory: str | Path, map_location: str | torch.device = "cpu") -> GazeVLM:
        directory = Path(directory)
        saved = json.loads((directory / CONFIG_FILE).read_text())
        config = ModelConfig.from_dict(saved["model"])
        config.tokenizer.pretrained = str(directory)
        model = cls.build(config)
        load_exact_weights(model, saved_state(directory, map_location), directory)
        model.top_k = resolve_top_k(saved.get("top_k", config.gaze.top_k))  # "all" or an int in the file
        return model.eval()  # as transformers' from_pretrained: ready for inference


def saved_state(directory: str | Path, map_location: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """The GazeVLM state dict of a model directory: model.safetensors, plus the LLM's own safetensors
    files under llm/ (prefixed `llm.`) where the directory has them."""
    directory = Path(directory)
    state = load_file(str(directory / WEIGHTS_FILE), device=str(map_location))
    for shard in sorted((directory / LLM_DIR).glob("*.safetensors")):
        state.update({LLM_PREFIX + k: v for k, v in load_file(str(shard), device=str(map_location)).items()})
    return state


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def _config_fields(config: dict) -> dict:
    """A backbone config dict reduced to fields a config mapping accepts."""
    drop = {"transformers_version", "architectures", "_name_or_path", "torch_dtype", "dtype", "_attn_implementation_autoset",
            "_commit_hash", "output_attentions", "output_hidden_states", "use_cache", "return_dict"}
    return {k: v for k, v in config.items() if k not in drop and not k.startswith("_")}


def _untie(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """safetensors refuses tensors sharing memory: keep the first name of each shared storage."""
    seen, out = set(), {}
    for name, tensor in state.items():
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape))
        if key in seen:
            continue
        seen.add(key)
        out[name] = tensor
    return out


def load_exact_weights(model: nn.Module, state: dict[str, torch.Tensor], source: str | Path) -> None:
    """Load `state` into `model`: every tensor must match, except tied entries saved once (a ValueError
    naming `source` otherwise). The one loader behind from_pretrained, export and --checkpoint."""
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = set(tied_parameter_names(model))
    missing = [m for m in missing if m not in tied]
    if missing or unexpected:
        raise ValueError(f"{source}: weights do not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}")


def _pretrained_part(build, pretrained: str | None, empty_pretrained: bool, weights) -> tuple[nn.Module, bool]:
    """(component, built empty?) from `build(empty)`. Empty only for a local directory whose safetensors
    names cover the module (`weights(part)`, the module the files describe); else loaded whole, with a
    warning when empty was asked for. Loading a checkpoint keeps the CPU random state as it was, so the
    projector's and context tokens' init is the same whether the pretrained parts were loaded or left empty."""
    with torch.random.fork_rng(devices=[]) if pretrained is not None else nullcontext():
        empty = empty_pretrained and pretrained is not None and Path(pretrained).is_dir()
        part = build(empty)
        if empty and not covers(weights(part), pretrained):
            log.warning("%s cannot be read shard by shard (no safetensors files, or tensor names transformers "
                        "renames when it loads); loading it whole on every rank", pretrained)  # fmt: skip
            part, empty = build(False), False
    return part, empty


def _with_look_tokens(tokenizer: PreTrainedTokenizerBase, llm: PreTrainedModel, bins: int, empty: bool):
    """The tokenizer with the look tokens (a copy where it lacks them: the caller's is left as it is); the
    LLM's embeddings (and tied head) grown to hold them."""
    missing = [t for t in look_token_strings(bins) if t not in tokenizer.get_vocab()]
    if missing:
        tokenizer = copy.deepcopy(tokenizer)
        tokenizer.add_tokens(missing, special_tokens=True)
    if len(tokenizer) > llm.get_input_embeddings().num_embeddings:
        if empty:
            raise ValueError(
                f"model.look: the LLM's vocabulary ({llm.get_input_embeddings().num_embeddings}) lacks the "
                f"{len(missing)} look tokens; under a sharded start its embeddings cannot grow. Start once unsharded "
                "(or resize and save the LLM with the tokens) and use that directory"
            )
        llm.resize_token_embeddings(len(tokenizer))
    return tokenizer


def tied_parameter_names(model: nn.Module) -> list[str]:
    """Names of parameters that are another parameter under a second name (tied embeddings); by identity,
    so it holds for meta and sharded parameters too."""
    seen: set[int] = set()
    tied = []
    for name, param in model.named_parameters(remove_duplicate=False):
        if id(param) in seen:
            tied.append(name)
        seen.add(id(param))
    return tied


def _k_str(k: int | None) -> Any:
    return "all" if k is None else k
