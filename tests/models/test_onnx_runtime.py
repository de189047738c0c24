"""`metalm.models.onnx_runtime`: the encoder on ONNX Runtime gives PyTorch's embeddings
(within 1e-4), is exported once and again only when the weights change, and reaches
users through `from_pretrained(backend="onnx")` and `--backend onnx`."""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from run_tools import LABELS, QUERIES, TEXTS, write_csv

from metalm import FewShotClassifier
from metalm.cli import main
from metalm.errors import MetalmError
from metalm.models import onnx_runtime
from metalm.models.encoder import EncoderConfig, TextEncoder

pytest.importorskip("onnxruntime", reason="the onnx extra: pip install 'metalm[onnx]'")


def _encoder(model_dir: Path) -> TextEncoder:
    return TextEncoder.from_config(EncoderConfig(name_or_path=str(model_dir), device="cpu"))


def test_onnx_embeddings_equal_pytorch_and_the_export_is_cached(tiny_model_dir, tmp_path):
    torch_encoder, onnx_encoder = _encoder(tiny_model_dir), _encoder(tiny_model_dir)
    onnx_encoder.use_onnx(tmp_path / "onnx", stamp="weights-1")
    assert onnx_encoder.backend == "onnx" and torch_encoder.backend == "torch"
    texts = [*TEXTS, *QUERIES, "a much longer text " * 10]
    gap = (onnx_encoder.embed(texts) - torch_encoder.embed(texts)).abs().max()
    assert float(gap) < 1e-4
    exported = tmp_path / "onnx" / onnx_runtime.FP32_FILE
    made = exported.stat().st_mtime_ns
    _encoder(tiny_model_dir).use_onnx(tmp_path / "onnx", stamp="weights-1")
    assert exported.stat().st_mtime_ns == made, "exported again for the same weights"
    _encoder(tiny_model_dir).use_onnx(tmp_path / "onnx", stamp="weights-2")
    assert exported.stat().st_mtime_ns != made, "not exported again for other weights"
    # gradients and replaced weights stay in PyTorch (meta-training, fine-tuning learners)
    assert onnx_encoder(["hello"]).requires_grad


def test_int8_is_a_second_file_close_to_float32(tiny_model_dir, tmp_path):
    fp32, int8 = _encoder(tiny_model_dir), _encoder(tiny_model_dir)
    fp32.use_onnx(tmp_path / "onnx", stamp="w")
    int8.use_onnx(tmp_path / "onnx", "int8", stamp="w")
    assert sorted(p.name for p in (tmp_path / "onnx").iterdir()) == [
        "encoder.int8.onnx",
        "encoder.onnx",
        "source.json",
    ]
    a, b = fp32.embed(TEXTS), int8.embed(TEXTS)
    assert 0 < float((a - b).abs().max()) < 0.2
    assert torch.nn.functional.cosine_similarity(a, b).min() > 0.95


def test_bad_uses_are_metalm_errors(tiny_model_dir, tmp_path, monkeypatch):
    encoder = _encoder(tiny_model_dir)
    with pytest.raises(MetalmError, match="quantize must be one of"):
        encoder.use_onnx(tmp_path / "o", "int4")
    encoder.quantize("int8")
    with pytest.raises(MetalmError, match="int8 in PyTorch already"):
        encoder.use_onnx(tmp_path / "o")
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    with pytest.raises(MetalmError, match=r"pip install 'metalm\[onnx\]'"):
        _encoder(tiny_model_dir).use_onnx(tmp_path / "o")
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "x.onnx").write_bytes(b"not onnx")
    monkeypatch.undo()
    with pytest.raises(MetalmError, match="ONNX Runtime cannot load it"):
        onnx_runtime.OnnxTransformer(tmp_path / "broken" / "x.onnx")


