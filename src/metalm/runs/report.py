"""`EvalReport`: the results of a run as JSON, Markdown and PNG plots."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from metalm.runs.accuracy import MethodResult, mean_ci95
from metalm.runs.directory import ACCURACY_PLOT, LOG_FILE, REPORT_JSON, REPORT_MD, TRAINING_PLOT

BASELINE = "frozen"


@dataclass
class EvalReport:
    """Accuracy ± 95% CI of each method under each protocol, on the same test tasks.

    Example:
        >>> from metalm.config import DEMO_CONFIG      # the recipe of `metalm demo`
        >>> config = metalm.load_config(DEMO_CONFIG, [*tiny, "data.unlabeled.max_texts=200"])
        >>> report = metalm.run(config, progress=False)
        >>> [(result.method, result.protocol) for result in report.results]
        [('protonet', '3-way 1-shot')]
        >>> print(report.to_markdown())  # doctest: +ELLIPSIS
        | method | protocol | test data | accuracy % (±95% CI) | ...
    """

    results: list[MethodResult]
    train: dict[str, Any] = field(default_factory=dict)
    run_dir: str = ""
    # a strict split's removed overlaps (`data.classes.strict`): ClassOverlap.as_dict()s
    removed_overlap: list[dict[str, Any]] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)  # each stage's (RunRecipe)

    def find(self, method: str, protocol: str) -> MethodResult | None:
        for result in self.results:
            if result.method == method and result.protocol == protocol:
                return result
        return None

    def paired_difference(self, result: MethodResult) -> tuple[float, float] | None:
        """Mean accuracy difference to `frozen` with its 95% CI, paired on the same test
        units: the same episodes (the first ones both ran: episode i is the same task
        for every method), or for a single episode (full-way) the same query texts."""
        base = self.find(BASELINE, result.protocol)
        return None if base is None or base is result else paired_difference(result, base)

    def as_dict(self) -> dict[str, Any]:
        rows = []
        for result in self.results:
            row = result.as_dict()
            diff = self.paired_difference(result)
            row["vs_frozen"] = None if diff is None else {"mean": diff[0], "ci95": diff[1]}
            rows.append(row)
        out = {"results": rows, "train": self.train, "run_dir": self.run_dir}
        if self.removed_overlap:
            out["removed_overlap"] = self.removed_overlap
        if self.seconds:
            out["seconds"] = self.seconds
        return out

    def to_markdown(self) -> str:
        lines = [
            "| method | protocol | test data | accuracy % (±95% CI) | Δ vs frozen (paired) "
            "| episodes | adapt s/task | predict texts/s |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for r in self.results:
            diff = self.paired_difference(r)
            delta = "" if diff is None else f"{100 * diff[0]:+.2f} ± {100 * diff[1]:.2f}"
            lines.append(
                f"| {r.method} | {r.protocol} | {r.dataset} | "
                f"{100 * r.accuracy:.2f} ± {100 * r.ci95:.2f} | {delta} | {r.episodes} | "
                f"{r.adapt_seconds:.3f} | {r.predict_texts_per_second:.0f} |"
            )
        return "\n".join(lines)

    def write(self, run_dir: str | Path) -> None:
        """`report.json`, `report.md` and `accuracy.png` (and `training.png` if trained)."""
        run_dir = Path(run_dir)
        self.run_dir = str(run_dir)
        (run_dir / REPORT_JSON).write_text(json.dumps(self.as_dict(), indent=1))
        header = "# metalm report\n\n"
        if self.train:
            header += (
                f"Meta-trained {self.train.get('steps')} steps; best validation accuracy "
                f"{self.train.get('best_val_accuracy')} at step {self.train.get('best_step')}.\n\n"
            )
        if self.removed_overlap:
            removed = sorted({o["train_class"] for o in self.removed_overlap})
            header += (
                f"Strict split: {len(removed)} meta-train/meta-val classes removed for a "
                f"(near-)name shared with a test class: {', '.join(removed)}.\n\n"
            )
        (run_dir / REPORT_MD).write_text(header + self.to_markdown() + "\n")
        if self.results:
            plot_accuracy(self, run_dir / ACCURACY_PLOT)
        if (run_dir / LOG_FILE).exists():
            plot_training(run_dir / LOG_FILE, run_dir / TRAINING_PLOT)


def paired_difference(result: MethodResult, base: MethodResult) -> tuple[float, float] | None:
    """Mean accuracy difference `result - base` with its 95% CI, paired on the same test
    units: the same episodes (the first ones both ran: episode i is the same task for
    every method), or for a single episode (full-way) the same query texts; None when
    they share fewer than two units.

    Example:
        >>> a = MethodResult("a", "5-way 1-shot", "d", 5, 1, 3, 0.8, 0.1, 0.0, 0.0, [0.8, 0.9, 0.7])
        >>> b = MethodResult("b", "5-way 1-shot", "d", 5, 1, 3, 0.7, 0.1, 0.0, 0.0, [0.7, 0.8, 0.6])
        >>> [round(v, 4) for v in paired_difference(a, b)]
        [0.1, 0.0]
    """
    if (base.episodes == 1) != (result.episodes == 1):
        return None
    if result.episodes == 1 and len(base.per_episode) != len(result.per_episode):
        return None  # not the same query texts
    n = min(len(base.per_episode), len(result.per_episode))
    if n < 2:
        return None
    diffs = np.asarray(result.per_episode[:n]) - np.asarray(base.per_episode[:n])
    return mean_ci95(diffs)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_accuracy(report: EvalReport, path: Path) -> None:
    """Grouped bars: accuracy of each method per protocol, with 95% CI error bars."""
    plt = _pyplot()
    protocols = list(dict.fromkeys(r.protocol for r in report.results))
    methods = list(dict.fromkeys(r.method for r in report.results))
    width = 0.8 / max(1, len(methods))
    fig, ax = plt.subplots(figsize=(max(6, 2.2 * len(protocols)), 4))
    for m, method in enumerate(methods):
        xs, ys, errs = [], [], []
        for p, protocol in enumerate(protocols):
            result = report.find(method, protocol)
            if result is not None:
                xs.append(p + (m - (len(methods) - 1) / 2) * width)
                ys.append(100 * result.accuracy)
                errs.append(100 * result.ci95)
        ax.bar(xs, ys, width, yerr=errs, capsize=3, label=method)
    ax.set_xticks(range(len(protocols)), protocols)
    low = min((100 * r.accuracy for r in report.results), default=0)
    ax.set_ylim(max(0, low - 15), 100)
    ax.set_ylabel("accuracy % (95% CI)")
    ax.legend(loc="lower right")
    ax.set_title(f"few-shot accuracy on {report.results[0].dataset}" if report.results else "")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_training(log_path: Path, path: Path) -> None:
    """Training loss and validation accuracy against step."""
    plt = _pyplot()
    records = [json.loads(line) for line in log_path.read_text().splitlines() if line.strip()]
    if not records:
        return
    fig, ax = plt.subplots(figsize=(7, 4))
    steps = [r["step"] for r in records]
    ax.plot(steps, [r["loss"] for r in records], color="tab:blue", alpha=0.6, label="loss")
    ax.set_xlabel("step")
    ax.set_ylabel("meta-training loss", color="tab:blue")
    val = [(r["step"], r["val_accuracy"]) for r in records if "val_accuracy" in r]
    if val:
        twin = ax.twinx()
        twin.plot(*zip(*val, strict=True), "o-", color="tab:red", label="val accuracy")
        twin.set_ylabel("validation accuracy", color="tab:red")
    ax.set_title("meta-training")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
