"""The docstring examples of src/metalm run as doctests, on a tiny random BERT and Llama.

`pytest` (testpaths in pyproject.toml) collects tests/ and every module of src/metalm;
each example runs in its own temporary directory (where `configs/` and `examples/` name
the repository's), with these names ready (only the ones it uses are built, fresh for
each example):

- `encoder`: a `TextEncoder` on the tiny random BERT (2 layers, 32 wide, MiniLM's
  tokenizer cut to 5,000 wordpieces); `lm`: a `CausalLM` on the tiny random Llama;
  `tiny_bert` / `tiny_llama`: their directories
- `texts`, `labels`: a 3-way 2-shot support set; `queries`: texts to classify;
  `episode`: the same task as an `Episode`
- `tiny`: overrides for a run of a few seconds on the tiny BERT (`load_config(path, tiny)`)
- `config`: that run's `RunConfig`; `trained_run`: the directory of such a finished run;
  `saved_model`: a saved frozen learner on the tiny BERT (`from_pretrained`)
- `learner`: a `ProtoNet` on `encoder`; `train_sampler`, `val_sampler`: 3-way 2-shot
  CLINC150 episodes; `clf`: a `FewShotClassifier` of `saved_model` adapted to `texts`
  under the label names weather / alarm / music
- `torch`, `metalm`, `EncoderConfig`, `TextEncoder`, `CausalLM`, `build_model`,
  `build_learner`, `load_config`
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).parent
SRC = ROOT / "src" / "metalm"

TEXTS = [
    "will it rain today",
    "is it sunny outside",
    "wake me up at seven",
    "set an alarm for six",
    "play some jazz",
    "put on my workout playlist",
]
LABELS = [0, 0, 1, 1, 2, 2]
QUERIES = ["will it snow tomorrow", "alarm at five please", "play a song"]
LABEL_NAMES = ["weather", "alarm", "music"]
# the tiny models' tokenizer: MiniLM's cut to its 5,000 most frequent wordpieces (every
# character kept): a tenth of the weights, so loading, saving and exporting are fast
TINY_VOCAB = 5000


# examples that run a whole study (trials, then the best config on meta-test), a
# comparison of learners or two runs: a few seconds each, so they run with the slow tests
# (`pytest -m "not slow"` leaves them out)
SLOW_DOCTESTS = {
    "metalm.tune",
    "metalm.tune.tuner",
    "metalm.tune.objective",
    "metalm.compare",
    "metalm.runs.recipe.run_on_both_splits",
}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    from _pytest.doctest import DoctestItem

    for item in items:
        if isinstance(item, DoctestItem) and item.name in SLOW_DOCTESTS:
            item.add_marker(pytest.mark.slow)


def pytest_collect_file(file_path: Path, parent: pytest.Collector) -> pytest.Collector | None:
    """Every module of src/metalm is a doctest module (as `--doctest-modules` would make it;
    with that flag given, pytest collects them itself)."""
    if (
        file_path.suffix == ".py"
        and file_path.name != "__main__.py"
        and SRC in file_path.parents
        and not parent.config.option.doctestmodules
    ):
        from _pytest.doctest import DoctestModule

        return DoctestModule.from_parent(parent, path=file_path)
    return None


@pytest.fixture(scope="session")
def _tiny_bert(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from metalm.models.tiny import save_tiny_bert

    return save_tiny_bert(tmp_path_factory.mktemp("doctest-tiny-bert"), vocab_size=TINY_VOCAB)


@pytest.fixture(scope="session")
def _new_tiny_encoder(_tiny_bert: Path) -> Callable[[], Any]:
    """Makes an encoder on the tiny BERT (`max_length` 16) as loading it would: a copy of
    one loaded once a session, sharing its tokenizer (which nothing changes); a few ms
    instead of ~50 for each example or test that gets a fresh one."""
    import copy

    from metalm.models.encoder import EncoderConfig, TextEncoder

    original = TextEncoder.from_config(EncoderConfig(name_or_path=str(_tiny_bert), max_length=16))
    return lambda: copy.deepcopy(original, {id(original.tokenizer): original.tokenizer})


@pytest.fixture(scope="session")
def _tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from metalm.models.tiny import save_tiny_llama

    return save_tiny_llama(tmp_path_factory.mktemp("doctest-tiny-llama"), vocab_size=TINY_VOCAB)


def _tiny_overrides(model_dir: Path, output_dir: Path) -> list[str]:
    return [
        f"model.name_or_path={model_dir}",
        "model.max_length=16",
        f"output_dir={output_dir}",
        "run_name=run",
        "train.steps=2",
        "train.warmup_steps=0",
        "train.eval_every=2",
        "train.val_episodes=2",
        "train.tensorboard=false",
        "episode.n_way=3",
        "episode.k_shot=2",
        "episode.q_queries=2",
        "eval.episodes=2",
        "eval.q_queries=2",
        "eval.settings=[{n_way: 3, k_shot: 1}]",
        "eval.full_way_shots=[]",
        "eval.baselines=[]",
    ]


@pytest.fixture(scope="session")
def _trained_run(_tiny_bert: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    import metalm

    out = tmp_path_factory.mktemp("doctest-runs")
    config = metalm.load_config(None, _tiny_overrides(_tiny_bert, out))
    metalm.run(config, progress=False)
    return out / "run"


@pytest.fixture(scope="session")
def _saved_model(_tiny_bert: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from metalm.pretrained import export_untrained

    out = tmp_path_factory.mktemp("doctest-model") / "frozen-tiny"
    return export_untrained(out, "frozen", [f"model.name_or_path={_tiny_bert}"])


@pytest.fixture
def doctest_namespace(request: pytest.FixtureRequest, tmp_path: Path, monkeypatch) -> dict:
    """The names a docstring example may use (see the module docstring); the example runs
    in `tmp_path`. Only names that the example mentions are built."""
    import torch

    import metalm
    from metalm.classifier import FewShotClassifier
    from metalm.config import load_config, parse_learner_config
    from metalm.data import Episode, EpisodeSampler, builtin_dataset
    from metalm.learners import build_learner
    from metalm.models.base import build_model
    from metalm.models.causal import CausalLM
    from metalm.models.encoder import EncoderConfig, TextEncoder

    def bert() -> str:
        return str(request.getfixturevalue("_tiny_bert"))

    def llama() -> str:
        return str(request.getfixturevalue("_tiny_llama"))

    def encoder() -> TextEncoder:
        return request.getfixturevalue("_new_tiny_encoder")()

    factories: dict[str, Callable[[], Any]] = {
        "tiny_bert": lambda: bert(),
        "tiny_llama": lambda: llama(),
        "encoder": encoder,
        "lm": lambda: CausalLM.from_config(
            EncoderConfig(kind="causal", name_or_path=llama(), max_length=64)
        ),
        "texts": lambda: list(TEXTS),
        "labels": lambda: list(LABELS),
        "queries": lambda: list(QUERIES),
        "episode": lambda: Episode(
            list(TEXTS), list(LABELS), list(QUERIES), [0, 1, 2], list(LABEL_NAMES)
        ),
        "tiny": lambda: _tiny_overrides(bert(), tmp_path / "runs"),
        "trained_run": lambda: str(request.getfixturevalue("_trained_run")),
        "saved_model": lambda: str(request.getfixturevalue("_saved_model")),
        "config": lambda: load_config(None, _tiny_overrides(bert(), tmp_path / "runs")),
        "learner": lambda: build_learner(encoder(), parse_learner_config({"name": "protonet"})),
        "train_sampler": lambda: EpisodeSampler(builtin_dataset("clinc150", "train"), 3, 2, 2),
        "val_sampler": lambda: EpisodeSampler(builtin_dataset("clinc150", "valid"), 3, 2, 2),
        "clf": lambda: FewShotClassifier.from_pretrained(
            request.getfixturevalue("_saved_model")
        ).adapt(list(TEXTS), [LABEL_NAMES[i] for i in LABELS]),
    }
    namespace: dict[str, Any] = {
        "torch": torch,
        "metalm": metalm,
        "EncoderConfig": EncoderConfig,
        "TextEncoder": TextEncoder,
        "CausalLM": CausalLM,
        "build_model": build_model,
        "build_learner": build_learner,
        "load_config": load_config,
    }
    dtest = getattr(request.node, "dtest", None)
    source = "".join(example.source for example in dtest.examples) if dtest else ""
    for name, factory in factories.items():
        if re.search(rf"\b{name}\b", source):
            namespace[name] = factory()
    for shipped in ("configs", "examples"):  # read-only inputs that examples name
        (tmp_path / shipped).symlink_to(ROOT / shipped, target_is_directory=True)
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    return namespace