def test_from_pretrained_onnx_predicts_as_torch(frozen_dir, tmp_path, monkeypatch):
    model = Path(shutil.copytree(frozen_dir, tmp_path / "model"))
    torch_clf = FewShotClassifier.from_pretrained(model, device="cpu").adapt(TEXTS, LABELS)
    onnx_clf = FewShotClassifier.from_pretrained(model, device="cpu", backend="onnx")
    onnx_clf.adapt(TEXTS, LABELS)
    assert (model / "onnx" / onnx_runtime.FP32_FILE).exists()
    # the same labels; probabilities as close as the logistic-regression head's fit
    # tolerance lets them be (it stops where 1e-7 changes of its inputs take it)
    assert list(onnx_clf.predict(QUERIES)) == list(torch_clf.predict(QUERIES))
    np.testing.assert_allclose(
        onnx_clf.predict_proba(QUERIES), torch_clf.predict_proba(QUERIES), atol=5e-3
    )
    assert onnx_clf.model_fingerprint == torch_clf.model_fingerprint  # onnx/ is not weights
    with pytest.raises(MetalmError, match="backend must be one of torch, onnx"):
        FewShotClassifier.from_pretrained(model, device="cpu", backend="tensorrt")
    # a model directory this user cannot write to: the export goes to metalm's cache
    monkeypatch.setenv("METALM_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(os, "access", lambda path, mode: False)
    FewShotClassifier.from_pretrained(frozen_dir, device="cpu", backend="onnx")
    assert list((tmp_path / "cache" / "onnx").glob(f"*/{onnx_runtime.FP32_FILE}"))


def test_cli_adapt_predict_with_the_onnx_backend(frozen_dir, tmp_path, capsys):
    model = Path(shutil.copytree(frozen_dir, tmp_path / "model"))
    support = write_csv(tmp_path / "support.csv", list(zip(TEXTS, LABELS, strict=True)))
    queries = write_csv(tmp_path / "queries.csv", [(q, "x") for q in QUERIES])
    outputs = {}
    for backend in ("torch", "onnx"):
        task = tmp_path / f"task-{backend}"
        args = ["adapt", "--model", str(model), "--support", str(support), "--out", str(task)]
        assert main([*args, "--backend", backend]) == 0
        capsys.readouterr()
        args = ["predict", "--task", str(task), "--input", str(queries), "--backend", backend]
        assert main(args) == 0
        outputs[backend] = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["label"] for r in outputs["onnx"]] == [r["label"] for r in outputs["torch"]]
    assert len(outputs["onnx"]) == len(QUERIES)


@pytest.mark.slow
def test_real_minilm_on_onnx_runtime(tmp_path):
    """The shipped MiniLM: ONNX Runtime's embeddings equal PyTorch's within 1e-4."""
    from metalm.data import builtin_dataset

    texts = builtin_dataset("banking77", "test").texts[:64]
    torch_encoder = TextEncoder.from_config(EncoderConfig(device="cpu"))
    onnx_encoder = TextEncoder.from_config(EncoderConfig(device="cpu"))
    onnx_encoder.use_onnx(tmp_path / "onnx", stamp="minilm")
    gap = (onnx_encoder.embed(texts) - torch_encoder.embed(texts)).abs().max()
    assert float(gap) < 1e-4


@pytest.mark.slow  # a whole run
def test_a_run_evaluates_on_onnx_runtime_as_on_pytorch(tiny_model_dir, tmp_path):
    """`model.backend=onnx`: the run's evaluation (learner and baseline) on ONNX Runtime
    gives the accuracies of the same run on PyTorch."""
    from conftest import tiny_overrides

    from metalm import load_config, run

    reports = {}
    for backend in ("torch", "onnx"):
        overrides = tiny_overrides(tiny_model_dir, tmp_path / backend, **{"train.steps": 2})
        overrides += [f"model.backend={backend}", "model.device=cpu", "learner.head=centroid"]
        overrides += ["eval.baselines=[{name: frozen}]"]
        report = run(load_config(None, overrides), progress=False)
        reports[backend] = {(r.method, r.protocol): r.accuracy for r in report.results}
    assert reports["onnx"].keys() == reports["torch"].keys() and len(reports["onnx"]) >= 2
    for key, accuracy in reports["torch"].items():
        assert reports["onnx"][key] == pytest.approx(accuracy, abs=1e-9), key
    with pytest.raises(MetalmError, match=r"model\.backend must be one of torch, onnx"):
        load_config(None, ["model.backend=tensorrt"])


