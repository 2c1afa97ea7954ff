"""Dense attention maps from the probe hook equal the attention weights of the equivalent dense model."""

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
        rows[close] = probe._targets[0][1]
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
        hits = torch.stack([probe.hits[layer] for layer in sorted(probe.hits)])
        others = torch.stack([probe.other_hits[layer] for layer in sorted(probe.other_hits)])
        assert torch.allclose(others, (1 - hits) / 3)
        best = float(hits.max())
        assert abs(m["hit_rate_other_best_head"] - (1 - best) / 3) < 1e-6
        assert abs(m["question_gap_best"] - float((hits - (1 - hits) / 3).max())) < 1e-6
    batch["meta"] = [{"target_box": quadrants[0]}]  # no other_boxes: nothing to compare, no key
    probe = RoutingAccuracy(top_k=1)
    probe.batch = batch
    with torch.no_grad():
        model(batch, probe=probe)
    assert "question_gap_best" not in probe.metrics()
