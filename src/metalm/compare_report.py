"""A `metalm compare` report: its rows and what it holds (`CompareReport`), and how it
reads: Markdown tables per protocol and a plot of accuracy against adapt time."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from metalm.learners import learner_class
from metalm.runs.accuracy import MethodResult
from metalm.runs.report import _pyplot

REPORT_NAME = "compare"
HEAD_NAMES = {"own": "its own", "logreg": "logreg on its encoder"}


@dataclass
class CompareRow:
    """One learner under one head and one protocol, with its paired differences."""

    label: str
    head: str  # own | logreg
    result: MethodResult
    vs_same_head: tuple[float, float] | None
    vs_frozen: tuple[float, float] | None
    meta_train_seconds: float
    train_steps: int

    def as_dict(self) -> dict[str, Any]:
        out = {k: v for k, v in asdict(self).items() if k not in ("vs_same_head", "vs_frozen")}
        for key in ("vs_same_head", "vs_frozen"):
            value = getattr(self, key)
            out[key] = None if value is None else {"mean": value[0], "ci95": value[1]}
        return out


@dataclass
class CompareReport:
    """Every learner's rows, the settings each one ran with, and the class overlap."""

    rows: list[CompareRow]
    baselines: dict[str, list[MethodResult]]
    settings: dict[str, dict[str, Any]]
    overlap: list[dict[str, Any]]
    strict: bool
    errors: dict[str, str] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {
            "rows": [row.as_dict() for row in self.rows],
            "baselines": {k: [asdict(r) for r in v] for k, v in self.baselines.items()},
            "settings": self.settings,
            "overlap": self.overlap,
            "strict": self.strict,
            "errors": self.errors,
        }

    def to_markdown(self) -> str:
        return markdown(self)

    def write(self, out: Path) -> None:
        (out / f"{REPORT_NAME}.json").write_text(json.dumps(self.as_dict(), indent=1))
        (out / f"{REPORT_NAME}.md").write_text(self.to_markdown() + "\n")
        if self.rows:
            plot(self, out / f"{REPORT_NAME}.png")


def _delta(value: tuple[float, float] | None) -> str:
    return "" if value is None else f"{100 * value[0]:+.2f} ± {100 * value[1]:.2f}"


def protocols(report: CompareReport) -> list[str]:
    found = [r.result.protocol for r in report.rows]
    found += [r.protocol for results in report.baselines.values() for r in results]
    return list(dict.fromkeys(found))


def markdown(report: CompareReport) -> str:
    """Per protocol: the frozen reference, then every learner under each head with its
    paired differences; then the settings each learner ran with, and the class overlap."""
    frozen = report.baselines.get("frozen", [])
    lines = ["# metalm compare", ""]
    dataset = next((r.dataset for r in frozen), "")
    lines.append(
        f"Test data: {dataset}. Split: "
        + (
            "strict (meta-train classes sharing a (near-)name with a test class removed)."
            if report.strict
            else "as configured (not strict)."
        )
    )
    lines.append(
        "Heads: `own` = the learner's own test-time adaptation, paired against the same "
        "learner untrained (same head, no meta-training); `logreg` = the default "
        "logistic-regression head on the learner's meta-trained encoder, paired against "
        "`frozen` (the same head on the pretrained encoder)."
    )
    for protocol in protocols(report):
        lines += ["", f"## {protocol}", ""]
        lines.append(
            "| learner | head | accuracy % ± 95% CI | Δ vs untrained, same head | "
            "Δ vs frozen (logreg) | units | meta-train s (steps) | adapt s/task | "
            "predict texts/s |"
        )
        lines.append("|---|---|---|---|---|---|---|---|---|")
        base = next((r for r in frozen if r.protocol == protocol), None)
        if base is not None:
            lines.append(
                f"| frozen | logreg | {100 * base.accuracy:.2f} ± {100 * base.ci95:.2f} | | | "
                f"{_units(base)} | 0 | {base.adapt_seconds:.3f} | "
                f"{base.predict_texts_per_second:.0f} |"
            )
        for row in (r for r in report.rows if r.result.protocol == protocol):
            lines.append(_row(row))
    lines += ["", "## Settings", ""]
    for label, settings in report.settings.items():
        lines.append(f"* **{label}**: {describe(settings)}")
    lines += ["", "## Class overlap", ""]
    if report.overlap:
        shared = len({o["test_class"] for o in report.overlap})
        lines.append(
            f"Strict split: {len({o['train_class'] for o in report.overlap})} meta-train/"
            f"meta-val classes removed for a (near-)name shared with {shared} test classes:"
            if report.strict
            else f"{shared} test classes share a (near-)name with meta-train/meta-val classes:"
        )
        lines += [""] + [
            f"* {o['test_class']} ~ {o['train_class']} ({o['reason']})" for o in report.overlap
        ]
    else:
        lines.append("No test class shares a name or near-name with a meta-train class.")
    if report.errors:
        lines += ["", "## Errors", ""]
        lines += [f"* {label}: {message}" for label, message in report.errors.items()]
    return "\n".join(lines)


