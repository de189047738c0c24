"""The outer loop: meta-batches of episodes, AdamW, schedule, validation, checkpoints."""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from metalm.checkpoint import (
    find_checkpoint,
    load_checkpoint,
    load_extra,
    load_weights,
    save_checkpoint,
    save_weights_atomic,
)
from metalm.config import TrainConfig
from metalm.data.mixture import TaskSampler, load_sampler_state, on_step, sampler_state
from metalm.errors import MetalmError
from metalm.evaluate import validation_accuracy
from metalm.hypergrad import HypergradientLR
from metalm.learners.base import MetaLearner

ValidationCallback = Callable[[int, float], None]

CHECKPOINT_DIR = "checkpoint"
BEST_WEIGHTS = "best.safetensors"
LOG_FILE = "log.jsonl"


def lr_lambda(cfg: TrainConfig):
    """Warm-up then `linear`/`cosine` decay to zero, or `constant`."""
    if cfg.schedule not in ("linear", "cosine", "constant"):
        raise MetalmError(
            f"train.schedule must be linear, cosine or constant, got {cfg.schedule!r}"
        )

    def factor(step: int) -> float:
        if cfg.warmup_steps and step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        if cfg.schedule == "constant":
            return 1.0
        progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
        progress = min(max(progress, 0.0), 1.0)
        if cfg.schedule == "linear":
            return 1.0 - progress
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


@dataclass
class TrainResult:
    steps: int
    best_step: int | None
    best_val_accuracy: float | None
    val_history: list[dict[str, float]] = field(default_factory=list)
    stopped_early: bool = False


