"""GRPO (gazelit.models.grpo and the `grpo` stage of GazeVLMModule): truths from labels, repeated
batches, rewards, group advantages, the clipped loss and its gradients, and a step that makes the
rewarded completion more likely and the other less."""

from __future__ import annotations

import warnings
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from gazelit.lit_module import GazeVLMModule
from gazelit.models import grpo
from gazelit.models.gaze_vlm import GeneratedLook
from gazelit.schema import GRPOConfig, TrainConfig
from tests.batches import make_batch
from tests.builders import tiny_vlm

LOOK = {"enabled": True, "bins": 4}


def look_batch(model):
    """Two samples whose answers are `<look> box word </look> word <eos>` after an image."""
    batch = make_batch(model, [[("text", 3), ("image",), ("text", 12)], [("image",), ("text", 14)]], seed=1)
    t, eos = model.look_tokens, model.tokenizer.eos_token_id
    answers = [t.span_ids((0, 1, 2, 3)) + [40, t.close, 41, eos], t.span_ids((3, 3, 3, 3)) + [t.close, 42, 43, eos]]
    batch["labels"][:] = -100
    for i, answer in enumerate(answers):
        end = int(batch["attention_mask"][i].nonzero()[-1]) + 1
        start = end - len(answer)
        batch["input_ids"][i, start:end] = torch.tensor(answer)
        batch["labels"][i, start:end] = torch.tensor(answer)
    return batch, answers


def test_prompts_and_truths_come_from_the_labels():
    model = tiny_vlm(look=LOOK, top_k=1)
    batch, answers = look_batch(model)
    prompts, truths = grpo.prompts_and_truths(batch, model.tokenizer.pad_token_id, model.tokenizer.eos_token_id,
                                              model.look_tokens)  # fmt: skip
    assert truths[0].box == (0.0, 0.25, 0.75, 1.0) and truths[1].box == (0.75, 0.75, 1.0, 1.0)
    assert truths[0].answer_ids == [41, model.tokenizer.eos_token_id]
    assert truths[1].answer_ids == [42, 43, model.tokenizer.eos_token_id]
    lengths = [int((batch["labels"][i] != -100).nonzero()[0]) for i in range(2)]
    assert prompts["input_ids"].shape[1] == max(lengths)
    for i in range(2):  # left-padded, ending where the answer started
        assert torch.equal(prompts["input_ids"][i, -lengths[i] :], batch["input_ids"][i, : lengths[i]])
    model(prompts)  # a valid batch
    empty = dict(batch, labels=torch.full_like(batch["labels"], -100))
    with pytest.raises(ValueError, match="sample 0 .* no supervised token"):
        grpo.prompts_and_truths(empty, 0, 2, None)


def test_a_repeated_batch_gives_every_copy_the_same_output():
    model = tiny_vlm(top_k=1)
    batch = make_batch(model, [[("text", 2), ("image",), ("text", 4)], [("text", 5), ("image",), ("text", 1)]])
    repeated = grpo.repeat_batch(batch, 3)
    assert repeated["input_ids"].shape[0] == 6 and repeated["pixel_values"].shape[0] == 6
    out, again = model(batch).logits, model(repeated).logits
    for i in range(2):
        for j in range(3):
            assert torch.allclose(again[3 * i + j], out[i], atol=1e-5)


def test_rewards_and_group_advantages():
    model = tiny_vlm(look=LOOK)
    truths = [grpo.Truth(model.tokenizer.encode("red"), (0.0, 0.0, 0.5, 0.5))]
    look = GeneratedLook(0, (0.0, 0.0, 0.5, 1.0), 4, 6)
    outs = [SimpleNamespace(text="red", looks=[look], looks_opened=1),
            SimpleNamespace(text="blue", looks=[], looks_opened=1),
            SimpleNamespace(text="red", looks=[GeneratedLook(0, (0.0, 0.0, 0.5, 0.5), 4, None)], looks_opened=1)]
    got = grpo.rewards(outs, truths, 3, (0.25, 0.5, 1.0), model.tokenizer, looks_on=True)
    assert got.well_formed.tolist() == [1.0, 0.0, 0.0] and got.answer.tolist() == [1.0, 0.0, 1.0]
    assert got.iou.tolist() == [0.5, 0.0, 1.0]
    assert torch.allclose(got.total, torch.tensor([1.5, 0.0, 1.5]))
    adv = grpo.group_advantages(torch.tensor([1.0, 1.0, 1.0, 0.0, 2.0, 1.0]), 3)
    assert torch.equal(adv[:3], torch.zeros(3))
    assert torch.allclose(adv[3:], torch.tensor([-1.0, 1.0, 0.0]) / (2 / 3) ** 0.5, atol=1e-3)


