"""GazeVLM: every encoder x LLM family, splicing, conv compression, batches, generation, save/load, errors."""


import pytest
import torch

from gazelit.attention import CONTEXT, VISUAL
from gazelit.schema import GazeSpec, LLMSpec, ModelConfig, VisionSpec
from gazelit.models.gaze_vlm import GazeVLM
from gazelit.models.tiny import TINY_LLM, TINY_VISION

from ..batches import make_batch
from ..builders import MIXED, TOKENIZER, tiny_vlm


@pytest.mark.parametrize("vision", sorted(TINY_VISION))
@pytest.mark.parametrize("llm", sorted(TINY_LLM))
def test_every_encoder_with_every_llm_trains_and_generates(vision, llm):
    model = tiny_vlm(vision=vision, llm=llm)
    batch = make_batch(model, MIXED)
    out, ctx = model(batch, collect_stats=True)
    assert torch.isfinite(out.loss)
    out.loss.backward()
    assert model.context_tokens.grad.abs().sum() > 0
    assert all(p.grad is not None for p in model.projector.parameters())
    assert all(p.grad is None for p in model.vision.parameters())  # frozen by default
    assert 0 < ctx.attended_visual_fraction() < 1
    model.eval()
    prompt = make_batch(model, [[("text", 2), ("image",), ("text", 3)]], padding="left")
    gen = model.generate_from_batch(prompt, max_new_tokens=4)[0]
    layers, heads = model.llm.config.num_hidden_layers, model.llm.config.num_attention_heads
    assert 1 <= len(gen.token_ids) <= 4
    assert gen.trace.region.shape == (len(gen.token_ids), layers, heads, 2)
    assert ((gen.trace.unit == 0) | (gen.trace.region < 0)).all()  # one image: every region is in unit 0


def test_visual_and_context_tokens_are_spliced_where_token_kind_says():
    model = tiny_vlm()
    batch = make_batch(model, MIXED)
    embeds, layout = model.embed(batch)
    tokens = model.encode_units(batch["pixel_values"])  # (N, 16, D)
    n = model.visual_grid[0] * model.visual_grid[1]
    for j, (s, start) in enumerate(zip(batch["unit_sample"].tolist(), batch["unit_start"].tolist())):
        assert torch.equal(embeds[s, start : start + n], tokens[j])
        assert torch.equal(embeds[s, start + n : start + n + 2], model.context_tokens)
    text = batch["token_kind"] == 0
    assert torch.equal(embeds[text], model.llm.get_input_embeddings()(batch["input_ids"])[text])
    assert layout.num_regions == 4 * 3  # 4x4 grid in 2x2 regions, at most 3 units per sample


def test_conv_compression_halves_the_grid_and_the_layout_follows():
    model = tiny_vlm(projector="conv_mlp2x_gelu", image_size=48, region=(2, 2))  # 6x6 -> 3x3
    assert model.vision.token_grid() == (6, 6) and model.visual_grid == (3, 3)
    batch = make_batch(model, [[("text", 2), ("image",), ("text", 3)]])
    assert int((batch["token_kind"] == VISUAL).sum()) == 9
    _, layout = model.embed(batch)
    assert layout.num_regions == 4  # 3x3 grid in 2x2 tiles: edge tiles smaller, none dropped
    assert (layout.region_tokens[0] >= 0).sum(-1).tolist() == [4, 2, 2, 1]
    model(batch).loss.backward()


def test_token_matched_dense_baseline_pools_the_grid():
    model = tiny_vlm(enabled=False, pool=2)
    assert model.visual_grid == (2, 2) and model.num_context == 0  # dense baseline: no context tokens
    batch = make_batch(model, [[("text", 2), ("image",), ("text", 3)]])
    full = tiny_vlm(enabled=False, pool=1)
    full.load_state_dict(model.state_dict())
    unpooled = full.encode_units(batch["pixel_values"]).view(1, 4, 4, -1)
    pooled = model.encode_units(batch["pixel_values"]).view(1, 2, 2, -1)
    assert torch.allclose(pooled[0, 0, 0], unpooled[0, :2, :2].mean((0, 1)), atol=1e-6)
    assert torch.isfinite(model(batch).loss)


def test_greedy_generation_at_k_all_without_context_equals_the_dense_model():
    gaze = tiny_vlm(top_k="all", m=0).eval()
    dense = tiny_vlm(enabled=False, m=0).eval()
    dense.load_state_dict(gaze.state_dict())
    prompt = make_batch(gaze, [[("text", 3), ("image",), ("text", 4)], [("text", 2), ("video", 2), ("text", 2)]],
                        padding="left")
    a = gaze.generate_from_batch(prompt, max_new_tokens=8)
    b = dense.generate_from_batch(prompt, max_new_tokens=8)
    assert [o.token_ids for o in a] == [o.token_ids for o in b]
    with torch.no_grad():
        full = make_batch(gaze, MIXED)
        assert (gaze(full).logits - dense(full).logits)[full["attention_mask"].bool()].abs().max() < 1e-5


