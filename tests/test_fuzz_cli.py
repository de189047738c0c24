"""Fuzzing the command line with Hypothesis: `metalm.cli.main(argv)` on generated
argument lists (real commands and options with odd values, odd files, stray tokens)
returns 0, or exits 2 with a one-line `error:` message (ours or argparse's), and never
prints a traceback. `adapt`, `predict`, `score`, `export` and `sample` run for real on a
tiny model; `train`, `eval`, `tune` and `demo` run only where their config is invalid
(a valid one would start a long run), `serve` only with --help."""

from __future__ import annotations

import contextlib
import io
import os
import signal
import sys
from collections import Counter
from pathlib import Path

import pytest
from fuzzing import EXAMPLES, fuzz_settings
from hypothesis import assume, given
from hypothesis import strategies as st

from metalm import FewShotClassifier, save_pretrained
from metalm.cli import build_parser, main
from metalm.config import DEMO_CONFIG, load_config, parse_learner_config
from metalm.errors import MetalmError
from metalm.learners import build_learner
from metalm.models.encoder import EncoderConfig, TextEncoder
from metalm.tune import load_tune_config


@pytest.fixture(scope="module")
def files(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Paths the generated arguments pick from: a model, a task, good and bad inputs."""
    root = tmp_path_factory.mktemp("fuzz-cli")
    encoder = TextEncoder.from_config(EncoderConfig(name_or_path=str(tiny_model_dir)))
    model = save_pretrained(
        build_learner(encoder, parse_learner_config({"name": "protonet"})), root / "model"
    )
    clf = FewShotClassifier.from_pretrained(model, device="cpu")
    task = clf.adapt(["one", "two", "three", "four"], ["a", "a", "b", "b"]).save_task(root / "task")
    (root / "good.csv").write_text("text,label\nhello,a\nbye,b\nhi,a\n", encoding="utf-8")
    (root / "good.jsonl").write_text('{"text": "yo", "label": "b"}\n', encoding="utf-8")
    (root / "ragged.csv").write_text('text,label\n"open,a\n,\nx,y,z\n', encoding="utf-8")
    (root / "latin1.csv").write_bytes("text,label\ncafé,a\n".encode("latin-1"))
    (root / "nul.txt").write_bytes(b"a\x00b\n\n\xef\xbb\xbfc\n")
    (root / "dup.csv").write_text("text,text,label\na,b,c\n", encoding="utf-8")
    (root / "bad.yaml").write_text("train: {steps: -1}\n", encoding="utf-8")
    (root / "list.yaml").write_text("- 1\n- 2\n", encoding="utf-8")
    (root / "empty.csv").write_text("", encoding="utf-8")
    return {
        "model": str(model),
        "tiny": str(tiny_model_dir),
        "task": str(task),
        "root": str(root),
        **{p.stem + p.suffix: str(p) for p in root.iterdir() if p.is_file()},
    }


def argv_strategy(files: dict[str, str]) -> st.SearchStrategy[list[str]]:
    """Argument lists: a command, its options with odd values, stray tokens."""
    path = st.one_of(
        st.sampled_from(sorted(files.values())),
        st.sampled_from(["", "missing.csv", "/", "-", "a.unknown", "hf:", "x" * 300]),
        st.text(max_size=10),
    )
    number = st.one_of(
        st.integers(-5, 5).map(str), st.sampled_from(["0", "1e3", "nan", "x", "", "99999999"])
    )
    word = st.one_of(
        st.sampled_from(["text", "label", "auto", "cpu", "cuda", "meta", "frozen", "protonet"]),
        st.text(max_size=8),
    )
    override = st.one_of(
        st.sampled_from(
            [
                f"model.name_or_path={files['tiny']}",
                "model.max_length=8",
                "episode.n_way=3",
                "episode.k_shot=1",
                "episode.q_queries=1",
                "data.train.source=banking77",
                f"data.train.source={files['good.csv']}",
                f"data.train.source={files['ragged.csv']}",
                "episode.n_way=all",
                "learner.name=nope",
                "learner.head=ridge",
                "=",
                "a.b",
            ]
        ),
        st.builds(lambda k, v: f"{k}={v}", word, word),
    )
    options = {
        "adapt": {"--model": path, "--support": path, "--out": path, "--text-column": word},
        "predict": {"--task": path, "--input": path, "--output": path, "--batch-size": number},
        "score": {
            "--task": path,
            "--input": path,
            "--out": path,
            "--top": number,
            "--label-column": word,
            "--batch-size": number,
        },
        "export": {"--learner": word, "--out": path, "--run": path},
        "sample": {
            "--pool": word,
            "--index": number,
            "--n-way": number,
            "--k-shot": number,
            "-c": path,
        },
        "train": {"-c": path, "--resume": path},
        "eval": {"-c": path, "--run": path, "--name": word},
        "tune": {"-c": path, "--trials": number, "--sampler": word},
        "demo": {"-c": path},
        "serve": {"--help": st.just("")},
        "datasets": {"--help": st.just("")},
    }
    good = {
        "adapt": ["--model", files["model"], "--support", files["good.csv"]],
        "predict": ["--task", files["task"], "--model", files["model"]],
        "score": ["--task", files["task"], "--input", files["good.csv"]],
        "export": [f"model.name_or_path={files['tiny']}"],
    }

    @st.composite
    def argv(draw: st.DrawFn) -> list[str]:
        command = draw(st.sampled_from(sorted(options)))
        out = [command]
        if command in good and draw(st.sampled_from([True, True, True, False])):
            out += good[command]  # mostly valid, so that the command runs past parsing
        for option, values in draw(
            st.lists(st.sampled_from(sorted(options[command].items())), max_size=2)
        ):
            out.append(option)
            value = draw(values)
            if value:
                out.append(value)
        if "--out" not in out and command in ("adapt", "score", "export"):
            out += ["--out", "out"]  # in the test's own working directory
        if command in ("sample", "train", "eval", "tune", "demo", "export"):
            out += draw(st.lists(override, max_size=3))
        if draw(st.sampled_from([False, False, False, True])):
            out.append(draw(st.one_of(word, st.sampled_from(["-q", "--", "-x"]))))
        return out

    return argv()


HEAVY = {"train", "eval", "tune", "demo"}
HANG_SECONDS = 60  # one command line on the tiny model takes well under a second


def would_run_long(argv: list[str]) -> bool:
    """Whether `argv` could start a meta-training or tuning run, or a server: it parses,
    and its config (the demo's when none is given) is valid."""
    command = argv[0]
    if command not in (*HEAVY, "serve"):
        return False
    try:
        with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
            args = build_parser().parse_args(argv)
    except SystemExit:
        return False  # --help, or a usage error: nothing runs
    if command == "serve":
        return True
    if getattr(args, "resume", None) or getattr(args, "run", None):
        return os.path.isdir(getattr(args, "resume", None) or args.run)
    try:
        if command == "tune":
            _base, space = load_tune_config(args.config, args.overrides)
            return space is not None or args.arch
        load_config(args.config or (DEMO_CONFIG if command == "demo" else None), args.overrides)
    except (MetalmError, OSError, ValueError):  # ValueError: a path with a NUL byte
        return False
    return True


def run_main(argv: list[str]) -> tuple[int, str]:
    """`main(argv)`: its exit status and what it wrote to stderr."""

    def hang(_signum: int, _frame: object) -> None:
        raise TimeoutError(f"metalm {' '.join(argv)!r} ran over {HANG_SECONDS} s")

    err, out = io.StringIO(), io.StringIO()
    previous = signal.signal(signal.SIGALRM, hang)
    signal.alarm(HANG_SECONDS)
    stdin, sys.stdin = sys.stdin, io.StringIO('hello\n{"text": "bye"}\n\x00\n')
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
            try:
                code = main(argv)
            except SystemExit as exit_:  # argparse: --help (0) or a usage error (2)
                code = exit_.code if isinstance(exit_.code, int) else 1
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
        sys.stdin = stdin
    return code, err.getvalue()


@pytest.mark.slow
@pytest.mark.parametrize("examples", EXAMPLES)
def test_cli_returns_a_status_or_one_error_line(
    examples: int, files: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every generated command line ends with status 0, or 2 and an `error:` line; the
    commands that use a model also succeed on some of them (the fuzzing gets past the
    argument parsing)."""
    outcomes: Counter[str] = Counter()
    monkeypatch.chdir(tmp_path)  # relative paths the fuzzer makes up land here

    @fuzz_settings(examples)
    @given(argv=argv_strategy(files))
    def check(argv: list[str]) -> None:
        assume(not would_run_long(argv))
        code, err = run_main(argv)
        outcomes[f"{argv[0]} {code}"] += 1
        assert "Traceback" not in err, err
        assert code in (0, 2), (code, err)
        if code == 2:
            assert "error:" in err, err

    check()
    print(sorted(outcomes.items()))
    ran = sum(outcomes[f"{command} 0"] for command in ("adapt", "predict", "score", "export"))
    assert ran >= 3, outcomes
