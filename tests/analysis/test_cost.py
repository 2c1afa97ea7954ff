"""Cost analysis: formulas, FlopCounterMode counts on real decode steps, the paper's example, recipes."""

import json

import pytest

from gazelit.analysis import cost
from gazelit.cli import main

from ..builders import model_config, write_recipe


def test_paper_section_3_5_example():
    inp = cost.paper_example()
    assert inp.visual_tokens == 4608 and len(inp.region_sizes()) == 128
    got = {k: cost.attended(inp, k) for k in (4, 8, 16)}
    assert {k: e.visual + e.context for k, e in got.items()} == {4: 176, 8: 320, 16: 608}
    assert {k: e.kv_label for k, e in got.items()} == {4: "144+32", 8: "288+32", 16: "576+32"}
    summary = cost.paper_summary()
    for line in ("176 of 4608 entries = 3.8%", "320 of 4608 entries = 6.9%", "608 of 4608 entries = 13.2%"):
        assert line in summary


def test_region_sizes_keep_edge_tiles_and_group_frames():
    assert cost.VisualInput(1, (5, 5), (2, 2, 1)).region_sizes() == [4, 4, 2, 4, 4, 2, 2, 2, 1]
    video = cost.VisualInput(3, (2, 2), (2, 2, 2), video=True)
    assert video.region_sizes() == [8, 4]  # frames (0, 1) and (2)
    images = cost.VisualInput(3, (2, 2), (2, 2, 2))
    assert images.region_sizes() == [4, 4, 4]  # images never share regions
    e = cost.attended(cost.VisualInput(1, (5, 5), (2, 2, 1), num_context=3, text=10), 2)
    assert (e.text, e.context, e.visual, e.total) == (10, 3, 8, 21)


@pytest.mark.parametrize("dims", [cost.AttentionDims(1, 4, 2, 16), cost.AttentionDims(1, 8, 2, 8),
                                  cost.AttentionDims(1, 3, 3, 32)])
@pytest.mark.parametrize("inp", [
    cost.VisualInput(1, (6, 6), (3, 3, 1), num_context=2, text=9),
    cost.VisualInput(4, (4, 4), (2, 2, 2), num_context=1, text=5, video=True),
])
@pytest.mark.parametrize("k", [1, 3, None])
def test_counted_flops_of_real_decode_steps_match_the_formula(dims, inp, k):
    formula = cost.step_cost(dims, inp, k)
    useful = formula.attention_flops + formula.routing_flops
    assert cost.count_step_flops(dims, inp, k, shared=True) == useful  # one selection per KV head
    per_head = cost.count_step_flops(dims, inp, k)  # each query head selects on its own
    assert useful <= per_head <= formula.attention_flops_per_head + formula.routing_flops
    if dims.group == 1 or k is None:
        assert per_head == useful  # nothing to take the union of
    dense = cost.step_cost(dims, inp, None, dense=True)
    assert cost.count_step_flops(dims, inp, None, dense=True) == dense.attention_flops
    assert dense.attention_flops == 4 * dims.heads * dims.head_dim * (inp.text + inp.visual_tokens)


def test_bytes_shared_versus_per_head_selection_under_gqa():
    inp = cost.VisualInput(1, (24, 24), (6, 6, 1), num_context=4, text=64)
    gqa = cost.AttentionDims(36, 32, 8, 128)
    row = 2 * 8 * 128 * 2  # K and V rows of 8 KV heads in bf16
    c = cost.step_cost(gqa, inp, 2)
    assert c.kv_bytes == row * (64 + 4 + 72)
    assert c.kv_bytes_per_head == row * (64 + 4 + 8 * 36)  # 4 heads x 2 regions each, all distinct at worst
    assert c.descriptor_bytes == 8 * 16 * 128 * 4
    mha = cost.step_cost(cost.AttentionDims(2, 4, 4, 16), inp, 2)
    assert mha.kv_bytes == mha.kv_bytes_per_head  # one query head per KV head: nothing to union
    capped = cost.step_cost(gqa, inp, 8)
    assert capped.kv_bytes_per_head == row * (64 + 4 + 576)  # the union is capped by the 16 regions


def test_recipe_shapes_without_building(tmp_path):
    config = model_config(projector="conv_mlp2x_gelu", pool=1)
    assert cost.visual_grid(config) == (2, 2)  # 32 px / 8 px patches = 4x4, halved by the conv projector
    assert cost.visual_grid(model_config(pool=2)) == (2, 2)
    assert cost.visual_grid(config, grid=(27, 27)) == (14, 14)
    dims = cost.llm_dims(config)
    assert (dims.layers, dims.heads, dims.kv_heads, dims.head_dim) == (2, 4, 2, 16)
    (tmp_path / "llm.json").write_text(json.dumps({"text_config": {
        "num_hidden_layers": 28, "num_attention_heads": 28, "num_key_value_heads": 4, "hidden_size": 3584}}))
    assert cost.llm_dims(config, tmp_path / "llm.json").head_dim == 128
    hub = model_config()
    hub.llm.config, hub.llm.pretrained = None, "Qwen/Qwen3-4B"
    assert cost.llm_dims(hub).kv_heads == 8
    hub.llm.pretrained = "someone/unknown-llm"
    with pytest.raises(ValueError, match="--llm-config"):
        cost.llm_dims(hub)
    hub.vision.config, hub.vision.pretrained = None, "google/siglip2-so400m-patch16-384"
    assert cost.visual_grid(hub) == (24, 24)
    gaze, dense = model_config(top_k=4, region=(6, 6), m=4), model_config(enabled=False)
    assert cost.kv_label(gaze, (24, 24), 4) == "144+4"
    assert cost.kv_label(gaze, (24, 24), 4, units=8, video=True) == "144+32"
    assert cost.kv_label(dense, (24, 24), None) == "576"


def test_cost_command_prints_recipe_and_paper_tables(tmp_path, capsys):
    recipe = write_recipe(tmp_path, top_k=2)
    main(["cost", str(recipe), "--paper", "--text", "8", "--json", str(tmp_path / "cost.json")])
    out = capsys.readouterr().out
    assert "3.8% of dense" in out and "13.2% of dense" in out
    assert "image: 1 image x 4x4 = 16 visual tokens" in out and "video of 4 frames" in out
    data = json.loads((tmp_path / "cost.json").read_text())
    image_rows = data["recipe"]["inputs"][0]["rows"]
    assert [r["name"] for r in image_rows] == ["dense", "gaze k=2"]
    for r in image_rows:  # counted on a real step: between the formula and its per-head worst case
        routing = r["routing_flops_per_layer"]
        assert r["attention_flops_per_layer"] + routing <= r["counted_flops_per_layer"]
        assert r["counted_flops_per_layer"] <= r["attention_flops_per_layer_per_head_selection"] + routing
    assert image_rows[1]["kv_size"] == "8+2"