def test_save_and_load_restore_identical_logits(tmp_path):
    model = tiny_vlm(vision="clip", llm="llama", projector="conv_mlp2x_gelu", top_k=1).eval()
    with torch.no_grad():
        model.context_tokens.add_(1.0)  # not the init values
    model.top_k = 3
    model.save_pretrained(tmp_path)
    assert {"gazelit_config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in tmp_path.iterdir()}
    loaded = GazeVLM.from_pretrained(tmp_path).eval()
    assert loaded.top_k == 3
    batch = make_batch(model, MIXED)
    with torch.no_grad():
        assert torch.equal(model(batch).logits, loaded(batch).logits)
    assert loaded.tokenizer("red circle")["input_ids"] == model.tokenizer("red circle")["input_ids"]


def test_bad_inputs_name_what_is_wrong():
    model = tiny_vlm()
    batch = make_batch(model, [[("text", 2), ("image",), ("text", 3)]])
    with pytest.raises(ValueError, match=r"unit 0 has grid \(2, 8\) in the batch but the model produces \(4, 4\)"):
        model(dict(batch, unit_grid=torch.tensor([[2, 8]])))  # same token count, wrong shape
    with pytest.raises(ValueError, match=r"sample 0 position \d+: token_kind says visual .* implies context"):
        model(dict(batch, unit_grid=torch.tensor([[3, 4]])))  # fewer tokens than the sequence holds
    missing_image = dict(batch, pixel_values=torch.zeros(0, 3, 32, 32), unit_sample=torch.zeros(0, dtype=torch.long),
                         unit_start=torch.zeros(0, dtype=torch.long), unit_grid=torch.zeros(0, 2, dtype=torch.long),
                         unit_video=torch.zeros(0, dtype=torch.long), unit_time=torch.zeros(0, dtype=torch.long))
    with pytest.raises(ValueError, match="token_kind says visual"):
        model(missing_image)
    with pytest.raises(ValueError, match="context tokens per unit"):
        model(dict(batch, num_context=4))
    with pytest.raises(ValueError, match="unknown vision family 'siglp'"):
        GazeVLM.build(ModelConfig(vision=VisionSpec("siglp", config={}), llm=LLMSpec(config=TINY_LLM["qwen3"])),
                      tokenizer=TOKENIZER)
    with pytest.raises(ValueError, match="top_k"):
        ModelConfig(vision=VisionSpec(config={}), llm=LLMSpec(config={}), gaze=GazeSpec(top_k="some")).validate()
    kinds = batch["token_kind"].clone()
    kinds[0, kinds[0] == CONTEXT] = 0
    with pytest.raises(ValueError, match="token_kind says text"):
        model(dict(batch, token_kind=kinds))


def test_the_exported_llm_loads_in_transformers_with_the_same_logits(tmp_path):
    import stat

    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    model = tiny_vlm(top_k=2)
    with torch.no_grad():
        for p in model.llm.parameters():
            p.add_(torch.randn_like(p) * 0.01)  # weights unlike a fresh init
    model.save_pretrained(tmp_path / "export")
    llm_dir = tmp_path / "export" / "llm"
    assert AutoConfig.from_pretrained(llm_dir).model_type == "qwen3"
    served = AutoModelForCausalLM.from_pretrained(llm_dir).eval()
    ids = torch.randint(3, 200, (2, 17), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(served(input_ids=ids).logits, model.llm(input_ids=ids).logits, atol=1e-5)
    assert AutoTokenizer.from_pretrained(llm_dir)("what colour").input_ids == model.tokenizer("what colour").input_ids
    for path in (tmp_path / "export").rglob("*"):
        if path.is_file():
            assert stat.S_IMODE(path.stat().st_mode) & 0o044 == 0o044, path  # group and others may read
    again = GazeVLM.from_pretrained(tmp_path / "export")
    for (name, a), b in zip(model.state_dict().items(), again.state_dict().values()):
        assert torch.equal(a, b), name


def test_a_model_on_patch_embedding_features_saves_and_loads(tmp_path):
    """feature_layer 0 keeps no vision block; the saved tower (0 layers) must load and give the same logits."""
    model = tiny_vlm(feature_layer=0)
    model.save_pretrained(tmp_path / "m")
    loaded = GazeVLM.from_pretrained(tmp_path / "m").eval()
    assert len(type(loaded.vision)._block_list(loaded.vision.model)) == 0
    batch = make_batch(model, MIXED, seed=2)
    assert torch.equal(loaded(batch).logits, model(batch).logits)


def test_trace_row_at_the_last_prompt_row_is_the_first_generated_tokens_selection():
    """trace_row runs a full forward and routes one query row as the attention does; at the prompt's last
    row that is exactly the selection generation traces for its first token. Rows that route nothing (a
    visual row, a text row before every unit) give None."""
    model = tiny_vlm(top_k=2)
    for spec in ([[("text", 2), ("image",), ("text", 3)]], [[("text", 1), ("image",), ("text", 2), ("image",), ("text", 3)]]):
        prompt = make_batch(model, spec)
        first = model.generate_from_batch(prompt, max_new_tokens=1)[0].trace
        last = prompt["input_ids"].shape[1] - 1
        row = model.trace_row(prompt, last)
        assert row.region.shape == (1, *first.region.shape[1:])
        assert torch.equal(row.region[0], first.region[0]) and torch.equal(row.tile[0], first.tile[0])
        assert torch.equal(row.unit[0], first.unit[0])
    assert model.trace_row(prompt, 0) is None  # text before the first unit: no candidate region
    assert model.trace_row(prompt, 3) is None  # a visual token's row