def _units(result: Any) -> str:
    return f"{len(result.per_episode)} texts" if result.episodes == 1 else f"{result.episodes}"


def _row(row: CompareRow) -> str:
    r = row.result
    return (
        f"| {row.label} | {row.head} | {100 * r.accuracy:.2f} ± {100 * r.ci95:.2f} | "
        f"{_delta(row.vs_same_head)} | {_delta(row.vs_frozen)} | {_units(r)} | "
        f"{row.meta_train_seconds:.0f} ({row.train_steps}) | {r.adapt_seconds:.3f} | "
        f"{r.predict_texts_per_second:.0f} |"
    )


def describe(settings: dict[str, Any]) -> str:
    """The learner settings that differ from its config's defaults, and the training."""
    learner = settings["learner"]
    cls = learner_class(learner["name"])
    defaults = cls.config_class()
    changed = {k: v for k, v in learner.items() if k != "name" and getattr(defaults, k, None) != v}
    parts = [f"learner `{learner['name']}`"]
    if changed:
        parts.append(", ".join(f"{k}={v}" for k, v in changed.items()))
    train, episode = settings["train"], settings["episode"]
    if not cls.meta_trainable:
        parts.append("no meta-training")
    else:
        parts.append(
            f"{train['steps']} steps × meta-batch {train['meta_batch_size']} "
            f"at lr {train['lr']:g}, episodes {episode['n_way']}-way {episode['k_shot']}-shot"
        )
    if settings["overrides"]:
        parts.append("overrides: " + " ".join(settings["overrides"]))
    return "; ".join(parts)


def plot(report: CompareReport, path: Path) -> None:
    """Accuracy (± 95% CI) against adapt seconds per task, one panel per protocol."""
    plt = _pyplot()
    names = protocols(report)
    fig, axes = plt.subplots(1, len(names), figsize=(5 * len(names), 4.2), squeeze=False)
    frozen = report.baselines.get("frozen", [])
    for ax, protocol in zip(axes[0], names, strict=True):
        for head, marker in (("own", "o"), ("logreg", "s")):
            rows = [r for r in report.rows if r.result.protocol == protocol and r.head == head]
            if not rows:
                continue
            xs = [max(r.result.adapt_seconds, 1e-4) for r in rows]
            ys = [100 * r.result.accuracy for r in rows]
            errs = [100 * r.result.ci95 for r in rows]
            ax.errorbar(xs, ys, yerr=errs, fmt=marker, capsize=2, label=HEAD_NAMES[head])
            for x, y, row in zip(xs, ys, rows, strict=True):
                ax.annotate(
                    row.label, (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points"
                )
        base = next((r for r in frozen if r.protocol == protocol), None)
        if base is not None:
            ax.axhline(100 * base.accuracy, color="grey", linestyle="--", label="frozen (logreg)")
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(plt.NullFormatter())
        ax.set_xlabel("adapt seconds per task")
        ax.set_ylabel("accuracy %")
        ax.set_title(protocol)
        ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
