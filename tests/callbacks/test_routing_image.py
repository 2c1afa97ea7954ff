"""The routing picture: the prompt cut from a training batch, and the drawing of a routing trace."""

from __future__ import annotations

import textwrap

import numpy as np
import torch

from gazelit.callbacks.routing_image import PANEL, draw_routing, prompt_of, selection_counts, to_rgb
from gazelit.attention.layout import CONTEXT, PAD, TEXT, VISUAL
from gazelit.models.gaze_vlm import RoutingTrace


def batch_of_two() -> dict:
    """Sample 0: 3 text, 4 visual (2x2 grid), 1 context, 2 text, a 2-token answer, then a second turn (2 text,
    1 answer token); sample 1 shorter."""
    kinds = [TEXT] * 3 + [VISUAL] * 4 + [CONTEXT] + [TEXT] * 2 + [TEXT] * 2 + [TEXT] * 3
    labels = [-100] * 10 + [7, 8] + [-100, -100, 9]
    return {
        "input_ids": torch.arange(15).repeat(2, 1),
        "attention_mask": torch.tensor([[1] * 15, [1] * 11 + [0] * 4]),
        "labels": torch.tensor([labels, [-100] * 10 + [9] + [-100] * 4]),
        "token_kind": torch.tensor([kinds, kinds[:11] + [PAD] * 4]),
        "pixel_values": torch.stack([torch.zeros(3, 8, 8), torch.ones(3, 8, 8)]),
        "unit_sample": torch.tensor([0, 1]),
        "unit_start": torch.tensor([3, 3]),
        "unit_grid": torch.tensor([[2, 2], [2, 2]]),
        "unit_video": torch.tensor([-1, -1]),
        "unit_time": torch.tensor([0, 0]),
        "num_context": 1,
        "meta": [{"id": "a", "target_box": [0.5, 0.0, 1.0, 0.5]}, {"id": "b"}],
    }


def test_prompt_is_the_sample_cut_before_its_first_supervised_token():
    prompt, meta = prompt_of(batch_of_two(), 0)
    assert prompt["input_ids"].tolist() == [list(range(10))]
    assert prompt["token_kind"].shape == (1, 10) and (prompt["labels"] == -100).all()
    assert prompt["pixel_values"].shape == (1, 3, 8, 8) and prompt["pixel_values"].sum() == 0  # sample 0's unit only
    assert prompt["unit_sample"].tolist() == [0] and prompt["unit_start"].tolist() == [3]
    assert meta["id"] == "a" and meta["expected"].tolist() == [7, 8]
    other, _ = prompt_of(batch_of_two(), 1)
    assert other["pixel_values"].sum() > 0 and other["unit_sample"].tolist() == [0]


def trace(region_shape=(1, 1, 1)) -> RoutingTrace:
    # 2 generated tokens, 2 layers, 2 heads, k = 1 on a 2x2 grid of 1x1 regions (tiles 0..3)
    tile = torch.tensor([[[[3], [3]], [[3], [1]]], [[[0], [0]], [[0], [0]]]])
    unit = torch.zeros_like(tile)
    unit[1, 1, 1, 0] = -1  # one head selected nothing
    return RoutingTrace(region=tile.clone(), score=tile.float(), unit=unit, tile=tile, unit_grids=[(2, 2)],
                        region_shape=region_shape, tokens=["red", "<|im_end|>"])  # fmt: skip


def test_selection_counts_tally_layer_head_pairs_per_token():
    counts = selection_counts(trace())
    assert counts == {(0, 0, 3): 3, (0, 0, 1): 1, (1, 0, 0): 3}


