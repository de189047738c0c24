"""The model card (README.md) of a pretrained directory: what the model is, what it was
meta-trained and tested on, its accuracy, the data's licenses.

Example:
    >>> from metalm.pretrained import read_metadata
    >>> print(model_card(read_metadata(saved_model), report=None))  # doctest: +ELLIPSIS
    ---
    ...
"""

from __future__ import annotations

from typing import Any

DATASET_LICENSES = {
    "banking77": "CC BY 4.0 — Casanueva et al. (2020), Efficient Intent Detection with Dual "
    "Sentence Encoders, PolyAI",
    "clinc150": "CC BY 3.0 — Larson et al. (2019), An Evaluation Dataset for Intent "
    "Classification and Out-of-Scope Prediction, Clinc",
}


def model_card(metadata: dict[str, Any], report: dict[str, Any] | None) -> str:
    """The README.md of a pretrained directory (Hugging Face model card)."""
    learner = metadata["learner"]["name"]
    encoder = metadata["encoder"]
    run = metadata.get("run") or {}
    sources = _data_sources(run)
    datasets = _dataset_names(run)
    front = ["---", "library_name: metalm", "tags: [few-shot, meta-learning, text-classification]"]
    if datasets:
        front.append(f"datasets: [{', '.join(datasets)}]")
    front.append("---")
    head = metadata["learner"].get("head")  # frozen, protonet: learner.head
    head_note = f" It adapts to a new task with the `{head}` head." if head else ""
    lines = [
        *front,
        "",
        f"# metalm `{learner}` few-shot text classifier",
        "",
        _model_line(learner, encoder, metadata["metalm_version"]) + head_note,
        "",
        "```python",
        "from metalm import FewShotClassifier",
        'clf = FewShotClassifier.from_pretrained("<this directory or hub id>")',
        'clf.adapt(["my card is lost", "what is my balance"], ["lost_card", "balance"])',
        'clf.predict(["I lost my card"])',
        "```",
        "",
        "## Meta-training",
        "",
    ]
    if run and metadata.get("meta_trained"):
        train, episode = run.get("train", {}), run.get("episode", {})
        meta_sources = ", ".join(dict.fromkeys(v for k, v in sources.items() if k != "test"))
        lines.append(
            f"Meta-trained for {train.get('steps')} steps on {episode.get('n_way')}-way "
            f"{episode.get('k_shot')}-shot episodes from {meta_sources or 'unknown data'}."
        )
    elif run:
        lines.append(f"Not meta-trained (`{learner}` adapts from the pretrained encoder).")
    if "test" in sources:
        lines.append(f"Tested on classes of {sources['test']} never seen in meta-training.")
    else:
        lines.append("No training run was recorded with this model.")
    lines += ["", "## Few-shot accuracy", "", *_accuracy_lines(report)]
    lines += ["", "## Data and licenses", "", *_license_lines(datasets)]
    lines += [
        "",
        f"The encoder weights keep the license of `{encoder['base_model']}`.",
        "",
    ]
    return "\n".join(lines)


def _accuracy_lines(report: dict[str, Any] | None) -> list[str]:
    """The accuracy table of the saved report, or a line saying there is none."""
    lines: list[str] = []
    rows = (report or {}).get("results") or []
    if rows:
        lines += [
            "| method | protocol | test data | accuracy % (±95% CI) | episodes |",
            "|---|---|---|---|---|",
        ]
        for row in rows:
            lines.append(
                f"| {row['method']} | {row['protocol']} | {row['dataset']} | "
                f"{100 * row['accuracy']:.2f} ± {100 * row['ci95']:.2f} | {row['episodes']} |"
            )
        lines += [
            "",
            "Intervals: normal 95% confidence intervals over test episodes (full-way: "
            "over the test texts).",
        ]
    else:
        lines.append("Not measured: no evaluation report was saved with this model.")
    return lines


def _license_lines(datasets: list[str]) -> list[str]:
    """The built-in datasets' licenses and attribution, or a line saying they are unknown."""
    lines: list[str] = []
    if datasets:
        lines += [f"- `{name}`: {DATASET_LICENSES[name]}" for name in datasets]
        lines.append(
            "\nThe built-in data is redistributed unchanged by metalm (see its NOTICE.md); "
            "keep this attribution when republishing."
        )
    else:
        lines.append("The training data's license is not recorded; check your data source.")
    return lines


def _model_line(learner: str, encoder: dict[str, Any], version: str) -> str:
    if encoder.get("kind") == "causal":
        return (
            f"A `{learner}` in-context learner over the causal LM `{encoder['base_model']}` "
            f"({encoder['num_layers']} layers; loaded from there, not copied here unless "
            f"`encoder/` exists), saved by metalm {version}."
        )
    return (
        f"A `{learner}` meta-learner over `{encoder['base_model']}` "
        f"({encoder['num_layers']} layers, {encoder['pooling']} pooling, "
        f"max {encoder['max_length']} tokens), saved by metalm {version}."
    )


def _data_sources(run: dict[str, Any]) -> dict[str, str]:
    """`source/split` of each data role (train, val, test) of a run config."""
    data = run.get("data") or {}
    return {
        role: f"{source['source']}/{source.get('split', '')}"
        for role in ("train", "val", "test")
        if isinstance(source := data.get(role), dict) and source.get("source")
    }


def _dataset_names(run: dict[str, Any]) -> list[str]:
    data = run.get("data") or {}
    names = {s.get("source") for s in data.values() if isinstance(s, dict)}
    return sorted(n for n in names if n in DATASET_LICENSES)
