"""The outer loop: meta-batches of episodes, AdamW, schedule, validation, checkpoints."""

from __future__ import annotations

import contextlib
import functools
import json
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from metalm import distributed
from metalm.checkpoint import (
    load_checkpoint,
    load_extra,
    load_weights,
    save_checkpoint,
    save_weights_atomic,
)
from metalm.config import TrainConfig
from metalm.data.episodes import TaskSampler
from metalm.errors import MetalmError
from metalm.hypergrad import HypergradientLR
from metalm.learners.base import MetaLearner
from metalm.runs.accuracy import validation_accuracy
from metalm.runs.directory import (
    BEST_WEIGHTS,
    CHECKPOINT_DIR,
    LOG_FILE,
    TENSORBOARD_DIR,
    find_checkpoint,
)

ValidationCallback = Callable[[int, float], None]


def lr_lambda(cfg: TrainConfig):
    """Warm-up then `linear`/`cosine` decay to zero, or `constant` (`TrainConfig` checks
    the name)."""

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


def _write_record(record: dict[str, Any], log: Any, writer: Any) -> None:
    """One step's record as a line of `log.jsonl` and as TensorBoard scalars (either
    may be None: another rank's, or TensorBoard off)."""
    if log is not None:
        log.write(json.dumps(record) + "\n")
        log.flush()
    if writer is not None:
        for key in ("loss", "lr", "val_accuracy"):
            if key in record:
                writer.add_scalar(f"train/{key}", record[key], record["step"])


@dataclass
class TrainResult:
    steps: int
    best_step: int | None
    best_val_accuracy: float | None
    val_history: list[dict[str, float]] = field(default_factory=list)
    stopped_early: bool = False