def test_drawing_outlines_selected_tiles_by_share_and_keeps_the_image_visible():
    image = np.full((8, 8, 3), 235, dtype=np.uint8)
    long_title = "question: What shape is the red object in the second row of the board? " * 3
    picture = np.asarray(draw_routing([image], trace(), target_box=[0.0, 0.0, 0.5, 0.5], title=long_title))
    side = PANEL  # two tokens: the largest panels
    lines = len(textwrap.wrap(long_title, (2 * side) // 6))
    header = 4 + 12 * lines
    assert lines > 1  # the header wraps instead of running off the canvas
    assert picture.shape == (header + side + 14, 2 * side, 3)

    def centre(token, tile_row, tile_col):
        return picture[header + tile_row * side // 2 + side // 4, token * side + tile_col * side // 2 + side // 4]

    def edge(token, tile_row, tile_col):  # a point on the tile's left outline
        return picture[header + tile_row * side // 2 + side // 4, token * side + tile_col * side // 2 + 1]

    assert edge(0, 1, 1)[0] > edge(0, 1, 1)[1] + 100  # token 0: bottom-right chosen: a red outline
    assert 150 < centre(0, 1, 1)[1] < 235 and centre(0, 1, 1)[0] >= 200  # its inside keeps the image, faintly tinted
    assert centre(0, 1, 1)[1] < centre(0, 0, 1)[1]  # chosen by 3 of 4 pairs: tinted more than by 1 of 4
    assert tuple(centre(0, 1, 0)) == (235, 235, 235)  # never selected: untouched
    assert tuple(centre(1, 1, 1)) == (235, 235, 235)  # token 1 looked top-left only
    assert edge(1, 0, 0)[0] > edge(1, 0, 0)[1] + 100
    assert tuple(picture[header + 1, 1]) == (0, 200, 0)  # the target box outline, top-left corner


def test_the_question_head_is_outlined_in_blue_where_it_looked():
    """trace(): layer 1 head 1 selected tile 1 (top-right) for token 0 and nothing for token 1."""
    from callbacks.routing_image import BLUE, head_tiles

    t = trace()
    assert head_tiles(t, (1, 1), 0, 0) == [1] and head_tiles(t, (1, 1), 1, 0) == []
    assert head_tiles(t, None, 0, 0) == [] and head_tiles(t, (5, 0), 0, 0) == []  # no such layer: nothing
    image = np.full((8, 8, 3), 235, dtype=np.uint8)
    plain = np.asarray(draw_routing([image], t))
    marked = np.asarray(draw_routing([image], t, head=(1, 1)))
    blue = (marked == np.array(BLUE, dtype=np.uint8)).all(axis=-1)
    side = PANEL
    header = marked.shape[0] - side - 14
    rows, cols = np.nonzero(blue)
    assert blue.any() and not (plain == np.array(BLUE, dtype=np.uint8)).all(axis=-1).any()
    assert cols.min() >= side // 2 and cols.max() < side  # token 0's panel, right half: tile 1
    assert rows.min() >= header and rows.max() < header + side // 2  # top half


def test_caption_words_stay_apart_and_any_text_draws():
    """Each space of a header line is a blank gap as wide as a letter (Pillow's small FreeType default
    drew 2-pixel spaces: "Whatshape is ..."), and text outside the font's range draws as '?'."""
    image = np.full((8, 8, 3), 235, dtype=np.uint8)
    question = "What shape is the green object?"
    picture = np.asarray(draw_routing([image], trace(), title=[question, "形状は? \ufffd"]))
    ink = (picture[2:14] < 128).any(axis=(0, 2))  # the first header line's columns with dark pixels
    columns = np.flatnonzero(ink)
    blank_runs, run = [], 0
    for has_ink in ink[columns[0] : columns[-1] + 1]:
        run = 0 if has_ink else run + 1
        if run == 5:  # a gap of 5+ blank columns (letters of the label font leave at most 2)
            blank_runs.append(run)
    assert len(blank_runs) == question.count(" ")


def test_pixels_are_denormalised_with_the_transform_mean_and_std():
    class Transform:
        mean, std = np.array([0.5] * 3), np.array([0.5] * 3)

    pixels = torch.full((3, 2, 2), -1.0)  # normalised black
    assert (to_rgb(pixels, Transform()) == 0).all()
    assert (to_rgb(torch.ones(3, 2, 2), Transform()) == 255).all()


def test_the_phrase_panel_comes_first_and_the_generated_steps_follow_unchanged():
    """prepend_step: step 0 is the phrase query's selection (k padded to the longer), labelled; the generated
    tokens' steps, labels and look positions follow, shifted by one."""
    import dataclasses

    from gazelit.callbacks.routing_image import prepend_step
    from gazelit.models.gaze_vlm import GeneratedLook

    rest = dataclasses.replace(trace(), looks=[GeneratedLook(0, (0, 0, 1, 1), 0, 1)])
    first = RoutingTrace(region=torch.tensor([[[[2, 1], [0, -1]]] * 2]), score=torch.ones(1, 2, 2, 2),
                         unit=torch.zeros(1, 2, 2, 2, dtype=torch.long), tile=torch.tensor([[[[2, 1], [0, -1]]] * 2]),
                         unit_grids=[(2, 2)], region_shape=(1, 1, 1))  # fmt: skip
    joined = prepend_step(first, rest, "@red")
    assert joined.tokens == ["@red", "red", "<|im_end|>"]
    assert joined.tile.shape == (3, 2, 2, 2) and torch.equal(joined.tile[0], first.tile[0])
    assert torch.equal(joined.tile[1:, ..., :1], rest.tile) and (joined.tile[1:, ..., 1] == -1).all()
    assert (joined.looks[0].start, joined.looks[0].end) == (1, 2) and (rest.looks[0].start, rest.looks[0].end) == (0, 1)
    counts = selection_counts(joined)
    assert counts[(0, 0, 2)] == 2 and counts[(0, 0, 0)] == 2 and counts[(1, 0, 3)] == 3
    picture = draw_routing([np.zeros((8, 8, 3), np.uint8)], joined, [0.5, 0.5, 1.0, 1.0], ["question: q"])
    assert picture.size[0] == 3 * PANEL


def test_trace_at_phrase_finds_the_phrase_in_the_prompt_or_gives_none():
    from gazelit.callbacks.routing_image import trace_at_phrase

    from ..batches import make_batch
    from ..builders import tiny_vlm

    model = tiny_vlm(top_k=1)
    prompt = make_batch(model, [[("text", 2), ("image",), ("text", 6)]])
    phrase = model.tokenizer(" red", add_special_tokens=False)["input_ids"]
    end = prompt["input_ids"].shape[1] - 2
    prompt["input_ids"][0, end - len(phrase) + 1 : end + 1] = torch.tensor(phrase)
    found = trace_at_phrase(model, prompt, "red")
    assert found is not None and torch.equal(found.region, model.trace_row(prompt, end).region)
    assert trace_at_phrase(model, prompt, None) is None and trace_at_phrase(model, prompt, "zzzqqq") is None
