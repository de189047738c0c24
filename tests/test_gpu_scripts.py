"""The GPU scripts run where no GPU is: `scripts/gpu_cuda_path.py --device cpu` compares
every learner on the CPU against itself (so the comparison code cannot rot between the
rare runs on a lent GPU), and `scripts/gpu_throughput.py` measures the CPU alone."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from run_tools import REPO_ROOT, one_thread_env

from metalm.learners import LEARNERS

SCRIPTS = REPO_ROOT / "scripts"


@pytest.mark.slow
def test_cuda_path_script_compares_every_learner(tmp_path: Path):
    out = tmp_path / "cuda_path.json"
    command = [sys.executable, str(SCRIPTS / "gpu_cuda_path.py"), "--device", "cpu"]
    done = subprocess.run(
        [*command, "--learners-only", "--out", str(out)],
        env=one_thread_env(PYTHONPATH=str(REPO_ROOT / "src")),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout + done.stderr[-3000:]
    checks = json.loads(out.read_text())["checks"]
    assert [c["check"] for c in checks] == [f"learner {n}: cpu = cpu" for n in sorted(LEARNERS)]
    assert all(c["ok"] for c in checks)


def test_cuda_path_script_refuses_cuda_without_a_gpu():
    done = subprocess.run(
        [sys.executable, str(SCRIPTS / "gpu_cuda_path.py")],
        env=one_thread_env(PYTHONPATH=str(REPO_ROOT / "src"), CUDA_VISIBLE_DEVICES=""),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 1 and "no GPU here" in done.stderr


def test_throughput_script_measures_the_cpu(tiny_model_dir: Path, tmp_path: Path):
    out = tmp_path / "throughput.json"
    command = [sys.executable, str(SCRIPTS / "gpu_throughput.py"), "--devices", "cpu"]
    command += ["--model", str(tiny_model_dir), "--texts", "32", "--repeats", "1"]
    done = subprocess.run(
        [*command, "--steps", "2", "--out", str(out)],
        env=one_thread_env(PYTHONPATH=str(REPO_ROOT / "src")),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    (row,) = json.loads(out.read_text())["rows"]
    assert row["device"] == "cpu" and row["encode_texts_per_s"] > 0
    assert row["meta_train_steps_per_s"] > 0
    assert "| cpu |" in done.stdout
