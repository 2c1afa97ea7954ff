"""Vision encoders: features, token grids, prefix tokens, preprocessing, freezing, loading by path."""

from __future__ import annotations

import copy
import pickle

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import (
    CLIPConfig,
    CLIPModel,
    Dinov2Model,
    Dinov2WithRegistersModel,
    Siglip2VisionConfig,
    SiglipConfig,
    SiglipModel,
)
from transformers.models.clip.modeling_clip import CLIPEncoderLayer
from transformers.models.dinov2.modeling_dinov2 import Dinov2Layer
from transformers.models.dinov2_with_registers.modeling_dinov2_with_registers import Dinov2WithRegistersLayer
from transformers.models.siglip.modeling_siglip import SiglipEncoderLayer

from gazelit.models.vision import VISION_FAMILIES, build_vision_encoder, vision_family
from gazelit.models.tiny import TINY_DINOV2_REGISTERS, TINY_VISION

# case -> (family, tiny config, prefix tokens in the HF sequence, block class)
CASES = {
    "siglip2": ("siglip2", TINY_VISION["siglip2"], 0, SiglipEncoderLayer),
    "siglip": ("siglip", TINY_VISION["siglip"], 0, SiglipEncoderLayer),
    "clip": ("clip", TINY_VISION["clip"], 1, CLIPEncoderLayer),
    "dinov2": ("dinov2", TINY_VISION["dinov2"], 1, Dinov2Layer),
    "dinov2_registers": ("dinov2", TINY_DINOV2_REGISTERS, 1 + 4, Dinov2WithRegistersLayer),
}
STANDARD_MEAN = {
    "siglip2": (0.5, 0.5, 0.5),
    "siglip": (0.5, 0.5, 0.5),
    "clip": (0.48145466, 0.4578275, 0.40821073),
    "dinov2": (0.485, 0.456, 0.406),
}
GRID = 4  # tiny configs: 32 px / 8 px patches
WIDTH = 32
cases = pytest.mark.parametrize("case", list(CASES))


def hf_model(case: str, seed: int = 0) -> nn.Module:
    """A randomly initialised transformers vision model of the case's family, in eval mode."""
    family, config, _, _ = CASES[case]
    cls = vision_family(family)
    hf_config = cls.config_from_mapping(config)
    torch.manual_seed(seed)
    return cls.model_class(hf_config)(hf_config).eval()


def hf_features(model: nn.Module, case: str, pixels: torch.Tensor, layer: int) -> torch.Tensor:
    """transformers' own hidden_states[layer] without prefix tokens: what the wrapper must return."""
    family, _, prefix, _ = CASES[case]
    kwargs = {} if family == "dinov2" else {"interpolate_pos_encoding": True}
    with torch.no_grad():
        hidden = model(pixels, output_hidden_states=True, **kwargs).hidden_states[layer]
    rows = pixels.shape[-2] // 8
    cols = pixels.shape[-1] // 8
    assert hidden.shape[1] == prefix + rows * cols  # the reference really has that many prefix tokens
    return hidden[:, prefix:]


def wrap(case: str, model: nn.Module, feature_layer: int = -2, trainable: bool = False):
    family = CASES[case][0]
    cls = vision_family(family)
    return cls(copy.deepcopy(model), cls.default_processor(32), feature_layer=feature_layer, trainable=trainable)


