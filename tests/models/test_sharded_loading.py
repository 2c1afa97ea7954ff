"""Start-up without a full model: pretrained components built with parameters on the meta device, then
filled in from their safetensors files, equal the model transformers' from_pretrained builds."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from gazelit.models.gaze_vlm import GazeVLM
from gazelit.models.llm import build_llm
from gazelit.models.sharded_loading import load_safetensors_shards, materialize, parameters_on_meta
from gazelit.models.tiny import TINY_LLM

from ..batches import make_batch
from ..builders import MIXED, TOKENIZER, pretrained_config


def both(config):
    torch.manual_seed(1)
    full = GazeVLM.build(config, tokenizer=TOKENIZER).eval()
    torch.manual_seed(1)
    empty = GazeVLM.build(config, tokenizer=TOKENIZER, empty_pretrained=True).eval()
    return full, empty


@pytest.mark.parametrize("llm,vision,tie", [("qwen3", "siglip2", False), ("qwen2", "clip", True),
                                            ("llama", "dinov2", False), ("qwen3", "siglip", True)])  # fmt: skip
def test_an_empty_build_filled_from_safetensors_equals_from_pretrained(llm, vision, tie, tmp_path):
    full, empty = both(pretrained_config(tmp_path, llm=llm, vision=vision, tie=tie))
    # transformers saves DINOv2 under older tensor names than its modules': that tower is loaded whole
    expected = {"llm"} if vision == "dinov2" else {"llm", "vision.model"}
    assert set(empty.pending_weights) == expected
    meta = {n.partition(".")[0] for n, p in empty.named_parameters() if p.is_meta}
    assert meta == {name.partition(".")[0] for name in expected}
    assert not any(n.startswith(("projector.", "context_tokens")) for n in meta)  # built as usual
    empty.load_pretrained_shards("cpu")
    assert not empty.pending_weights
    full_state, empty_state = full.state_dict(), empty.state_dict()
    assert full_state.keys() == empty_state.keys()
    for name, tensor in full_state.items():  # parameters and buffers (rotary inv_freq, position_ids)
        assert empty_state[name].dtype == tensor.dtype, name
        assert torch.equal(empty_state[name], tensor), name
    if tie:
        assert empty.llm.get_output_embeddings().weight is empty.llm.get_input_embeddings().weight
    batch = make_batch(full, MIXED, seed=3)
    assert torch.equal(empty(batch).logits, full(batch).logits)


@pytest.mark.parametrize("saved,requested", [(torch.bfloat16, None), (torch.bfloat16, "float32"),
                                             (torch.float32, "bfloat16")])  # fmt: skip
def test_parameters_come_in_the_recipes_dtype_else_the_checkpoints(saved, requested, tmp_path):
    config = pretrained_config(tmp_path, dtype=saved)
    config.llm.dtype = requested
    full, empty = both(config)
    empty.load_pretrained_shards("cpu")
    expected = getattr(torch, requested) if requested else saved
    for model in (full, empty):
        assert {p.dtype for p in model.llm.parameters()} == {expected}
    for (name, a), b in zip(full.llm.named_parameters(), empty.llm.parameters()):
        assert torch.equal(a, b), name


def test_a_weight_the_files_lack_is_an_error_naming_it(tmp_path):
    config = pretrained_config(tmp_path)
    weights = tmp_path / "llm" / "model.safetensors"
    state = load_file(weights)
    del state["model.layers.1.mlp.up_proj.weight"]
    save_file(state, weights, metadata={"format": "pt"})
    message = r"does not hold these weights: \['model.layers.1.mlp.up_proj.weight'\]"
    with pytest.raises(ValueError, match=message):  # the names do not cover the module: loaded whole, refused
        GazeVLM.build(config, tokenizer=TOKENIZER, empty_pretrained=True)
    with parameters_on_meta():
        llm = build_llm(config=TINY_LLM["qwen3"])
    with pytest.raises(ValueError, match=message):
        load_safetensors_shards(llm, tmp_path / "llm")


def test_parameters_on_meta_keeps_buffers_real_and_computes_no_init():
    with parameters_on_meta():
        module = torch.nn.BatchNorm1d(4)
        linear = torch.nn.Linear(3, 2)
    assert module.weight.is_meta and linear.weight.is_meta and linear.bias.is_meta
    assert not module.running_var.is_meta and torch.equal(module.running_var, torch.ones(4))
    assert not torch.nn.Linear(2, 2).weight.is_meta  # the patch ends with the block
    materialize(module, "cpu")
    assert not module.weight.is_meta and torch.equal(module.running_var, torch.ones(4))
