"""`metalm compare`: meta-train several learners on the same tasks, test them all on the
same fixed test tasks, each beside the untrained encoder under the same head; one report.

Every learner is run as an ordinary metalm run (`metalm.runs.recipe.run`) in
`OUT/learners/<label>/`, and tested twice: with its own test-time adaptation (`own`)
and, where it has an encoder, with the logistic-regression head on its meta-trained
encoder (`logreg`). Its baselines are the same two heads without meta-training: the
learner itself untrained (`OUT/baselines/<label>/`) and `frozen` (`OUT/baselines/frozen/`).
A finished learner is not run again; an interrupted one resumes from its checkpoint.

Example:
    >>> config, entries = load_compare_config(None, tiny, learners=["protonet", "anil"])
    >>> report = compare(config, entries, "runs/compare", progress=False)
    >>> sorted({(row.label, row.head) for row in report.rows})
    [('anil', 'logreg'), ('anil', 'own'), ('protonet', 'own')]
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
import traceback
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml

from metalm.checkpoint import load_weights
from metalm.compare_report import CompareReport, CompareRow
from metalm.config import (
    RunConfig,
    config_from_data,
    load_config,
    read_yaml,
    save_config,
    to_dict,
)
from metalm.errors import MetalmError
from metalm.learners import (
    EmbeddingHeadConfig,
    FrozenConfig,
    MetaLearner,
    build_learner,
    learner_class,
    method_label,
)
from metalm.models.base import build_model
from metalm.parsing import from_dict, safe_load
from metalm.runs.accuracy import MethodResult
from metalm.runs.directory import (
    CONFIG_FILE,
    LOG_FILE,
    REPORT_JSON,
    has_checkpoint,
    trained_weights,
)
from metalm.runs.protocols import baseline_model, evaluate_learner
from metalm.runs.recipe import run
from metalm.runs.report import EvalReport, paired_difference
from metalm.tasks import build_pools, pools_overlap

COMPARE_FILE = "compare.yaml"
# a learner's own overrides may change how it trains, not what it is tested on
FIXED_KEYS = ("data.", "eval.", "output_dir", "run_name")


@dataclass
class CompareEntry:
    """One learner of a comparison: `name` (a registered learner), the row's `label`
    (default: the name), `learner` settings (`learner.*`) and any other `overrides`
    (`key=value`, e.g. `train.steps=100`; not `data.*` or `eval.*`: every learner is
    tested on the same tasks)."""

    name: str
    label: str = ""
    learner: dict[str, Any] = field(default_factory=dict)
    overrides: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        learner_class(self.name)  # a clear error for an unknown learner
        self.label = self.label or self.name
        if not self.label.replace("-", "").replace("_", "").replace(".", "").isalnum():
            raise MetalmError(
                f"compare label {self.label!r}: use letters, digits, '-', '_' and '.'"
            )
        for item in self.overrides:
            if item.startswith(FIXED_KEYS) or "=" not in item:
                raise MetalmError(
                    f"compare.learners[{self.label}].overrides: {item!r} must be key=value and "
                    "not change data.*, eval.*, output_dir or run_name (every learner is "
                    "tested on the same tasks)"
                )


def load_compare_config(
    path: str | Path | None, overrides: list[str] | None = None, learners: list[str] | None = None
) -> tuple[RunConfig, list[CompareEntry]]:
    """The shared run config (defaults, the YAML at `path` less its `compare:` section,
    `overrides`) and the learners: the `compare.learners` list (each a name or a mapping
    of `CompareEntry`'s fields), or, when `learners` is given, those labels: each one's
    entry of that list if it has one, else the learner of that name with its defaults."""
    data = read_yaml(path) if path is not None else {}
    section = data.pop("compare", None) or {}
    if not isinstance(section, dict) or set(section) - {"learners"}:
        raise MetalmError("compare: expected a mapping with one key, learners: [...]")
    config = config_from_data(data, overrides)
    entries = []
    for i, item in enumerate(section.get("learners") or []):
        spec = {"name": item} if isinstance(item, str) else item
        entries.append(from_dict(CompareEntry, spec, f"compare.learners[{i}]"))
    if learners:
        listed = {e.label: e for e in entries}
        entries = [listed.get(label) or CompareEntry(label) for label in learners]
    labels = [e.label for e in entries]
    twice = sorted({label for label in labels if labels.count(label) > 1})
    if twice:
        raise MetalmError(f"compare: the label(s) {twice} are used twice; give each a label")
    return config, entries


def learner_config(base: RunConfig, entry: CompareEntry, out: Path) -> RunConfig:
    """The run config of one learner: the shared config with its learner, its own
    overrides, its run directory `out/learners/<label>`, and no baselines of its own."""
    data = to_dict(base)
    data["learner"] = {"name": entry.name, **entry.learner}
    data["output_dir"] = str(out / "learners")
    data["run_name"] = entry.label
    data["eval"]["baselines"] = []
    return config_from_data(data, list(entry.overrides))


def compare(
    config: RunConfig,
    entries: list[CompareEntry],
    out: str | Path,
    progress: bool = True,
    trained_in: str | Path | None = None,
) -> CompareReport:
    """Run (or resume) every learner of `entries` and its baselines; write
    `out/compare.{json,md,png}`. Errors of one learner are recorded and the others go on;
    `MetalmError` is raised at the end if any failed.

    `trained_in`: another comparison's folder whose learners trained exactly as these
    would (same label, same training; test-time settings such as `eval_inner_steps` or
    `head` may differ): their weights are tested here instead of training again, e.g. to
    score on `test` the learners chosen on `valid`."""
    if not entries:
        raise MetalmError("compare: no learners; pass --learners or a compare.learners list")
    out = Path(out)
    configs = {e.label: learner_config(config, e, out) for e in entries}  # validated first
    if trained_in is not None:
        _check_trained_in(configs, Path(trained_in))
    pools = build_pools(config.data, config.eval.full_way_shots)
    # a strict split has no overlap left: report the classes it removed instead
    found = pools.removed_overlap or pools_overlap(pools, config.data.classes.name_similarity)
    overlap = [o.as_dict() for o in found]
    _claim(out, config, entries)
    frozen = _baseline(config, FrozenConfig(), out / "baselines", "frozen", progress)
    rows: list[CompareRow] = []
    baselines = {"frozen": frozen}
    settings: dict[str, dict[str, Any]] = {}
    errors: dict[str, str] = {}
    for i, entry in enumerate(entries, 1):
        run_config = configs[entry.label]
        settings[entry.label] = {
            "learner": to_dict(run_config.learner),
            "overrides": list(entry.overrides),
            "train": to_dict(run_config.train),
            "episode": to_dict(run_config.episode),
        }
        _say(progress, f"[{i}/{len(entries)}] {entry.label}")
        try:
            own, logreg, seconds, steps = _learner_results(run_config, out, progress, trained_in)
            if learner_class(entry.name).meta_trainable:
                untrained = _baseline(
                    run_config, run_config.learner, out / "baselines", entry.label, progress
                )
            else:  # it is its own untrained self
                untrained = own
        except Exception as err:  # one learner's failure does not stop the others
            errors[entry.label] = _one_line(err)
            _record_error(out / "learners" / entry.label, err)
            print(f"{entry.label}: error: {errors[entry.label]}", file=sys.stderr, flush=True)
            continue
        baselines[entry.label] = untrained
        for head, results, base in (("own", own, untrained), ("logreg", logreg, frozen)):
            rows += [
                CompareRow(
                    entry.label,
                    head,
                    result,
                    _paired(result, base),
                    _paired(result, frozen),
                    seconds,
                    steps,
                )
                for result in results
            ]
    report = CompareReport(rows, baselines, settings, overlap, config.data.classes.strict, errors)
    report.write(out)
    if errors:
        raise MetalmError(
            f"compare: {len(errors)} of {len(entries)} learners failed ({', '.join(errors)}); "
            f"see {out}/learners/<label>/error.txt; the report has the others"
        )
    return report


def _claim(out: Path, config: RunConfig, entries: list[CompareEntry]) -> None:
    """Write `compare.yaml` in `out`, or check that it is this comparison's (resume)."""
    record = {"config": to_dict(config), "learners": [asdict(e) for e in entries]}
    path = out / COMPARE_FILE
    if path.exists():
        saved = safe_load(path.read_text(encoding="utf-8")) or {}
        if saved.get("config") != json.loads(json.dumps(record["config"])):
            raise MetalmError(
                f"{out} holds another comparison (its shared config differs); "
                "pick another --out, or delete it"
            )
        known = {e["label"]: e for e in saved.get("learners", [])}
        for entry in record["learners"]:
            if entry["label"] in known and known[entry["label"]] != entry:
                raise MetalmError(
                    f"{out}: learner {entry['label']!r} ran with other settings before; "
                    "give it another label, or delete its folder under learners/"
                )
        record["learners"] = list({**known, **{e["label"]: e for e in record["learners"]}}.values())
    out.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(record, sort_keys=False), encoding="utf-8")


