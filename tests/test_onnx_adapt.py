"""`metalm.onnx_adapt`: a task adapted on ONNX Runtime in a process where torch cannot
be imported gives the task `FewShotClassifier.adapt` gives on the ONNX backend (same
labels; probabilities as close as the head's fit tolerance allows), written as
`save_task` writes it."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from run_tools import LABELS, QUERIES, TEXTS, one_thread_env, tiny_learner, write_csv

from metalm import FewShotClassifier
from metalm.errors import MetalmError
from metalm.learners.heads import fit_logreg as torch_fit_logreg
from metalm.onnx_adapt import adapt_task, fit_logreg, read_examples
from metalm.onnx_predict import OnnxTaskPredictor
from metalm.pretrained import save_pretrained

pytest.importorskip("onnxruntime", reason="the onnx extra: pip install 'metalm[onnx]'")
NO_TORCH = "import sys; sys.modules['torch'] = None; "  # any import of torch now fails


def test_the_numpy_head_is_the_torch_head():
    """The same fit (start, temperature, L-BFGS) with weights, a prior, 20 classes."""
    generator = torch.Generator().manual_seed(0)
    x = torch.nn.functional.normalize(torch.randn(100, 16, generator=generator), dim=-1)
    y = torch.arange(20).repeat(5)
    weight = torch.rand(100, generator=generator) + 0.5
    prior = torch.nn.functional.normalize(torch.randn(20, 16, generator=generator), dim=-1)
    expected = torch_fit_logreg(x, y, 20, l2=1e-4, sample_weight=weight, prior=prior)
    got = fit_logreg(x.numpy(), y.numpy(), 20, 1e-4, weight.numpy(), prior.numpy())
    logits = x @ expected["head.weight"].T + expected["head.bias"]
    mine = x.numpy() @ got["head.weight"].T + got["head.bias"]
    np.testing.assert_allclose(mine, logits.numpy(), atol=2e-3)
    assert got["head.l2"].tolist() == pytest.approx([1e-4])
    # at the shipped tolerance they stop at slightly different points; where the problem
    # is well conditioned (l2 1e-2) and the tolerance tight, at the same head: an exact port
    tight = {"tol": 1e-7, "max_iter": 1000}
    expected = torch_fit_logreg(x, y, 20, l2=1e-2, sample_weight=weight, prior=prior, **tight)
    got = fit_logreg(x.numpy(), y.numpy(), 20, 1e-2, weight.numpy(), prior.numpy(), **tight)
    logits = x @ expected["head.weight"].T + expected["head.bias"]
    mine = x.numpy() @ got["head.weight"].T + got["head.bias"]
    np.testing.assert_allclose(mine, logits.numpy(), atol=1e-5)


@pytest.mark.parametrize("quantize", ["none", pytest.param("int8", marks=pytest.mark.slow)])
def test_adapts_without_torch_as_the_classifier_does(tiny_model_dir, tmp_path, quantize):
    # an L2 of 1e-2 (the default 1e-4 lets the random tiny BERT's heads grow large, where
    # the two L-BFGS' stops at the same gradient tolerance lie ~1e-2 apart in probability;
    # at 1e-2 they agree to 1e-6)
    learner = tiny_learner(tiny_model_dir, "frozen", logreg_l2=1e-2)
    model = save_pretrained(learner, tmp_path / "model")
    clf = FewShotClassifier.from_pretrained(model, device="cpu", backend="onnx", quantize=quantize)
    expected = clf.adapt(TEXTS, LABELS).predict_proba(QUERIES)
    support = write_csv(tmp_path / "support.csv", list(zip(TEXTS, LABELS, strict=True)))
    code = NO_TORCH + "from metalm.onnx_adapt import main; raise SystemExit(main())"
    args = ["--model", str(model), "--support", str(support), "--out", str(tmp_path / "task")]
    done = subprocess.run(
        [sys.executable, "-c", code, *args, "--quantize", quantize],
        env=one_thread_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "3 classes from 6 examples" in done.stdout
    got = OnnxTaskPredictor(tmp_path / "task", quantize=quantize).predict_proba(QUERIES)
    assert list(got.argmax(1)) == list(expected.argmax(1))
    np.testing.assert_allclose(got, expected, atol=1e-4)
    # the task directory is save_task's: metalm's own loader reads it, same answers
    loaded = FewShotClassifier.load_task(
        tmp_path / "task", device="cpu", backend="onnx", quantize=quantize
    )
    np.testing.assert_allclose(loaded.predict_proba(QUERIES), got, atol=1e-5)
    assert loaded.classes_ == ["alarm", "music", "weather"]


def test_centroid_heads_and_names_as_a_prior(tiny_model_dir, tmp_path):
    for config in ({"head": "centroid"}, {"label_names": "prior"}):
        model = save_pretrained(tiny_learner(tiny_model_dir, "frozen", **config), tmp_path / "m")
        clf = FewShotClassifier.from_pretrained(model, device="cpu", backend="onnx")
        expected = clf.adapt(TEXTS, LABELS).predict_proba(QUERIES)
        task = adapt_task(model, TEXTS, LABELS, tmp_path / "task")
        got = OnnxTaskPredictor(task).predict_proba(QUERIES)
        np.testing.assert_allclose(got, expected, atol=5e-3, err_msg=str(config))
        shutil.rmtree(tmp_path / "m")


def test_what_it_cannot_adapt_is_a_clear_error(tiny_model_dir, frozen_dir, tmp_path):
    maml = save_pretrained(tiny_learner(tiny_model_dir, "maml"), tmp_path / "maml")
    FewShotClassifier.from_pretrained(maml, device="cpu", backend="onnx")  # exports onnx/
    with pytest.raises(MetalmError, match="adapts in PyTorch only"):
        adapt_task(maml, TEXTS, LABELS, tmp_path / "t")
    chosen = save_pretrained(tiny_learner(tiny_model_dir, "frozen", logreg_l2=0), tmp_path / "c")
    FewShotClassifier.from_pretrained(chosen, device="cpu", backend="onnx")
    with pytest.raises(MetalmError, match="logreg_l2=0"):
        adapt_task(chosen, TEXTS, LABELS, tmp_path / "t")
    with pytest.raises(MetalmError, match=r"onnx/encoder.onnx: not there"):
        adapt_task(frozen_dir, TEXTS, LABELS, tmp_path / "t")  # never exported
    with pytest.raises(MetalmError, match="at least 2 classes"):
        adapt_task(chosen, TEXTS[:2], LABELS[:2], tmp_path / "t")
    (tmp_path / "bad.csv").write_text("words,tag\nhello,a\n")
    with pytest.raises(MetalmError, match="needs the columns 'text' and 'label'"):
        read_examples(tmp_path / "bad.csv")
    assert not (tmp_path / "t").exists()


@pytest.mark.slow
def test_real_minilm_adapts_without_torch_as_with_it(tmp_path):
    """BANKING77 full-way 5-shot on the shipped MiniLM: the torch-free task labels 1,000
    test texts as the classifier adapted in the same process does."""
    from metalm.data import builtin_dataset
    from metalm.pretrained import export_untrained

    model = export_untrained(tmp_path / "frozen", "frozen")
    support, test = builtin_dataset("banking77", "train_5"), builtin_dataset("banking77", "test")
    clf = FewShotClassifier.from_pretrained(model, device="cpu", backend="onnx")
    expected = clf.adapt(list(support.texts), list(support.labels)).predict(test.texts[:1000])
    rows = [
        {"text": t, "label": label} for t, label in zip(support.texts, support.labels, strict=True)
    ]
    (tmp_path / "support.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    code = NO_TORCH + "from metalm.onnx_adapt import main; raise SystemExit(main())"
    args = ["--model", str(model), "--support", str(tmp_path / "support.jsonl")]
    done = subprocess.run(
        [sys.executable, "-c", code, *args, "--out", str(tmp_path / "task")],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    got = OnnxTaskPredictor(tmp_path / "task").predict(test.texts[:1000])
    assert got == list(expected)
