"""More source tasks: what each meta-training ingredient adds, chosen on `valid`, the
chosen recipe scored once on `test`.

For each target (BANKING77, CLINC150), protonet is meta-trained without the target's
labels: on the other dataset's labeled intents, then adding (one row each, on top of
the row before)
  labeled        the other dataset's intents only (5-way 5-shot episodes)
  cluster        + the target's `train` texts without labels as cluster tasks (`metalm demo`)
  names          + the labeled intents' names as support examples in meta-training
  both-texts     + the labeled source's own texts as cluster tasks too (both datasets)
and, for the row with the best validation score, a run `--long-steps` long. Every
trained encoder adapts with each `--adapt` variant (`HEAD/LABEL_NAMES:WEIGHT`, as in
`benchmarks/label_names.py`) on the target's `valid` split: 5-way 1-shot episodes and
full-way 5-/10-shot (support = `train_5`/`train_10`, query = the whole split). The
recipe (row and steps) with the best mean validation accuracy under the first adapt
variant is then scored on `test`, beside the frozen encoder, and nothing else is.

    python benchmarks/source_tasks.py --targets banking77 clinc150 --long-steps 2000
    python benchmarks/source_tasks.py --quick            # a smoke run: a few steps
    python benchmarks/source_tasks.py --table benchmarks/results/source_tasks.json

Runs on a GPU when there is one (`model.device=auto`); `scripts/gpu_check.sh` runs it.
Writes JSON (`--out`) and prints Markdown tables.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from label_names import parse_variant, variant_learner

from metalm.config import RunConfig, load_config
from metalm.label_names import name_texts
from metalm.learners import MetaLearner, build_learner
from metalm.models.base import build_model
from metalm.runs.accuracy import mean_ci95
from metalm.runs.protocols import evaluate_learner
from metalm.runs.recipe import RunRecipe
from metalm.tasks import build_pools

SOURCE_OF = {"banking77": "clinc150", "clinc150": "banking77"}  # target -> labeled source
CLUSTERS = "{source: NAME, split: train, tasks: cluster, n_way: 64}"
TARGET_TEXTS = "data.unlabeled=" + CLUSTERS.replace("NAME", "TARGET")
BOTH_TEXTS = (
    "data.unlabeled=["
    + CLUSTERS.replace("NAME", "TARGET")
    + ", "
    + CLUSTERS.replace("NAME", "SOURCE")
    + "]"
)
ROWS: dict[str, list[str]] = {  # TARGET / SOURCE: the target and the labeled source
    "labeled": [],
    "cluster": [TARGET_TEXTS, "learner.label_names=off"],  # names at adapt time only
    "names": [TARGET_TEXTS, "learner.label_names=example"],
    "both-texts": [BOTH_TEXTS, "learner.label_names=example"],
}
PROTOCOLS = ("5-way 1-shot", "full-way 5-shot", "full-way 10-shot")


def base_overrides(target: str, split: str, steps: int, args: argparse.Namespace) -> list[str]:
    """`metalm demo`'s recipe (learner, episodes, schedule), for `target` on `split`."""
    overrides = [
        "learner.name=protonet",
        f"data.train={{source: {SOURCE_OF[target]}, split: train}}",
        f"data.test={{source: {target}, split: {split}}}",
        "data.classes.fractions=[0.8, 0.2, 0.0]",
        "episode={n_way: 5, k_shot: 5, q_queries: 5}",
        f"train.steps={steps}",
        f"train.warmup_steps={max(1, steps // 10)}",
        f"train.eval_every={max(1, steps // 4)}",
        f"train.checkpoint_every={steps}",
        "train.select_best=false",
        "train.tensorboard=false",
        f"eval.episodes={args.episodes}",
        "eval.settings=[{n_way: 5, k_shot: 1}]",
        "eval.full_way_shots=[5, 10]",
        "eval.baselines=[]",
        f"output_dir={args.runs}",
    ]
    if args.quick:
        overrides += ["train.val_episodes=5", "model.max_length=32"]
    return overrides + list(args.overrides)


def row_overrides(row: str, target: str) -> list[str]:
    return [o.replace("TARGET", target).replace("SOURCE", SOURCE_OF[target]) for o in ROWS[row]]


def train(config: RunConfig, progress: bool) -> tuple[MetaLearner, float]:
    """The protonet of `config`, meta-trained (`RunRecipe`'s setup and train, no test);
    and the seconds training took."""
    recipe = RunRecipe(config, progress)
    recipe.setup(Path(config.output_dir) / config.run_name)
    recipe.train()
    learner = recipe.learner
    if learner.encoder.device.type == "cuda":
        torch.cuda.synchronize()
    return learner.eval(), recipe.seconds["train"]


