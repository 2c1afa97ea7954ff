"""Conversation -> tokens: a hand-checked example, placeholder rules, truncation and skip reasons."""

from __future__ import annotations

import pytest

from gazelit.datamodules.chat import IGNORE_INDEX, ChatEncoder
from gazelit.datamodules.skips import ALL_MASKED, EMPTY_CONVERSATION, OVER_LENGTH, PLACEHOLDER_MISMATCH, SkipSample
from gazelit.attention.layout import CONTEXT, TEXT, VISUAL
from gazelit.tokenizer import build_tiny_tokenizer

T, V, C = TEXT, VISUAL, CONTEXT


@pytest.fixture(scope="module")
def small_tokenizer():
    return build_tiny_tokenizer(["system user assistant Be brief. What colour is it? red And now? blue"] * 30, 400)


def encoder(tokenizer, grid=(1, 2), num_context=1, max_length=100, system_prompt="Be brief."):
    return ChatEncoder(tokenizer, grid, num_context, max_length, system_prompt)


def test_hand_checked_two_turn_example(small_tokenizer):
    """ChatML, a 1x2 grid with one context token, the placeholder written at the end of the question."""
    turns = [("user", "What colour is it?<image>"), ("assistant", "red"), ("user", "And now?"), ("assistant", "blue")]
    got = encoder(small_tokenizer).encode(turns, [1])
    # (token, supervised, kind); the placeholder moved to the start of its turn: "<image>\nWhat colour is it?"
    expected = [
        ("<|im_start|>", 0, T), ("system", 0, T), ("Ċ", 0, T), ("Be", 0, T), ("Ġbrief", 0, T), (".", 0, T),
        ("<|im_end|>", 0, T), ("Ċ", 0, T),
        ("<|im_start|>", 0, T), ("user", 0, T), ("Ċ", 0, T),
        ("<|endoftext|>", 0, V), ("<|endoftext|>", 0, V), ("<|endoftext|>", 0, C),  # the unit: 2 visual + 1 context
        ("Ċ", 0, T), ("Wh", 0, T), ("at", 0, T), ("Ġcolour", 0, T), ("Ġis", 0, T), ("Ġit", 0, T), ("?", 0, T),
        ("<|im_end|>", 0, T), ("Ċ", 0, T),
        ("<|im_start|>", 0, T), ("as", 0, T), ("sistan", 0, T), ("t", 0, T), ("Ċ", 0, T),
        ("red", 1, T), ("<|im_end|>", 1, T),  # assistant content and its end-of-turn token are supervised
        ("Ċ", 0, T),
        ("<|im_start|>", 0, T), ("user", 0, T), ("Ċ", 0, T), ("An", 0, T), ("d", 0, T), ("Ġnow", 0, T), ("?", 0, T),
        ("<|im_end|>", 0, T), ("Ċ", 0, T),
        ("<|im_start|>", 0, T), ("as", 0, T), ("sistan", 0, T), ("t", 0, T), ("Ċ", 0, T),
        ("b", 1, T), ("lu", 1, T), ("e", 1, T), ("<|im_end|>", 1, T),
        ("Ċ", 0, T),
    ]  # fmt: skip
    tokens = small_tokenizer.convert_ids_to_tokens(got.input_ids)
    assert list(zip(tokens, [int(label != IGNORE_INDEX) for label in got.labels], got.token_kind)) == expected
    supervised = [(i, label) for i, label in zip(got.input_ids, got.labels) if label != IGNORE_INDEX]
    assert all(i == label for i, label in supervised)  # labels are the ids themselves (not shifted)
    assert got.unit_starts == [11]
    assert got.input_ids[11:14] == [small_tokenizer.pad_token_id] * 3


def test_placeholder_is_inserted_for_media_without_one(small_tokenizer):
    enc = encoder(small_tokenizer, system_prompt=None)
    messages = enc.messages([("user", "What colour is it?"), ("assistant", "red")], num_media=1)
    assert messages[0] == {"role": "user", "content": "<image>\nWhat colour is it?"}
    got = enc.encode([("user", "What colour is it?"), ("assistant", "red")], [1])
    assert got.token_kind.count(VISUAL) == 2 and got.token_kind.count(CONTEXT) == 1


def test_text_only_sample_has_no_units(small_tokenizer):
    got = encoder(small_tokenizer).encode([("user", "And now?"), ("assistant", "blue")], [])
    assert got.unit_starts == [] and set(got.token_kind) == {TEXT}


