"""Adapt a task on ONNX Runtime without PyTorch: tokenizers, ONNX Runtime, safetensors
and numpy only (this module imports no torch, and nothing that does).

For models whose task state is a head on the embeddings (`frozen` and `protonet` with
`learner.head` `logreg` at a fixed `logreg_l2`, or `centroid`), over a model directory
whose encoder is exported for ONNX Runtime (`metalm export --format onnx`). The head is
fitted as `FewShotClassifier.adapt` fits it (the label names as examples or as a prior,
as `learner.label_names` says; the same prototype start, temperature and L-BFGS, in
numpy), and the task directory it writes is the one `save_task` writes, so `metalm
predict`, `metalm serve --tasks-dir` and `metalm.onnx_predict` all read it. The head's
fit stops at the same tolerance as PyTorch's, so probabilities agree to ~1e-3 and labels
agree (tests/test_onnx_adapt.py).

Example (in a process without torch):

    task = adapt_task("models/frozen-onnx", texts, labels, "tasks/intents")
    OnnxTaskPredictor(task).predict(["my card has not arrived"])   # ['card_arrival']

or `python -m metalm.onnx_adapt --model models/frozen-onnx --support support.csv
--out tasks/intents`.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from metalm.errors import MetalmError
from metalm.label_names import named_classes, usable_names
from metalm.layout import (
    TASK_FORMAT_VERSION,
    TASK_INFO,
    TASK_WEIGHTS,
    fingerprint,
    metalm_version,
)
from metalm.onnx_predict import ONNX_FILES, OnnxEncoder
from metalm.task_input import check_examples, task_classes

# as metalm.learners.heads fits `learner.head=logreg` (see there)
FIT_ITER, LBFGS_TOL, HISTORY = 100, 1e-4, 10
HEADS = ("logreg", "centroid")
Objective = Callable[[np.ndarray], tuple[np.float32, np.ndarray]]


def _scaled_prototypes(
    x1: np.ndarray, onehot: np.ndarray, rows: np.ndarray, l2: np.float32
) -> tuple[np.ndarray, np.float32]:
    """The prototype head [N, d+1] of the weighted class means, times the temperature τ
    that minimises the penalised loss along it (Newton steps), and τ."""
    weights = rows / max(rows.sum(), np.float32(1e-12))
    counts = rows @ onehot
    means = ((rows[:, None] * onehot).T @ x1[:, :-1]) / np.maximum(counts, 1)[:, None]
    theta = np.concatenate([2 * means, -(means**2).sum(-1, keepdims=True)], 1)
    logits = x1 @ theta.T
    target = (logits * onehot).sum(-1)
    norm = (theta[:, :-1] ** 2).sum()
    tau = np.float32(1.0)
    for _ in range(6):
        probs = _softmax(tau * logits)
        mean = (probs * logits).sum(-1)
        variance = (probs * logits**2).sum(-1) - mean**2
        slope = ((mean - target) * weights).sum() + l2 * tau * norm
        curvature = (variance * weights).sum() + l2 * norm
        tau = np.clip(tau - slope / max(curvature, np.float32(1e-12)), tau / 4, tau * 4)
    return (theta * tau).astype(np.float32), np.float32(tau)


def _softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max(-1, keepdims=True))
    return shifted / shifted.sum(-1, keepdims=True)


def _objective(
    x1: np.ndarray, labels: np.ndarray, weights: np.ndarray, l2: np.float32, center: Any
) -> Objective:
    """The weighted mean cross-entropy plus `l2/2·‖W − center‖²` (bias not penalised),
    and its gradient, of a head `theta` [N, d+1]."""
    rows = np.arange(len(labels))

    def evaluate(theta: np.ndarray) -> tuple[np.float32, np.ndarray]:
        logits = x1 @ theta.T
        shifted = logits - logits.max(-1, keepdims=True)
        logp = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
        offset = theta[:, :-1] - center
        loss = -(logp[rows, labels] * weights).sum() + 0.5 * l2 * (offset**2).sum()
        dlogits = np.exp(logp)
        dlogits[rows, labels] -= 1
        grad = (dlogits * weights[:, None]).T @ x1
        grad[:, :-1] += l2 * offset
        return np.float32(loss), grad.astype(np.float32)

    return evaluate


def _lbfgs(objective: Objective, theta: np.ndarray, max_iter: int, tol: float) -> np.ndarray:
    """L-BFGS with a backtracking (Armijo) step, as `metalm.learners.heads._lbfgs` runs
    each of its problems; stops when no gradient entry is above `tol`."""
    loss, grad = objective(theta)
    memory: list[tuple[np.ndarray, np.ndarray, np.float32]] = []
    for _ in range(max_iter):
        if np.abs(grad).max() <= tol:
            break
        direction = -grad
        alphas = []
        for s, y, rho in reversed(memory):
            alpha = rho * (s * direction).sum()
            direction = direction - alpha * y
            alphas.append(alpha)
        if memory:
            s, y, _ = memory[-1]
            sy, yy = (s * y).sum(), (y * y).sum()
            gamma = sy / max(yy, np.float32(1e-30)) if sy > 0 and yy > 0 else np.float32(1)
        else:
            gamma = 1 / max(np.abs(grad).sum(), np.float32(1.0))
        direction = direction * gamma
        for (s, y, rho), alpha in zip(memory, reversed(alphas), strict=True):
            direction = direction + (alpha - rho * (y * direction).sum()) * s
        slope = (grad * direction).sum()
        if slope >= 0:  # a stale memory: steepest descent
            direction = -grad
            slope = (grad * direction).sum()
        step = np.float32(1.0)
        slack = 1e-6 * max(abs(loss), np.float32(1.0))
        for _ in range(10):
            candidate = (theta + step * direction).astype(np.float32)
            new_loss, new_grad = objective(candidate)
            if new_loss <= loss + 1e-4 * step * slope + slack:
                break
            step = step * np.float32(0.25)
        else:  # no decrease found: converged as far as it can
            return theta
        s, y = candidate - theta, new_grad - grad
        sy = (s * y).sum()
        memory.append((s, y, np.float32(1 / sy) if sy > 1e-10 else np.float32(0)))
        if len(memory) > HISTORY:
            memory.pop(0)
        theta, loss, grad = candidate, new_loss, new_grad
    return theta


def fit_logreg(
    features: np.ndarray,
    labels: np.ndarray,
    n_way: int,
    l2: float,
    sample_weight: np.ndarray | None = None,
    prior: np.ndarray | None = None,
    prior_weight: float = 1.0,
    max_iter: int = FIT_ITER,
    tol: float = LBFGS_TOL,
) -> dict[str, np.ndarray]:
    """`metalm.learners.heads.fit_logreg` at a fixed `l2`, in numpy: a multinomial
    logistic regression head {"head.weight", "head.bias", "head.l2"} started from the
    temperature-scaled prototype head; `prior` [N, dim] with `prior_weight`: a Gaussian
    prior on the weights centred on the prototype head of `prior`."""
    x = features.astype(np.float32)
    x1 = np.concatenate([x, np.ones((len(x), 1), np.float32)], 1)
    onehot = np.eye(n_way, dtype=np.float32)[labels]
    rows = np.ones(len(x), np.float32) if sample_weight is None else sample_weight
    rows = rows.astype(np.float32)
    weights = rows / max(rows.sum(), np.float32(1e-12))
    strength = np.float32(l2)
    theta, tau = _scaled_prototypes(x1, onehot, rows, strength)
    center: Any = np.float32(0)
    if prior is not None:  # l2‖W‖² + w·l2‖W − C‖² = (1+w)·l2‖W − w/(1+w)·C‖² + const
        share = np.float32(prior_weight / (1 + prior_weight))
        center = (share * tau * 2 * prior).astype(np.float32)
        strength = np.float32(strength * (1 + prior_weight))
    theta = _lbfgs(_objective(x1, labels, weights, strength, center), theta, max_iter, tol)
    return {
        "head.weight": np.ascontiguousarray(theta[:, :-1]),
        "head.bias": np.ascontiguousarray(theta[:, -1]),
        "head.l2": np.array([l2], np.float32),
    }


def weighted_means(
    x: np.ndarray, labels: np.ndarray, n_way: int, weights: np.ndarray | None
) -> np.ndarray:
    """Class means [n_way, dim] of `x`, row i counting `weights[i]` (default 1)."""
    onehot = np.eye(n_way, dtype=np.float32)[labels]
    if weights is not None:
        onehot = onehot * weights[:, None]
    return (onehot.T @ x) / onehot.sum(0)[:, None]


def _check_learner(learner: dict[str, Any], model: Path) -> None:
    head, l2 = learner.get("head"), learner.get("logreg_l2", 0)
    if learner.get("name") not in ("frozen", "protonet") or head not in HEADS:
        raise MetalmError(
            f"{model}: {learner.get('name')} with head {head} adapts in PyTorch only "
            "(metalm adapt); without torch: frozen or protonet, head logreg or centroid"
        )
    if head == "logreg" and not l2:
        raise MetalmError(
            f"{model}: learner.logreg_l2=0 chooses the L2 strength on the support set, "
            "which runs in PyTorch only (metalm adapt); or export with a fixed logreg_l2"
        )


def adapt_state(
    encoder: OnnxEncoder, texts: Sequence[str], labels: Sequence[int], names: Sequence[str]
) -> dict[str, np.ndarray]:
    """The task state `FrozenCentroids` / `ProtoNet` would adapt to (`adapt_named`):
    the support embeddings, the label names as the learner reads them, the head."""
    learner = encoder.meta["learner"]
    y = np.asarray(labels, dtype=np.int64)
    n_way = int(y.max()) + 1
    features = encoder.embed(texts)
    rows, row_labels = [features], [y]
    weights = [np.ones(len(y), np.float32)]
    prior = None
    mode = learner.get("label_names", "off")
    classes, name_texts = named_classes(usable_names(names) if mode != "off" else None)
    weight = float(learner.get("label_name_weight", 1.0))
    if classes:
        embedded = encoder.embed(name_texts)
        if mode == "prior" and learner["head"] != "centroid":
            prior = np.zeros((n_way, features.shape[1]), np.float32)
            prior[classes] = embedded
        else:
            rows.append(embedded)
            row_labels.append(np.asarray(classes, dtype=np.int64))
            weights.append(np.full(len(classes), weight, np.float32))
    x, y_all = np.concatenate(rows), np.concatenate(row_labels)
    sample_weight = np.concatenate(weights) if len(rows) > 1 else None
    if learner["head"] == "centroid":
        return {"prototypes": weighted_means(x, y_all, n_way, sample_weight)}
    return fit_logreg(
        x,
        y_all,
        n_way,
        float(learner["logreg_l2"]),
        sample_weight=sample_weight,
        prior=prior,
        prior_weight=weight,
    )


def adapt_task(
    model: str | Path,
    texts: Sequence[str],
    labels: Sequence[Any],
    out: str | Path,
    quantize: str = "none",
) -> Path:
    """Adapt to the labeled examples on ONNX Runtime and write the task directory `out`
    (as `FewShotClassifier.save_task` writes it); returns `out`."""
    from safetensors.numpy import save_file

    from metalm.atomic import replace_dir

    model = Path(model).resolve()
    texts, checked = check_examples(texts, labels)
    encoder = OnnxEncoder(model, quantize)
    _check_learner(encoder.meta["learner"], model)
    classes = task_classes(checked)
    index = {name: i for i, name in enumerate(classes)}
    state = adapt_state(encoder, texts, [index[v] for v in checked], [str(c) for c in classes])
    meta = {
        "format_version": TASK_FORMAT_VERSION,
        "metalm_version": metalm_version(),
        "classes": classes,
        "learner": encoder.meta["learner"]["name"],
        "model": str(model),
        "model_fingerprint": fingerprint(model),
        "info": {"adapted_on": f"onnx ({quantize})"},
    }

    def write(tmp: Path) -> None:
        save_file({k: np.ascontiguousarray(v) for k, v in state.items()}, str(tmp / TASK_WEIGHTS))
        (tmp / TASK_INFO).write_text(json.dumps(meta, indent=1), encoding="utf-8")

    return replace_dir(out, write)


def read_examples(path: str | Path, text_column: str = "text", label_column: str = "label"):
    """Labeled examples from a .csv (with a header) or .jsonl file: (texts, labels)."""
    import csv

    path = Path(path)
    try:
        raw = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise MetalmError(f"{path}: cannot read it ({err})") from None
    if path.suffix.lower() == ".jsonl":
        try:
            records = [json.loads(line) for line in raw.splitlines() if line.strip()]
        except json.JSONDecodeError as err:
            raise MetalmError(f"{path}: not JSON lines ({err})") from None
    elif path.suffix.lower() == ".csv":
        records = list(csv.DictReader(raw.splitlines()))
    else:
        raise MetalmError(f"{path}: give a .csv or .jsonl file of labeled examples")
    missing = [c for c in (text_column, label_column) if records and c not in records[0]]
    if missing or not records:
        raise MetalmError(f"{path}: needs the columns {text_column!r} and {label_column!r}")
    return [r[text_column] for r in records], [r[label_column] for r in records]


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m metalm.onnx_adapt --model MODEL_DIR --support FILE --out TASK_DIR
    [--quantize int8|int8-static]`: adapt a task on ONNX Runtime without torch."""
    import argparse
    import sys

    parser = argparse.ArgumentParser(prog="python -m metalm.onnx_adapt", description=main.__doc__)
    parser.add_argument("--model", required=True, help="a model directory with onnx/")
    parser.add_argument("--support", required=True, help="labeled examples, .csv or .jsonl")
    parser.add_argument("--out", required=True, help="the task directory to write")
    parser.add_argument("--quantize", choices=sorted(ONNX_FILES), default="none")
    parser.add_argument("--text-column", default="text")
    parser.add_argument("--label-column", default="label")
    args = parser.parse_args(argv)
    try:
        texts, labels = read_examples(args.support, args.text_column, args.label_column)
        out = adapt_task(args.model, texts, labels, args.out, args.quantize)
    except (MetalmError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"adapted {len(set(labels))} classes from {len(texts)} examples into {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
