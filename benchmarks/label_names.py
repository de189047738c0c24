"""Label names in the embedding learners: each variant of `learner.label_names`, paired
against the same encoder and head without names, on the same tasks.

For each target (BANKING77, CLINC150): the frozen MiniLM and the protonet meta-trained
for that target without its labels (a finished run: `--trained-banking77 RUN`,
`--trained-clinc150 RUN`), each under every variant `HEAD/MODE:WEIGHT` (e.g.
`logreg/example:1`, `centroid/prior:2`, `logreg/off`): 5-way 1-shot episodes of the
target's split and full-way 5-/10-shot (support = `train_5`/`train_10`, query = the whole
split). Δ is the paired difference to `HEAD/off` on the same encoder (per episode / per
query text) with its 95% interval. Choose on `--split valid`; score `test` once.

    python benchmarks/label_names.py --split valid \\
        --variants logreg/off logreg/example:1 logreg/example:2 logreg/prior:1
    python benchmarks/label_names.py --split test --variants logreg/off logreg/example:1

Prints a Markdown table and writes benchmarks/results/label_names_<split>.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import numpy as np
import torch

from metalm.config import load_config
from metalm.data import builtin_dataset
from metalm.label_names import name_texts
from metalm.learners import MetaLearner, build_learner
from metalm.learners.protonet import FrozenConfig
from metalm.runs.accuracy import MethodResult, mean_ci95
from metalm.runs.existing import load_trained_learner
from metalm.runs.protocols import evaluate_learner
from metalm.tasks import build_pools

TRAINED = {  # meta-trained without the target's labels (the leaderboard's protonet runs)
    "banking77": "runs/leaderboard/clinc150-valid/learners/protonet",  # CLINC150 labels
    "clinc150": "runs/leaderboard/banking77-trainsplit/learners/protonet",  # BANKING77 labels
}


def parse_variant(text: str) -> tuple[str, str, float, tuple[int, float] | None]:
    """`logreg/example:2` -> ("logreg", "example", 2.0, None); a suffix `+self:10:0.5`
    adds self-training on the target's unlabeled texts (10 per class, weight 0.5)."""
    text, _, self_training = text.partition("+self:")
    head, _, rest = text.partition("/")
    mode, _, weight = rest.partition(":")
    selftrain = None
    if self_training:
        per_class, _, st_weight = self_training.partition(":")
        selftrain = (int(per_class), float(st_weight or 0.5))
    return head, mode or "off", float(weight or 1.0), selftrain


def variant_learner(
    base: MetaLearner,
    head: str,
    mode: str,
    weight: float,
    selftrain: tuple[int, float] | None = None,
    pool: list[str] | None = None,
) -> MetaLearner:
    """`base`'s weights, adapting with another head and label-name option (and, with
    `selftrain`, self-training on `pool` in every task)."""
    config = dataclasses.replace(base.config, head=head, label_names=mode, label_name_weight=weight)
    if selftrain is not None:
        config = dataclasses.replace(
            config, self_train_per_class=selftrain[0], self_train_weight=selftrain[1]
        )
    learner = build_learner(base.encoder, config)
    learner.load_state_dict(base.state_dict())
    if selftrain is not None:
        adapt_unlabeled = learner.adapt_unlabeled
        unlabeled = list(pool or [])

        def adapt_named(texts, labels, names):  # what evaluation calls
            chosen = set(texts)
            return adapt_unlabeled(texts, labels, names, [t for t in unlabeled if t not in chosen])

        learner.adapt_named = adapt_named  # type: ignore[method-assign]
    return learner.eval()


