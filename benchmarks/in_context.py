"""In-context learning with a causal LM (SmolLM2-135M-Instruct) beside MiniLM learners.

Leave-one-dataset-out: `metaicl` and `protonet` meta-train on one intent dataset's
labeled classes, and every row is tested on the *other* dataset's intents (never seen):
the first `--episodes` of the same fixed 5-way 1-shot and 5-way 5-shot test episodes that
every metalm learner is measured on (`eval.seed`, 15 queries per class). Rows:

  frozen        MiniLM, no training (logreg head)
  protonet      MiniLM meta-trained, 200 steps (logreg head)
  icl           SmolLM2 in context, direct scoring (log P(label | prompt, query))
  icl-calib     the same with contextual calibration
  icl-channel   SmolLM2 in context, channel scoring (log P(query | prompt, label))
  metaicl       SmolLM2 meta-trained on prompts (MetaICL; LoRA r=16), direct scoring
  metaicl-channel  the same, channel scoring (loss on the query's tokens after its label)

Δ columns are paired differences (same episodes) with 95% intervals. `--speed` measures
prompt tokens, adapt time, queries/s with and without the prompt's key/value cache, and
peak memory on 5-way 5-shot tasks.

    python benchmarks/in_context.py --direction clinc150 --episodes 40
    python benchmarks/in_context.py --speed --episodes 5
    python benchmarks/in_context.py --table benchmarks/results/in_context_*.json
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import time
from pathlib import Path

import numpy as np
import torch

from metalm.config import load_config
from metalm.data import builtin_dataset
from metalm.data.episodes import EpisodeSampler
from metalm.learners import ICLConfig, build_learner
from metalm.models.base import build_model
from metalm.models.encoder import EncoderConfig
from metalm.models.prompting import PromptScorer
from metalm.runs.accuracy import mean_ci95
from metalm.runs.recipe import run

DIRECTIONS = {"clinc150": "banking77", "banking77": "clinc150"}
SETTINGS = ((5, 1), (5, 5))
CAUSAL = ["model.kind=causal"]
ROWS: dict[str, list[str]] = {
    "frozen": ["learner.name=frozen"],
    "protonet": [
        "learner.name=protonet",
        "train.steps=200",
        "train.warmup_steps=20",
        "train.eval_every=33",
        "train.val_episodes=100",
    ],
    "icl": [*CAUSAL, "learner.name=icl"],
    "icl-calib": [*CAUSAL, "learner.name=icl", "learner.calibrate=true"],
    "icl-channel": [*CAUSAL, "learner.name=icl", "learner.scoring=channel"],
    "metaicl": [*CAUSAL, "learner.name=metaicl", "@metaicl"],
    "metaicl-channel": [*CAUSAL, "learner.name=metaicl", "learner.scoring=channel", "@metaicl"],
}


def metaicl_overrides(steps: int) -> list[str]:
    """MetaICL's budget: 5-way episodes of 1 to 5 shots, 4 queries per class, LoRA."""
    return [
        f"train.steps={steps}",
        "train.lr=3e-4",
        f"train.warmup_steps={max(1, steps // 10)}",
        f"train.eval_every={max(1, steps // 3)}",
        f"train.checkpoint_every={steps}",
        "train.val_episodes=10",
        "train.val_n_way=5",
        "train.val_q_queries=3",
        "episode.n_way=5",
        "episode.k_shot=[1, 5]",
        "episode.q_queries=4",
    ]


def row_config(row: str, source: str, args: argparse.Namespace):
    target = DIRECTIONS[source]
    causal = "model.kind=causal" in ROWS[row]
    episodes = args.episodes if causal else max(args.episodes, args.encoder_episodes)
    overrides = [
        f"data.train={{source: {source}, split: train}}",
        f"data.test={{source: {target}, split: test}}",
        "data.classes.fractions=[0.8, 0.2, 0.0]",
        "train.steps=0",
        "train.tensorboard=false",
        f"eval.episodes={episodes}",
        "eval.settings=[" + ", ".join(f"{{n_way: {n}, k_shot: {k}}}" for n, k in SETTINGS) + "]",
        "eval.full_way_shots=[]",
        "eval.baselines=[]",
        f"output_dir={args.runs}",
        f"run_name={source}-{row}-{time.strftime('%Y%m%d-%H%M%S')}",
    ]
    for item in ROWS[row]:
        overrides += metaicl_overrides(args.steps) if item == "@metaicl" else [item]
    return load_config(None, overrides), overrides


def run_row(row: str, source: str, args: argparse.Namespace) -> dict:
    config, overrides = row_config(row, source, args)
    began = time.perf_counter()
    report = run(config, progress=not args.quiet)
    seconds = time.perf_counter() - began
    return {
        "row": row,
        "source": source,
        "target": DIRECTIONS[source],
        "overrides": overrides,
        "seconds": seconds,
        "train": report.train,
        "results": {
            r.protocol: {
                "accuracy": r.accuracy,
                "ci95": r.ci95,
                "episodes": r.episodes,
                "adapt_seconds": r.adapt_seconds,
                "queries_per_second": r.predict_texts_per_second,
                "per_episode": r.per_episode,
            }
            for r in report.results
        },
    }


def paired(mine: dict, base: dict) -> dict[str, float]:
    n = min(len(mine["per_episode"]), len(base["per_episode"]))
    diff = np.asarray(mine["per_episode"][:n]) - np.asarray(base["per_episode"][:n])
    mean, ci = mean_ci95(diff.tolist())
    return {"mean": mean, "ci95": ci, "episodes": n}