def _learner_results(
    config: RunConfig, out: Path, progress: bool, trained_in: str | Path | None = None
) -> tuple[list[MethodResult], list[MethodResult], float, int]:
    """(own-head results, logreg-head results, meta-train seconds, steps) of one
    learner: run (or resumed, or read back, or tested from `trained_in`), then its
    encoder under the logreg head."""
    run_dir = out / "learners" / config.run_name
    own = _finished(run_dir)
    source = Path(trained_in) / "learners" / config.run_name if trained_in else None
    if own is None and source is not None and _finished(source) is not None:
        own = _test_trained(config, source, run_dir, progress)
    elif own is None:
        if has_checkpoint(run_dir):
            _say(progress, f"  resuming {run_dir}")
            own = run(config, resume=run_dir, progress=progress).results
        else:
            _clear_unstarted(run_dir)
            own = run(config, progress=progress).results
    seconds, steps = _train_time(run_dir)
    logreg_file = run_dir / "logreg_head.json"
    if _has_logreg_row(config):
        logreg = _read_results(logreg_file)
        if logreg is None:
            learner = _trained_learner(config, _weights_dir(run_dir))
            head = build_learner(learner.encoder, FrozenConfig())
            pools = build_pools(config.data, config.eval.full_way_shots)
            logreg = evaluate_learner(head, config.run_name, config, pools, progress)
            _write_results(logreg_file, logreg)
    else:
        logreg = []
    return own, logreg, seconds, steps


