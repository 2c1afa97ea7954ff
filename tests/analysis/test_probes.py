"""Dense attention maps from the probe hook equal the attention weights of the equivalent dense model."""

from pathlib import Path

import pytest
import torch

from gazelit.analysis.probes import GenerationMapProbe, RowMapProbe, require_gaze
from gazelit.attention import VISUAL, use_gaze

from ..batches import make_batch
from ..builders import tiny_vlm


def test_row_maps_equal_eager_attention_weights_of_the_dense_twin():
    gaze = tiny_vlm(top_k="all", m=0)  # k = all and no context tokens: exactly dense attention
    dense = tiny_vlm(enabled=False, m=0)
    dense.load_state_dict(gaze.state_dict())
    dense.llm.set_attn_implementation("eager")
    batch = make_batch(gaze, [[("text", 3), ("image",), ("text", 5)], [("text", 2), ("video", 2), ("text", 3)]],
                       padding="left")
    rows = [[30, 33, 36], [20, 34, 36]]  # a visual query row and text rows; sample 0 is left-padded by 13
    probe = RowMapProbe(rows)
    with torch.no_grad():
        embeds, layout = gaze.embed(batch)
        with use_gaze(gaze.context(layout, gaze_k=None, probe=probe)):
            gaze.llm(inputs_embeds=embeds, attention_mask=batch["attention_mask"], use_cache=False)
        embeds, _ = dense.embed(batch)
        weights = dense.llm(inputs_embeds=embeds, attention_mask=batch["attention_mask"], output_attentions=True,
                            use_cache=False).attentions
    for layer, w in enumerate(weights):
        for b in range(2):
            visual = (batch["token_kind"][b] == VISUAL).nonzero().flatten()
            expected = w[b][:, rows[b]][:, :, visual]
            assert probe.maps[layer][b].shape == expected.shape
            assert torch.allclose(probe.maps[layer][b], expected, atol=1e-6)


def test_generation_maps_follow_the_trace_and_dense_models_are_refused():
    model = tiny_vlm(top_k=1)
    batch = make_batch(model, [[("text", 3), ("image",), ("text", 2)]], padding="left")
    probe = GenerationMapProbe(num_layers=2)
    out = model.generate_from_batch(batch, max_new_tokens=5, probe=probe)[0]
    maps = probe.maps()
    assert maps.shape[0] >= len(out.trace.tokens) and maps.shape[1:] == (2, 4, 16)
    total = maps.sum(-1)
    assert ((total > 0) & (total <= 1 + 1e-6)).all()  # probability mass on the visual tokens
    with pytest.raises(ValueError, match="gaze-enabled"):
        require_gaze(tiny_vlm(enabled=False))


def test_routing_accuracy_counts_selected_tokens_inside_the_object_box():
    """A model whose keys make the object's region win: accuracy = its share of the selection, hit rate 1,
    chance levels from the candidates; a box elsewhere gives 0 hits."""
    from gazelit.models.routing_accuracy import RoutingAccuracy

    model = tiny_vlm(top_k=1, m=0, region=(2, 2))  # 4x4 grid, 4 regions of 2x2 per image
    batch = make_batch(model, [[("text", 2), ("image",), ("text", 5)]])
    batch["labels"][0, :20] = -100  # the answer starts at 20: its first token is predicted by text row 19
    batch["meta"] = [{"target_box": [0.0, 0.0, 0.5, 0.5]}]  # the top-left region (tokens of cells 0,1,4,5)
    layout_probe = RoutingAccuracy(top_k=1)
    layout_probe.batch = batch
    captured = {}

    def spy(**kwargs):
        captured.setdefault("layout", kwargs["layout"])
        layout_probe(**kwargs)

    with torch.no_grad():
        model(batch, probe=spy)
    metrics = layout_probe.metrics()
    assert metrics["samples"] == 1 and 0.0 <= metrics["routing_acc"] <= 1.0
    assert metrics["routing_acc_chance"] == 4 / 16 and metrics["hit_rate_chance"] == 1 / 4
    # the selection's inside fraction and hit agree: one 2x2 region selected per head, so acc = hit
    assert abs(metrics["routing_acc"] - metrics["hit_rate_mean"]) < 1e-6
    assert "hit_rate/layer1" in metrics


def test_with_k_1_every_head_hits_exactly_one_of_the_four_quadrants():
    from gazelit.models.routing_accuracy import RoutingAccuracy

    model = tiny_vlm(top_k=1, m=0, region=(2, 2))
    batch = make_batch(model, [[("text", 2), ("image",), ("text", 5)]])
    batch["labels"][0, :20] = -100
    total = 0.0
    for box in ([0, 0, 0.5, 0.5], [0.5, 0, 1, 0.5], [0, 0.5, 0.5, 1], [0.5, 0.5, 1, 1]):
        batch["meta"] = [{"target_box": box}]
        probe = RoutingAccuracy(top_k=1)
        probe.batch = batch
        with torch.no_grad():
            model(batch, probe=probe)
        total += probe.metrics()["hit_rate_mean"]
    assert abs(total - 1.0) < 1e-6