def pixels(n: int = 2, size: int = 32, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


@cases
@pytest.mark.parametrize("feature_layer", [-2, -1, 1])
def test_build_from_config_shapes(case, feature_layer):
    family, config, _, _ = CASES[case]
    enc = build_vision_encoder(family, config=config, feature_layer=feature_layer)
    assert (enc.family, enc.hidden_size, enc.image_size, enc.patch_size) == (family, WIDTH, 32, 8)
    assert enc.token_grid() == (GRID, GRID)
    out = enc(pixels())
    assert out.shape == (2, GRID * GRID, WIDTH)
    assert torch.isfinite(out).all()
    kept = feature_layer % (config["num_hidden_layers"] + 1)
    assert len(enc._block_list(enc.model)) == kept


@cases
@pytest.mark.parametrize("feature_layer", [-2, -1, 1, 0])
def test_features_equal_hf_hidden_states_without_prefix_tokens(case, feature_layer):
    model = hf_model(case)
    enc = wrap(case, model, feature_layer)
    x = pixels()
    out = enc(x)
    torch.testing.assert_close(out, hf_features(model, case, x, feature_layer), rtol=0, atol=1e-6)
    # Different feature layers give different features (the index is not ignored).
    if feature_layer == -2:
        assert not torch.allclose(out, hf_features(model, case, x, -1))


@cases
def test_other_input_resolution_interpolates_positions(case):
    model = hf_model(case)
    enc = wrap(case, model)
    x = pixels(1, 48)
    assert enc.token_grid(48) == (6, 6)
    out = enc(x)
    assert out.shape == (1, 36, WIDTH)
    torch.testing.assert_close(out, hf_features(model, case, x, -2), rtol=0, atol=1e-6)


@cases
def test_batch_without_images(case):
    family, config, _, _ = CASES[case]
    enc = build_vision_encoder(family, config=config)
    assert enc(torch.zeros(0, 3, 32, 32)).shape == (0, GRID * GRID, WIDTH)


@cases
def test_unused_modules_removed_and_block_class(case):
    family, config, prefix, block = CASES[case]
    enc = build_vision_encoder(family, config=config)
    assert enc.block_class is block
    assert enc.num_prefix_tokens == prefix
    blocks = [m for m in enc.modules() if isinstance(m, enc.block_class)]
    assert len(blocks) == config["num_hidden_layers"] - 1  # penultimate layer: the last block is gone
    assert enc.model.config.num_hidden_layers == len(blocks)
    names = [name for name, _ in enc.named_parameters()]
    assert not [n for n in names if "post_layernorm" in n or ".head." in n or "mask_token" in n]
    assert not [n for n in names if n.startswith("model.layernorm")]


def test_dinov2_registers_variant_follows_config():
    plain = build_vision_encoder("dinov2", config=TINY_VISION["dinov2"])
    registers = build_vision_encoder("dinov2", config=TINY_DINOV2_REGISTERS)
    assert type(plain.model) is Dinov2Model and plain.num_prefix_tokens == 1
    assert type(registers.model) is Dinov2WithRegistersModel and registers.num_prefix_tokens == 5
    by_type = build_vision_encoder("dinov2", config={**TINY_VISION["dinov2"], "model_type": "dinov2_with_registers"})
    assert type(by_type.model) is Dinov2WithRegistersModel and by_type.num_prefix_tokens == 1 + 4  # default 4
    with pytest.raises(ValueError, match="contradicts"):
        build_vision_encoder("dinov2", config={**TINY_DINOV2_REGISTERS, "model_type": "dinov2"})


# ---- preprocessing ------------------------------------------------------------------------------------


def _normalised(value_0_255: float, mean: float, std: float) -> float:
    return (value_0_255 / 255 - mean) / std


@pytest.mark.parametrize("family", sorted(VISION_FAMILIES))
def test_preprocessing_shape_and_normalisation(family):
    enc = build_vision_encoder(family, config=TINY_VISION[family])
    pre = enc.preprocessor()
    mean, std = np.array(pre.processor.image_mean), np.array(pre.processor.image_std)
    np.testing.assert_allclose(mean, STANDARD_MEAN[family], atol=1e-6)
    out = pre(Image.new("RGB", (50, 50), (200, 100, 30)))
    assert out.shape == (3, 32, 32) and out.dtype == torch.float32
    expected = [_normalised(v, m, s) for v, m, s in zip((200, 100, 30), mean, std)]
    expected = torch.tensor(expected, dtype=torch.float32)[:, None, None].expand(3, 32, 32)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-4)
    # A greyscale image becomes 3 channels.
    assert pre(Image.new("L", (20, 40), 128)).shape == (3, 32, 32)


@pytest.mark.parametrize("family", sorted(VISION_FAMILIES))
@pytest.mark.parametrize("wide", [True, False])
def test_non_square_image_is_padded_with_the_mean_colour(family, wide):
    pre = build_vision_encoder(family, config=TINY_VISION[family]).preprocessor()
    mean, std = pre.processor.image_mean, pre.processor.image_std
    size = (64, 32) if wide else (32, 64)  # PIL (width, height): pads top/bottom or left/right by 16 px
    out = pre(Image.new("RGB", size, (255, 0, 0)))
    assert out.shape == (3, 32, 32)
    # After resizing 64 -> 32: padding covers 8 rows/cols on each side, the image the middle 16.
    if not wide:
        out = out.transpose(1, 2)  # make the padded axis the row axis
    pad = torch.cat([out[:, :6], out[:, -6:]], dim=1)  # away from the resampling seam
    centre = out[:, 10:22]
    background = [int(m * 255) for m in mean]
    for c in range(3):
        torch.testing.assert_close(pad[c], torch.full_like(pad[c], _normalised(background[c], mean[c], std[c])))
        red = _normalised(255 if c == 0 else 0, mean[c], std[c])
        torch.testing.assert_close(centre[c], torch.full_like(centre[c], red), rtol=0, atol=1e-4)
    assert pad.abs().max() < 0.02  # mean colour -> about 0 after normalisation


