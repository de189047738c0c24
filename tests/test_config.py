"""Tests for the typed run configuration: defaults, YAML files, overrides, validation.

No model and no data are loaded here; everything is pure config handling.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from metalm.config import (
    ClassesConfig,
    DataConfig,
    EvalConfig,
    RunConfig,
    SettingConfig,
    load_config,
    save_config,
)
from metalm.data.sources import DataSource, EvalSource
from metalm.errors import MetalmError
from metalm.learners import LEARNERS, FinetuneConfig, FrozenConfig, ProtoNetConfig

REPO_ROOT = Path(__file__).resolve().parents[1]
CONFIG_FILES = sorted(REPO_ROOT.glob("configs/**/*.yaml")) + sorted(
    REPO_ROOT.glob("src/metalm/recipes/*.yaml")
)


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


# --------------------------------------------------------------------------- defaults


def test_defaults_load():
    config = load_config()
    assert config == RunConfig()
    assert isinstance(config.learner, ProtoNetConfig)
    assert config.learner.name == "protonet"
    assert config.data.train == DataSource("clinc150", "train")
    assert config.data.test == EvalSource("banking77", "test")
    assert config.data.val is None
    assert config.eval.settings == [SettingConfig(5, 1), SettingConfig(5, 5)]
    assert config.eval.full_way_shots == [5]
    assert [b.name for b in config.eval.baselines] == ["frozen", "finetune"]
    assert isinstance(config.eval.baselines[0], FrozenConfig)
    assert isinstance(config.eval.baselines[1], FinetuneConfig)


def test_defaults_are_fresh_objects():
    first, second = load_config(), load_config()
    first.eval.settings.append(SettingConfig(10, 1))
    first.train.steps = 1
    assert second == RunConfig()


def test_empty_yaml_file_gives_defaults(tmp_path):
    assert load_config(write(tmp_path / "empty.yaml", "")) == RunConfig()
    assert load_config(write(tmp_path / "comments.yaml", "# nothing\n")) == RunConfig()


# --------------------------------------------------------------------------- precedence


def test_yaml_file_then_overrides(tmp_path):
    path = write(
        tmp_path / "run.yaml",
        "seed: 7\ntrain: {steps: 10, lr: 0.1}\nepisode: {n_way: 3}\neval: {episodes: 50}\n",
    )
    config = load_config(path, ["train.steps=20", "eval.episodes=60"])
    assert config.train.steps == 20  # the override beats the file
    assert config.eval.episodes == 60
    assert config.train.lr == 0.1  # from the file
    assert config.seed == 7
    assert config.episode.n_way == 3
    # the rest of a partially given section keeps its defaults
    assert config.episode.k_shot == 5
    assert config.train.warmup_steps == RunConfig().train.warmup_steps
    assert config.eval.q_queries == 15


def test_later_override_wins():
    config = load_config(None, ["train.steps=5", "train.steps=9"])
    assert config.train.steps == 9


def test_yaml_learner_section_replaces_default_learner(tmp_path):
    path = write(tmp_path / "ft.yaml", "learner: {name: finetune, steps: 4}\n")
    config = load_config(path)
    assert config.learner == FinetuneConfig(steps=4)


def test_yaml_learner_section_without_name_updates_default(tmp_path):
    path = write(tmp_path / "cos.yaml", "learner: {distance: cosine}\n")
    config = load_config(path)
    assert config.learner == ProtoNetConfig(distance="cosine")


# --------------------------------------------------------------------------- override values


@pytest.mark.parametrize(
    ("override", "attribute", "expected"),
    [
        ("train.steps=12", ("train", "steps"), 12),
        ("train.lr=1e-3", ("train", "lr"), 1e-3),
        ("train.lr=3.0e-5", ("train", "lr"), 3e-5),
        ("train.lr=0.5", ("train", "lr"), 0.5),
        ("train.lr=1", ("train", "lr"), 1.0),
        ("train.grad_clip=2", ("train", "grad_clip"), 2.0),
        ("train.tensorboard=false", ("train", "tensorboard"), False),
        ("train.tensorboard=False", ("train", "tensorboard"), False),
        ("train.tensorboard=true", ("train", "tensorboard"), True),
        ("model.normalize=false", ("model", "normalize"), False),
        ("train.schedule=cosine", ("train", "schedule"), "cosine"),
        ("run_name=my-run", ("run_name",), "my-run"),
        ("output_dir=/tmp/x y", ("output_dir",), "/tmp/x y"),
        ("eval.full_way_shots=[5, 10]", ("eval", "full_way_shots"), [5, 10]),
        ("eval.full_way_shots=[]", ("eval", "full_way_shots"), []),
        ("data.classes.fractions=[0.6,0.2,0.2]", ("data", "classes", "fractions"), [0.6, 0.2, 0.2]),
        ("data.classes.fractions=[1, 0, 0]", ("data", "classes", "fractions"), [1.0, 0.0, 0.0]),
        ("data.classes.train=[a, b]", ("data", "classes", "train"), ["a", "b"]),
        ("eval.episodes_by_method={finetune: 2}", ("eval", "episodes_by_method"), {"finetune": 2}),
        (
            "eval.settings=[{n_way: 3, k_shot: 2}, {n_way: 10}]",
            ("eval", "settings"),
            [SettingConfig(3, 2), SettingConfig(10, 1)],
        ),
        ("data.test=null", ("data", "test"), None),
        (
            "data.val={source: banking77, split: valid}",
            ("data", "val"),
            DataSource("banking77", "valid"),
        ),
        ("data.test=banking77", ("data", "test"), EvalSource("banking77", "test")),
        ("data.train.source=/data/x.csv", ("data", "train", "source"), "/data/x.csv"),
        ("data.test.split=valid", ("data", "test"), EvalSource("banking77", "valid")),
    ],
)
def test_override_values_are_parsed(override, attribute, expected):
    value = load_config(None, [override])
    for name in attribute:
        value = getattr(value, name)
    assert value == expected
    assert type(value) is type(expected)


def test_float_fields_are_floats():
    config = load_config(None, ["train.lr=1e-3", "data.classes.fractions=[1, 0, 0]"])
    assert isinstance(config.train.lr, float)
    assert all(isinstance(f, float) for f in config.data.classes.fractions)


def test_float_written_without_dot_in_yaml_file(tmp_path):
    # PyYAML reads `1e-3` as a string; the config must still give a float
    path = write(tmp_path / "lr.yaml", "train: {lr: 1e-3, weight_decay: 0}\n")
    config = load_config(path)
    assert config.train.lr == pytest.approx(1e-3)
    assert isinstance(config.train.weight_decay, float)


def test_baselines_from_override_are_typed():
    config = load_config(None, ["eval.baselines=[{name: frozen}, {name: finetune, steps: 2}]"])
    assert config.eval.baselines == [FrozenConfig(), FinetuneConfig(steps=2)]
    config = load_config(None, ["eval.baselines=[frozen]"])
    assert config.eval.baselines == [FrozenConfig()]
    config = load_config(None, ["eval.baselines=[]"])
    assert config.eval.baselines == []


def test_value_with_equals_sign_is_kept_whole():
    config = load_config(None, ["run_name=a=b"])
    assert config.run_name == "a=b"


@pytest.mark.parametrize("override", ["train.steps", "=5", "noequals"])
def test_malformed_override_is_an_error(override):
    with pytest.raises(MetalmError, match=r"key\.sub=value"):
        load_config(None, [override])


# --------------------------------------------------------------------------- learner switch


def test_learner_name_switches_config_type():
    config = load_config(None, ["learner.name=frozen"])
    assert type(config.learner) is FrozenConfig
    assert config.learner == FrozenConfig()
    config = load_config(None, ["learner.name=finetune", "learner.steps=3"])
    assert config.learner == FinetuneConfig(steps=3)


def test_learner_switch_drops_keys_unknown_to_new_learner(tmp_path):
    path = write(
        tmp_path / "proto.yaml",
        "learner: {name: protonet, distance: cosine, init_scale: 5.0, learn_scale: false}\n",
    )
    config = load_config(path, ["learner.name=frozen"])
    # init_scale / learn_scale are not frozen's: dropped; distance is shared: kept
    assert config.learner == FrozenConfig(distance="cosine")
    config = load_config(path, ["learner.name=finetune"])
    assert config.learner == FinetuneConfig()


def test_learner_switch_from_finetune_back_to_protonet():
    config = load_config(
        None, ["learner.name=finetune", "learner.steps=3", "learner.name=protonet"]
    )
    assert config.learner == ProtoNetConfig()


def test_learner_key_of_other_learner_is_unknown():
    with pytest.raises(MetalmError, match="steps") as err:
        load_config(None, ["learner.steps=3"])  # protonet has no `steps`
    assert "init_scale" in str(err.value)  # lists protonet's valid keys


# --------------------------------------------------------------------------- unknown keys


@pytest.mark.parametrize(
    ("override", "valid_key"),
    [
        ("bogus=1", "train"),
        ("train.bogus=1", "warmup_steps"),
        ("model.bogus=1", "name_or_path"),
        ("data.bogus=1", "drop_small_classes"),
        ("data.classes.bogus=1", "fractions"),
        ("data.train.bogus=1", "text_column"),
        ("episode.bogus=1", "q_queries"),
        ("eval.bogus=1", "full_way_shots"),
        ("eval.settings=[{n_way: 3, bogus: 1}]", "k_shot"),
        ("eval.baselines=[{name: finetune, bogus: 1}]", "head_lr"),
        ("learner.bogus=1", "init_scale"),
    ],
)
def test_unknown_key_at_any_depth_lists_valid_keys(override, valid_key):
    with pytest.raises(MetalmError) as err:
        load_config(None, [override])
    message = str(err.value)
    assert "'bogus'" in message
    assert "valid keys" in message
    assert valid_key in message


def test_unknown_key_in_yaml_file(tmp_path):
    path = write(tmp_path / "typo.yaml", "train:\n  step: 10\n")
    with pytest.raises(MetalmError, match=r"config\.train: unknown key 'step'.*'steps'"):
        load_config(path)


# --------------------------------------------------------------------------- wrong types


@pytest.mark.parametrize(
    ("override", "field"),
    [
        ("train.steps=abc", "train.steps"),  # str for int
        ("train.steps=1.5", "train.steps"),  # float for int
        ("train.steps=true", "train.steps"),  # bool for int
        ("eval.episodes=false", "eval.episodes"),  # bool for int
        ("seed=[1]", "seed"),  # list for int
        ("train=[1, 2]", "train"),  # list for mapping
        ("model=[a]", "model"),  # list for mapping
        ("data.classes=[0.5, 0.5]", "data.classes"),  # list for mapping
        ("eval.episodes_by_method=[finetune]", "eval.episodes_by_method"),  # list for dict
        ("eval.episodes_by_method={finetune: two}", "eval.episodes_by_method.finetune"),
        ("eval.full_way_shots=5", "eval.full_way_shots"),  # int for list
        ("eval.full_way_shots=[five]", "eval.full_way_shots[0]"),
        ("eval.settings=[5]", "eval.settings[0]"),  # int for mapping
        ("eval.settings=[{n_way: three}]", "eval.settings[0].n_way"),
        ("train.lr=fast", "train.lr"),  # str for float
        ("train.lr=true", "train.lr"),  # bool for float
        ("train.tensorboard=1", "train.tensorboard"),  # int for bool
        ("train.tensorboard=maybe", "train.tensorboard"),  # str for bool
        ("model.max_length=long", "model.max_length"),
        ("data.train=null", "data.train"),  # None where a source is required
        ("data.train=[5]", "data.train[0]"),  # a list of sources holds sources
        ("learner.init_scale=big", "learner.init_scale"),
        ("learner.learn_scale=7", "learner.learn_scale"),
        ("learner=[protonet]", "learner"),
        ("learner={distance: cosine, name: 5}", "learner"),
    ],
)
def test_wrong_type_names_the_field(override, field):
    with pytest.raises(MetalmError) as err:
        load_config(None, [override])
    message = str(err.value)
    assert field in message
    assert "\n" not in message


def test_wrong_type_in_yaml_file_names_the_field(tmp_path):
    path = write(tmp_path / "bad.yaml", "episode:\n  k_shot: five\n")
    with pytest.raises(MetalmError, match=r"episode\.k_shot: expected int"):
        load_config(path)
    path = write(tmp_path / "bad2.yaml", "eval: [1, 2]\n")
    with pytest.raises(MetalmError, match=r"config\.eval: expected a mapping"):
        load_config(path)


# --------------------------------------------------------------------------- learners


@pytest.mark.parametrize(
    "override",
    [
        "learner.name=nope",
        "learner=nope",
        "learner={name: nope}",
        "eval.baselines=[{name: nope}]",
    ],
)
def test_unknown_learner_lists_valid_learners(override):
    with pytest.raises(MetalmError) as err:
        load_config(None, [override])
    message = str(err.value)
    assert "unknown learner 'nope'" in message
    for name in LEARNERS:
        assert repr(name) in message


def test_unknown_learner_in_yaml_file(tmp_path):
    path = write(tmp_path / "l.yaml", "learner: {name: maml2}\n")
    with pytest.raises(MetalmError, match=r"unknown learner 'maml2'.*protonet"):
        load_config(path)


def test_learner_without_name_is_an_error():
    with pytest.raises(MetalmError, match="'name'"):
        load_config(None, ["eval.baselines=[{steps: 2}]"])


# --------------------------------------------------------------------------- broken files


def test_broken_yaml_file(tmp_path):
    path = write(tmp_path / "broken.yaml", "train: {steps: 10\nmodel: [\n")
    with pytest.raises(MetalmError, match="not a valid YAML file") as err:
        load_config(path)
    assert "broken.yaml" in str(err.value)
    assert "\n" not in str(err.value)


def test_tab_indented_yaml_file(tmp_path):
    path = write(tmp_path / "tabs.yaml", "train:\n\tsteps: 10\n")
    with pytest.raises(MetalmError, match="not a valid YAML file"):
        load_config(path)


@pytest.mark.parametrize("text", ["- a\n- b\n", "just a string\n", "42\n"])
def test_non_mapping_top_level(tmp_path, text):
    path = write(tmp_path / "list.yaml", text)
    with pytest.raises(MetalmError, match="mapping at the top level"):
        load_config(path)


def test_missing_config_file(tmp_path):
    with pytest.raises(MetalmError, match="no such config file") as err:
        load_config(tmp_path / "absent.yaml")
    assert "absent.yaml" in str(err.value)


def test_non_utf8_config_file(tmp_path):
    path = tmp_path / "latin1.yaml"
    path.write_bytes("run_name: caf\xe9\n".encode("latin-1"))
    with pytest.raises(MetalmError, match=r"latin1\.yaml"):
        load_config(path)


# --------------------------------------------------------------------------- round trip


def test_round_trip_defaults(tmp_path):
    config = load_config()
    save_config(config, tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml") == config


def test_round_trip_non_default(tmp_path):
    config = load_config(
        None,
        [
            "seed=3",
            "run_name=rt",
            "learner.name=finetune",
            "learner.steps=7",
            "learner.lr=1e-4",
            "learner.train_encoder=false",
            "data.train.source=/somewhere/intents.csv",
            "data.train.text_column=utterance",
            "data.val={source: banking77, split: valid}",
            "data.test=null",
            "data.classes.fractions=[0.6, 0.2, 0.2]",
            "data.classes.seed=4",
            "data.drop_small_classes=true",
            "episode.n_way=3",
            "train.lr=1e-3",
            "train.tensorboard=false",
            "eval.settings=[{n_way: 3, k_shot: 2}]",
            "eval.full_way_shots=[5, 10]",
            "eval.baselines=[{name: frozen, distance: cosine}, {name: protonet}]",
            "eval.episodes_by_method={finetune: 2, frozen: 3}",
        ],
    )
    path = tmp_path / "config.yaml"
    save_config(config, path)
    loaded = load_config(path)
    assert loaded == config
    assert type(loaded.learner) is FinetuneConfig
    assert [type(b) for b in loaded.eval.baselines] == [FrozenConfig, ProtoNetConfig]
    assert loaded.data == DataConfig(
        train=DataSource("/somewhere/intents.csv", "train", text_column="utterance"),
        val=DataSource("banking77", "valid"),
        test=None,
        classes=ClassesConfig(fractions=[0.6, 0.2, 0.2], seed=4),
        drop_small_classes=True,
    )
    # and saving again gives the same file
    save_config(loaded, tmp_path / "again.yaml")
    assert (tmp_path / "again.yaml").read_text() == path.read_text()


@pytest.mark.parametrize("name", sorted(LEARNERS))
def test_round_trip_every_learner(name, tmp_path):
    kind = LEARNERS[name].model_kind  # icl / metaicl need model.kind=causal
    config = load_config(None, [f"learner.name={name}", f"model.kind={kind}"])
    assert config.learner.name == name and config.model.kind == kind
    save_config(config, tmp_path / f"{name}.yaml")
    assert load_config(tmp_path / f"{name}.yaml") == config


def test_eval_config_defaults_match():
    assert load_config().eval == EvalConfig()


# --------------------------------------------------------------------------- shipped configs


def test_configs_exist():
    assert CONFIG_FILES, f"no YAML configs under {REPO_ROOT / 'configs'}"


@pytest.mark.parametrize(
    "path", CONFIG_FILES, ids=[str(p.relative_to(REPO_ROOT)) for p in CONFIG_FILES]
)
def test_shipped_config_loads(path, tmp_path):
    from metalm.config import read_yaml

    if "search" in read_yaml(path):
        # a tuning config: the run part loads as any config; its search space is checked
        # against it (fields exist, types fit, conditions refer to earlier parameters)
        from metalm.tune import load_tune_config

        config, space = load_tune_config(path)
        assert space is not None and space.params
    elif "compare" in read_yaml(path):
        # a comparison: the shared run config, and each learner's config built from it
        from metalm.compare import learner_config, load_compare_config

        config, entries = load_compare_config(path)
        assert entries
        for entry in entries:
            assert learner_config(config, entry, tmp_path).learner.name == entry.name
    else:
        config = load_config(path)
    assert isinstance(config, RunConfig)
    # and it survives a save/load round trip
    save_config(config, tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml") == config


def test_episode_config_accepts_all_and_ranges():
    config = load_config(None, ["episode.n_way=all", "episode.k_shot=[1, 5]"])
    assert config.episode.n_way == "all" and config.episode.k_shot == [1, 5]
    for bad, message in (("episode.n_way=most", "'all'"), ("episode.k_shot=[4, 2]", "min <= max")):
        with pytest.raises(MetalmError, match=message):
            load_config(None, [bad])