def to_markdown(records: list[dict]) -> str:
    """One table per direction: accuracy on the LM's episodes, Δ vs frozen and vs the best
    `icl` row (paired, over the episodes both rows have)."""
    lines = []
    for source in DIRECTIONS:
        rows = {r["row"]: r for r in records if r["source"] == source}
        if not rows:
            continue
        lines += [
            f"\n{source} → {DIRECTIONS[source]}\n",
            "| row | protocol | episodes | accuracy % | Δ vs frozen | Δ vs best icl | "
            "adapt s | queries/s |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for row, record in rows.items():
            for protocol, result in record["results"].items():
                # the LM's episodes: the first `--episodes` of the encoder rows' 600
                n = min(len(result["per_episode"]), lm_episodes(rows, protocol))
                mean, ci = mean_ci95(result["per_episode"][:n])
                cells = [row, protocol, str(n), f"{100 * mean:.2f} ± {100 * ci:.2f}"]
                for base in ("frozen", "best-icl"):
                    other = best_icl(rows, protocol) if base == "best-icl" else rows.get(base)
                    if other is None or other is record:
                        cells.append("")
                        continue
                    d = paired(result, other["results"][protocol])
                    cells.append(f"{100 * d['mean']:+.2f} ± {100 * d['ci95']:.2f}")
                cells += [f"{result['adapt_seconds']:.2f}", f"{result['queries_per_second']:.1f}"]
                lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def lm_episodes(rows: dict[str, dict], protocol: str) -> int:
    """The most episodes a causal-LM row of this direction has (the encoder rows' are
    cut to it, so that every row's accuracy is over the same tasks)."""
    causal = [r for name, r in rows.items() if "icl" in name]
    counts = [len(r["results"][protocol]["per_episode"]) for r in causal]
    return max(counts, default=10**9)


def best_icl(rows: dict[str, dict], protocol: str) -> dict | None:
    """The untrained in-context row with the highest accuracy on `protocol`."""
    icl = [r for name, r in rows.items() if name.startswith("icl")]
    return max(icl, key=lambda r: r["results"][protocol]["accuracy"], default=None)


def speed(args: argparse.Namespace) -> dict:
    """Prompt tokens, adapt time and queries/s with and without the prompt cache, on
    5-way 5-shot BANKING77 tasks (direct scoring), and the process's peak memory."""
    lm = build_model(EncoderConfig(kind="causal", device="cpu"))
    learner = build_learner(lm, ICLConfig()).eval()
    scorer = PromptScorer(lm.model, lm.tokenizer, learner.template)
    sampler = EpisodeSampler(builtin_dataset("banking77", "test"), 5, 5, 15, seed=1234)
    rows = []
    with torch.no_grad():
        learner.predict(learner.adapt_named(["a", "b"], [0, 1], ["x", "y"]), ["warm"])
        for i in range(args.episodes):
            episode = sampler.sample(i)
            began = time.perf_counter()
            state = learner.adapt_named(
                episode.support_texts, episode.support_labels, episode.label_names
            )
            from metalm.learners.icl import decode_prompt

            prefix, labels = decode_prompt(state)
            cache = scorer.prefix_cache(scorer.ids(prefix))
            adapted = time.perf_counter()
            scorer.score(prefix, episode.query_texts, labels, cache=cache)
            cached = time.perf_counter()
            few = episode.query_texts[: args.uncached_queries]
            scorer.score(prefix, few, labels, use_cache=False)
            uncached = time.perf_counter()
            rows.append(
                {
                    "prompt_tokens": len(scorer.ids(prefix)),
                    "adapt_seconds": adapted - began,
                    "cached_queries_per_second": len(episode.query_texts) / (cached - adapted),
                    "uncached_queries_per_second": len(few) / (uncached - cached),
                }
            )
            print(rows[-1], flush=True)
    summary = {k: float(np.median([r[k] for r in rows])) for k in rows[0]}
    summary["cache_speedup"] = (
        summary["cached_queries_per_second"] / summary["uncached_queries_per_second"]
    )
    summary["peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    summary["threads"] = torch.get_num_threads()
    return {"speed": summary, "per_episode": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--direction", choices=list(DIRECTIONS), nargs="*", default=list(DIRECTIONS)
    )
    parser.add_argument("--rows", nargs="*", default=list(ROWS), choices=list(ROWS))
    parser.add_argument("--episodes", type=int, default=40, help="test episodes of the LM rows")
    parser.add_argument("--encoder-episodes", type=int, default=600)
    parser.add_argument("--steps", type=int, default=150, help="metaicl meta-training steps")
    parser.add_argument("--runs", default="runs/in_context")
    parser.add_argument("--out", default="")
    parser.add_argument("--speed", action="store_true")
    parser.add_argument("--uncached-queries", type=int, default=5)
    parser.add_argument("--table", nargs="*", help="print the table of saved results")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args()
    if args.table:
        records = [r for path in args.table for r in json.loads(Path(path).read_text())["rows"]]
        print(to_markdown(records))
        return
    out = Path(args.out or f"benchmarks/results/in_context{'_speed' if args.speed else ''}.json")
    meta = {"machine": platform.platform(), "threads": torch.get_num_threads()}
    if args.speed:
        result = speed(args)
        out.write_text(json.dumps({**meta, **result}, indent=1))
        print(json.dumps(result["speed"], indent=1))
        return
    records: list[dict] = []
    for source in args.direction:
        for row in args.rows:
            records.append(run_row(row, source, args))
            out.write_text(json.dumps({**meta, "rows": records}, indent=1))  # after every row
            print(to_markdown(records), flush=True)


if __name__ == "__main__":
    main()