# learner settings that only change how a trained learner adapts at test time
TEST_TIME_FIELDS = frozenset(
    {"head", "logreg_l2", "lpft_steps", "lpft_lr", "lpft_head_lr", "eval_inner_steps",
     "eval_head_init", "eval_adapt"}
)  # fmt: skip
TRAINED_IN_FILE = "trained_in.txt"


def _training(config: RunConfig) -> dict[str, Any]:
    """What decides a learner's trained weights: everything but the test data, the test
    protocols, where the run is written and the learner's test-time settings."""
    data = to_dict(config)
    for key in ("eval", "output_dir", "run_name"):
        data.pop(key)
    data["data"].pop("test")
    data["learner"] = {k: v for k, v in data["learner"].items() if k not in TEST_TIME_FIELDS}
    return json.loads(json.dumps(data))


def _test_trained(
    config: RunConfig, source: Path, run_dir: Path, progress: bool
) -> list[MethodResult]:
    """Test the learner trained in `source` (another comparison) on this config's test
    tasks, with this config's test-time settings; the report goes to `run_dir`."""
    _say(progress, f"  testing the learner trained in {source}")
    learner = _trained_learner(config, source)
    pools = build_pools(config.data, config.eval.full_way_shots)
    results = evaluate_learner(learner, method_label(config.learner), config, pools, progress)
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(config, run_dir / CONFIG_FILE)
    shutil.copyfile(source / LOG_FILE, run_dir / LOG_FILE)
    (run_dir / TRAINED_IN_FILE).write_text(str(source.resolve()))
    EvalReport(results=results).write(run_dir)
    return results


def _check_trained_in(configs: dict[str, RunConfig], trained_in: Path) -> None:
    """Every learner that `trained_in` holds finished trained as it would here."""
    for label, config in configs.items():
        source = trained_in / "learners" / label
        if _finished(source) is None:
            continue
        saved = load_config(source / CONFIG_FILE)
        same_test = saved.data.test is not None and config.data.test is not None
        if not (same_test and saved.data.test.source == config.data.test.source) or (
            _training(saved) != _training(config)
        ):
            raise MetalmError(
                f"{source} trained with other settings (or for another test dataset) than "
                f"{label!r} here; drop --trained-in or give the learner another label"
            )


def _weights_dir(run_dir: Path) -> Path:
    """The run whose weights a learner folder tests: its own, or the one it names."""
    pointer = run_dir / TRAINED_IN_FILE
    return Path(pointer.read_text().strip()) if pointer.exists() else run_dir


def _trained_learner(config: RunConfig, run_dir: Path) -> MetaLearner:
    """`config`'s learner with the trained weights of `run_dir`."""
    learner = build_learner(build_model(config.model), config.learner)
    weights = trained_weights(run_dir)
    if weights is not None:
        load_weights(learner, weights)
    return learner


