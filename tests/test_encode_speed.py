"""The encoding options of issue "faster encoding": batches in token-length order (the
default) and int8 quantization at load time (`quantize="int8"`), on the tiny random BERT
of conftest and once on the real all-MiniLM-L6-v2. Speed itself is measured by
benchmarks/encode_speed.py, not here."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_overrides

from metalm import FewShotClassifier, MetalmError
from metalm.cli import main
from metalm.config import load_config, parse_learner_config
from metalm.learners import build_learner
from metalm.models.encoder import EncoderConfig, TextEncoder
from metalm.pretrained import export_untrained
from metalm.trainer import MetaTrainer

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
    from metalm.data import builtin_dataset

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