def test_pad_to_square_can_be_turned_off():
    enc = build_vision_encoder("siglip2", config=TINY_VISION["siglip2"], options={"pad_to_square": False})
    out = enc.preprocessor()(Image.new("RGB", (64, 32), (255, 0, 0)))
    assert out.shape == (3, 32, 32)
    torch.testing.assert_close(out[0], torch.ones(32, 32))  # stretched: red everywhere, no padding


@pytest.mark.parametrize("family", sorted(VISION_FAMILIES))
def test_preprocessor_pickles(family):
    pre = build_vision_encoder(family, config=TINY_VISION[family]).preprocessor()
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 60, 3), dtype=np.uint8))
    clone = pickle.loads(pickle.dumps(pre))
    assert clone is not pre
    assert torch.equal(clone(image), pre(image))


def test_image_size_option_sets_processor_and_grid():
    enc = build_vision_encoder("dinov2", config=TINY_VISION["dinov2"], options={"image_size": 48})
    assert enc.image_size == 48 and enc.token_grid() == (6, 6)
    x = enc.preprocessor()(Image.new("RGB", (70, 50)))
    assert x.shape == (3, 48, 48)
    assert enc(x[None]).shape == (1, 36, WIDTH)


# ---- freezing -----------------------------------------------------------------------------------------


def _train_step(enc: nn.Module, head: nn.Module) -> None:
    opt = torch.optim.AdamW([*enc.parameters(), *head.parameters()], lr=1e-2, weight_decay=0.1)
    loss = head(enc(pixels())).pow(2).mean()
    loss.backward()
    opt.step()


@cases
def test_frozen_by_default(case):
    family, config, _, _ = CASES[case]
    dropout = "hidden_dropout_prob" if family == "dinov2" else "attention_dropout"
    enc = build_vision_encoder(family, config={**config, dropout: 0.5})
    assert not any(p.requires_grad for p in enc.parameters())
    enc.train()  # what Lightning does to the whole model at fit start
    assert not any(m.training for m in enc.model.modules())
    x = pixels()
    assert torch.equal(enc(x), enc(x))  # dropout stays off
    before = copy.deepcopy(enc.state_dict())
    head = nn.Linear(WIDTH, 1)
    head_before = head.weight.detach().clone()
    _train_step(enc, head)
    assert not torch.equal(head.weight, head_before)  # the step did happen
    for name, value in enc.state_dict().items():
        assert torch.equal(value, before[name]), name
    assert not enc(pixels()).requires_grad  # no autograd graph kept for a frozen tower


@cases
def test_trainable_every_parameter_gets_a_gradient(case):
    family, config, _, _ = CASES[case]
    enc = build_vision_encoder(family, config=config, trainable=True)
    enc.train()
    assert enc.model.training
    assert all(p.requires_grad for p in enc.parameters())
    before = copy.deepcopy(enc.state_dict())
    head = nn.Linear(WIDTH, 1)
    enc(pixels()).sum().backward()
    # No parameter off the feature path is left (DDP's "unused parameters" error, wasted optimiser state).
    assert [n for n, p in enc.named_parameters() if p.grad is None] == []
    enc.zero_grad()
    _train_step(enc, head)
    assert any(not torch.equal(v, before[k]) for k, v in enc.state_dict().items())
    enc.set_trainable(False)
    assert not any(p.requires_grad for p in enc.parameters()) and not enc.model.training


def test_dtype_option():
    enc = build_vision_encoder("siglip2", config=TINY_VISION["siglip2"], options={"dtype": "bfloat16"})
    assert {p.dtype for p in enc.parameters()} == {torch.bfloat16}
    assert enc(pixels()).dtype == torch.bfloat16  # float32 pixels are cast by the patch embedding


# ---- loading by path ----------------------------------------------------------------------------------