def test_with_look_spans_routing_is_measured_at_the_query_after_the_looks():
    """The answer `<look> box text </look> word`: the measured query is the one at `</look>` (it predicts
    the first word of the answer proper), not the one before `<look>`."""
    from gazelit.models.routing_accuracy import RoutingAccuracy

    model = tiny_vlm(top_k=1, m=0, region=(2, 2), look={"enabled": True, "bins": 4})
    batch = make_batch(model, [[("text", 2), ("image",), ("text", 12)]])
    t = model.look_tokens
    answer = t.span_ids((0, 0, 1, 1)) + [40, t.close, 41, model.tokenizer.eos_token_id]
    batch["input_ids"][0, 20 : 20 + len(answer)] = torch.tensor(answer)
    batch["labels"][0] = -100
    batch["labels"][0, 20 : 20 + len(answer)] = torch.tensor(answer)
    batch["meta"] = [{"target_box": [0.0, 0.0, 0.5, 0.5]}]
    rows = {}
    for close in (None, t.close):
        probe = RoutingAccuracy(top_k=1, look_close=close)
        probe.prepare(batch, model.embed(batch)[1])
        rows[close] = probe._targets[0].answer_row
    assert rows[None] == 19 and rows[t.close] == 20 + 6


def test_other_object_hits_are_the_same_heads_hits_on_the_boards_other_objects():
    """With k = 1 and the other three quadrants as the board's other objects, each head hits exactly one of
    the four: its other-object hit rate is (1 - its named hit) / 3, and the gap follows from that."""
    from gazelit.models.routing_accuracy import RoutingAccuracy

    model = tiny_vlm(top_k=1, m=0, region=(2, 2))
    batch = make_batch(model, [[("text", 2), ("image",), ("text", 5)]])
    batch["labels"][0, :20] = -100
    quadrants = [[0, 0, 0.5, 0.5], [0.5, 0, 1, 0.5], [0, 0.5, 0.5, 1], [0.5, 0.5, 1, 1]]
    for named in range(4):
        batch["meta"] = [{"target_box": quadrants[named], "other_boxes": quadrants[:named] + quadrants[named + 1 :]}]
        probe = RoutingAccuracy(top_k=1)
        probe.batch = batch
        with torch.no_grad():
            model(batch, probe=probe)
        m = probe.metrics()
        hits = torch.stack([probe.at_answer.hits[layer] for layer in sorted(probe.at_answer.hits)])
        others = torch.stack([probe.at_answer.other_hits[layer] for layer in sorted(probe.at_answer.other_hits)])
        assert torch.allclose(others, (1 - hits) / 3)
        best = float(hits.max())
        assert abs(m["hit_rate_other_best_head"] - (1 - best) / 3) < 1e-6
        assert abs(m["question_gap_best"] - float((hits - (1 - hits) / 3).max())) < 1e-6
        for layer in range(hits.shape[0]):  # per layer, that layer's best head
            assert abs(m[f"question_gap/layer{layer}"] - float((hits[layer] - (1 - hits[layer]) / 3).max())) < 1e-6
    batch["meta"] = [{"target_box": quadrants[0]}]  # no other_boxes: nothing to compare, no key
    probe = RoutingAccuracy(top_k=1)
    probe.batch = batch
    with torch.no_grad():
        model(batch, probe=probe)
    assert "question_gap_best" not in probe.metrics()


def test_the_question_head_is_the_largest_named_minus_other_gap():
    from gazelit.models.routing_accuracy import RoutingSums

    sums = RoutingSums(paired=4)
    assert RoutingSums().question_head() is None  # no other objects: nothing to compare
    sums.paired_hits = {0: torch.tensor([4.0, 4.0]), 1: torch.tensor([3.0, 2.0])}
    sums.other_hits = {0: torch.tensor([4.0, 3.0]), 1: torch.tensor([0.0, 2.0])}
    layer, head, gap = sums.question_head()
    assert (layer, head) == (1, 0) and gap == 0.75  # not layer 0's heads, which hit every object