def score_target(target: str, args: argparse.Namespace) -> list[dict]:
    run_dir = getattr(args, f"trained_{target}")
    overrides = [
        f"data.test={{source: {target}, split: {args.split}}}",
        "eval.full_way_shots=[5, 10]",
        "eval.settings=[{n_way: 5, k_shot: 1}]",
        f"eval.q_queries={args.queries}",
        f"eval.episodes={args.episodes}",
        "model.device=cpu",
    ]
    config = load_config(Path(run_dir) / "config.yaml", overrides)
    _, trained = load_trained_learner(run_dir, overrides)
    frozen = build_learner(trained.encoder.__class__.from_config(config.model), FrozenConfig())
    pools = build_pools(config.data, config.eval.full_way_shots)
    pool = list(builtin_dataset(target, "train").texts)  # the target's texts, labels unread
    texts = list(pools.test.texts) + name_texts(pools.test.classes) + pool
    for episode in pools.full_way.values():
        texts += episode.support_texts
    records = []
    for encoder_name, base in (("frozen", frozen), ("protonet", trained)):
        results: dict[str, dict[str, MethodResult]] = {}
        with base.encoder.cached_embeddings(texts):
            for variant in args.variants:
                learner = variant_learner(base, *parse_variant(variant), pool=pool)
                began = time.perf_counter()
                scored = evaluate_learner(learner, variant, config, pools, progress=False)
                results[variant] = {r.protocol: r for r in scored}
                print(f"  {target} {encoder_name} {variant}: {time.perf_counter() - began:.0f} s")
        for variant, by_protocol in results.items():
            head = parse_variant(variant)[0]
            reference = results.get(args.baseline or f"{head}/off")
            row = {"target": target, "encoder": encoder_name, "variant": variant, "results": {}}
            for protocol, result in by_protocol.items():
                cell = {"accuracy": result.accuracy, "ci95": result.ci95}
                if reference is not None and reference is not by_protocol:
                    base_units = np.asarray(reference[protocol].per_episode)
                    mean, ci = mean_ci95(np.asarray(result.per_episode) - base_units)
                    cell["vs_off"] = {"mean": mean, "ci95": ci}
                cell["per_unit"] = list(map(float, result.per_episode))
                row["results"][protocol] = cell
            records.append(row)
    return records


def to_markdown(records: list[dict]) -> str:
    protocols = ["5-way 1-shot", "full-way 5-shot", "full-way 10-shot"]
    lines = [
        "| target | encoder | variant | " + " | ".join(protocols) + " |",
        "|---|---|---|" + "---|" * len(protocols),
    ]
    for rec in records:
        cells = []
        for protocol in protocols:
            cell = rec["results"].get(protocol)
            if cell is None:
                cells.append("")
                continue
            text = f"{100 * cell['accuracy']:.2f}"
            if "vs_off" in cell:
                diff = cell["vs_off"]
                text += f" ({100 * diff['mean']:+.2f} ± {100 * diff['ci95']:.2f})"
            cells.append(text)
        lines.append(
            f"| {rec['target']} | {rec['encoder']} | {rec['variant']} | " + " | ".join(cells) + " |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--split", default="valid", choices=["valid", "test"])
    parser.add_argument("--targets", nargs="+", default=["banking77", "clinc150"])
    parser.add_argument("--variants", nargs="+", default=["logreg/off", "logreg/example:1"])
    parser.add_argument("--episodes", type=int, default=600)
    parser.add_argument("--baseline", help="the variant Δ is taken against (default HEAD/off)")
    parser.add_argument("--queries", type=int, default=15)
    parser.add_argument("--trained-banking77", default=TRAINED["banking77"])
    parser.add_argument("--trained-clinc150", default=TRAINED["clinc150"])
    parser.add_argument("--out", help="default: benchmarks/results/label_names_<split>.json")
    parser.add_argument("--table", nargs="+", help="print the tables of these JSON files")
    args = parser.parse_args()
    if args.table:
        for path in args.table:
            print(to_markdown(json.loads(Path(path).read_text())["records"]))
        return
    torch.manual_seed(0)
    records = [rec for target in args.targets for rec in score_target(target, args)]
    table = to_markdown(records)
    print(table)
    out = Path(args.out or f"benchmarks/results/label_names_{args.split}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    command = "python benchmarks/label_names.py " + " ".join(
        [f"--split {args.split}", "--targets", *args.targets, "--variants", *args.variants]
    )
    out.write_text(
        json.dumps(
            {"command": command, "threads": torch.get_num_threads(), "records": records}, indent=1
        )
    )
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
