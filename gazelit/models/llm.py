"""Loading the language model: a transformers causal LM from a checkpoint or from config fields.

Only loading lives here; how the LLM attends (Gaze Attention) is set up by the VLM through
`attn_implementation`. Tested with Qwen3, Qwen2 (Qwen2.5) and Llama.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel

from gazelit.models._hf import check_options, checkpoint_dtype, exactly_one_source, resolve_dtype
from gazelit.models.sharded_loading import parameters_on_meta

__all__ = ["LLM_OPTIONS", "build_llm", "decoder_layer_class", "decoder_layers"]

LLM_OPTIONS: dict[str, Any] = {"trust_remote_code": False, "revision": None}


def build_llm(
    *,
    pretrained: str | None = None,
    config: Mapping[str, Any] | None = None,
    attn_implementation: str = "sdpa",
    dtype: torch.dtype | str | None = None,
    options: Mapping[str, Any] | None = None,
    empty: bool = False,
) -> PreTrainedModel:
    """A causal LM from a checkpoint (`pretrained`: hub id or local directory) or from config fields
    (`config`: a mapping with `model_type`, e.g. "qwen3", plus fields; random init); exactly one.

    `dtype` None keeps transformers' default: the checkpoint's dtype for `pretrained`, float32 for
    `config`. `options`: trust_remote_code, revision. A checkpoint missing some of the model's weights is
    an error (tied embeddings are not missing).

    `empty` (with `pretrained`, a local directory): build the architecture with its parameters on the meta
    device and read no weights; `gazelit.models.sharded_loading` fills them in after sharding. The dtype
    is the one `from_pretrained` would give. Unlike vision configs, LLM config fields are not checked
    by name: transformers accepts legacy names (e.g. rope_theta) that are not attributes.
    """
    exactly_one_source(pretrained, config, "build_llm")
    opts = check_options(options, LLM_OPTIONS, "LLM")
    kwargs: dict[str, Any] = {
        "attn_implementation": attn_implementation,
        "trust_remote_code": opts["trust_remote_code"],
    }
    if (resolved := resolve_dtype(dtype)) is not None:
        kwargs["dtype"] = resolved
    if pretrained is not None and empty:
        hf_config = AutoConfig.from_pretrained(pretrained, trust_remote_code=opts["trust_remote_code"])
        kwargs["dtype"] = checkpoint_dtype(hf_config, kwargs.get("dtype"))
        with parameters_on_meta():
            return AutoModelForCausalLM.from_config(hf_config, **kwargs)
    if pretrained is not None:
        kwargs.setdefault("dtype", "auto")  # the checkpoint's dtype on every transformers version
        if opts["revision"]:
            kwargs["revision"] = opts["revision"]
        model, info = AutoModelForCausalLM.from_pretrained(pretrained, output_loading_info=True, **kwargs)
        bad = sorted(info["missing_keys"]) + sorted(str(k) for k in info["mismatched_keys"])
        if bad:  # transformers would random-initialise them with only a log line
            raise ValueError(f"{pretrained}: the checkpoint does not hold these weights: {bad[:8]}")
        return model

    fields = dict(config)  # type: ignore[arg-type]
    model_type = fields.pop("model_type", None)
    if not model_type:
        raise ValueError("build_llm: `config` needs a `model_type` (e.g. 'qwen3', 'qwen2', 'llama')")
    hf_config = AutoConfig.for_model(model_type, **fields)
    if kwargs.get("dtype") == "auto":  # nothing to take the dtype from
        del kwargs["dtype"]
    return AutoModelForCausalLM.from_config(hf_config, **kwargs)


def decoder_layers(model: PreTrainedModel) -> nn.ModuleList:
    """The ModuleList of decoder blocks of a causal LM (`model.model.layers` for Qwen / Llama)."""
    layers = getattr(model.get_decoder(), "layers", None)
    if not isinstance(layers, nn.ModuleList) or len(layers) == 0:
        raise TypeError(f"{type(model).__name__}: cannot find the decoder layers (get_decoder().layers)")
    return layers


def decoder_layer_class(model: PreTrainedModel) -> type[nn.Module]:
    """The decoder-block class of a causal LM, for FSDP auto-wrapping and activation checkpointing."""
    classes = {type(layer) for layer in decoder_layers(model)}
    if len(classes) != 1:
        names = sorted(c.__name__ for c in classes)
        raise TypeError(f"{type(model).__name__}: decoder layers of several classes {names}")
    (cls,) = classes
    return cls
