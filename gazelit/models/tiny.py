"""Tiny configs for every vision and LLM family, for tests, the demo recipe and benchmarks.

Plain dicts, to pass as `config=` to `build_vision_encoder(family, ...)` / `build_llm(...)` (copy before
editing). Vision towers: width 32, 2 blocks, 32 px images in 8 px patches -> a 4 x 4 token grid.
LLMs: width 64, 2 layers, grouped-query attention (4 query heads over 2 KV heads, head_dim 16).

The LLM vocabulary (640) covers a `build_tiny_tokenizer(corpus, vocab_size=512)` tokenizer plus 128 ids
of headroom for tokens the VLM adds (image / context placeholders). Its special ids follow that
tokenizer: pad = <|endoftext|>, eos = <|im_end|>, no BOS (ChatML does not use one).
"""

from __future__ import annotations

from typing import Any

from gazelit.tokenizer import TINY_SPECIAL_TOKENS

__all__ = ["TINY_VISION", "TINY_DINOV2_REGISTERS", "TINY_LLM", "TINY_LLM_VOCAB"]

_VIT: dict[str, Any] = {
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "image_size": 32,
    "patch_size": 8,
}

TINY_VISION: dict[str, dict[str, Any]] = {
    "siglip2": {**_VIT, "intermediate_size": 64},
    "siglip": {**_VIT, "intermediate_size": 64},
    "clip": {**_VIT, "intermediate_size": 64},
    "dinov2": {**_VIT, "mlp_ratio": 2},
}

# The DINOv2-with-registers variant of the "dinov2" family (selected by `num_register_tokens`).
TINY_DINOV2_REGISTERS: dict[str, Any] = {**TINY_VISION["dinov2"], "num_register_tokens": 4}

TINY_LLM_VOCAB = 640

_SPECIAL_IDS: dict[str, Any] = {
    "pad_token_id": TINY_SPECIAL_TOKENS.index("<|endoftext|>"),
    "eos_token_id": TINY_SPECIAL_TOKENS.index("<|im_end|>"),
    "bos_token_id": None,
}

_DECODER: dict[str, Any] = {
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "intermediate_size": 128,
    "vocab_size": TINY_LLM_VOCAB,
    "max_position_embeddings": 2048,
    "tie_word_embeddings": False,
    **_SPECIAL_IDS,
}

TINY_LLM: dict[str, dict[str, Any]] = {
    "qwen3": {"model_type": "qwen3", **_DECODER, "head_dim": 16},
    # Qwen2 / Qwen2.5 have no head_dim field: it is hidden_size / num_attention_heads = 16.
    "qwen2": {"model_type": "qwen2", **_DECODER},
    "llama": {"model_type": "llama", **_DECODER, "head_dim": 16},
}
