"""Shared fixtures and helpers: a tiny random BERT and Llama (fast unit tests), the
overrides of a fast run, a brief run on the real MiniLM; frozen models saved from the
tiny BERT and a tiny finished run (each built once a session: tests only read them).

Plain helpers of the top-level tests stand in `run_tools.py`."""

from __future__ import annotations

import contextlib
import io
import math
from pathlib import Path
from typing import NamedTuple

import pytest

from metalm import save_pretrained
from metalm.cli import main
from metalm.models import TextEncoder

# the helpers' asserts explain their failures as a test's do (before its first import)
pytest.register_assert_rewrite("run_tools")
from run_tools import read_log, tiny_learner  # noqa: E402


@pytest.fixture(scope="session")
def tiny_model_dir(_tiny_bert: Path) -> Path:
    """A 2-layer, 32-wide BERT with random weights and MiniLM's tokenizer cut to 5,000
    wordpieces, saved locally (`save_tiny_bert`, seeded: the very directory the doctests
    of the root conftest.py use, written once a session)."""
    return _tiny_bert


@pytest.fixture(scope="session")
def tiny_llama_dir(_tiny_llama: Path) -> Path:
    """A 2-layer, 32-wide Llama causal LM with random weights and the same cut tokenizer
    (`save_tiny_llama`, the doctests' directory too)."""
    return _tiny_llama


@pytest.fixture
def tiny_encoder(_new_tiny_encoder) -> TextEncoder:
    """A fresh encoder over the tiny BERT, `max_length` 16 (each test may change its
    weights): a copy of one loaded once a session (the root conftest.py's)."""
    return _new_tiny_encoder()


@pytest.fixture(scope="session")
def frozen_dir(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`save_pretrained` of a frozen learner on the tiny BERT, its weights nudged."""
    out = tmp_path_factory.mktemp("frozen") / "model"
    return save_pretrained(tiny_learner(tiny_model_dir, "frozen"), out)


@pytest.fixture(scope="session")
def frozen_model(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`metalm export --learner frozen` on the tiny BERT, without a run."""
    out = tmp_path_factory.mktemp("untrained") / "model"
    args = ["export", "--learner", "frozen", f"model.name_or_path={tiny_model_dir}"]
    assert main([*args, "model.max_length=16", "--out", str(out)]) == 0
    return out


def tiny_overrides(model_dir: Path, output_dir: Path, **extra: object) -> list[str]:
    """Overrides for a fast run: tiny model, few steps/episodes, small splits."""
    values: dict[str, object] = {
        "model.name_or_path": str(model_dir),
        "model.max_length": 16,
        "output_dir": str(output_dir),
        "run_name": "run",
        "train.steps": 6,
        "train.warmup_steps": 2,
        "train.eval_every": 3,
        "train.val_episodes": 4,
        "train.checkpoint_every": 2,
        "train.lr": 1e-3,
        "train.tensorboard": False,
        "episode.n_way": 3,
        "episode.k_shot": 2,
        "episode.q_queries": 2,
        "eval.episodes": 5,
        "eval.q_queries": 3,
        "eval.settings": "[{n_way: 3, k_shot: 1}]",
        "eval.full_way_shots": "[]",
        "eval.baselines": "[{name: frozen}]",
    }
    values.update(extra)
    return [f"{k}={v}" for k, v in values.items()]


class TinyTrain(NamedTuple):
    run_dir: Path
    overrides: list[str]  # the run's config: tiny_overrides
    printed: str  # what `metalm -q train` printed


@pytest.fixture(scope="session")
def tiny_train(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> TinyTrain:
    """A tiny meta-training run (CLINC150 -> BANKING77) of `metalm -q train`, named as in
    the README; one for the session: tests read it or add their own `evals/<name>`."""
    root = tmp_path_factory.mktemp("own-files")
    overrides = tiny_overrides(tiny_model_dir, root / "runs", run_name="protonet-20261123-120000")
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert main(["-q", "train", *overrides]) == 0
    return TinyTrain(root / "runs" / "protonet-20261123-120000", overrides, printed.getvalue())


@pytest.fixture(scope="session")
def tiny_run(tiny_train: TinyTrain) -> Path:
    """The directory of `tiny_train`'s run."""
    return tiny_train.run_dir


def run_real_minilm_briefly(name: str, extra: list[str], tmp_path: Path) -> None:
    """Two meta-training steps of learner `name` on the real MiniLM and CLINC150, then 3
    BANKING77 test episodes: the run finishes with finite losses, a result, best weights."""
    import metalm
    from metalm.config import load_config

    overrides = [
        f"learner.name={name}",
        *extra,
        f"output_dir={tmp_path}",
        "run_name=run",
        "model.max_length=32",
        "episode.n_way=3",
        "episode.k_shot=1",
        "episode.q_queries=2",
        "train.steps=2",
        "train.meta_batch_size=2",
        "train.warmup_steps=0",
        "train.eval_every=2",
        "train.val_episodes=2",
        "train.tensorboard=false",
        "eval.episodes=3",
        "eval.q_queries=3",
        "eval.settings=[{n_way: 5, k_shot: 1}]",
        "eval.full_way_shots=[]",
        "eval.baselines=[]",
    ]
    report = metalm.run(load_config(None, overrides), progress=False)
    run_dir = tmp_path / "run"
    log = read_log(run_dir)
    assert [r["step"] for r in log] == [1, 2] and all(math.isfinite(r["loss"]) for r in log)
    (result,) = report.results
    assert result.method == name and result.episodes == 3 and 0.0 <= result.accuracy <= 1.0
    assert (run_dir / "best.safetensors").exists()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """The long `fuzz` cases run only when asked for (`pytest -m fuzz`); the default run
    keeps every surface's 200-case version."""
    if "fuzz" in (config.option.markexpr or ""):
        return
    skip = [item for item in items if item.get_closest_marker("fuzz")]
    if skip:
        config.hook.pytest_deselected(items=skip)
        items[:] = [item for item in items if not item.get_closest_marker("fuzz")]