@dataclass
class TrainState:
    """Where training stands: the steps done, the best validation so far and when, the
    validations since it improved, their history, and whether it stopped early. Saved in
    every checkpoint (`state.json`) and sent from rank 0 to the others."""

    step: int = 0
    best_step: int | None = None
    best_val_accuracy: float | None = None
    evals_without_improvement: int = 0
    val_history: list[dict[str, float]] = field(default_factory=list)
    stopped_early: bool = False

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainState:
        """The state a checkpoint's `state.json` holds (keys it lacks: their defaults)."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})

    def result(self) -> TrainResult:
        return TrainResult(
            steps=self.step,
            best_step=self.best_step,
            best_val_accuracy=self.best_val_accuracy,
            val_history=list(self.val_history),
            stopped_early=self.stopped_early,
        )


class MetaTrainer:
    """Meta-trains `learner` on episodes of `train_sampler`, validating on `val_sampler`.

    Episode `i` of step `s` is `train_sampler.sample(s * meta_batch_size + i)`, so a run
    resumed from a checkpoint sees exactly the episodes the uninterrupted run would. Each
    episode's meta-loss runs under its own torch seed (from `seed` and its index), so
    its dropout masks do not depend on the episodes before it either.

    Under torchrun (see `metalm.distributed`) each rank computes its share of every
    meta-batch and the meta-gradients are summed over the ranks before the optimizer
    step; rank 0 alone logs, validates and writes checkpoints, and sends its validation
    outcome (best step, early stop, a callback's exception) to the others.

    Example:
        >>> train = TrainConfig(steps=4, eval_every=2, val_episodes=2, tensorboard=False)
        >>> trainer = MetaTrainer(learner, train_sampler, val_sampler, train, "runs/x", False)
        >>> result = trainer.fit()
        >>> result.steps, [row["step"] for row in result.val_history]
        (4, [2, 4])
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
        seed: int | None = None,
    ):
        if getattr(getattr(learner, "encoder", None), "quantized", False):
            raise MetalmError(
                "an int8-quantized encoder adapts and predicts but cannot be meta-trained; "
                "meta-train the fp32 model and quantize when you load it (quantize='int8')"
            )
        self.world = distributed.world()
        if self.world.distributed:
            distributed.check_meta_batch(config.meta_batch_size, self.world.size)
        # the base of the episodes' torch seeds: by default the seed `run` gave torch
        self.seed = torch.initial_seed() if seed is None else seed
        self.learner = learner
        self.train_sampler = train_sampler
        self.val_sampler = val_sampler
        self.config = config
        self.run_dir = Path(run_dir)
        self.progress = progress and self.world.is_main
        # called as callback(step, val_accuracy) after each validation; an exception
        # raised there (e.g. optuna.TrialPruned) stops training and propagates
        self.on_validation: list[ValidationCallback] = list(on_validation)
        groups = [  # e.g. Meta-SGD's rates have a group of their own
            g for g in learner.optimizer_groups(config.lr, config.weight_decay) if g["params"]
        ]
        self.optimizer = torch.optim.AdamW(groups, lr=config.lr, weight_decay=config.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda(config))
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
        self.state = TrainState()

    @property
    def checkpoint_dir(self) -> Path:
        return self.run_dir / CHECKPOINT_DIR

    def resume(self) -> int:
        """Restore the last checkpoint; returns the step training continues from."""
        found = find_checkpoint(self.checkpoint_dir)
        if found is None:
            raise MetalmError(f"{self.run_dir}: no checkpoint to resume from")
        state = load_checkpoint(found, self.learner, self.optimizer, self.scheduler)
        self.state = TrainState.from_dict(state)
        extra = load_extra(found)
        if extra:
            self.train_sampler.load_state_dict(extra)
        step = int(self.state.step)
        distributed.on_main(lambda: self._truncate_log(step), f"truncating {LOG_FILE}")
        return step

    def fit(self, resume: bool = False) -> TrainResult:
        cfg = self.config
        self.run_dir.mkdir(parents=True, exist_ok=True)
        start = self.resume() if resume else 0
        # rank 0's outputs (None on the others); if it cannot open them, every rank stops
        writer = distributed.on_main(self._tensorboard, "starting TensorBoard")
        log = distributed.on_main(self._open_log, f"opening {LOG_FILE}")
        bar = tqdm(
            total=cfg.steps,
            initial=start,
            desc="meta-train",
            unit="step",
            disable=not self.progress,
            dynamic_ncols=True,
        )
        try:
            with log if log is not None else contextlib.nullcontext():
                for step in range(start, cfg.steps):
                    if self.state.stopped_early:
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
                    self.state.step = step + 1
                    if (step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps:
                        record["val_accuracy"] = self._validate_everywhere(step + 1)
                        bar.set_postfix(loss=f"{loss:.3f}", val=f"{record['val_accuracy']:.3f}")
                    else:
                        bar.set_postfix(loss=f"{loss:.3f}")
                    save = (step + 1) % cfg.checkpoint_every == 0 or step + 1 == cfg.steps
                    # rank 0 logs and saves alone; if that fails, every rank stops here
                    distributed.on_main(
                        functools.partial(self._record, record, log, writer, save),
                        f"logging or saving step {step + 1}",
                    )
                    bar.update(1)
        finally:
            bar.close()
            if writer is not None:
                writer.close()
        if self.state.stopped_early and self.state.step < cfg.steps:
            distributed.on_main(self._save, "saving the early-stopped run")
        distributed.barrier()  # rank 0's best weights are written
        best = self.run_dir / BEST_WEIGHTS
        if best.exists():
            load_weights(self.learner, best)
        return self.state.result()

    def _step(self, step: int) -> float:
        cfg = self.config
        # hard negatives and cluster tasks are recomputed from the current encoder
        self.train_sampler.on_step(step, self.learner.encoder.embed)
        if self.world.distributed:
            self._check_samplers_agree(step)
        self.learner.train()
        self.optimizer.zero_grad(set_to_none=True)
        total = 0.0
        # this rank's share of the meta-batch (all of it in one process)
        share = distributed.shard(cfg.meta_batch_size, self.world)
        indices = [step * cfg.meta_batch_size + i for i in share]
        for loss in self._losses(indices):
            if not torch.isfinite(loss):
                total = loss.item()  # the other ranks learn it from the sum below
                break
            loss.backward()
            total += loss.item()
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        # sums over the ranks: the global meta-batch's mean loss and its gradient
        total = distributed.all_reduce_gradients(params, total)
        if not math.isfinite(total):  # on every rank alike
            raise MetalmError(
                f"the meta-training loss became {total} at step {step + 1}; "
                f"lower train.lr (now {cfg.lr}) or raise train.warmup_steps; the last "
                f"good checkpoint is kept in {self.checkpoint_dir}"
            )
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

    def _losses(self, indices: list[int]) -> Iterator[torch.Tensor]:
        """The meta-losses of episodes `indices`, each weighted by 1/meta_batch_size: one
        vmap call for all of them when the learner batches, else one per episode."""
        episodes = [self.train_sampler.sample(i) for i in indices]
        size = self.config.meta_batch_size
        with self._episode_seed(indices[0]):
            batched = self.learner.meta_loss_batch(episodes)  # their mean loss, or None
        if batched is not None:
            yield batched * (len(episodes) / size)
            return
        for index, episode in zip(indices, episodes, strict=True):
            with self._episode_seed(index):
                loss = self.learner.meta_loss(episode)
            yield loss / size

    @contextlib.contextmanager
    def _episode_seed(self, index: int) -> Iterator[None]:
        """Torch's random numbers (dropout) for episode `index`: seeded from the trainer's
        seed and the index, the global generator left as it was."""
        device = self.learner.encoder.device
        devices = []
        if device.type == "cuda":
            devices = [device.index if device.index is not None else torch.cuda.current_device()]
        seed = int(np.random.SeedSequence([self.seed, index]).generate_state(1, np.uint64)[0])
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            yield

    def _check_samplers_agree(self, step: int) -> None:
        """Samplers refreshed from the encoder (hard negatives, clusters) must be equal on
        every rank: the ranks hold equal weights and the refresh is deterministic; a
        difference (nondeterministic kernels) would make them draw different tasks."""
        state = self.train_sampler.state_dict()
        if state and not distributed.same_on_all_ranks(state):
            raise MetalmError(
                f"at step {step + 1} the task samplers' refreshed state (hard negatives, "
                "clusters) differs between processes; the encoder's embeddings are not "
                "deterministic here: train in one process"
            )

    def _validate_everywhere(self, step: int) -> float:
        """Rank 0 validates; every rank gets its outcome (best step, early stop) and stops
        if rank 0's validation raised (e.g. a pruned trial)."""
        accuracy, error = float("nan"), None
        if self.world.is_main:
            try:
                accuracy = self._validate(step)
            except BaseException as err:  # re-raised below, after the others know
                if not self.world.distributed:
                    raise
                error = err
        if self.world.distributed:
            self.state, failed = distributed.broadcast_object((self.state, error is not None))
            if error is not None:
                raise error
            if failed:
                raise distributed.StoppedByMain(
                    f"rank 0 stopped training at step {step} (see its message)"
                )
        return accuracy

    def _open_log(self) -> Any:
        return open(self.run_dir / LOG_FILE, "a", encoding="utf-8")

    def _validate(self, step: int) -> float:
        if self.val_sampler is None:
            return float("nan")
        accuracy = validation_accuracy(self.learner, self.val_sampler, self.config.val_episodes)
        state = self.state
        state.val_history.append({"step": step, "val_accuracy": accuracy})
        if state.best_val_accuracy is None or accuracy > state.best_val_accuracy:
            state.best_val_accuracy, state.best_step = accuracy, step
            state.evals_without_improvement = 0
            if self.config.select_best:
                save_weights_atomic(self.learner, self.run_dir / BEST_WEIGHTS)
        else:
            state.evals_without_improvement += 1
            patience = self.config.patience
            if patience and state.evals_without_improvement >= patience:
                state.stopped_early = True
        for callback in self.on_validation:
            callback(step, accuracy)
        return accuracy

    def _record(self, record: dict[str, Any], log: Any, writer: Any, save: bool) -> None:
        _write_record(record, log, writer)
        if save:
            self._save()

    def _save(self) -> None:
        save_checkpoint(
            self.checkpoint_dir,
            self.learner,
            self.optimizer,
            self.scheduler,
            asdict(self.state),
            extra=self.train_sampler.state_dict(),
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
        return SummaryWriter(str(self.run_dir / TENSORBOARD_DIR))
