"""`FewShotClassifier`: a pretrained meta-learner as a scikit-learn-like classifier.

Example:
    >>> clf = FewShotClassifier.from_pretrained(saved_model)    # e.g. "protonet-minilm"
    >>> clf = clf.adapt(["lost my card", "card stolen", "balance?", "how much money"],
    ...                 ["lost", "lost", "balance", "balance"])
    >>> clf.classes_, clf.predict(["someone took my card"])[0] in clf.classes_
    (['balance', 'lost'], True)
    >>> clf.predict_proba(["someone took my card"]).shape
    (1, 2)
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from metalm.atomic import recover, replace_dir
from metalm.errors import MetalmError, first_line
from metalm.layout import (
    TASK_FORMAT_VERSION,
    TASK_INFO,
    TASK_WEIGHTS,
    fingerprint,
    metalm_version,
)
from metalm.learners.base import MetaLearner, TaskState
from metalm.pretrained import from_pretrained, resolve_pretrained, safetensors_ready
from metalm.scoring import ScoreResult, score_predictions
from metalm.task_input import Label, check_examples, check_label, check_texts, task_classes

# texts whose tokens a classifier keeps between calls; tokenizing runs at ~45,000 texts/s
# (benchmarks/encode_speed.py), so a small cache costs nothing and bounds a service's memory
TOKEN_CACHE_LIMIT = 5_000


class FewShotClassifier:
    """Adapt a pretrained meta-learner to a new task from a few labeled examples.

    `classes_` holds the label names (sorted; strings and integers as given), and
    `predict` returns them. Prediction is batched, without gradients and deterministic.

    Example:
        >>> clf = FewShotClassifier.from_pretrained(saved_model).fit(texts, labels)
        >>> clf.save_task("task-dir")
        PosixPath('task-dir')
        >>> loaded = FewShotClassifier.load_task("task-dir")
        >>> loaded.predict(["new text"]) == clf.predict(["new text"])
        True
    """

    def __init__(
        self,
        learner: MetaLearner,
        model_path: str = "",
        model_fingerprint: str = "",
        batch_size: int = 64,
    ):
        self.learner = learner.eval()
        self.model_path = model_path
        self.model_fingerprint = model_fingerprint
        self.batch_size = batch_size
        self.state_: TaskState | None = None
        self._classes: list[Label] | None = None

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str | Path,
        device: str = "auto",
        batch_size: int = 64,
        quantize: str = "none",
        backend: str = "torch",
    ) -> FewShotClassifier:
        """Load a directory made by `save_pretrained` / `metalm export` (or a Hub id);
        `quantize="int8"`: a faster CPU encoder at a small accuracy cost (BENCHMARKS.md);
        `backend="onnx"`: the encoder on ONNX Runtime (exported once, into the model
        directory's `onnx/`)."""
        directory = resolve_pretrained(name_or_path)
        learner = from_pretrained(directory, device=device, quantize=quantize, backend=backend)
        return cls(learner, str(directory.resolve()), fingerprint(directory), batch_size)

    def unfitted(self) -> FewShotClassifier:
        """A new, unadapted classifier sharing this one's model (cheap: no copy)."""
        return FewShotClassifier(
            self.learner, self.model_path, self.model_fingerprint, self.batch_size
        )

    # -- adaptation --------------------------------------------------------------------
    @property
    def classes_(self) -> list[Label]:
        if self._classes is None:
            raise MetalmError("the classifier is not adapted yet; call adapt(texts, labels)")
        return list(self._classes)

    @property
    def is_adapted(self) -> bool:
        return self.state_ is not None

    def adapt(
        self,
        texts: Sequence[str],
        labels: Sequence[Label],
        unlabeled: Sequence[str] | None = None,
    ) -> FewShotClassifier:
        """Learn the task from labeled examples (at least 2 classes); returns self.

        `unlabeled`: texts of the task without labels; the most confident predictions
        among them join the examples and the head is fitted again (self-training,
        `frozen`/`protonet` models; `learner.self_train_*` set how many and how much)."""
        texts, labels = check_examples(texts, labels)
        classes = task_classes(labels)
        index = {name: i for i, name in enumerate(classes)}
        encoder = getattr(self.learner, "encoder", None)
        if getattr(encoder, "needs_calibration", False):  # --quantize int8-static, first task
            encoder.calibrate(texts)
        # learners that draw random numbers while adapting get the same ones every time
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            names = [str(c) for c in classes]
            if unlabeled:
                state = self.learner.adapt_unlabeled(
                    texts,
                    [index[v] for v in labels],
                    names,
                    check_texts(unlabeled, "unlabeled texts"),
                )
            else:
                state = self.learner.adapt_named(texts, [index[v] for v in labels], names)
        self.state_ = {k: v.detach() for k, v in state.items()}
        self._classes = classes
        _trim_token_cache(self.learner)
        return self

    fit = adapt

    # -- prediction --------------------------------------------------------------------
    def predict_proba(self, texts: Sequence[str]) -> np.ndarray:
        """Class probabilities, shape [len(texts), len(classes_)]; columns as `classes_`."""
        classes = self.classes_
        texts = check_texts(texts)
        if not texts:
            return np.zeros((0, len(classes)), dtype=np.float32)
        assert self.state_ is not None
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise MetalmError(f"batch_size must be a positive integer, got {self.batch_size!r}")
        # batches of equal token counts pad little: sort by them, restore the order after
        counts = self.learner.encoder.token_counts(texts)
        order = sorted(range(len(texts)), key=counts.__getitem__)
        out = np.empty((len(texts), len(classes)), dtype=np.float32)
        with torch.no_grad():
            for start in range(0, len(order), self.batch_size):
                rows = order[start : start + self.batch_size]
                logits = self.learner.predict(self.state_, [texts[i] for i in rows])
                out[rows] = torch.softmax(logits.float(), dim=-1).cpu().numpy()
        _trim_token_cache(self.learner)
        return out

    def predict(self, texts: Sequence[str]) -> list[Label]:
        """The most likely label name of each text."""
        classes = self.classes_
        return [classes[i] for i in self.predict_proba(texts).argmax(-1)]

    def predict_with_probability(self, texts: Sequence[str]) -> list[tuple[Label, float]]:
        """(label, its probability) for each text."""
        classes = self.classes_
        probs = self.predict_proba(texts)
        return [(classes[int(row.argmax())], float(row.max())) for row in probs]

    def score(
        self, texts: Sequence[str], labels: Sequence[Label], top_pairs: int = 10
    ) -> ScoreResult:
        """Predict `texts` and score the predictions against their `labels`: accuracy,
        macro-F1, per-class precision/recall/F1/support, the most confused pairs. Labels
        the task does not know raise a MetalmError naming them (a label read as the string
        "3" matches an integer class 3).

        Example:
            >>> result = clf.score(["is it sunny", "wake me at 7"], ["weather", "alarm"])
            >>> result.accuracy, result.macro_f1, result.confused_pairs
            (1.0, 1.0, [])
            >>> [path.name for path in result.write("scores/")]
            ['score.json', 'score.md', 'confusion.png']
        """
        classes = self.classes_
        texts = check_texts(texts)
        labels = [check_label(v, i) for i, v in enumerate(labels)]
        if len(texts) != len(labels):
            raise MetalmError(f"{len(texts)} texts but {len(labels)} labels")
        if not texts:
            raise MetalmError("nothing to score: give at least one labeled text")
        known: dict[Label, Label] = {str(c): c for c in classes}
        known.update({c: c for c in classes})
        unknown = sorted({str(v) for v in labels if v not in known and str(v) not in known})
        if unknown:
            shown = ", ".join(repr(v) for v in unknown[:20])
            more = f" and {len(unknown) - 20} more" if len(unknown) > 20 else ""
            raise MetalmError(
                f"labels the task does not know: {shown}{more} (its {len(classes)} classes: "
                f"{', '.join(repr(c) for c in classes[:20])}{' ...' if len(classes) > 20 else ''}"
                "); drop those rows, or adapt the task on examples of them"
            )
        truth = [known[v] if v in known else known[str(v)] for v in labels]
        result = score_predictions(truth, self.predict(texts), classes, top_pairs)
        result.info.update(learner=self.learner.name, model=self.model_path)
        return result

    # -- task files --------------------------------------------------------------------
    def save_task(self, directory: str | Path, info: dict[str, Any] | None = None) -> Path:
        """Write the adapted task: `task.safetensors` (the task state) and `task.json`
        (label names, the model's path and fingerprint; `info` is kept as given). An
        existing directory is replaced atomically (`metalm.atomic`)."""
        classes = self.classes_
        assert self.state_ is not None
        meta = {
            "format_version": TASK_FORMAT_VERSION,
            "metalm_version": metalm_version(),
            "classes": classes,
            "learner": self.learner.name,
            "model": self.model_path,
            "model_fingerprint": self.model_fingerprint,
            "info": info or {},
        }
        state = safetensors_ready(self.state_)

        def write(tmp: Path) -> None:
            save_file(state, str(tmp / TASK_WEIGHTS))
            (tmp / TASK_INFO).write_text(json.dumps(meta, indent=1), encoding="utf-8")

        return replace_dir(directory, write)

    @staticmethod
    def read_task_info(directory: str | Path) -> dict[str, Any]:
        """The `task.json` of a task directory, checked."""
        path = recover(directory) / TASK_INFO
        if not path.exists():
            raise MetalmError(f"{directory}: not a task directory (no {TASK_INFO})")
        try:
            meta = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise MetalmError(f"{path}: not valid JSON ({err})") from None
        version = meta.get("format_version") if isinstance(meta, dict) else None
        if not isinstance(version, int) or version < 1:
            raise MetalmError(f"{path}: format_version must be a positive integer")
        if version > TASK_FORMAT_VERSION:
            raise MetalmError(
                f"{path}: task format_version {version} is newer than this metalm reads "
                f"({TASK_FORMAT_VERSION}); upgrade metalm"
            )
        classes = meta.get("classes")
        if not isinstance(classes, list) or len(classes) < 2:
            raise MetalmError(f"{path}: 'classes' must list at least 2 labels")
        return meta

    @classmethod
    def load_task(
        cls,
        directory: str | Path,
        model: FewShotClassifier | str | Path | None = None,
        device: str = "auto",
        quantize: str = "none",
        backend: str = "torch",
    ) -> FewShotClassifier:
        """An adapted classifier from `save_task`'s directory, over `model` (a loaded
        classifier to share, or a model directory; default: the path the task recorded).
        A task adapted with another model is refused (fingerprints differ)."""
        directory = recover(directory)
        meta = cls.read_task_info(directory)
        if model is None:
            model = meta.get("model") or ""
            if not model:
                raise MetalmError(f"{directory}: the task records no model; pass model=")
        base = (
            model
            if isinstance(model, FewShotClassifier)
            else cls.from_pretrained(model, device, quantize=quantize, backend=backend)
        )
        recorded = meta.get("model_fingerprint")
        if recorded and base.model_fingerprint and recorded != base.model_fingerprint:
            raise MetalmError(
                f"{directory}: the task was adapted with another model (fingerprint "
                f"{recorded}, this model {base.model_fingerprint}); adapt it again"
            )
        weights = directory / TASK_WEIGHTS
        if not weights.exists():
            raise MetalmError(f"{directory}: missing {TASK_WEIGHTS}")
        clf = base.unfitted()
        try:
            clf.state_ = load_file(str(weights), device=str(base.learner.encoder.device))
        except SafetensorError as err:
            raise MetalmError(
                f"{weights}: broken or truncated ({first_line(err)}); adapt the "
                "task again (metalm adapt)"
            ) from None
        clf._classes = list(meta["classes"])
        return clf


def _trim_token_cache(learner: MetaLearner) -> None:
    """Bound the encoder's token cache: a long-running service sees endless new texts."""
    cache = getattr(learner.encoder, "_token_cache", None)
    if isinstance(cache, dict) and len(cache) > TOKEN_CACHE_LIMIT:
        cache.clear()
