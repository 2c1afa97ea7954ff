"""Gaze heads: the correlation score on synthetic maps, and a head constructed (by setting weights) to
track the described panel, which the analysis must rank first through the real model forward."""

import copy

import numpy as np
import pytest
import torch

from gazelit.analysis.comic_strips import PROMPT, generate_strips, load_strips, make_strip
from gazelit.analysis.gaze_heads import correlation_scores, find_gaze_heads, heatmap_png, panel_of_tokens
from gazelit.cli import main
from gazelit.schema import GazeSpec, LLMSpec, ModelConfig, ProjectorSpec, VisionSpec
from gazelit.models.gaze_vlm import GazeVLM
from gazelit.models.tiny import TINY_LLM, TINY_VISION
from gazelit.tokenizer import build_tiny_tokenizer

from gazelit.datamodules.demo_data import COLOURS

from ..builders import tiny_vlm

LAYER, HEAD = 0, 3  # the head made to track the described panel (KV head 1 of 2)


def test_correlation_score_on_synthetic_maps():
    labels = torch.tensor([0, 1, 2, 3])
    tracking = torch.eye(4) * 0.8 + 0.05  # most mass on the described panel
    wrong = torch.roll(torch.eye(4), 1, dims=1)  # all mass on another panel
    flat = torch.full((4, 4), 0.25)
    attention = torch.stack([tracking, wrong, flat])  # (3 "heads", 4 tokens, 4 panels)
    scores = correlation_scores(attention, labels)
    assert scores[0] == pytest.approx(1.0)
    assert scores[1] == pytest.approx(-1 / 3)  # corr(e_i, e_j) for i != j over 4 panels
    assert scores[2] == 0.0  # no preference: no correlation
    half = torch.cat([torch.eye(4)[:2], wrong[2:]])  # tracks on two tokens, wrong on two
    assert correlation_scores(half, labels) == pytest.approx((1 + 1 - 1 / 3 - 1 / 3) / 4)


def test_tokens_map_to_panels_in_the_padded_frame():
    panels = [[0.0, 0.0, 0.5, 1.0], [0.5, 0.0, 1.0, 1.0]]
    square = panel_of_tokens((2, 4), panels, (64, 64), pad_to_square=True)
    assert square.tolist() == [0, 0, 1, 1, 0, 0, 1, 1]
    # a 64 x 32 strip is padded to 64 x 64: its rows of tokens in the padding belong to no panel
    wide = panel_of_tokens((4, 2), panels, (64, 32), pad_to_square=True)
    assert wide.tolist() == [-1, -1, 0, 1, 0, 1, -1, -1]


def _constructed_model(strips, tokenizer):
    """siglip + llama tiny VLM whose visual tokens carry their patch's mean colour and whose layer-0 head 3
    matches the colour word being read against the patch colours (q from the word, k from the patch)."""
    torch.manual_seed(0)
    config = ModelConfig(vision=VisionSpec("siglip", config=copy.deepcopy(TINY_VISION["siglip"])),
                         projector=ProjectorSpec("mlp2x_gelu"), llm=LLMSpec(config=copy.deepcopy(TINY_LLM["llama"])),
                         gaze=GazeSpec(enabled=True, top_k=2, region=[2, 2], num_context=2))
    model = GazeVLM.build(config, tokenizer=tokenizer).eval()
    word, patch = 56, 60  # residual dims holding a colour word's colour / a visual token's colour
    slots = [5, 6, 7]  # low-frequency RoPE dims: rotation by position barely changes q . k
    with torch.no_grad():
        emb = model.vision.model.embeddings  # patch features = mean RGB of the patch, nothing else
        emb.patch_embedding.weight.zero_()
        emb.patch_embedding.bias.zero_()
        for c in range(3):
            emb.patch_embedding.weight[c, c] = 1 / 64
        emb.position_embedding.weight.zero_()
        block = model.vision.model.encoder.layers[0]
        for linear in (block.self_attn.out_proj, block.mlp.fc2):  # the block passes its input through
            linear.weight.zero_()
            linear.bias.zero_()
        first, second = model.projector.mlp[0], model.projector.mlp[2]  # ~identity into dims 60..62
        for linear in (first, second):
            linear.weight.zero_()
            linear.bias.zero_()
        for c in range(3):
            first.weight[c, c], first.bias[c] = 1.0, 10.0  # GELU is linear around 10
            second.weight[patch + c, c], second.bias[patch + c] = 1.0, -10.0
        table = model.llm.get_input_embeddings().weight
        table[:, word : word + 3] = 0
        table[:, patch : patch + 3] = 0  # no text or context token looks like a patch
        model.context_tokens[:, patch : patch + 3] = 0
        for strip in strips:
            enc = tokenizer(strip.description, add_special_tokens=False, return_offsets_mapping=True)
            for token, (a, b) in zip(enc["input_ids"], enc["offset_mapping"]):
                panel = strip.panel_of_span(a, b)
                if panel is not None:
                    name = strip.description[strip.spans[panel][0] : strip.spans[panel][1]]
                    table[token] = 0
                    table[token, word : word + 3] = torch.tensor([(v / 255 - 0.5) / 0.5 for v in COLOURS[name]])
        attention = model.llm.model.layers[LAYER].self_attn
        d, kv = 16, HEAD // 2
        attention.q_proj.weight[HEAD * d : (HEAD + 1) * d] = 0
        attention.k_proj.weight[kv * d : (kv + 1) * d] = 0
        for c, slot in enumerate(slots):
            attention.q_proj.weight[HEAD * d + slot, word + c] = 3.0
            attention.k_proj.weight[kv * d + slot, patch + c] = 1.0
    return model


