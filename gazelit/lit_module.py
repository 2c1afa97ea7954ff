"""GazeVLMModule: the LightningModule that trains a GazeVLM (stages, optimiser, metrics, logs).

Stages (Cambrian recipe): `align` trains the projector and the context tokens; `finetune` also trains the
LLM. The vision encoder trains only where the recipe sets `model.vision.trainable`. `grpo` trains what
`finetune` trains, by GRPO with a grounding reward (gazelit.models.grpo): each batch's prompts are sampled
`train.grpo.group` times, rewarded, and the module steps its optimiser itself (`train.grpo.iterations`
steps per batch of samples; Lightning's manual optimisation), logging train/reward and its parts. The loss covers the
supervised (assistant) tokens only: the data marks everything else -100.

Logged: train/loss, gaze/top_k (k, or the batch's largest region count for "all"), gaze/attended_fraction
(selected / available visual tokens per routed text query), perf/tokens_per_s and perf/samples_per_s,
data/skipped/<reason> (cumulative, from the loader); val/loss, val/token_acc and val/answer_acc (the share of samples greedy decoding answers exactly) through torchmetrics.
Learning rates per named parameter group come from Lightning's LearningRateMonitor.

`configure_model` applies `parallel_plan` (gazelit.training.parallel: activation checkpointing per block
and, under ModelParallelStrategy, FSDP2 sharding); the training entry point sets the plan from the recipe.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections import Counter
from typing import Any

import lightning as L
import torch
from torchmetrics import MeanMetric
from torchmetrics.classification import MulticlassAccuracy

from gazelit.models.gaze_vlm import GazeVLM
from gazelit.optim import build_optimizer, build_scheduler
from gazelit.schema import STAGES, GRPOConfig, ModelConfig, OptimConfig, TrainConfig

log = logging.getLogger(__name__)

def _as(kind, value):
    if isinstance(value, kind):
        return value
    if kind is TrainConfig:
        value = dict(value)
        value["optim"] = OptimConfig(**value.get("optim", {}))
        value["grpo"] = GRPOConfig(**value.get("grpo", {}))
        return TrainConfig(**value)
    return kind.from_dict(value)


def answer_exact_match(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per sample with supervised tokens: True if the argmax is right at every supervised position.

    With teacher forcing this is exactly whether greedy decoding reproduces every answer (end token
    included): greedy follows the reference as long as each step's argmax is the reference token.
    logits (B, L, V) and labels (B, L) already shifted so that logits[:, i] predicts labels[:, i].
    """
    supervised = labels != -100
    right = (logits.argmax(-1) == labels) | ~supervised
    has = supervised.any(1)
    return right.all(1)[has]


