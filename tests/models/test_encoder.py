"""`metalm.models.encoder`: embeddings, pooling, caches, token-ordered batches, int8
quantization and devices."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_overrides
from learner_tools import assert_unchanged, snapshot

from metalm import FewShotClassifier, MetalmError
from metalm.cli import main
from metalm.config import load_config, parse_learner_config
from metalm.data import builtin_dataset
from metalm.learners import (
    ProtoNetConfig,
    build_learner,
)
from metalm.models.encoder import EncoderConfig, TextEncoder, resolve_device
from metalm.pretrained import export_untrained
from metalm.trainer import MetaTrainer


# -- encoder -----------------------------------------------------------------------
def test_embed_matches_forward_and_is_normalized(tiny_encoder):
    texts = ["short", "a somewhat longer sentence about cards", "mid length text"]
    tiny_encoder.eval()
    with torch.no_grad():
        direct = tiny_encoder(texts)
    batched = tiny_encoder.embed(texts, batch_size=2)  # sorted by length, re-ordered back
    assert torch.allclose(direct, batched, atol=1e-5)
    assert torch.allclose(batched.norm(dim=-1), torch.ones(3), atol=1e-5)


def test_padding_does_not_change_embeddings(tiny_encoder):
    tiny_encoder.eval()
    alone = tiny_encoder.embed(["hi"])
    with_long = tiny_encoder.embed(["hi", "a much longer text that forces padding of hi"])
    assert torch.allclose(alone[0], with_long[0], atol=1e-5)


def test_truncation_and_token_cache(tiny_encoder):
    long_text = " ".join(["word"] * 100)
    batch = tiny_encoder.tokenize([long_text])
    assert batch["input_ids"].shape[1] == 16
    assert long_text in tiny_encoder._token_cache


def test_cls_pooling_and_bad_pooling(tiny_model_dir):
    cls = TextEncoder.from_config(
        EncoderConfig(name_or_path=str(tiny_model_dir), pooling="cls", normalize=False)
    )
    cls.eval()
    batch = cls.tokenize(["hello world"])
    with torch.no_grad():
        hidden = cls.model(**batch).last_hidden_state
    assert torch.allclose(cls.embed(["hello world"])[0], hidden[0, 0], atol=1e-5)
    with pytest.raises(MetalmError, match="pooling"):
        TextEncoder.from_config(EncoderConfig(name_or_path=str(tiny_model_dir), pooling="max"))


def test_functional_params_leave_model_untouched(tiny_encoder):
    before = snapshot(tiny_encoder)
    params = {k: v.detach().clone() + 0.5 for k, v in tiny_encoder.model.named_parameters()}
    shifted = tiny_encoder.embed(["hello"], params=params)
    plain = tiny_encoder.embed(["hello"])
    assert not torch.allclose(shifted, plain)
    assert_unchanged(before, tiny_encoder)


def test_embedding_cache_is_used_and_scoped(tiny_encoder):
    texts = ["alpha", "beta"]
    with tiny_encoder.cached_embeddings(texts):
        tiny_encoder._embedding_cache["alpha"] = torch.full((tiny_encoder.dim,), 7.0)
        assert torch.all(tiny_encoder.embed(["alpha"]) == 7.0)
    assert not torch.all(tiny_encoder.embed(["alpha"]) == 7.0)
    assert tiny_encoder._embedding_cache is None


def test_nested_embedding_caches_keep_the_outer_table(tiny_encoder):
    with tiny_encoder.cached_embeddings(["alpha", "beta"]):
        tiny_encoder._embedding_cache["alpha"] = torch.full((tiny_encoder.dim,), 7.0)
        with tiny_encoder.cached_embeddings(["beta", "gamma"]):
            assert set(tiny_encoder._embedding_cache) == {"alpha", "beta", "gamma"}
            assert torch.all(tiny_encoder.embed(["alpha", "gamma"])[0] == 7.0)
        assert set(tiny_encoder._embedding_cache) == {"alpha", "beta"}
    assert tiny_encoder._embedding_cache is None


def test_unknown_model_path_is_a_clear_error(tmp_path):
    with pytest.raises(MetalmError, match="cannot load encoder"):
        TextEncoder.from_config(EncoderConfig(name_or_path=str(tmp_path / "nope")))


TEXTS = [
    "a",
    "set an alarm for six in the morning please and also tomorrow",
    "wake me up",
    "what is the weather like in paris today",
    "rain?",
    "play some jazz music",
    "put on my workout playlist now",
    "hello there",
]


LABELS = ["alarm", "alarm", "alarm", "weather", "weather", "music", "music", "music"]


@pytest.fixture(scope="module")
def encoder(tiny_model_dir) -> TextEncoder:
    return TextEncoder.from_config(EncoderConfig(name_or_path=str(tiny_model_dir)))


def test_token_order_batches_return_rows_in_input_order(encoder):
    # character order and token order differ here ("rain?" is short in characters only
    # if the tokenizer splits it), and every batch size must put each row back in place
    one_by_one = torch.cat([encoder.embed([t]) for t in TEXTS])
    for batch_size in (1, 2, 3, 64):
        batched = encoder.embed(TEXTS, batch_size=batch_size)
        torch.testing.assert_close(batched, one_by_one, atol=1e-5, rtol=1e-4)


def test_embed_batches_follow_token_counts(encoder, monkeypatch):
    seen: list[list[int]] = []
    forward = TextEncoder.forward

    def spy(self, texts, params=None):
        seen.append([len(self._token_cache[t]) for t in texts])
        return forward(self, texts, params)

    monkeypatch.setattr(TextEncoder, "forward", spy)
    encoder.embed(TEXTS, batch_size=3)
    counts = [n for batch in seen for n in batch]
    assert counts == sorted(counts)
    assert sum(len(b) for b in seen) == len(TEXTS)


def test_int8_quantized_encoder_is_close_and_changes_the_linear_layers(tiny_model_dir):
    fp32 = TextEncoder.from_config(EncoderConfig(name_or_path=str(tiny_model_dir), device="cpu"))
    int8 = TextEncoder.from_config(EncoderConfig(name_or_path=str(tiny_model_dir), device="cpu"))
    int8.quantize("int8")
    assert int8.quantized and not fp32.quantized
    assert not any(type(m) is torch.nn.Linear for m in int8.model.modules())
    a, b = fp32.embed(TEXTS), int8.embed(TEXTS)
    assert not torch.equal(a, b)
    assert torch.nn.functional.cosine_similarity(a, b).min() > 0.9
    int8.quantize("int8")  # a second call keeps the quantized model as it is
    torch.testing.assert_close(int8.embed(TEXTS), b)
    with pytest.raises(MetalmError, match="quantize must be one of"):
        fp32.quantize("int4")


def test_a_quantized_encoder_cannot_be_meta_trained(tiny_model_dir, tmp_path):
    encoder = TextEncoder.from_config(EncoderConfig(name_or_path=str(tiny_model_dir)))
    encoder.quantize("int8")
    learner = build_learner(encoder, parse_learner_config({"name": "protonet"}))
    config = load_config(None, tiny_overrides(tiny_model_dir, tmp_path))
    with pytest.raises(MetalmError, match="cannot be meta-trained"):
        MetaTrainer(learner, None, None, config.train, tmp_path / "run", progress=False)


def test_quantize_at_load_through_python_and_cli(tiny_model_dir, tmp_path):
    model = export_untrained(tmp_path / "model", "frozen", [f"model.name_or_path={tiny_model_dir}"])
    fp32 = FewShotClassifier.from_pretrained(model).adapt(TEXTS, LABELS)
    int8 = FewShotClassifier.from_pretrained(model, device="cpu", quantize="int8")
    int8.adapt(TEXTS, LABELS)
    assert int8.learner.encoder.quantized and not fp32.learner.encoder.quantized
    p, q = fp32.predict_proba(TEXTS), int8.predict_proba(TEXTS)
    assert p.shape == q.shape and abs(p - q).max() < 0.2
    support = tmp_path / "support.csv"
    support.write_text(
        "text,label\n" + "".join(f"{t},{y}\n" for t, y in zip(TEXTS, LABELS, strict=True))
    )
    task = tmp_path / "task"
    adapt = ["adapt", "--model", str(model), "--support", str(support), "--out", str(task)]
    assert main([*adapt, "--quantize", "int8", "--device", "cpu"]) == 0
    assert (task / "task.json").exists()
    with pytest.raises(SystemExit):
        main([*adapt, "--quantize", "fp8"])


@pytest.mark.slow
def test_int8_on_the_real_minilm_keeps_banking77_predictions_close(tmp_path):

    model = export_untrained(tmp_path / "minilm", "frozen", ["model.device=cpu"])
    support = builtin_dataset("banking77", "train_5")
    test = builtin_dataset("banking77", "test")
    queries, truth = list(test.texts[:400]), list(test.labels[:400])
    accuracy = {}
    for quantize in ("none", "int8"):
        clf = FewShotClassifier.from_pretrained(model, device="cpu", quantize=quantize)
        clf.adapt(list(support.texts), list(support.labels))
        predicted = clf.predict(queries)
        accuracy[quantize] = sum(p == t for p, t in zip(predicted, truth, strict=True)) / len(truth)
    assert accuracy["none"] > 0.7  # 77 classes: chance is 1.3%
    assert abs(accuracy["int8"] - accuracy["none"]) < 0.05


def test_auto_picks_cuda_only_when_available() -> None:
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto").type == expected


def test_unknown_or_missing_device_is_a_clear_error() -> None:
    with pytest.raises(MetalmError, match="unknown device"):
        resolve_device("tpu-ish")
    if not torch.cuda.is_available():
        with pytest.raises(MetalmError, match="no CUDA device"):
            resolve_device("cuda")


def test_learner_and_task_state_follow_the_encoder_device(tiny_model_dir) -> None:
    encoder = TextEncoder.from_config(EncoderConfig(name_or_path=str(tiny_model_dir)))
    learner = build_learner(encoder, ProtoNetConfig(learn_scale=True, head="centroid"))
    device = resolve_device("auto")
    assert {p.device.type for p in learner.parameters()} == {device.type}
    state = learner.adapt(["a b", "c d", "e f", "g h"], [0, 1, 0, 1])
    assert state["prototypes"].device.type == device.type
    logits = learner.predict(state, ["a b", "g h"])
    assert logits.shape == (2, 2) and logits.device.type == device.type