@pytest.fixture(scope="module")
def constructed(tmp_path_factory):
    folder = tmp_path_factory.mktemp("strips")
    path = generate_strips(folder, count=4, panels=4, size=128, seed=1, solid=True, phrase="{colour}")
    strips = load_strips(path)
    corpus = [PROMPT, "You are a helpful assistant.", " ".join(COLOURS)] + [s.description for s in strips]
    tokenizer = build_tiny_tokenizer(corpus * 3, vocab_size=400)
    return _constructed_model(strips, tokenizer), strips, path


def test_the_constructed_head_is_found_first(constructed):
    model, strips, _ = constructed
    result = find_gaze_heads(model, strips)
    assert result.tokens == 16 and result.strips == 4  # 4 colour words per strip
    (layer, head, score), (_, _, runner_up) = result.top(2)
    assert (layer, head) == (LAYER, HEAD)
    assert score > 0.95 and runner_up < 0.6
    # control: the query *before* each colour word does not know the colour, so the head cannot track
    shifted = find_gaze_heads(model, strips, offset=1)
    assert shifted.scores[LAYER, HEAD] < 0.5


def test_a_random_model_has_no_such_head(tmp_path):
    strips = [make_strip(np.random.default_rng(i), panels=3) for i in range(2)]
    result = find_gaze_heads(tiny_vlm(), strips)
    assert result.scores.shape == (2, 4) and result.scores.max() < 0.9
    png = heatmap_png(result.scores, tmp_path / "h.png")
    assert png.stat().st_size > 0
    with pytest.raises(ValueError, match="gaze-enabled"):
        find_gaze_heads(tiny_vlm(enabled=False), strips)


def test_analyze_command_end_to_end(constructed, tmp_path, capsys):
    model, _, data = constructed
    model.save_pretrained(tmp_path / "model")
    main(["analyze", "gaze-heads", str(tmp_path / "model"), "--data", str(data), "--top", "3",
          "--out", str(tmp_path / "out")])
    lines = capsys.readouterr().out.splitlines()
    rank1 = lines[lines.index(next(l for l in lines if l.strip().startswith("rank"))) + 1].split()
    assert rank1[:3] == ["1", str(LAYER), str(HEAD)] and float(rank1[3]) > 0.95
    assert (tmp_path / "out" / "gaze_heads.png").is_file() and (tmp_path / "out" / "gaze_heads.json").is_file()
    main(["analyze", "comic-strips", "--out", str(tmp_path / "strips"), "--count", "2", "--size", "64"])
    assert len(load_strips(tmp_path / "strips" / "strips.jsonl")) == 2


def test_the_heatmap_keeps_its_title_and_legend_inside_the_image(tmp_path):
    import numpy as np
    from PIL import Image, ImageDraw, ImageFont

    from gazelit.analysis.gaze_heads import heatmap_png

    title = "gaze-head score (mean correlation)"
    picture = Image.open(heatmap_png(torch.randn(2, 3) * 0.3, tmp_path / "h.png", title=title))
    width = ImageDraw.Draw(Image.new("RGB", (1, 1))).textlength(title, font=ImageFont.load_default())
    assert picture.width >= width + 4
    pixels = np.asarray(picture.convert("L"))
    assert (pixels[-14:] < 100).any()  # the legend's last line is drawn inside the image
    assert (pixels[:, -6:] > 250).all()  # a white margin on the right: nothing cut off there