class GazeVLMModule(L.LightningModule):
    def __init__(
        self,
        model_config: ModelConfig | dict,
        train_config: TrainConfig | dict | None = None,
        model: GazeVLM | None = None,
    ):
        super().__init__()
        model_config = _as(ModelConfig, model_config).validate()
        train_config = _as(TrainConfig, train_config or TrainConfig()).validate()
        # plain dicts in the checkpoint: load_from_checkpoint rebuilds the model from them
        self.save_hyperparameters(
            {"model_config": model_config.to_dict(), "train_config": dataclasses.asdict(train_config)}
        )
        self.model_config = model_config
        self.train_config = train_config
        self.model = model if model is not None else GazeVLM.build(model_config)
        apply_stage(self.model, train_config.stage)
        vocab = self.model.llm.get_output_embeddings().out_features
        self.val_loss = MeanMetric()
        self.val_token_acc = MulticlassAccuracy(num_classes=vocab, ignore_index=-100, average="micro")
        self.val_answer_acc = MeanMetric()  # samples whose every answer greedy decoding gets exactly right
        self.question_head: tuple[int, int, float] | None = None  # set by validation where data has other objects
        self._skipped: Counter = Counter()
        self._step_tokens = torch.zeros((), dtype=torch.long)  # supervised tokens of this rank's current step
        self._last_step_end: float | None = None
        self.parallel_plan = None  # gazelit.training.parallel.ParallelPlan; None: plain module
        self._parallelism_applied = False
        self.init_from: str | None = None  # weights loaded in configure_model, after sharding
        # grpo: the module steps its optimiser itself; the recipe's gradient clipping is applied here
        self.automatic_optimization = train_config.stage != "grpo"
        self.gradient_clip_val: float | None = None
        self.reference_from: str | None = None  # grpo with kl > 0: the frozen reference policy's weights
        self._reference: list[GazeVLM] = []  # kept out of the module tree (not trained, not checkpointed)

    # ------------------------------------------------------------------ set-up
    def on_fit_start(self) -> None:
        counts = trainable_parameter_counts(self.model)
        for name, (trainable, total) in counts.items():
            log.info("%-10s %12d trainable of %12d parameters", name, trainable, total)
        if self.logger is not None:
            self.logger.log_hyperparams({f"params/{n}_trainable": t for n, (t, _) in counts.items()})

    def configure_model(self) -> None:
        if self._parallelism_applied:  # Lightning calls this hook again for every fit / validate
            return
        from gazelit.training.parallel import apply_parallelism

        apply_parallelism(self.model, self.parallel_plan, self.device_mesh)
        # weights of components built empty (fsdp2 start-up): each rank reads only its shards, onto the
        # device the rest of the model is on (the strategy moves the whole model afterwards)
        built = next((t for t in self.model.parameters() if not t.is_meta), None)
        self.model.load_pretrained_shards(built.device if built is not None else "cpu")
        if self.init_from:
            from gazelit.training.checkpoints import load_matching_weights

            load_matching_weights(self.model, self.init_from)
        if self.train_config.stage == "grpo" and self.train_config.grpo.kl > 0:
            import copy

            from gazelit.training.checkpoints import load_matching_weights

            reference = copy.deepcopy(self.model).eval().requires_grad_(False)
            if self.reference_from:  # else: the policy as fitting starts
                load_matching_weights(reference, self.reference_from)
            self._reference = [reference]
        self._parallelism_applied = True

    def configure_optimizers(self):
        optimizer = build_optimizer(self.model, self.train_config.optim)
        # max_steps, not estimated_stepping_batches: the latter builds the train loader before its state
        # is restored on resume (Lightning #20550) and the stream would silently restart.
        total = self.trainer.max_steps
        scheduler = build_scheduler(optimizer, total, self.train_config.optim)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # ------------------------------------------------------------------ steps
    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        if not self.automatic_optimization:
            return self._grpo_step(batch)
        # The loss of an optimiser step is the mean over the supervised tokens of the whole global batch
        # (every rank, every accumulated micro-batch), not a mean of per-micro-batch means: each micro-batch
        # contributes its token-loss *sum*; `on_before_optimizer_step` divides the gradients by the global
        # token count, all-reduced. The factors undo Lightning's 1/accumulate and DDP/FSDP's 1/world size.
        out, ctx = self.model(batch, collect_stats=True, num_items_in_batch=1)
        tokens = (batch["labels"][:, 1:] != -100).sum()
        self._step_tokens = self._step_tokens.to(tokens.device) + tokens.detach()
        b = batch["input_ids"].shape[0]
        self.log("train/loss", out.loss.detach() / tokens.clamp(min=1), prog_bar=True, batch_size=b)
        self.log("gaze/top_k", float(self._k_value(ctx)), batch_size=b)
        if ctx is not None and (frac := ctx.attended_visual_fraction()) is not None:
            self.log("gaze/attended_fraction", frac, batch_size=b)
        self._log_skips(batch.get("skipped"), b)
        self._tokens, self._samples = int(batch["attention_mask"].sum()), b
        return out.loss * (self.trainer.world_size * self.trainer.accumulate_grad_batches)

    def _grpo_step(self, batch: dict) -> torch.Tensor:
        """Sample `group` completions per prompt, reward them, and take `iterations` clipped policy steps."""
        from gazelit.models import grpo

        cfg, model = self.train_config.grpo, self.model
        tok = model.tokenizer
        prompts, truths = grpo.prompts_and_truths(batch, tok.pad_token_id, tok.eos_token_id, model.look_tokens)
        prompts = grpo.repeat_batch(prompts, cfg.group)
        outputs = model.generate_from_batch(prompts, max_new_tokens=cfg.max_new_tokens, do_sample=True,
                                            temperature=cfg.temperature, top_p=cfg.top_p, trace=False)  # fmt: skip
        got = grpo.rewards(outputs, truths, cfg.group, (cfg.reward_format, cfg.reward_iou, cfg.reward_answer), tok,
                           model.look_tokens is not None)  # fmt: skip
        advantages = grpo.group_advantages(got.total, cfg.group).to(self.device)
        scored, mask = grpo.completion_batch(prompts, [o.token_ids for o in outputs], tok.pad_token_id)
        ref_logp = None
        if self._reference:
            reference = self._reference[0].to(self.device)
            with torch.no_grad():
                ref_logp = grpo.completion_logprobs(reference(scored).logits, scored, mask)
        optimizer, scheduler = self.optimizers(), self.lr_schedulers()
        old_logp, loss = None, None
        for _ in range(cfg.iterations):
            logp = grpo.completion_logprobs(model(scored).logits, scored, mask)
            if old_logp is None:  # the policy that sampled: equal to this one before its first step
                old_logp = logp.detach()
            loss, stats = grpo.grpo_loss(logp, old_logp, advantages, mask, cfg.clip, cfg.kl, ref_logp)
            optimizer.zero_grad()
            self.manual_backward(loss)
            if self.gradient_clip_val:
                self.clip_gradients(optimizer, gradient_clip_val=self.gradient_clip_val, gradient_clip_algorithm="norm")
            optimizer.step()
            scheduler.step()
        n = len(outputs)
        self.log("train/loss", loss.detach(), prog_bar=True, batch_size=n)
        for name, value in (("reward", got.total), ("reward_well_formed", got.well_formed), ("reward_iou", got.iou),
                            ("reward_answer", got.answer)):  # fmt: skip
            self.log(f"train/{name}", value.mean().item(), prog_bar=name == "reward", batch_size=n)
        for name, value in stats.items():
            self.log(f"train/{name}", value.item(), batch_size=n)
        self.log("gaze/top_k", float(self._k_value(None)), batch_size=n)
        self._log_skips(batch.get("skipped"), batch["input_ids"].shape[0])
        self._tokens, self._samples = int(scored["attention_mask"].sum()), n
        return loss.detach()

    def on_before_optimizer_step(self, optimizer) -> None:
        """Divide the accumulated gradients by the supervised tokens of the global batch (before clipping).
        (GRPO's loss is already a mean: nothing to divide.)"""
        if not self.automatic_optimization:
            return
        total = self.trainer.strategy.reduce(self._step_tokens.to(self.device), reduce_op="sum")
        scale = 1.0 / max(float(total), 1.0)
        for group in optimizer.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.grad.mul_(scale)
        self._step_tokens = torch.zeros((), dtype=torch.long)

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        now = time.perf_counter()
        if self._last_step_end is not None:
            elapsed = max(now - self._last_step_end, 1e-9)
            self.log("perf/tokens_per_s", self._tokens / elapsed, batch_size=self._samples)
            self.log("perf/samples_per_s", self._samples / elapsed, batch_size=self._samples)
        self._last_step_end = now

    def on_validation_epoch_start(self) -> None:
        from gazelit.models.routing_accuracy import RoutingAccuracy

        k = self.model.top_k
        close = self.model.look_tokens.close if self.model.look_tokens is not None else None
        self._routing = (RoutingAccuracy(k, self.model.config.gaze.shared_gqa, look_close=close,
                                         tokenizer=self.model.tokenizer)
                         if self.model.gaze_enabled and k else None)  # fmt: skip

    def on_validation_epoch_end(self) -> None:
        """Routing accuracy and hit rates at the first answer token and (val/at_name/...) at the question's
        words naming the object, against the data's object boxes (gazelit.models.routing_accuracy); logged
        where the validation data has boxes."""
        routing = getattr(self, "_routing", None)
        if routing is not None:
            for name, value in routing.metrics().items():
                self.log(f"val/{name}", value, sync_dist=True)
            # this rank's (layer, head, gap) that follows the question most; the routing picture marks it
            self.question_head = routing.question_head()
            self._routing = None

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        routing = getattr(self, "_routing", None)
        if routing is not None:
            routing.batch = batch
        out = self.model(batch, probe=routing)
        logits = out.logits[:, :-1]
        labels = batch["labels"][:, 1:]
        supervised = int((labels != -100).sum())
        if supervised:
            self.val_loss.update(out.loss, weight=supervised)
            self.val_token_acc.update(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1))
            exact = answer_exact_match(logits, labels)
            if exact.numel():
                self.val_answer_acc.update(exact.float())
        b = batch["input_ids"].shape[0]
        self.log("val/loss", self.val_loss, on_epoch=True, prog_bar=True, batch_size=b)
        self.log("val/token_acc", self.val_token_acc, on_epoch=True, batch_size=b)
        self.log("val/answer_acc", self.val_answer_acc, on_epoch=True, prog_bar=True, batch_size=b)

    def _k_value(self, ctx) -> float:
        k = self.model.top_k
        if k is not None:
            return k
        return float(ctx.layout.region_count.max()) if ctx is not None else float("nan")

    def _log_skips(self, skipped: dict | None, batch_size: int) -> None:
        if skipped:
            self._skipped.update(skipped)
        for reason, count in self._skipped.items():
            self.log(f"data/skipped/{reason}", float(count), batch_size=batch_size)

    # ------------------------------------------------------------------ schedule state (k)
    def set_top_k(self, k: int | None) -> None:
        self.model.top_k = k


def apply_stage(model: GazeVLM, stage: str) -> None:
    """requires_grad per component for a stage; the vision tower follows its own `trainable` flag."""
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}; choose one of {STAGES}")
    model.projector.requires_grad_(True)
    model.context_tokens.requires_grad_(model.context_tokens.numel() > 0)
    model.llm.requires_grad_(stage in ("finetune", "grpo"))
    model.vision.set_trainable(model.config.vision.trainable)


def trainable_parameter_counts(model: GazeVLM) -> dict[str, tuple[int, int]]:
    parts: dict[str, Any] = {
        "vision": model.vision, "projector": model.projector, "llm": model.llm, "context": [model.context_tokens]
    }
    counts = {}
    for name, part in parts.items():
        params = list(part.parameters()) if hasattr(part, "parameters") else part
        counts[name] = (sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params))
    return counts
