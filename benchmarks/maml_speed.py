"""One meta-step of metalm's gradient learners vs a plain fine-tuning step and vs MAML
written with the `higher` library, on the same episode and model.

Every method runs in a fresh process, on the same 5-way episode (CLINC150 train,
episode 0, fixed seed): after a warm-up step it times `repeats` steps and reports the
median, and reads its peak memory as max RSS (`getrusage(RUSAGE_SELF).ru_maxrss`) minus
max RSS after the model, tokens and optimizer are ready (torch allocations are invisible
to tracemalloc). A step is

* `finetune`: forward + backward + AdamW over all encoder tensors and a linear head, on
  the support and query texts of the episode in one batch (the same tokens);
* `fomaml`, `maml`, `anil` (metalm): `learner.meta_loss(episode).backward()` + AdamW,
  i.e. the inner loop on the support set, the query loss and the meta-gradient;
* `higher-maml`: the same second-order MAML with `higher.monkeypatch` and a
  differentiable SGD (`copy_initial_weights=False`, so meta-gradients reach the model):
  the same adapted tensors, the same prototype-initialised head (the head is passed in
  as fast weights, with gradient), the same inner learning rates and steps, and the same
  attention kernel as metalm's second-order path (SDPA restricted to the math kernel).

    python benchmarks/maml_speed.py                      # tiny + MiniLM, ~10 min, 1 thread
    python benchmarks/maml_speed.py --models tiny --repeats 3

Prints a Markdown table and writes benchmarks/results/maml_speed.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

METHODS = ["finetune", "fomaml", "maml", "higher-maml", "anil"]


def make_tiny(directory: Path) -> str:
    """The 2-layer, 32-wide random BERT of the tests."""
    from metalm.models.tiny import save_tiny_bert

    return str(save_tiny_bert(directory))


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def build(args: argparse.Namespace, method: str, encoder=None):
    """Encoder, learner (its config sets the adapted tensors and rates) and the episode."""
    import torch

    from metalm.config import parse_learner_config
    from metalm.data import EpisodeSampler, builtin_dataset
    from metalm.learners import build_learner
    from metalm.models import EncoderConfig, TextEncoder

    torch.manual_seed(0)
    if encoder is None:
        encoder = TextEncoder.from_config(EncoderConfig(name_or_path=args.model_path))
    name = {"higher-maml": "maml", "finetune": "fomaml"}.get(method, method)
    spec: dict = {"name": name, "inner_steps": args.inner_steps}
    if name != "anil":
        spec.update(
            adapt=args.adapt,
            last_n=args.last_n,
            inner_lr=args.inner_lr,
            adapt_embeddings=args.adapt_embeddings,
        )
    learner = build_learner(encoder, parse_learner_config(spec))
    sampler = EpisodeSampler(builtin_dataset("clinc150", "train"), 5, args.k_shot, 5, seed=0)
    episode = sampler.sample(0)
    encoder.pretokenize(episode.support_texts + episode.query_texts)
    return encoder, learner, episode


def higher_maml_loss(learner, episode, module, fmodel, diffopt):
    """Second-order MAML through `higher`, the same computation as metalm's `maml`."""
    from torch import nn

    from metalm.learners.vmap_safety import math_attention

    s_ids, s_mask, s_labels, q_ids, q_mask, q_labels = (
        t[0] for t in learner._episode_tensors([episode])
    )
    encoder = learner.encoder
    with math_attention():
        # prototype head from the support features, with gradient (as metalm)
        support = encoder.pool(
            encoder.model(input_ids=s_ids, attention_mask=s_mask).last_hidden_state, s_mask
        )
        head = learner.init_head(support, s_labels, episode.n_way)
        # start from the live model tensors (so meta-gradients reach them) and the head;
        # not fmodel.fast_params, which still hold the previous step's adapted tensors
        # (as views: new graph nodes, so that the first inner gradient is the partial
        # derivative per tensor, as with torch.func, not the total derivative that would
        # add the path through the prototype head, which depends on the same tensors)
        encoder_params = [p.view_as(p) for p in module.model.parameters()]
        params = [*encoder_params, head["head.weight"], head["head.bias"]]

        def loss_on(ids, mask, labels, fast):
            hidden = fmodel(ids, mask, params=fast)
            return nn.functional.cross_entropy(hidden, labels)

        for _ in range(learner.config.inner_steps):
            params = diffopt.step(loss_on(s_ids, s_mask, s_labels, params), params=params)
        return loss_on(q_ids, q_mask, q_labels, params)