def test_the_clipped_loss_and_its_gradients():
    logp = torch.tensor([[-1.0, -2.0, 0.0], [-0.5, 0.0, 0.0]], requires_grad=True)
    mask = torch.tensor([[True, True, False], [True, False, False]])
    adv = torch.tensor([1.0, -2.0])
    loss, stats = grpo.grpo_loss(logp, logp.detach(), adv, mask, clip=0.2)
    loss.backward()
    # ratio 1: d loss / d logp = -A / (tokens of the completion) / completions
    assert torch.allclose(logp.grad, torch.tensor([[-0.25, -0.25, 0.0], [1.0, 0.0, 0.0]]))
    assert stats["clip_fraction"] == 0
    # a ratio beyond 1 + clip with a positive advantage: the clipped term wins and gives no gradient
    new = torch.tensor([[0.0]], requires_grad=True)
    loss, stats = grpo.grpo_loss(new, torch.tensor([[-1.0]]), torch.tensor([1.0]), torch.tensor([[True]]), clip=0.2)
    loss.backward()
    assert new.grad.abs().item() == 0 and stats["clip_fraction"] == 1 and loss.item() == pytest.approx(-1.2)
    # the KL term is zero at the reference and positive away from it
    zero, s = grpo.grpo_loss(logp.detach(), logp.detach(), torch.zeros(2), mask, 0.2, kl=0.1, ref_logp=logp.detach())
    assert zero.item() == 0 and s["kl"] == 0
    _, s = grpo.grpo_loss(logp.detach(), logp.detach(), torch.zeros(2), mask, 0.2, kl=0.1, ref_logp=logp.detach() - 1)
    assert s["kl"] > 0


def test_a_grpo_step_makes_the_rewarded_completion_more_likely(monkeypatch):
    """Two completions of one prompt, one rewarded: after the stage's steps the rewarded one gained
    log-probability and the other lost some (the sampler is replaced to fix the completions)."""
    torch.manual_seed(0)
    model = tiny_vlm(look=LOOK, top_k=1)
    model.train()
    batch, answers = look_batch(model)
    batch = {k: (v[:1] if torch.is_tensor(v) and v.shape[:1] == (2,) else v) for k, v in batch.items()}
    units = batch["unit_sample"] == 0
    for key in ("unit_start", "unit_grid", "unit_video", "unit_time", "pixel_values"):
        batch[key] = batch[key][units] if key != "pixel_values" else batch[key][: int(units.sum())]
    batch["unit_sample"] = batch["unit_sample"][units]
    t, eos = model.look_tokens, model.tokenizer.eos_token_id
    good = answers[0]  # the true look and answer
    bad = t.span_ids((3, 0, 3, 0)) + [t.close, 50, eos]

    def fake_generate(prompts, **kwargs):
        return [_as_output(model, c) for c in (good, bad)]

    monkeypatch.setattr(model, "generate_from_batch", fake_generate)
    config = TrainConfig(stage="grpo", grpo=GRPOConfig(group=2, iterations=2, kl=0.0))
    config.optim.lr_llm = config.optim.lr_projector = 1e-3
    config.optim.warmup_steps = 0
    lit = GazeVLMModule(model.config, config, model=model)
    prompts, _ = grpo.prompts_and_truths(batch, model.tokenizer.pad_token_id, eos, t)
    scored, mask = grpo.completion_batch(grpo.repeat_batch(prompts, 2), [good, bad], model.tokenizer.pad_token_id)

    def logps():
        with torch.no_grad():
            return (grpo.completion_logprobs(model(scored).logits, scored, mask) * mask).sum(-1)

    before = logps()
    trainer = L.Trainer(max_steps=2, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(lit, train_dataloaders=DataLoader([batch], batch_size=None))
    after = logps()
    assert trainer.global_step == 2  # two optimiser steps on one batch of samples
    assert after[0] > before[0] and after[1] < before[1]
    assert trainer.callback_metrics["train/reward"] == pytest.approx((1.0 + 0.25 + 0.5 + 0.25 + 0.0) / 2)


def _as_output(model, ids):
    """The GenerationOutput generate_from_batch would return for these generated ids."""
    from gazelit.attention.look import _Parser

    parser = _Parser(model.look_tokens)
    for position, token in enumerate(ids):
        parser.feed(token, position, lambda at: 0)
    return model._output(torch.tensor(ids), None, parser.looks, SimpleNamespace(length=0), parser.spans_opened)
