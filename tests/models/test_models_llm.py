"""LLM loading: tiny configs of every family, save/load by path, decoder-layer class, bad input."""

from __future__ import annotations

import copy

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers.models.llama.modeling_llama import LlamaDecoderLayer
from transformers.models.qwen2.modeling_qwen2 import Qwen2DecoderLayer
from transformers.models.qwen3.modeling_qwen3 import Qwen3DecoderLayer

from gazelit.models.llm import build_llm, decoder_layer_class, decoder_layers
from gazelit.models.tiny import TINY_LLM
from gazelit.tokenizer import build_tiny_tokenizer

LAYER = {"qwen3": Qwen3DecoderLayer, "qwen2": Qwen2DecoderLayer, "llama": LlamaDecoderLayer}
families = pytest.mark.parametrize("family", sorted(TINY_LLM))


def ids(length: int = 12, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 512, (2, length), generator=torch.Generator().manual_seed(seed))


@families
def test_build_from_config(family):
    config = copy.deepcopy(TINY_LLM[family])
    model = build_llm(config=config)
    assert config == TINY_LLM[family]  # the caller's mapping is not consumed
    assert model.config.model_type == family
    assert model.config.num_key_value_heads < model.config.num_attention_heads  # GQA
    assert model.config._attn_implementation == "sdpa"
    assert model.dtype == torch.float32
    logits = model(ids()).logits
    assert logits.shape == (2, 12, TINY_LLM[family]["vocab_size"])
    assert torch.isfinite(logits).all()


@families
def test_decoder_layer_class(family):
    model = build_llm(config=TINY_LLM[family])
    cls = decoder_layer_class(model)
    assert cls is LAYER[family]
    assert sum(isinstance(m, cls) for m in model.modules()) == TINY_LLM[family]["num_hidden_layers"]
    assert len(decoder_layers(model)) == TINY_LLM[family]["num_hidden_layers"]


@families
def test_load_local_directory(family, tmp_path):
    torch.manual_seed(0)
    model = build_llm(config=TINY_LLM[family]).eval()
    model.save_pretrained(tmp_path)
    loaded = build_llm(pretrained=str(tmp_path)).eval()
    assert type(loaded) is type(model)
    assert loaded.config._attn_implementation == "sdpa"
    x = ids()
    with torch.no_grad():
        assert torch.equal(loaded(x).logits, model(x).logits)


def test_tied_embeddings_round_trip(tmp_path):
    model = build_llm(config={**TINY_LLM["qwen3"], "tie_word_embeddings": True}).eval()
    model.save_pretrained(tmp_path)
    loaded = build_llm(pretrained=str(tmp_path)).eval()
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    with torch.no_grad():
        assert torch.equal(loaded(ids()).logits, model(ids()).logits)


def test_checkpoint_missing_weights_is_an_error(tmp_path):
    build_llm(config=TINY_LLM["llama"]).save_pretrained(tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    del weights["model.layers.1.mlp.up_proj.weight"]
    save_file(weights, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"does not hold these weights: \['model.layers.1.mlp.up_proj.weight'\]"):
        build_llm(pretrained=str(tmp_path))


def test_attn_implementation_and_dtype_are_passed(tmp_path):
    model = build_llm(config=TINY_LLM["qwen3"], attn_implementation="eager", dtype="bfloat16")
    assert model.config._attn_implementation == "eager"
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    model.save_pretrained(tmp_path)
    loaded = build_llm(pretrained=str(tmp_path), dtype=torch.float32)
    assert loaded.dtype == torch.float32
    assert build_llm(pretrained=str(tmp_path)).dtype == torch.bfloat16  # default: the checkpoint's dtype


def test_tiny_vocab_covers_the_tiny_tokenizer():
    corpus = [f"the {w} sat on the mat number {i} while the dog barked" for i, w in enumerate(["cat", "cow"] * 200)]
    tok = build_tiny_tokenizer(corpus, vocab_size=512)
    tok.add_special_tokens({"additional_special_tokens": ["<|image_pad|>", "<|context|>"]})
    for family, config in TINY_LLM.items():
        assert len(tok) <= config["vocab_size"], family
        assert config["eos_token_id"] == tok.convert_tokens_to_ids("<|im_end|>") == tok.eos_token_id
        assert config["pad_token_id"] == tok.pad_token_id
    model = build_llm(config=TINY_LLM["qwen3"])
    text = tok.apply_chat_template([{"role": "user", "content": "the cat"}], tokenize=False)
    assert model(tok(text, return_tensors="pt").input_ids).logits.shape[-1] == TINY_LLM["qwen3"]["vocab_size"]


def test_bad_input():
    with pytest.raises(ValueError, match="both `pretrained` and `config`"):
        build_llm(pretrained="Qwen/Qwen3-0.6B", config=TINY_LLM["qwen3"])
    with pytest.raises(ValueError, match="neither of `pretrained` and `config`"):
        build_llm()
    no_type = {k: v for k, v in TINY_LLM["qwen3"].items() if k != "model_type"}
    with pytest.raises(ValueError, match="needs a `model_type`"):
        build_llm(config=no_type)
    with pytest.raises(ValueError, match="qwen9"):
        build_llm(config={**TINY_LLM["qwen3"], "model_type": "qwen9"})
    with pytest.raises(ValueError, match=r"unknown LLM option\(s\) \['trust_remote'\]"):
        build_llm(config=TINY_LLM["qwen3"], options={"trust_remote": True})
    with pytest.raises(ValueError, match="unknown dtype 'bf16'"):
        build_llm(config=TINY_LLM["qwen3"], dtype="bf16")