class EncoderWithHead:
    """Built lazily (needs torch): a module whose forward is `logit_scale * head(pool(x))`."""

    @staticmethod
    def make(learner, n_way: int):
        import torch
        from torch import nn

        class Module(nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.model = learner.encoder.model
                self.head = nn.Linear(learner.encoder.dim, n_way)

            def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
                out = self.model(input_ids=ids, attention_mask=mask).last_hidden_state
                features = learner.encoder.pool(out, mask)
                return learner.config.logit_scale * self.head(features)

        return Module()


def make_step(args: argparse.Namespace, method: str, encoder, learner, episode):
    """A zero-argument function doing one full training step of `method`."""
    import torch
    from torch import nn

    learner.train()
    if method == "finetune":
        head = nn.Linear(encoder.dim, episode.n_way)
        params = [*encoder.model.parameters(), *head.parameters()]
        optimizer = torch.optim.AdamW(params, lr=2e-5)
        ((ids, mask),) = learner._tokens([episode.support_texts + episode.query_texts])
        labels = torch.tensor(episode.support_labels + episode.query_labels)

        def step() -> None:
            optimizer.zero_grad(set_to_none=True)
            out = encoder.model(input_ids=ids, attention_mask=mask).last_hidden_state
            logits = head(encoder.pool(out, mask))
            nn.functional.cross_entropy(logits, labels).backward()
            optimizer.step()

        return step

    optimizer = torch.optim.AdamW([p for p in learner.parameters() if p.requires_grad], lr=2e-5)
    if method != "higher-maml":

        def step() -> None:
            optimizer.zero_grad(set_to_none=True)
            learner.meta_loss(episode).backward()
            optimizer.step()

        return step

    import higher

    module = EncoderWithHead.make(learner, episode.n_way)
    module.train()
    named = dict(module.named_parameters())
    adapted = {"model." + n for n in learner.adapted_names}
    groups = [
        {"params": [named[n] for n in named if n in adapted], "lr": args.inner_lr},
        {"params": list(module.head.parameters()), "lr": learner.config.head_lr},
    ]
    inner = torch.optim.SGD(groups, lr=args.inner_lr)
    fmodel = higher.monkeypatch(module, copy_initial_weights=False, track_higher_grads=True)
    diffopt = higher.get_diff_optim(inner, module.parameters(), fmodel=fmodel)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        higher_maml_loss(learner, episode, module, fmodel, diffopt).backward()
        optimizer.step()

    return step


def measure(args: argparse.Namespace) -> dict:
    """One (model, method) in this process."""
    import torch

    torch.set_num_threads(args.threads)
    encoder, learner, episode = build(args, args.method)
    step = make_step(args, args.method, encoder, learner, episode)
    loaded = peak_rss_mib()
    step()  # warm-up
    seconds = []
    for _ in range(args.repeats):
        began = time.perf_counter()
        step()
        seconds.append(time.perf_counter() - began)
    texts = len(episode.support_texts) + len(episode.query_texts)
    return {
        "model": args.model,
        "method": args.method,
        "seconds_per_step": statistics.median(seconds),
        "all_seconds": seconds,
        "peak_extra_mib": peak_rss_mib() - loaded,
        "loaded_mib": loaded,
        "adapted_tensors": len(learner.adapted_names) if args.method != "finetune" else None,
        "texts": texts,
    }


def interleaved(args: argparse.Namespace) -> dict:
    """Step times of every method in one process, round-robin (repeat 1 of each method,
    then repeat 2, ...), so that a busy machine slows them all alike: the ratios are
    side by side. They share one encoder (each method's optimizer steps it; irrelevant
    to timing)."""
    import torch

    torch.set_num_threads(args.threads)
    encoder, steps = None, {}
    for method in args.methods:
        encoder, learner, episode = build(args, method, encoder)
        steps[method] = make_step(args, method, encoder, learner, episode)
    for step in steps.values():
        step()  # warm-up
    seconds: dict[str, list[float]] = {m: [] for m in steps}
    for _ in range(args.repeats):
        for method, step in steps.items():
            began = time.perf_counter()
            step()
            seconds[method].append(time.perf_counter() - began)
    return {m: {"median": statistics.median(v), "all": v} for m, v in seconds.items()}


def check_gradients(args: argparse.Namespace) -> dict:
    """metalm MAML and higher MAML give the same meta-gradient (eval mode, no dropout)."""
    import torch

    torch.set_num_threads(args.threads)
    encoder, learner, episode = build(args, "maml")
    learner.eval()
    learner.zero_grad(set_to_none=True)
    learner.meta_loss(episode).backward()
    ours = {n: p.grad.clone() for n, p in encoder.model.named_parameters() if p.grad is not None}
    learner.zero_grad(set_to_none=True)
    import higher

    module = EncoderWithHead.make(learner, episode.n_way)
    module.eval()
    named = dict(module.named_parameters())
    adapted = {"model." + n for n in learner.adapted_names}
    inner = torch.optim.SGD(
        [
            {"params": [named[n] for n in named if n in adapted], "lr": args.inner_lr},
            {"params": list(module.head.parameters()), "lr": learner.config.head_lr},
        ],
        lr=args.inner_lr,
    )
    fmodel = higher.monkeypatch(module, copy_initial_weights=False)
    diffopt = higher.get_diff_optim(inner, module.parameters(), fmodel=fmodel)
    higher_maml_loss(learner, episode, module, fmodel, diffopt).backward()
    theirs = {n: p.grad for n, p in encoder.model.named_parameters() if p.grad is not None}
    num = sum(((ours[n] - theirs[n]) ** 2).sum() for n in ours).sqrt()
    den = sum((ours[n] ** 2).sum() for n in ours).sqrt()
    return {
        "model": args.model,
        "tensors_with_grad": [len(ours), len(theirs)],
        "relative_difference": float(num / den),
    }


def child_command(args: argparse.Namespace, model: str, path: str, method: str) -> list[str]:
    return [
        sys.executable, __file__, "--child", "--model", model, "--model-path", path,
        "--method", method, "--adapt", args.adapt, "--last-n", str(args.last_n),
        "--k-shot", str(args.k_shot), "--inner-steps", str(args.inner_steps),
        "--inner-lr", str(args.inner_lr), "--repeats", str(args.repeats),
        "--threads", str(args.threads),
        *(["--adapt-embeddings"] if args.adapt_embeddings else []),
    ]  # fmt: skip


def run_child(command: list[str]) -> dict | str:
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        lines = done.stderr.strip().splitlines()
        return lines[-1] if lines else "failed"
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=["tiny", "minilm"])
    parser.add_argument("--methods", nargs="+", default=METHODS)
    parser.add_argument("--adapt", default="all", help="tensors MAML/FOMAML adapt: all | last_n")
    parser.add_argument("--last-n", type=int, default=2)
    parser.add_argument(
        "--adapt-embeddings", action="store_true", help="MAML/FOMAML also adapt embedding tables"
    )
    parser.add_argument("--k-shot", type=int, default=1)
    parser.add_argument("--inner-steps", type=int, default=3)
    parser.add_argument("--inner-lr", type=float, default=1e-3)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default="benchmarks/results/maml_speed.json")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--check", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--interleaved", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--model-path", default="", help=argparse.SUPPRESS)
    parser.add_argument("--method", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        if args.interleaved:
            print(json.dumps(interleaved(args)))
        else:
            print(json.dumps(check_gradients(args) if args.check else measure(args)))
        return

    command = "python " + " ".join(["benchmarks/maml_speed.py", *sys.argv[1:]])
    rows, checks = [], []
    with tempfile.TemporaryDirectory() as tmp:
        paths = {"minilm": ""}
        if "tiny" in args.models:
            paths["tiny"] = make_tiny(Path(tmp) / "tiny")
        for model in args.models:
            if "higher-maml" in args.methods:
                found = run_child([*child_command(args, model, paths[model], "maml"), "--check"])
                checks.append(
                    found if isinstance(found, dict) else {"model": model, "error": found}
                )
                print(checks[-1], file=sys.stderr)
            for method in args.methods:  # peak memory (and an isolated timing) per process
                found = run_child(child_command(args, model, paths[model], method))
                rows.append(
                    found if isinstance(found, dict)
                    else {"model": model, "method": method, "error": found}
                )  # fmt: skip
                print(rows[-1], file=sys.stderr)
            command = child_command(args, model, paths[model], "-")
            times = run_child([*command, "--interleaved", "--methods", *args.methods])
            print(times, file=sys.stderr)
            for row in rows:
                if row["model"] != model or "error" in row:
                    continue
                row["isolated_seconds_per_step"] = row.pop("seconds_per_step")
                if isinstance(times, dict) and row["method"] in times:
                    row["seconds_per_step"] = times[row["method"]]["median"]
                    row["interleaved_seconds"] = times[row["method"]]["all"]
                else:
                    row["error"] = f"interleaved timing failed: {times}"
    table = to_markdown(rows, args)
    print(f"\n`{command}`\n")
    print(table)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    import torch

    settings = {
        k: getattr(args, k)
        for k in (
            "adapt",
            "adapt_embeddings",
            "last_n",
            "k_shot",
            "inner_steps",
            "inner_lr",
            "repeats",
            "threads",
        )
    }
    env = {"python": platform.python_version(), "torch": torch.__version__}
    try:
        from importlib.metadata import version

        env["higher"] = version("higher")
    except Exception:  # pragma: no cover - higher not installed
        env["higher"] = None
    out.write_text(
        json.dumps(
            {
                "command": command,
                "settings": settings,
                "env": env,
                "gradient_check": checks,
                "rows": rows,
                "ratios": ratios(rows),
            },
            indent=1,
        )
    )
    print(f"\nwrote {out}")


def ratios(rows: list[dict]) -> dict:
    """The target ratios per model: FOMAML / fine-tune time, higher / metalm MAML."""
    found: dict = {}
    for model in sorted({r["model"] for r in rows}):
        by = {r["method"]: r for r in rows if r["model"] == model and "error" not in r}

        def ratio(a: str, b: str, key: str, by: dict = by) -> float | None:
            if a in by and b in by and by[b][key] > 0:
                return by[a][key] / by[b][key]
            return None

        found[model] = {
            "fomaml_over_finetune_time": ratio("fomaml", "finetune", "seconds_per_step"),
            "maml_speedup_over_higher": ratio("higher-maml", "maml", "seconds_per_step"),
            "maml_over_higher_memory": ratio("maml", "higher-maml", "peak_extra_mib"),
        }
    return found


def to_markdown(rows: list[dict], args: argparse.Namespace) -> str:
    lines = [
        f"5-way {args.k_shot}-shot, 5 queries/class, {args.inner_steps} inner steps "
        f"(lr {args.inner_lr}), MAML/FOMAML adapt `{args.adapt}`"
        + (f" (last {args.last_n})" if args.adapt == "last_n" else "")
        + f", median of {args.repeats} steps after a warm-up, {args.threads} thread(s)",
        "",
        "| model | method | s/step (median, interleaved) | × finetune | s/step (own process) "
        "| peak extra MiB | × finetune MiB |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['model']} | {r['method']} | error: {r['error'][:80]} | | | | |")
            continue
        base = next(
            (b for b in rows if b["model"] == r["model"] and b["method"] == "finetune"
             and "error" not in b),
            None,
        )  # fmt: skip
        t = f"{r['seconds_per_step'] / base['seconds_per_step']:.2f}" if base else "-"
        m = (
            f"{r['peak_extra_mib'] / base['peak_extra_mib']:.2f}"
            if base and base["peak_extra_mib"] > 0
            else "-"
        )
        lines.append(
            f"| {r['model']} | {r['method']} | {r['seconds_per_step']:.3f} | {t} | "
            f"{r['isolated_seconds_per_step']:.3f} | {r['peak_extra_mib']:.0f} | {m} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