def test_export_format_onnx_writes_both_files_that_the_backend_then_reads(
    tiny_model_dir, tmp_path, capsys
):
    out = tmp_path / "model"
    args = ["export", "--learner", "frozen", f"model.name_or_path={tiny_model_dir}"]
    assert main([*args, "--format", "onnx", "--out", str(out)]) == 0
    assert "--backend onnx" in capsys.readouterr().out
    files = {p.name: p.stat().st_mtime_ns for p in (out / "onnx").iterdir()}
    assert {onnx_runtime.FP32_FILE, onnx_runtime.INT8_FILE} <= set(files)
    for quantize in ("none", "int8"):  # found, not exported again
        FewShotClassifier.from_pretrained(out, device="cpu", backend="onnx", quantize=quantize)
    assert {p.name: p.stat().st_mtime_ns for p in (out / "onnx").iterdir()} == files
    assert main(["export", "--model", str(out), "--format", "onnx", "--out", "x"]) == 2
    assert "writes a new model directory" in capsys.readouterr().err


def test_static_int8_is_calibrated_once_on_the_first_texts_and_then_reused(
    tiny_model_dir, tmp_path
):
    fp32, static = _encoder(tiny_model_dir), _encoder(tiny_model_dir)
    fp32.use_onnx(tmp_path / "onnx", stamp="w")
    static.use_onnx(tmp_path / "onnx", "int8-static", stamp="w")
    assert static.needs_calibration and not fp32.needs_calibration
    with pytest.raises(MetalmError, match="not calibrated yet"):
        static.embed(QUERIES)  # never float32 in its place without saying so
    static.calibrate([*TEXTS, *QUERIES])
    assert not static.needs_calibration
    assert (tmp_path / "onnx" / onnx_runtime.STATIC_FILE).exists()
    a, b = fp32.embed(TEXTS), static.embed(TEXTS)
    assert 0 < float((a - b).abs().max()) < 0.3
    assert torch.nn.functional.cosine_similarity(a, b).min() > 0.9
    made = (tmp_path / "onnx" / onnx_runtime.STATIC_FILE).stat().st_mtime_ns
    again = _encoder(tiny_model_dir)
    again.use_onnx(tmp_path / "onnx", "int8-static", stamp="w")
    assert not again.needs_calibration  # the calibrated file is used as it is
    assert torch.equal(again.embed(TEXTS), b)
    assert (tmp_path / "onnx" / onnx_runtime.STATIC_FILE).stat().st_mtime_ns == made
    again.use_onnx(tmp_path / "onnx", "int8-static", stamp="other weights")
    assert again.needs_calibration
    with pytest.raises(MetalmError, match=r"ONNX Runtime's .* use it with backend onnx"):
        _encoder(tiny_model_dir).quantize("int8-static")
    with pytest.raises(MetalmError, match="needs texts"):
        again.calibrate([])


@pytest.mark.slow  # the fast lane calibrates in the test above
def test_static_int8_through_the_classifier_and_the_cli(
    frozen_dir, tiny_model_dir, tmp_path, capsys
):
    model = Path(shutil.copytree(frozen_dir, tmp_path / "model"))
    clf = FewShotClassifier.from_pretrained(
        model, device="cpu", backend="onnx", quantize="int8-static"
    )
    clf.adapt(TEXTS, LABELS)  # the first support set calibrates it
    assert (model / "onnx" / onnx_runtime.STATIC_FILE).exists()
    assert len(clf.predict(QUERIES)) == len(QUERIES)
    support = write_csv(tmp_path / "support.csv", list(zip(TEXTS, LABELS, strict=True)))
    out = tmp_path / "exported"
    args = ["export", "--learner", "frozen", f"model.name_or_path={tiny_model_dir}"]
    args += ["--format", "onnx", "--calibration", str(support), "--out", str(out)]
    assert main(args) == 0
    assert "int8-static" in capsys.readouterr().out
    static_file = out / "onnx" / onnx_runtime.STATIC_FILE
    made = static_file.stat().st_mtime_ns
    task = tmp_path / "task"
    args = ["adapt", "--model", str(out), "--support", str(support), "--out", str(task)]
    assert main([*args, "--backend", "onnx", "--quantize", "int8-static"]) == 0
    assert static_file.stat().st_mtime_ns == made, "calibrated again"
    capsys.readouterr()
    args = ["export", "--learner", "frozen", "--calibration", str(support)]
    assert main([*args, "--out", str(tmp_path / "x")]) == 2
    assert "--calibration is for --format onnx" in capsys.readouterr().err