def score(learner: MetaLearner, config: RunConfig, variants: list[str]) -> dict[str, dict]:
    """{variant: {protocol: MethodResult}} on the tasks of `config` (split and all)."""
    pools = build_pools(config.data, config.eval.full_way_shots)
    texts = list(pools.test.texts) + name_texts(pools.test.classes)
    for episode in pools.full_way.values():
        texts += episode.support_texts
    out: dict[str, dict] = {}
    with learner.encoder.cached_embeddings(texts):
        for variant in variants:
            scored = variant_learner(learner, *parse_variant(variant))
            results = evaluate_learner(scored, variant, config, pools, progress=False)
            out[variant] = {r.protocol: r for r in results}
    return out


def cells(results: dict[str, dict], reference: dict[str, dict] | None) -> dict:
    """JSON cells: accuracy, interval, per-unit correctness and the paired Δ."""
    table: dict = {}
    for variant, by_protocol in results.items():
        table[variant] = {}
        for protocol, result in by_protocol.items():
            cell = {
                "accuracy": result.accuracy,
                "ci95": result.ci95,
                "adapt_seconds": result.adapt_seconds,
                "per_unit": [float(v) for v in result.per_episode],
            }
            if reference is not None:
                base = np.asarray(reference[variant][protocol].per_episode)
                mean, ci = mean_ci95(np.asarray(result.per_episode) - base)
                cell["vs_reference"] = {"mean": mean, "ci95": ci}
            table[variant][protocol] = cell
    return table


def mean_accuracy(results: dict[str, dict], variant: str) -> float:
    return float(np.mean([results[variant][p].accuracy for p in PROTOCOLS]))