def test_video_expands_one_placeholder_into_a_unit_per_frame(small_tokenizer):
    turns = [("user", "<image>What?"), ("assistant", "red")]
    got = encoder(small_tokenizer, grid=(2, 2), num_context=1).encode(turns, [3])
    assert len(got.unit_starts) == 3
    assert [got.unit_starts[i + 1] - got.unit_starts[i] for i in range(2)] == [5, 5]  # 4 visual + 1 context
    first = got.unit_starts[0]
    assert got.token_kind[first : first + 15] == ([V] * 4 + [C]) * 3


@pytest.mark.parametrize(
    ("turns", "num_media"),
    [
        ([("user", "<image> a <image>"), ("assistant", "red")], 1),  # two placeholders, one image
        ([("user", "<image> What?"), ("assistant", "red")], 0),  # placeholder in a text-only sample
        ([("user", "What?"), ("assistant", "<image> red")], 1),  # placeholder in an assistant turn
        ([("assistant", "red")], 1),  # media but no user turn to attach it to
    ],
)
def test_placeholder_mismatch(small_tokenizer, turns, num_media):
    with pytest.raises(SkipSample) as info:
        encoder(small_tokenizer).encode(turns, [1] * num_media)
    assert info.value.reason == PLACEHOLDER_MISMATCH


def test_empty_and_all_masked_conversations(small_tokenizer):
    enc = encoder(small_tokenizer)
    for turns in ([], [("user", "  "), ("assistant", "")]):
        with pytest.raises(SkipSample) as info:
            enc.encode(turns, [])
        assert info.value.reason == EMPTY_CONVERSATION
    with pytest.raises(SkipSample) as info:
        enc.encode([("user", "What colour is it?")], [])  # nothing for the assistant to learn
    assert info.value.reason == ALL_MASKED


def test_truncation_keeps_units_whole(small_tokenizer):
    turns = [("user", "<image>\nWhat colour is it?"), ("assistant", "red " * 40)]
    full = encoder(small_tokenizer, grid=(2, 2), max_length=1000).encode(turns, [2])
    unit_end = full.unit_starts[-1] + 5
    # a limit just after the units: text is cut, units untouched, something supervised must remain
    first_label = next(i for i, label in enumerate(full.labels) if label != IGNORE_INDEX)
    cut = encoder(small_tokenizer, grid=(2, 2), max_length=first_label + 3).encode(turns, [2])
    assert len(cut) == first_label + 3
    assert cut.input_ids == full.input_ids[: first_label + 3]
    assert cut.labels == full.labels[: first_label + 3]
    assert cut.unit_starts == full.unit_starts
    # the units themselves do not fit: dropped as over_length
    with pytest.raises(SkipSample) as info:
        encoder(small_tokenizer, grid=(2, 2), max_length=unit_end - 1).encode(turns, [2])
    assert info.value.reason == OVER_LENGTH
    # the units fit but no assistant token survives: all_masked
    with pytest.raises(SkipSample) as info:
        encoder(small_tokenizer, grid=(2, 2), max_length=first_label).encode(turns, [2])
    assert info.value.reason == ALL_MASKED


def test_system_turn_in_the_record_replaces_the_configured_prompt(small_tokenizer):
    messages = encoder(small_tokenizer).messages([("system", "Own."), ("user", "Hi"), ("assistant", "red")], 0)
    assert [m["role"] for m in messages] == ["system", "user", "assistant"]
    assert messages[0]["content"] == "Own."


QWEN3_STYLE_TEMPLATE = (
    "{%- for message in messages %}"
    "{%- if message.role == 'assistant' and loop.last %}"
    "{{- '<|im_start|>assistant\\n<think>\\n\\n</think>\\n\\n' + message.content.strip() + '<|im_end|>\\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content.strip() + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


def test_templates_that_strip_content_and_add_a_think_block():
    """Qwen3-like: the last assistant turn gets an empty think block, contents are stripped."""
    tokenizer = build_tiny_tokenizer(["system user assistant Be brief. What colour is it? red And now? blue"] * 30, 400)
    tokenizer.chat_template = QWEN3_STYLE_TEMPLATE
    turns = [("user", "What colour is it?"), ("assistant", " red "), ("user", "And now?"), ("assistant", "blue\n")]
    got = encoder(tokenizer).encode(turns, [])
    supervised = tokenizer.decode([i for i, label in zip(got.input_ids, got.labels) if label != IGNORE_INDEX])
    # first turn: content + end of turn; last turn: what the model must generate after the generation prompt
    assert supervised == "red<|im_end|><think>\n\n</think>\n\nblue<|im_end|>"
