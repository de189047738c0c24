"""The GPU scripts run where no GPU is: `scripts/gpu_cuda_path.py --device cpu` compares
every learner on the CPU against itself (so the comparison code cannot rot between the
rare runs on a lent GPU), and `scripts/gpu_throughput.py` measures the CPU alone. The
quick ones run in this process (`here`: the script as `__main__`) and, marked slow, as a
script in a child process (`child`)."""

from __future__ import annotations

import contextlib
import io
import json
import runpy
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from run_tools import REPO_ROOT, one_thread_env

from metalm.learners import LEARNERS

SCRIPTS = REPO_ROOT / "scripts"
WHERE = ["here", pytest.param("child", marks=pytest.mark.slow)]


def run_script(where: str, name: str, *args: str, **env: str) -> tuple[int, str, str]:
    """`scripts/<name> args` (with `env` in a child process): its exit status, stdout and
    stderr."""
    script = str(SCRIPTS / name)
    if where == "child":
        done = subprocess.run(
            [sys.executable, script, *args],
            env=one_thread_env(PYTHONPATH=str(REPO_ROOT / "src"), **env),
            capture_output=True,
            text=True,
            timeout=600,
        )
        return done.returncode, done.stdout, done.stderr
    out, err = io.StringIO(), io.StringIO()
    status = 0
    with (
        pytest.MonkeyPatch.context() as patch,
        contextlib.redirect_stdout(out),
        contextlib.redirect_stderr(err),
    ):
        patch.setattr(sys, "argv", [script, *args])
        try:
            runpy.run_path(script, run_name="__main__")
        except SystemExit as exit:  # as the interpreter ends: a message goes to stderr
            if isinstance(exit.code, str):
                print(exit.code, file=sys.stderr)
            status = exit.code if isinstance(exit.code, int) else 1
    return status, out.getvalue(), err.getvalue()


@pytest.mark.slow
def test_cuda_path_script_compares_every_learner(tmp_path: Path):
    out = tmp_path / "cuda_path.json"
    status, stdout, stderr = run_script(
        "child", "gpu_cuda_path.py", "--device", "cpu", "--learners-only", "--out", str(out)
    )
    assert status == 0, stdout + stderr[-3000:]
    checks = json.loads(out.read_text())["checks"]
    assert [c["check"] for c in checks] == [f"learner {n}: cpu = cpu" for n in sorted(LEARNERS)]
    assert all(c["ok"] for c in checks)


@pytest.mark.parametrize("where", WHERE)
def test_cuda_path_script_refuses_cuda_without_a_gpu(where, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # here, as in the child
    status, _, stderr = run_script(where, "gpu_cuda_path.py", CUDA_VISIBLE_DEVICES="")
    assert status == 1 and "no GPU here" in stderr


@pytest.mark.parametrize("where", WHERE)
def test_throughput_script_measures_the_cpu(where, tiny_model_dir: Path, tmp_path: Path):
    out = tmp_path / "throughput.json"
    args = ["--devices", "cpu", "--model", str(tiny_model_dir), "--texts", "32"]
    args += ["--repeats", "1", "--steps", "2", "--out", str(out)]
    status, stdout, stderr = run_script(where, "gpu_throughput.py", *args)
    assert status == 0, stderr[-3000:]
    (row,) = json.loads(out.read_text())["rows"]
    assert row["device"] == "cpu" and row["encode_texts_per_s"] > 0
    assert row["meta_train_steps_per_s"] > 0
    assert "| cpu |" in stdout
