"""GazeVLM with `model.look`: tokens and embeddings, training forward on every path, generation whose look
spans open and close token by token equal to a full forward over the same tokens, export and reload."""

from __future__ import annotations

import pytest
import torch

from gazelit.attention.look import look_token_strings
from gazelit.models.gaze_vlm import GazeVLM
from tests.batches import make_batch
from tests.builders import TOKENIZER, tiny_vlm

LOOK = {"enabled": True, "bias": -4.0, "bins": 4}


def look_ids(model, box, inner=2):
    t = model.look_tokens
    return t.span_ids(box) + [50 + i for i in range(inner)] + [t.close]


def test_the_tokenizer_gains_the_look_tokens_and_the_embeddings_grow_without_touching_the_callers():
    before = len(TOKENIZER)
    model = tiny_vlm(look=LOOK)
    assert len(TOKENIZER) == before  # the shared tokenizer is copied, not changed
    assert len(model.tokenizer) == before + 2 + LOOK["bins"]
    assert model.llm.get_input_embeddings().num_embeddings >= len(model.tokenizer)
    ids = model.tokenizer.convert_tokens_to_ids(look_token_strings(LOOK["bins"]))
    assert ids[0] == model.look_tokens.open and len(set(ids)) == len(ids)
    text = model.tokenizer.decode(ids, skip_special_tokens=False)
    assert "<look>" in text and "<loc_003>" in text


def batch_with_span(model, seed=0):
    batch = make_batch(model, [[("text", 3), ("image",), ("text", 14)], [("text", 2), ("image",), ("text", 15)]],
                       seed=seed)  # fmt: skip
    for i in range(2):
        start = int(batch["unit_start"][i]) + 16 + model.num_context + 3
        span = look_ids(model, (1, 0, 2, 1) if i else (0, 0, 1, 3))
        batch["input_ids"][i, start : start + len(span)] = torch.tensor(span)
    return batch


@pytest.mark.parametrize("enabled", [True, False])
def test_training_forward_with_spans_is_exact_on_every_path_and_spans_change_it(enabled):
    model = tiny_vlm(look=LOOK, enabled=enabled, top_k=1)
    batch = batch_with_span(model)
    outs = {}
    for impl in ("segmented", "reference"):
        model.config.gaze.impl = impl
        outs[impl] = model(batch).logits
    assert (outs["segmented"] - outs["reference"]).abs().max() < 1e-5
    model.look_tokens, tokens = None, model.look_tokens  # the same weights without look semantics
    without = model(batch).logits
    model.look_tokens = tokens
    assert (outs["reference"] - without).abs().max() > 1e-4


@pytest.mark.parametrize("enabled,top_k", [(True, 1), (True, None), (False, None)])
def test_generated_spans_steer_decoding_exactly_as_a_full_forward_sees_them(enabled, top_k):
    """Generation is constrained to write `<look> box` at step 1 and `</look>` at step 6 (the rest is
    greedy); every free greedy token equals the argmax of one full forward over prompt + generated tokens,
    so the spans opened and closed during cached decoding attend exactly as in training."""
    model = tiny_vlm(look=LOOK, enabled=enabled, top_k=top_k, seed=3)
    prompt = make_batch(model, [[("text", 3), ("image",), ("text", 4)], [("image",), ("text", 6)]], padding="left")
    t = model.look_tokens
    script = {1: t.open, 2: 1 + min(t.locs), 3: min(t.locs), 4: 2 + min(t.locs), 5: 3 + min(t.locs), 8: t.close}
    length = prompt["input_ids"].shape[1]
    special = {model.tokenizer.eos_token_id, t.open, t.close, *t.locs}
    free_ids = [j for j in range(len(model.tokenizer)) if j not in special]

    def allowed(_batch, ids):
        step = ids.shape[0]  # generating from embeddings: `ids` holds the generated tokens only
        return [script[step]] if step in script else free_ids

    out = model.generate_from_batch(prompt, max_new_tokens=11, prefix_allowed_tokens_fn=allowed)
    for i, o in enumerate(out):
        assert len(o.looks) == 1 and o.looks_opened == 1
        look = o.looks[0]
        assert (look.start, look.end) == (5, 8) and look.box == (0.25, 0.0, 0.75, 1.0)
        full = {k: (v[i : i + 1] if torch.is_tensor(v) and v.shape[:1] == (2,) else v) for k, v in prompt.items()}
        ids = torch.tensor(o.token_ids)
        n = ids.numel()
        full["input_ids"] = torch.cat([prompt["input_ids"][i : i + 1], ids[None]], 1)
        full["attention_mask"] = torch.cat([prompt["attention_mask"][i : i + 1], torch.ones(1, n, dtype=torch.long)], 1)
        full["token_kind"] = torch.cat([prompt["token_kind"][i : i + 1], torch.zeros(1, n, dtype=torch.long)], 1)
        units = prompt["unit_sample"] == i
        for key in ("unit_start", "unit_grid", "unit_video", "unit_time"):
            full[key] = prompt[key][units]
        full["unit_sample"] = torch.zeros(int(units.sum()), dtype=torch.long)
        full["pixel_values"] = prompt["pixel_values"][units]
        full["labels"] = torch.full_like(full["input_ids"], -100)
        logits = model(full).logits[0, length - 1 : length - 1 + n]
        free = [s for s in range(n) if s not in script]
        model.look_tokens = None
        plain = model(full).logits[0, length - 1 : length - 1 + n]
        model.look_tokens = t
        assert (logits[5:8] - plain[5:8]).abs().max() > 1e-4 and torch.equal(logits[:5], plain[:5])
        best = torch.tensor(free_ids)[logits[free][:, free_ids].argmax(-1)]  # what the constraint let through
        assert torch.equal(best, ids[free])


def test_a_model_with_looks_exports_and_reloads(tmp_path):
    model = tiny_vlm(look=LOOK)
    batch = batch_with_span(model)
    want = model(batch).logits
    again = GazeVLM.from_pretrained(model.save_pretrained(tmp_path / "m"))
    assert again.look_tokens == model.look_tokens
    assert torch.equal(again(batch).logits, want)


def test_look_values_are_checked_before_a_model_is_built():
    from tests.builders import model_config

    with pytest.raises(ValueError, match="model.look.bias"):
        model_config(look={"enabled": True, "bias": 1.0}).validate()
    with pytest.raises(ValueError, match="model.look.bins"):
        model_config(look={"enabled": True, "bins": 0}).validate()
    assert model_config(look={"enabled": True, "bias": "-inf"}).validate().look.bias == float("-inf")


def test_a_sharded_start_whose_llm_lacks_the_look_tokens_is_a_clear_error():
    """Under an fsdp2 start the LLM's parameters are on the meta device and its embeddings cannot grow."""
    from gazelit.models.gaze_vlm import _with_look_tokens

    llm = tiny_vlm().llm
    llm.resize_token_embeddings(len(TOKENIZER))  # exactly the tokenizer: no room for the look tokens
    with pytest.raises(ValueError, match=r"model.look: the LLM's vocabulary \(400\) lacks the 6 look tokens"):
        _with_look_tokens(TOKENIZER, llm, 4, empty=True)
    grown = _with_look_tokens(TOKENIZER, llm, 4, empty=False)  # unsharded: the embeddings grow
    assert llm.get_input_embeddings().num_embeddings == len(grown) == len(TOKENIZER) + 6
