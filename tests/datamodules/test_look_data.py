"""Look spans in the data: the `boxes` record field (checked, carried by the converter), the chat encoder
writing `<look> box text </look>` before the answer (supervised), and the demo data's boxes."""

from __future__ import annotations

import json

import pytest
import torch

from gazelit.attention.look import LOOK_CLOSE, LOOK_OPEN, LookTokens, box_to_bins, look_token_strings
from gazelit.datamodules.chat import IGNORE_INDEX, ChatEncoder
from gazelit.datamodules.records import InvalidRecord, LookBox, conversation_turns, look_boxes
from gazelit.tokenizer import build_tiny_tokenizer

BINS = 8


@pytest.fixture(scope="module")
def look_tokenizer():
    tok = build_tiny_tokenizer(["system user assistant What colour is it? red circle square blue"] * 30, 300)
    tok.add_tokens(look_token_strings(BINS), special_tokens=True)
    return tok


def record(boxes, answers=("red",)):
    conversations = []
    for a in answers:
        conversations += [{"from": "human", "value": "What colour is it?"}, {"from": "gpt", "value": a}]
    return {"conversations": conversations, "boxes": boxes}


def test_boxes_are_read_in_every_form_and_malformed_ones_are_named():
    r = record([[0.1, 0.2, 0.5, 0.6]])
    assert look_boxes(r, conversation_turns(r)) == [[LookBox((0.1, 0.2, 0.5, 0.6))]]
    r = record([None, [{"box": [0, 0, 1, 1], "text": "red"}, [0.5, 0.5, 0.5, 0.5]]], answers=("a", "b"))
    assert look_boxes(r, conversation_turns(r)) == [[], [LookBox((0.0, 0.0, 1.0, 1.0), "red"),
                                                         LookBox((0.5, 0.5, 0.5, 0.5))]]  # fmt: skip
    assert look_boxes({"conversations": []}, []) is None
    for bad, where in (([[0.5, 0, 0.1, 1]], r"boxes\[0\]"), ([[0, 0, 1]], r"boxes\[0\]"), ([[0, 0, 1, 2]], r"boxes\[0\]"),
                       ([[[0, 0, 1, 1], {"box": [0, 0, 1, True]}]], r"boxes\[0\]\[1\]"),
                       ([], "one entry per assistant turn"), ([[{"box": [0, 0, 1, 1], "text": 3}]], "text")):  # fmt: skip
        r = record(bad)
        with pytest.raises(InvalidRecord, match=where):
            look_boxes(r, conversation_turns(r))


def test_the_encoder_writes_look_spans_before_the_answer_and_supervises_them(look_tokenizer):
    enc = ChatEncoder(look_tokenizer, (2, 2), 1, 200, None, look_bins=BINS)
    turns = [("user", "<image>What colour is it?"), ("assistant", "red")]
    looks = [[LookBox((0.25, 0.5, 0.5, 1.0), "red circle"), LookBox((0.0, 0.0, 0.1, 0.1))]]
    got = enc.encode(turns, [1], looks)
    plain = enc.encode(turns, [1])
    tokens = LookTokens.from_tokenizer(look_tokenizer, BINS)
    first = got.input_ids.index(tokens.open)
    assert got.input_ids[first : first + 5] == tokens.span_ids(box_to_bins((0.25, 0.5, 0.5, 1.0), BINS))
    text = look_tokenizer.decode(got.input_ids[first:])
    assert text.startswith(f"{LOOK_OPEN}<loc_002><loc_004><loc_003><loc_007>red circle{LOOK_CLOSE}{LOOK_OPEN}")
    assert "<loc_000><loc_000><loc_000><loc_000>" in text and f"{LOOK_CLOSE}red" in text
    assert all(label != IGNORE_INDEX for label in got.labels[first:-1])  # the spans are supervised like text
    assert got.input_ids[:first] == plain.input_ids[: len(got.input_ids[:first])]
    without = ChatEncoder(look_tokenizer, (2, 2), 1, 200, None)  # no look_bins: boxes are ignored
    assert without.encode(turns, [1], looks).input_ids == plain.input_ids


def test_an_encoder_with_look_bins_needs_the_look_tokens():
    tok = build_tiny_tokenizer(["a b c"] * 10, 280)
    with pytest.raises(ValueError, match="look tokens"):
        ChatEncoder(tok, (2, 2), 0, 100, None, look_bins=BINS)


def test_demo_records_carry_boxes_per_answer_that_name_the_objects_in_order(tmp_path):
    from gazelit.datamodules.demo_data import generate_demo_data

    data = generate_demo_data(tmp_path, train=30, val=0, test=0, video_fraction=0.2, seed=3,
                              tasks=("shape_of", "shapes_of_two"))  # fmt: skip
    records = [json.loads(line) for line in data.jsonl["train"].read_text().splitlines()]
    assert any("video" in r for r in records) and any(r["task"] == "shapes_of_two" for r in records)
    for r in records:
        looks = look_boxes(r, conversation_turns(r))
        if "video" in r:
            assert looks == [[]]
            continue
        assert [list(look.box) for look in looks[0]] == r["target_boxes"]
        named = [look.text for look in looks[0]]
        assert all(text.split()[1] in r["answer"] for text in named)  # "colour shape": the shape is answered


def test_a_record_with_bad_boxes_is_skipped_at_conversion_with_its_reason(tmp_path):
    from gazelit.datamodules.convert import convert

    lines = [record([[0, 0, 1, 1]]) | {"id": "good"}, record([[1, 0, 0, 1]]) | {"id": "bad"}]
    (tmp_path / "in.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    manifest = convert(tmp_path / "in.jsonl", tmp_path, tmp_path / "out", progress=False)
    assert manifest.num_samples == 1
    (skipped,) = manifest.skipped
    assert skipped.id == "bad" and skipped.reason == "invalid_record" and "boxes[0]" in skipped.detail


def test_training_batches_of_a_look_model_hold_the_spans(tmp_path):
    """The demo data through the datamodule of a model with model.look: every image answer starts with
    its look spans, and the model's forward parses them."""
    from gazelit.datamodules.demo_data import generate_demo_data
    from gazelit.schema import DataConfig, SourceConfig
    from gazelit.training.data import TrainingDataModule
    from tests.builders import tiny_vlm

    data = generate_demo_data(tmp_path, train=12, val=0, test=0, video_fraction=0.0, seed=4, image_size=32)
    model = tiny_vlm(look={"enabled": True, "bins": BINS}, top_k=1)
    config = DataConfig(sources=[SourceConfig(str(data.shards["train"]))], batch_size=4, num_workers=0,
                        max_length=256, steps_per_epoch=1)  # fmt: skip
    dm = TrainingDataModule(config, model.tokenizer, model.image_transform(), model.visual_grid, model.num_context,
                            look_bins=BINS)  # fmt: skip
    batch = next(iter(dm.train_dataloader()))
    from gazelit.attention import GazeLayout, RegionShape

    layout = GazeLayout.from_token_kinds(batch["token_kind"], batch["unit_sample"], batch["unit_start"],
                                         batch["unit_grid"], model.num_context, RegionShape(2, 2, 1))  # fmt: skip
    looks = model.look_set(layout, batch["input_ids"])
    for i in range(batch["input_ids"].shape[0]):
        (span,) = looks.spans(i)
        assert span.end is not None and span.unit == 0
        assert batch["labels"][i, span.start] == batch["input_ids"][i, span.start]
    assert torch.isfinite(model(batch).loss)
