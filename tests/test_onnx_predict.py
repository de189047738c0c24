"""`metalm.onnx_predict`: an adapted task predicts on ONNX Runtime in a process where
torch cannot be imported, with the probabilities of `FewShotClassifier` on the ONNX
backend (float32 and int8)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from run_tools import LABELS, QUERIES, TEXTS, one_thread_env

from metalm import FewShotClassifier
from metalm.errors import MetalmError
from metalm.onnx_predict import OnnxTaskPredictor

pytest.importorskip("onnxruntime", reason="the onnx extra: pip install 'metalm[onnx]'")
NO_TORCH = "import sys; sys.modules['torch'] = None; "  # any import of torch now fails


SLOW = pytest.mark.slow  # a subprocess each: the quantized ones in the slow lane


@pytest.mark.parametrize(
    "quantize", ["none", pytest.param("int8", marks=SLOW), pytest.param("int8-static", marks=SLOW)]
)
def test_predicts_without_torch_as_the_onnx_backend(frozen_dir, tmp_path, quantize):
    model = Path(shutil.copytree(frozen_dir, tmp_path / "model"))
    clf = FewShotClassifier.from_pretrained(model, device="cpu", backend="onnx", quantize=quantize)
    clf.adapt(TEXTS, LABELS).save_task(tmp_path / "task")
    (tmp_path / "queries.txt").write_text("\n".join(QUERIES) + "\n")
    code = NO_TORCH + "from metalm.onnx_predict import main; raise SystemExit(main())"
    args = ["--task", str(tmp_path / "task"), "--input", str(tmp_path / "queries.txt")]
    done = subprocess.run(
        [sys.executable, "-c", code, *args, "--quantize", quantize],
        env=one_thread_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    rows = [json.loads(line) for line in done.stdout.splitlines()]
    expected = clf.predict_proba(QUERIES)
    assert [r["label"] for r in rows] == [clf.classes_[i] for i in expected.argmax(1)]
    got = OnnxTaskPredictor(tmp_path / "task", quantize=quantize).predict_proba(QUERIES)
    np.testing.assert_allclose(got, expected, atol=1e-5)
    assert [r["probability"] for r in rows] == pytest.approx(expected.max(1).tolist(), abs=1e-5)


def test_what_it_cannot_predict_is_a_clear_error(frozen_dir, tmp_path):
    model = Path(shutil.copytree(frozen_dir, tmp_path / "model"))
    FewShotClassifier.from_pretrained(model, device="cpu").adapt(TEXTS, LABELS).save_task(
        tmp_path / "task"
    )
    with pytest.raises(MetalmError, match="metalm export --format onnx"):
        OnnxTaskPredictor(tmp_path / "task")  # the model was never exported for ORT
    with pytest.raises(MetalmError, match="quantize must be one of"):
        OnnxTaskPredictor(tmp_path / "task", quantize="int4")
