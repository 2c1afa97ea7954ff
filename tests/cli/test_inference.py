"""gazelit.datamodules.inference: prompts -> left-padded generation batches matching the training encoding."""

import pytest
import torch

from gazelit.attention import CONTEXT, PAD, TEXT, VISUAL
from gazelit.batch import check_batch

from gazelit.datamodules.chat import ChatEncoder
from gazelit.datamodules.inference import Prompt, PromptEncoder, left_pad, load_frames_dir, load_video_frames
from gazelit.datamodules.skips import SkipSample

from ..builders import picture, tiny_vlm


@pytest.fixture(scope="module")
def model():
    return tiny_vlm()


def test_batch_is_left_padded_with_units_where_the_kinds_say(model):
    encoder = PromptEncoder.from_model(model)
    frames = [picture((30 * i, 90, 200)) for i in range(3)]
    batch = encoder.batch([
        Prompt("What colour is the circle?", images=[picture()]),
        Prompt("What happens?", frames=frames),
        Prompt("Say something longer than the others, please, with no picture at all", system=None),
    ])
    check_batch(batch)
    kinds = batch["token_kind"]
    assert (kinds[:, -1] == TEXT).all()  # every prompt ends at the last column
    for row in kinds:  # padding only on the left
        real = (row != PAD).nonzero().flatten()
        assert real.numel() == int(real[-1] - real[0] + 1) and int(real[-1]) == row.numel() - 1
    grid = model.visual_grid[0] * model.visual_grid[1]
    for s, start in zip(batch["unit_sample"].tolist(), batch["unit_start"].tolist()):
        assert (kinds[s, start : start + grid] == VISUAL).all()
        assert (kinds[s, start + grid : start + grid + model.num_context] == CONTEXT).all()
    assert batch["unit_sample"].tolist() == [0, 1, 1, 1]
    assert batch["unit_video"].tolist() == [-1, 0, 0, 0] and batch["unit_time"].tolist() == [0, 0, 1, 2]
    assert (batch["labels"] == -100).all()
    outs = model.generate_from_batch(batch, max_new_tokens=3)
    assert len(outs) == 3 and all(1 <= len(o.token_ids) <= 3 for o in outs)


def test_prompt_tokens_equal_the_training_encoding_up_to_the_answer(model):
    """The generation prompt is exactly what training feeds before the assistant's first token."""
    encoder = PromptEncoder.from_model(model)
    sample = encoder.encode(Prompt("What colour is the circle?", images=[picture()]))
    train = ChatEncoder(model.tokenizer, model.visual_grid, model.num_context).encode(
        [("user", "<image>\nWhat colour is the circle?"), ("assistant", "red")], [1])
    first_answer = next(i for i, label in enumerate(train.labels) if label != -100)
    assert sample.tokens.input_ids == train.input_ids[:first_answer]
    assert sample.tokens.token_kind == train.token_kind[:first_answer]
    assert sample.tokens.unit_starts == train.unit_starts


def test_left_pad_moves_rows_and_unit_starts():
    batch = {
        "input_ids": torch.tensor([[5, 6, 7, 0], [8, 9, 0, 0]]),
        "attention_mask": torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]]),
        "labels": torch.full((2, 4), -100),
        "token_kind": torch.tensor([[0, 1, 0, 3], [1, 0, 3, 3]]),
        "unit_sample": torch.tensor([0, 1]),
        "unit_start": torch.tensor([1, 0]),
    }
    out = left_pad(batch)
    assert out["input_ids"].tolist() == [[0, 5, 6, 7], [0, 0, 8, 9]]
    assert out["token_kind"].tolist() == [[3, 0, 1, 0], [3, 3, 1, 0]]
    assert out["unit_start"].tolist() == [2, 2]
    assert batch["unit_start"].tolist() == [1, 0]  # input untouched


def test_one_medium_per_prompt_and_the_placeholder_moves_to_the_front(model):
    encoder = PromptEncoder.from_model(model)
    with pytest.raises(ValueError, match="one image"):
        Prompt("compare them", images=[picture(), picture()])
    with pytest.raises(ValueError, match="not both"):
        Prompt("compare them", images=[picture()], frames=[picture()])
    with pytest.raises(SkipSample):
        encoder.encode(Prompt("   "))
    placed = encoder.encode(Prompt("Is it <image> red?", images=[picture()]))
    plain = encoder.encode(Prompt("<image>\nIs it  red?", images=[picture()]))
    assert placed.tokens.input_ids == plain.tokens.input_ids  # Cambrian: "<image>\n" + the rest of the turn


def test_frames_and_gif_are_sampled_like_training_videos(tmp_path):
    frames = [picture((40 * i, 0, 0)) for i in range(5)]
    for i, f in enumerate(frames):
        f.save(tmp_path / f"{i:03d}.png")
    got, times = load_frames_dir(tmp_path, fps=1.0, max_frames=3)
    assert len(got) == 3 and times == [0.0, 2.0, 4.0]
    frames[0].save(tmp_path / "clip.gif", save_all=True, append_images=frames[1:], duration=500)
    got, times = load_video_frames(tmp_path / "clip.gif", fps=1.0, max_frames=8)
    assert times == [0.0, 1.0, 2.0]  # one frame per second of a 2.5 s animation
    assert got[1].getpixel((5, 5)) == frames[2].getpixel((5, 5))