def run_target(target: str, args: argparse.Namespace, record: dict, save) -> None:
    """Fill `record` row by row (calling `save()` after each, so that a run cut short
    keeps what it measured)."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    record.update({"target": target, "source": SOURCE_OF[target], "rows": [], "test": []})
    variant = args.adapt[0]  # what recipes are chosen by

    def config_for(row: str, steps: int, split: str) -> RunConfig:
        extra = [] if row == "frozen" else row_overrides(row, target)
        name = [f"run_name={target}-{row}-{steps}-{stamp}"]
        return load_config(None, base_overrides(target, split, steps, args) + extra + name)

    def add_row(row: str, steps: int, seconds: float, valid: dict, previous: dict | None):
        reference = None if row == "frozen" else frozen
        entry = {"row": row, "steps": steps, "seconds": seconds, "valid": cells(valid, reference)}
        if row != "frozen":
            entry["overrides"] = row_overrides(row, target)
            entry["vs_previous_row"] = cells(valid, previous)
        record["rows"].append(entry)
        save()
        print(f"{target} {row} {steps} steps: {seconds:.0f} s, valid "
              f"{100 * mean_accuracy(valid, variant):.2f}", flush=True)  # fmt: skip

    def score_test(key: tuple[str, int], budget: str) -> None:
        """The recipe `key`, chosen on valid for this budget of steps, scored on test."""
        config = config_for(key[0], key[1], "test")
        frozen_test = score(untrained, config, args.adapt)
        record["test"].append(
            {
                "budget": budget,
                "row": key[0],
                "steps": key[1],
                "chosen_by": f"mean valid accuracy under {variant}",
                "frozen": cells(frozen_test, None),
                "chosen": cells(score(scored[key][0], config, args.adapt), frozen_test),
            }
        )
        save()

    base = config_for("frozen", 1, "valid")
    untrained = build_learner(build_model(base.model), base.learner).eval()
    frozen = score(untrained, base, args.adapt)
    add_row("frozen", 0, 0.0, frozen, None)
    scored: dict[tuple[str, int], tuple[MetaLearner, dict]] = {}
    previous = frozen
    for row in args.rows:
        config = config_for(row, args.steps, "valid")
        learner, seconds = train(config, not args.quiet)
        valid = score(learner, config, args.adapt)
        scored[(row, args.steps)] = (learner, valid)
        add_row(row, args.steps, seconds, valid, previous)
        previous = valid
    short = max(scored, key=lambda key: mean_accuracy(scored[key][1], variant))
    if args.test:
        score_test(short, f"{args.steps} steps")
    if args.long_steps:
        config = config_for(short[0], args.long_steps, "valid")
        learner, seconds = train(config, not args.quiet)
        valid = score(learner, config, args.adapt)
        scored[(short[0], args.long_steps)] = (learner, valid)
        add_row(short[0], args.long_steps, seconds, valid, scored[short][1])
        better = mean_accuracy(valid, variant) > mean_accuracy(scored[short][1], variant)
        if args.test and better:  # else the short recipe is the long budget's choice too
            score_test((short[0], args.long_steps), f"{args.long_steps} steps")


def to_markdown(records: list[dict]) -> str:
    lines = []
    for rec in records:
        variants = list(rec["rows"][0]["valid"])
        for variant in variants:
            lines += [
                f"\n**{rec['target']}** (labeled source {rec['source']}), `valid`, "
                f"adapt `{variant}`;"
                " Δ: paired vs frozen / vs the row above\n",
                "| row | steps | " + " | ".join(PROTOCOLS) + " | meta-train s |",
                "|---|---|" + "---|" * len(PROTOCOLS) + "---|",
            ]
            for row in rec["rows"]:
                texts = []
                for protocol in PROTOCOLS:
                    cell = row["valid"][variant][protocol]
                    text = f"{100 * cell['accuracy']:.2f}"
                    if "vs_previous_row" in row:
                        a = cell["vs_reference"]
                        b = row["vs_previous_row"][variant][protocol]["vs_reference"]
                        text += (
                            f" ({100 * a['mean']:+.2f} ± {100 * a['ci95']:.2f} / "
                            f"{100 * b['mean']:+.2f} ± {100 * b['ci95']:.2f})"
                        )
                    texts.append(text)
                lines.append(
                    f"| {row['row']} | {row['steps']} | " + " | ".join(texts)
                    + f" | {row['seconds']:.0f} |"
                )  # fmt: skip
        for test in rec.get("test", []):
            lines += [
                f"\n**{rec['target']}** `test`, the recipe chosen on valid for {test['budget']}: "
                f"{test['row']}, {test['steps']} steps (Δ paired vs frozen)\n",
                "| encoder | adapt | " + " | ".join(PROTOCOLS) + " |",
                "|---|---|" + "---|" * len(PROTOCOLS),
            ]
            for name in ("frozen", "chosen"):
                for variant, by_protocol in test[name].items():
                    texts = []
                    for protocol in PROTOCOLS:
                        cell = by_protocol[protocol]
                        text = f"{100 * cell['accuracy']:.2f} ± {100 * cell['ci95']:.2f}"
                        if "vs_reference" in cell:
                            d = cell["vs_reference"]
                            text += f" ({100 * d['mean']:+.2f} ± {100 * d['ci95']:.2f})"
                        texts.append(text)
                    lines.append(f"| {name} | {variant} | " + " | ".join(texts) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--targets", nargs="+", default=["banking77", "clinc150"])
    parser.add_argument("--rows", nargs="+", default=list(ROWS), choices=list(ROWS))
    parser.add_argument("--adapt", nargs="+", default=["logreg/example:1", "logreg/off"])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--long-steps", type=int, default=0, help="the best row, this long")
    parser.add_argument("--episodes", type=int, default=600)
    parser.add_argument("--no-test", dest="test", action="store_false")
    parser.add_argument("--quick", action="store_true", help="a smoke run: few steps/episodes")
    parser.add_argument("--quiet", action="store_true")
    parser.add_argument("--runs", default="runs/source-tasks")
    parser.add_argument("--out", default="benchmarks/results/source_tasks.json")
    parser.add_argument("--table", nargs="+", help="print the tables of these JSON files")
    parser.add_argument("overrides", nargs="*", help="key=value for every run")
    args = parser.parse_args()
    if args.table:
        for path in args.table:
            print(to_markdown(json.loads(Path(path).read_text())["records"]))
        return
    if args.quick:
        args.steps, args.episodes = min(args.steps, 4), min(args.episodes, 10)
        args.long_steps = min(args.long_steps, 6)
    began = time.perf_counter()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    records: list[dict] = []

    def save() -> None:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(
            json.dumps(
                {
                    "command": "python benchmarks/source_tasks.py " + " ".join(sys.argv[1:]),
                    "machine": {
                        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
                        "threads": torch.get_num_threads(),
                        "python": platform.python_version(),
                        "torch": torch.__version__,
                    },
                    "seconds": time.perf_counter() - began,
                    "records": records,
                },
                indent=1,
            )
        )

    for target in args.targets:
        records.append({})
        run_target(target, args, records[-1], save)
    print(to_markdown(records))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