def _has_logreg_row(config: RunConfig) -> bool:
    """A logreg row is added for learners on a sentence encoder whose own head is not
    already that logistic regression."""
    cls = learner_class(config.learner.name)
    if cls.model_kind != "encoder":
        return False
    own = config.learner
    return not (isinstance(own, EmbeddingHeadConfig) and own.head == "logreg")


def _baseline(
    config: RunConfig, learner: Any, root: Path, name: str, progress: bool
) -> list[MethodResult]:
    """The untrained `learner` on the shared test tasks (read back if already done)."""
    model = baseline_model(config, learner_class(learner.name).model_kind)
    key_data = {"learner": to_dict(learner), "model": to_dict(model), "seed": config.seed}
    key = hashlib.sha256(json.dumps(key_data, sort_keys=True).encode()).hexdigest()[:12]
    run_dir = root / name
    done = _finished(run_dir)
    if done is not None and _read_key(run_dir) == key:
        return done
    shutil.rmtree(run_dir, ignore_errors=True)
    untrained = replace(
        config,
        model=model,
        learner=learner,
        output_dir=str(root),
        run_name=name,
        train=replace(config.train, steps=0),
        eval=replace(config.eval, baselines=[]),
    )
    twin = _same_baseline(root, key, untrained)
    if twin is not None:  # e.g. two labels of one learner that differ only in training
        _say(progress, f"  untrained baseline: {name} (the same as {twin.name})")
        shutil.copytree(twin, run_dir)
        save_config(untrained, run_dir / CONFIG_FILE)
        return _finished(run_dir) or []
    _say(progress, f"  untrained baseline: {name}")
    results = run(untrained, progress=progress).results
    (run_dir / "baseline_key.txt").write_text(key)
    return results


def _same_baseline(root: Path, key: str, untrained: RunConfig) -> Path | None:
    """A finished baseline in `root` of the same untrained learner on the same test tasks
    (another label's), or None: what training alone changes does not matter untrained."""

    def test_side(config: RunConfig) -> dict[str, Any]:
        blank = replace(config, output_dir="", run_name="", train=RunConfig().train)
        return json.loads(json.dumps(to_dict(blank)))

    for other in sorted(root.iterdir()) if root.is_dir() else []:
        if _read_key(other) != key or _finished(other) is None:
            continue
        if test_side(load_config(other / CONFIG_FILE)) == test_side(untrained):
            return other
    return None


def _read_key(run_dir: Path) -> str | None:
    path = run_dir / "baseline_key.txt"
    return path.read_text().strip() if path.exists() else None


def _finished(run_dir: Path) -> list[MethodResult] | None:
    return _read_results(run_dir / REPORT_JSON)


def _read_results(path: Path) -> list[MethodResult] | None:
    if not path.exists():
        return None
    rows = json.loads(path.read_text(encoding="utf-8"))["results"]
    return [MethodResult.from_dict(row) for row in rows]


def _write_results(path: Path, results: list[MethodResult]) -> None:
    path.write_text(json.dumps({"results": [asdict(r) for r in results]}, indent=1))


def _train_time(run_dir: Path) -> tuple[float, int]:
    """Seconds of meta-training (the sum of the logged step times: validation and
    checkpoints not included) and steps, from the run's log."""
    log = run_dir / LOG_FILE
    if not log.exists():
        return 0.0, 0
    records = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    return float(sum(r.get("seconds", 0.0) for r in records)), len(records)


def _clear_unstarted(run_dir: Path) -> None:
    """A learner folder with neither a report nor a checkpoint holds nothing to keep
    (stopped before its first checkpoint): start it again."""
    if run_dir.exists():
        if not (run_dir / CONFIG_FILE).exists() and any(run_dir.iterdir()):
            raise MetalmError(f"{run_dir} holds files that are not a metalm run; move them")
        shutil.rmtree(run_dir)


def _record_error(run_dir: Path, err: BaseException) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    text = "".join(traceback.format_exception(type(err), err, err.__traceback__))
    (run_dir / "error.txt").write_text(text)


def _one_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__


def _paired(result: MethodResult, baselines: list[MethodResult]) -> tuple[float, float] | None:
    """The paired difference of `result` to the baseline of its protocol, if any."""
    base = next((r for r in baselines if r.protocol == result.protocol), None)
    return None if base is None else paired_difference(result, base)


def _say(progress: bool, line: str) -> None:
    if progress:
        print(line, flush=True)


__all__ = [
    "CompareEntry",
    "CompareReport",
    "CompareRow",
    "compare",
    "learner_config",
    "load_compare_config",
]