class MetaTrainer:
    """Meta-trains `learner` on episodes of `train_sampler`, validating on `val_sampler`.

    Episode `i` of step `s` is `train_sampler.sample(s * meta_batch_size + i)`, so a run
    resumed from a checkpoint sees exactly the episodes the uninterrupted run would.

    Example:
        >>> trainer = MetaTrainer(learner, train_sampler, val_sampler, TrainConfig(), "runs/x")
        >>> result = trainer.fit()
    """

    def __init__(
        self,
        learner: MetaLearner,
        train_sampler: TaskSampler,
        val_sampler: TaskSampler | None,
        config: TrainConfig,
        run_dir: str | Path,
        progress: bool = True,
        on_validation: Sequence[ValidationCallback] = (),
    ):
        for name in ("steps", "meta_batch_size", "eval_every", "checkpoint_every"):
            if getattr(config, name) < (0 if name == "steps" else 1):
                raise MetalmError(f"train.{name} must be positive, got {getattr(config, name)}")
        if getattr(getattr(learner, "encoder", None), "quantized", False):
            raise MetalmError(
                "an int8-quantized encoder adapts and predicts but cannot be meta-trained; "
                "meta-train the fp32 model and quantize when you load it (quantize='int8')"
            )
        self.learner = learner
        self.train_sampler = train_sampler
        self.val_sampler = val_sampler
        self.config = config
        self.run_dir = Path(run_dir)
        self.progress = progress
        # called as callback(step, val_accuracy) after each validation; an exception
        # raised there (e.g. optuna.TrialPruned) stops training and propagates
        self.on_validation: list[ValidationCallback] = list(on_validation)
        make_groups = getattr(learner, "optimizer_groups", None)  # e.g. Meta-SGD's rates
        groups = (
            [g for g in make_groups(config.lr, config.weight_decay) if g["params"]]
            if make_groups is not None
            else [{"params": [p for p in learner.parameters() if p.requires_grad]}]
        )
        self.optimizer = torch.optim.AdamW(groups, lr=config.lr, weight_decay=config.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda(config))
        if config.hypergradient_lr < 0:
            raise MetalmError(f"train.hypergradient_lr must be >= 0, got {config.hypergradient_lr}")
        if config.hypergradient_rule not in ("additive", "multiplicative"):
            raise MetalmError(
                "train.hypergradient_rule must be 'additive' or 'multiplicative', "
                f"got {config.hypergradient_rule!r}"
            )
        if config.hypergradient_rule == "multiplicative" and config.hypergradient_lr >= 1:
            raise MetalmError(
                "train.hypergradient_lr must be < 1 with the multiplicative rule "
                f"(a relative change per step), got {config.hypergradient_lr}"
            )
        self.hypergradient = (
            HypergradientLR(
                self.optimizer,
                self.scheduler,
                config.hypergradient_lr,
                rule=config.hypergradient_rule,
            )
            if config.hypergradient_lr > 0
            else None
        )
        self.state: dict[str, Any] = {
            "step": 0,
            "best_step": None,
            "best_val_accuracy": None,
            "evals_without_improvement": 0,
            "val_history": [],
            "stopped_early": False,
        }

    @property
    def checkpoint_dir(self) -> Path:
        return self.run_dir / CHECKPOINT_DIR

    def resume(self) -> int:
        """Restore the last checkpoint; returns the step training continues from."""
        found = find_checkpoint(self.checkpoint_dir)
        if found is None:
            raise MetalmError(f"{self.run_dir}: no checkpoint to resume from")
        self.state = load_checkpoint(found, self.learner, self.optimizer, self.scheduler)
        load_sampler_state(self.train_sampler, load_extra(found))
        self._truncate_log(self.state["step"])
        return int(self.state["step"])

    def fit(self, resume: bool = False) -> TrainResult:
        cfg = self.config
        self.run_dir.mkdir(parents=True, exist_ok=True)
        start = self.resume() if resume else 0
        writer = self._tensorboard()
        bar = tqdm(
            total=cfg.steps,
            initial=start,
            desc="meta-train",
            unit="step",
            disable=not self.progress,
            dynamic_ncols=True,
        )
        try:
            with open(self.run_dir / LOG_FILE, "a", encoding="utf-8") as log:
                for step in range(start, cfg.steps):
                    if self.state["stopped_early"]:
                        break
                    began = time.perf_counter()
                    lr = self.scheduler.get_last_lr()[0]  # the rate this step trains with
                    loss = self._step(step)
                    if self.hypergradient is not None:
                        lr = self.hypergradient.lrs_used[0]  # moved by its hypergradient
                    record = {
                        "step": step + 1,
                        "loss": loss,
                        "lr": lr,
                        "seconds": time.perf_counter() - began,
                    }
                    self.state["step"] = step + 1
                    if (step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps:
                        record["val_accuracy"] = self._validate(step + 1)
                        bar.set_postfix(loss=f"{loss:.3f}", val=f"{record['val_accuracy']:.3f}")
                    else:
                        bar.set_postfix(loss=f"{loss:.3f}")
                    log.write(json.dumps(record) + "\n")
                    log.flush()
                    if writer is not None:
                        for key in ("loss", "lr", "val_accuracy"):
                            if key in record:
                                writer.add_scalar(f"train/{key}", record[key], step + 1)
                    if (step + 1) % cfg.checkpoint_every == 0 or step + 1 == cfg.steps:
                        self._save()
                    bar.update(1)
        finally:
            bar.close()
            if writer is not None:
                writer.close()
        if self.state["stopped_early"] and self.state["step"] < cfg.steps:
            self._save()
        best = self.run_dir / BEST_WEIGHTS
        if best.exists():
            load_weights(self.learner, best)
        return TrainResult(
            steps=self.state["step"],
            best_step=self.state["best_step"],
            best_val_accuracy=self.state["best_val_accuracy"],
            val_history=list(self.state["val_history"]),
            stopped_early=self.state["stopped_early"],
        )

    def _step(self, step: int) -> float:
        cfg = self.config
        # hard negatives and cluster tasks are recomputed from the current encoder
        on_step(self.train_sampler, step, self.learner.encoder.embed)
        self.learner.train()
        self.optimizer.zero_grad(set_to_none=True)
        total = 0.0
        episodes = [
            self.train_sampler.sample(step * cfg.meta_batch_size + i)
            for i in range(cfg.meta_batch_size)
        ]
        batch_loss = getattr(self.learner, "meta_loss_batch", None)
        batched = batch_loss(episodes) if batch_loss is not None else None  # one vmap call
        losses = (
            [batched]
            if batched is not None
            else (self.learner.meta_loss(ep) / cfg.meta_batch_size for ep in episodes)
        )
        for loss in losses:
            if not torch.isfinite(loss):
                raise MetalmError(
                    f"the meta-training loss became {loss.item()} at step {step + 1}; "
                    f"lower train.lr (now {cfg.lr}) or raise train.warmup_steps; the last "
                    f"good checkpoint is kept in {self.checkpoint_dir}"
                )
            loss.backward()
            total += loss.item()
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        norm = torch.nn.utils.clip_grad_norm_(
            params, cfg.grad_clip if cfg.grad_clip > 0 else float("inf")
        )
        if not torch.isfinite(norm):
            raise MetalmError(
                f"the meta-gradient became {norm.item()} at step {step + 1}; lower train.lr "
                f"(now {cfg.lr}) or set train.grad_clip; the last good checkpoint is kept "
                f"in {self.checkpoint_dir}"
            )
        if self.hypergradient is not None:
            self.hypergradient.before_step()
        self.optimizer.step()
        if self.hypergradient is not None:
            self.hypergradient.after_step()
        self.scheduler.step()
        return total

    def _validate(self, step: int) -> float:
        if self.val_sampler is None:
            return float("nan")
        accuracy = validation_accuracy(self.learner, self.val_sampler, self.config.val_episodes)
        self.state["val_history"].append({"step": step, "val_accuracy": accuracy})
        best = self.state["best_val_accuracy"]
        if best is None or accuracy > best:
            self.state.update(best_val_accuracy=accuracy, best_step=step)
            self.state["evals_without_improvement"] = 0
            if self.config.select_best:
                save_weights_atomic(self.learner, self.run_dir / BEST_WEIGHTS)
        else:
            self.state["evals_without_improvement"] += 1
            patience = self.config.patience
            if patience and self.state["evals_without_improvement"] >= patience:
                self.state["stopped_early"] = True
        for callback in self.on_validation:
            callback(step, accuracy)
        return accuracy

    def _save(self) -> None:
        save_checkpoint(
            self.checkpoint_dir,
            self.learner,
            self.optimizer,
            self.scheduler,
            self.state,
            extra=sampler_state(self.train_sampler),
        )

    def _truncate_log(self, step: int) -> None:
        """Drop log lines past the checkpoint (and a line half-written by a crash)."""
        path = self.run_dir / LOG_FILE
        if not path.exists():
            return
        kept = []
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if record.get("step", 0) <= step:
                kept.append(line)
        path.write_text("".join(k + "\n" for k in kept), encoding="utf-8")

    def _tensorboard(self):
        if not self.config.tensorboard:
            return None
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            return None
        return SummaryWriter(str(self.run_dir / "tensorboard"))
