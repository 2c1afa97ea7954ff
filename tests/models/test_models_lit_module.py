"""GazeVLMModule: stage freeze policy, optimiser groups and schedule, a short fit, validation metrics."""


import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from gazelit.lit_module import GazeVLMModule, TrainConfig, trainable_parameter_counts
from gazelit.optim import OptimConfig, build_optimizer, lr_multiplier, parameter_groups

from ..builders import MIXED, tiny_vlm
from ..batches import make_batch


def module(stage, vision_trainable=False, optim=None):
    model = tiny_vlm(vision_trainable=vision_trainable).train()
    return GazeVLMModule(model.config, TrainConfig(stage=stage, optim=optim or OptimConfig(weight_decay=0.1)),
                         model=model)


@pytest.mark.parametrize("stage,vision_trainable", [("align", False), ("finetune", False), ("finetune", True)])
def test_stage_freezes_the_right_components_and_frozen_weights_do_not_move(stage, vision_trainable):
    lit = module(stage, vision_trainable)
    counts = trainable_parameter_counts(lit.model)
    assert counts["projector"][0] == counts["projector"][1] > 0
    assert counts["context"][0] == counts["context"][1] > 0
    assert (counts["llm"][0] > 0) == (stage == "finetune")
    assert (counts["vision"][0] > 0) == vision_trainable
    before = {n: p.detach().clone() for n, p in lit.model.named_parameters()}
    opt = build_optimizer(lit.model, lit.train_config.optim)
    batch = make_batch(lit.model, MIXED)
    lit.model(batch).loss.backward()
    opt.step()
    for name, p in lit.model.named_parameters():
        moved = not torch.equal(before[name], p.detach())
        if not p.requires_grad:
            assert not moved, f"frozen {name} changed"
    assert not torch.equal(before["context_tokens"], lit.model.context_tokens.detach())
    if stage == "finetune":
        assert any(not torch.equal(before[f"llm.{n}"], p) for n, p in lit.model.llm.named_parameters())


def test_parameter_groups_have_per_component_lr_and_no_decay_on_norms_biases_context():
    lit = module("finetune", vision_trainable=True, optim=OptimConfig(lr_projector=1e-3, lr_llm=2e-5,
                                                                       lr_vision=3e-6, weight_decay=0.1))
    groups = {g["name"]: g for g in parameter_groups(lit.model, lit.train_config.optim)}
    assert groups["projector"]["lr"] == 1e-3 and groups["llm"]["lr"] == 2e-5 and groups["vision"]["lr"] == 3e-6
    assert groups["context_no_decay"]["weight_decay"] == 0.0 and groups["context_no_decay"]["lr"] == 1e-3
    names = {id(p): n for n, p in lit.model.named_parameters()}
    for g in groups.values():
        for p in g["params"]:
            n = names[id(p)]
            no_decay = p.ndim < 2 or n.endswith(".bias") or "norm" in n.lower() or n == "context_tokens"
            assert (g["weight_decay"] == 0.0) == no_decay, n
    assert sum(len(g["params"]) for g in groups.values()) == sum(1 for p in lit.model.parameters() if p.requires_grad)


def test_warmup_then_cosine_reaches_the_floor():
    cfg = OptimConfig(warmup_steps=10, schedule="cosine", min_lr_ratio=0.1)
    values = [lr_multiplier(s, 100, cfg) for s in range(100)]
    assert values[0] == pytest.approx(0.1) and values[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(values[10:], values[11:]))
    assert lr_multiplier(100, 100, cfg) == pytest.approx(0.1)
    lin = OptimConfig(warmup_ratio=0.0, schedule="linear")
    assert lr_multiplier(50, 100, lin) == pytest.approx(0.5)


def test_a_short_fit_lowers_the_loss_and_validation_reports_token_accuracy(tmp_path):
    lit = module("finetune", optim=OptimConfig(lr_projector=3e-3, lr_llm=3e-3, warmup_steps=0, schedule="constant"))
    batch = make_batch(lit.model, MIXED)
    loader = DataLoader([batch], batch_size=None)
    trainer = L.Trainer(max_steps=15, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, limit_val_batches=1, val_check_interval=15,
                        check_val_every_n_epoch=None,
                        default_root_dir=tmp_path)
    with torch.no_grad():
        before = lit.model(batch).loss.item()
    trainer.fit(lit, train_dataloaders=loader, val_dataloaders=loader)
    metrics = trainer.callback_metrics
    assert metrics["train/loss"] < before
    assert 0.0 <= metrics["val/token_acc"] <= 1.0 and torch.isfinite(metrics["val/loss"])
    assert "gaze/attended_fraction" in metrics and "perf/tokens_per_s" in metrics


def test_answer_accuracy_is_exactly_greedy_decoding_getting_the_answer():
    """A sample counts as right exactly when greedy generation reproduces its answer: built from the model's
    own greedy output it scores 1; one changed answer token makes it 0."""
    from gazelit.lit_module import answer_exact_match

    model = tiny_vlm(top_k=1)
    prompt = make_batch(model, [[("text", 3), ("image",), ("text", 4)]], padding="left")
    generated = model.generate_from_batch(prompt, max_new_tokens=4, trace=False)[0].token_ids
    answer = torch.tensor(generated[:4])
    full = {**prompt}
    full["input_ids"] = torch.cat([prompt["input_ids"], answer[None]], 1)
    full["attention_mask"] = torch.cat([prompt["attention_mask"], torch.ones(1, len(answer), dtype=torch.long)], 1)
    full["token_kind"] = torch.cat([prompt["token_kind"], torch.zeros(1, len(answer), dtype=torch.long)], 1)
    labels = torch.full_like(full["input_ids"], -100)
    labels[0, -len(answer):] = answer
    full["labels"] = labels
    with torch.no_grad():
        logits = model(full).logits
    assert answer_exact_match(logits[:, :-1], labels[:, 1:]).tolist() == [True]
    wrong = labels.clone()
    wrong[0, -2] = (wrong[0, -2] + 1) % model.llm.config.vocab_size
    assert answer_exact_match(logits[:, :-1], wrong[:, 1:]).tolist() == [False]