def test_fidelity_question_following_compares_each_head_with_itself_and_reports_each_layer():
    """benchmarks/fidelity.py's summary: the best head is chosen by its named-object hits, its other-object
    hits are reported beside them, and each layer's gap is its own best head's."""
    import importlib.util

    script = Path(__file__).resolve().parents[2] / "benchmarks" / "fidelity.py"
    spec = importlib.util.spec_from_file_location("fidelity", script)
    fidelity = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(fidelity)
    named = torch.tensor([[8.0, 2.0], [4.0, 6.0]])  # (layers, heads) hits summed over 10 questions
    other = torch.tensor([[8.0, 0.0], [1.0, 6.0]])
    out = fidelity.question_following(named, other, 10)
    assert out["hit_rate_other_best_head"] == 0.8  # layer 0 head 0: finds every object
    assert out["question_gap_best"] == 0.3  # layer 1 head 0 follows the question
    assert out["question_gap_best_by_layer"] == [0.2, 0.3]
    assert out["question_gap_mean"] == round((0.0 + 0.2 + 0.3 + 0.0) / 4, 4)
    assert fidelity.question_following(None, None, 0)["question_gap_best_by_layer"] is None


def test_routing_at_the_questions_naming_word_is_the_answer_measure_taken_at_that_row():
    """With `target_phrase` and the tokenizer, the probe also measures the query at the phrase's last token
    (its last occurrence before the answer): the same numbers as a probe whose answer starts right after
    that token. Without the tokenizer, or where the phrase is absent, there is no at_name measure."""
    from gazelit.models.routing_accuracy import RoutingAccuracy

    model = tiny_vlm(top_k=1, m=0, region=(2, 2))
    batch = make_batch(model, [[("text", 2), ("image",), ("text", 8)]])  # text rows 18..25
    phrase = model.tokenizer(" red", add_special_tokens=False)["input_ids"]
    batch["input_ids"][0, 0] = phrase[-1]  # an earlier occurrence (before the image): not the one measured
    batch["input_ids"][0, 19 : 19 + len(phrase)] = torch.tensor(phrase)
    name_row = 19 + len(phrase) - 1
    batch["labels"][0, :24] = -100  # answer at 24, predicted by row 23
    quadrants = [[0, 0, 0.5, 0.5], [0.5, 0, 1, 0.5], [0, 0.5, 0.5, 1], [0.5, 0.5, 1, 1]]
    batch["meta"] = [{"target_box": quadrants[1], "other_boxes": [quadrants[0], quadrants[3]], "target_phrase": "red"}]
    probe = RoutingAccuracy(top_k=1, tokenizer=model.tokenizer)
    probe.batch = batch
    with torch.no_grad():
        model(batch, probe=probe)
    assert probe._targets[0].name_row == name_row and probe._targets[0].answer_row == 23
    twin = RoutingAccuracy(top_k=1)  # the answer measure, taken at the phrase's row
    twin_batch = dict(batch, labels=batch["labels"].clone())
    twin_batch["labels"][0, : name_row + 1] = -100
    twin_batch["labels"][0, name_row + 1 :] = batch["input_ids"][0, name_row + 1 :]
    twin.batch = twin_batch
    with torch.no_grad():
        model(twin_batch, probe=twin)
    assert twin._targets[0].answer_row == name_row
    m, expected = probe.metrics(), twin.metrics()
    for key in ("routing_acc", "hit_rate_best_head", "hit_rate_other_best_head", "question_gap_best", "hit_rate_chance"):
        assert m[f"at_name/{key}"] == pytest.approx(expected[key])
    for tokenizer, meta_phrase in ((None, "red"), (model.tokenizer, "blue")):
        batch["meta"][0]["target_phrase"] = meta_phrase
        other = RoutingAccuracy(top_k=1, tokenizer=tokenizer)
        other.batch = batch
        with torch.no_grad():
            model(batch, probe=other)
        keys = other.metrics()
        assert "hit_rate_mean" in keys and not any(k.startswith("at_name/hit") for k in keys)
        assert keys.get("at_name/phrase_not_found") == (1.0 if tokenizer is not None else None)


def test_video_routing_is_measured_in_the_target_frames_unit():
    """A video record's box is in the frame `target_frame` names, mapped through the sampled frame_indices;
    a frame that was not sampled gives no measurement."""
    from gazelit.models.routing_accuracy import RoutingAccuracy

    model = tiny_vlm(top_k=1, m=0, region=(2, 2))
    batch = make_batch(model, [[("text", 2), ("video", 2), ("text", 5)]])
    layout = model.embed(batch)[1]
    units = layout.samples[0].units
    answer = int(layout.samples[0].valid[1]) - 3
    batch["labels"][0, :answer] = -100
    for frame_indices, target_frame, unit in (([0, 4], 4, 1), ([0, 4], 0, 0), (None, 1, 1), ([0, 4], 2, None)):
        batch["meta"] = [{"target_box": [0, 0, 0.5, 0.5], "target_frame": target_frame, "frame_indices": frame_indices}]
        probe = RoutingAccuracy(top_k=1)
        found = probe.prepare(batch, layout)
        if unit is None:
            assert not found
            continue
        start = units[unit].start
        assert probe._targets[0].tokens.tolist() == [start, start + 1, start + 4, start + 5]