@cases
def test_load_local_directory(case, tmp_path):
    family = CASES[case][0]
    model = hf_model(case, seed=3)
    model.save_pretrained(tmp_path)
    vision_family(family).default_processor(32).save_pretrained(tmp_path)
    enc = build_vision_encoder(family, pretrained=str(tmp_path))
    assert type(enc.model) is type(model)
    x = pixels()
    assert torch.equal(enc(x), hf_features(model, case, x, -2))
    np.testing.assert_allclose(enc.preprocessor().processor.image_mean, STANDARD_MEAN[family], atol=1e-6)
    assert enc.preprocessor()(Image.new("RGB", (80, 40))).shape == (3, 32, 32)


def test_load_directory_without_processor_uses_family_default(tmp_path):
    model = hf_model("clip")
    model.save_pretrained(tmp_path)
    enc = build_vision_encoder("clip", pretrained=str(tmp_path), feature_layer=-1)
    np.testing.assert_allclose(enc.preprocessor().processor.image_mean, STANDARD_MEAN["clip"], atol=1e-6)
    x = pixels()
    assert torch.equal(enc(x), hf_features(model, "clip", x, -1))


@pytest.mark.parametrize("family", ["siglip2", "clip"])
def test_load_vision_tower_of_image_text_checkpoint(family, tmp_path):
    """Real SigLIP(2)/CLIP checkpoints hold the text tower too; only the vision tower is loaded."""
    text = dict(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
        vocab_size=64, max_position_embeddings=16, pad_token_id=1, bos_token_id=2, eos_token_id=3,
    )  # fmt: skip
    vision = TINY_VISION[family]
    torch.manual_seed(0)
    if family == "clip":
        full = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16))
    else:
        full = SiglipModel(SiglipConfig(text_config=text, vision_config=vision))
    full.eval().save_pretrained(tmp_path)
    enc = build_vision_encoder(family, pretrained=str(tmp_path))
    x = pixels()
    assert torch.equal(enc(x), hf_features(full.vision_model, family, x, -2))


def test_checkpoint_missing_weights_is_an_error(tmp_path):
    hf_model("siglip").save_pretrained(tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    dropped = next(k for k in weights if "layers.0.mlp.fc1.weight" in k)
    del weights[dropped]
    save_file(weights, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match="does not hold"):
        build_vision_encoder("siglip", pretrained=str(tmp_path))


def test_naflex_siglip2_checkpoint_is_rejected(tmp_path):
    naflex = Siglip2VisionConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
    naflex.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="NaFlex"):
        build_vision_encoder("siglip2", pretrained=str(tmp_path))


def test_checkpoint_of_another_family_is_rejected(tmp_path):
    hf_model("siglip").save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"'clip' expects model_type.*'siglip_vision_model'"):
        build_vision_encoder("clip", pretrained=str(tmp_path))


# ---- bad input ----------------------------------------------------------------------------------------


def test_unknown_family_lists_valid_names():
    with pytest.raises(ValueError) as err:
        build_vision_encoder("siglp", config=TINY_VISION["siglip"])
    assert str(err.value) == "unknown vision family 'siglp'; choose one of clip, dinov2, siglip, siglip2"


def test_both_or_neither_source_is_an_error():
    with pytest.raises(ValueError, match="both `pretrained` and `config`"):
        build_vision_encoder("clip", pretrained="openai/clip-vit-large-patch14-336", config=TINY_VISION["clip"])
    with pytest.raises(ValueError, match="neither of `pretrained` and `config`"):
        build_vision_encoder("clip")


def test_bad_config_options_and_layers_are_errors():
    with pytest.raises(ValueError, match=r"unknown CLIPVisionConfig field\(s\) \['hidden_sz'\]"):
        build_vision_encoder("clip", config={**TINY_VISION["clip"], "hidden_sz": 8})
    with pytest.raises(ValueError, match=r"unknown siglip2 vision option\(s\) \['imagesize'\]"):
        build_vision_encoder("siglip2", config=TINY_VISION["siglip2"], options={"imagesize": 64})
    with pytest.raises(ValueError, match="feature_layer 3 out of range for a 2-layer encoder"):
        build_vision_encoder("dinov2", config=TINY_VISION["dinov2"], feature_layer=3)
    with pytest.raises(ValueError, match="expects model_type"):
        build_vision_encoder("siglip", config={**TINY_VISION["siglip"], "model_type": "clip_vision_model"})
    with pytest.raises(ValueError, match="pixel_values must be"):
        build_vision_encoder("siglip", config=TINY_VISION["siglip"])(torch.zeros(3, 32, 32))
