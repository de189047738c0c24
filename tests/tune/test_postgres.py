"""The RDB storage path of `metalm tune` against a real PostgreSQL server that this file
starts itself (a throwaway cluster in a temporary directory, on a free local port):
two concurrent workers, and a worker killed mid-trial whose study another run continues.

Needs Debian's `postgresql` package (installed by .ci/run); skipped only where its
binaries are absent.
"""

from __future__ import annotations

import glob
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState
from run_tools import one_thread_env
from tuning import check_study_consistent, run_workers, worker_command, write_tune_yaml

from metalm.tune.optuna_private import set_trial_user_attr


def _pg_bin() -> Path | None:
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True)
    found = shutil.which("initdb")
    if found:
        candidates.append(str(Path(found).resolve().parent))
    for directory in candidates:
        if (Path(directory) / "initdb").exists() and (Path(directory) / "pg_ctl").exists():
            return Path(directory)
    return None


PG_BIN = _pg_bin()
pytestmark = pytest.mark.skipif(PG_BIN is None, reason="PostgreSQL server binaries not installed")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def postgres_url():
    """A fresh PostgreSQL cluster (trust auth on 127.0.0.1), stopped and removed after."""
    root = Path(tempfile.mkdtemp(prefix="metalm-pg-"))
    as_user: list[str] = []
    if os.geteuid() == 0:  # the server refuses to run as root
        shutil.chown(root, "postgres", "postgres")
        as_user = ["runuser", "-u", "postgres", "--"]
    data, log = root / "data", root / "server.log"
    port = _free_port()

    def pg(*args: str, check: bool = True):
        return subprocess.run(
            [*as_user, *args], check=check, capture_output=True, text=True, timeout=120
        )

    pg(str(PG_BIN / "initdb"), "-D", str(data), "-A", "trust", "-U", "postgres", "-E", "UTF8")
    options = f"-p {port} -k {root} -c listen_addresses=127.0.0.1 -c max_connections=50"
    started = pg(str(PG_BIN / "pg_ctl"), "-D", str(data), "-o", options, "-l", str(log), "-w",
                 "start", check=False)  # fmt: skip
    if started.returncode != 0:
        text = log.read_text() if log.exists() else ""
        shutil.rmtree(root, ignore_errors=True)
        pytest.fail(f"PostgreSQL did not start: {started.stderr}\n{text}")
    try:
        yield f"postgresql://postgres@127.0.0.1:{port}/postgres"
    finally:
        pg(str(PG_BIN / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop", check=False)
        shutil.rmtree(root, ignore_errors=True)


def _load(url: str, name: str) -> optuna.Study:
    return optuna.load_study(study_name=name, storage=optuna.storages.RDBStorage(url))


@pytest.mark.slow
def test_postgres_two_concurrent_workers(tiny_model_dir, tmp_path, postgres_url):
    path = write_tune_yaml(tmp_path / "pg.yaml")
    run_workers(
        [
            # as on two machines: separate study directories
            worker_command(
                path, tiny_model_dir, tmp_path / f"machine{i}", 6, "--storage", postgres_url
            )
            for i in range(2)
        ]
    )
    study = _load(postgres_url, "pg")
    check_study_consistent(study, 6)
    assert len({t.user_attrs["pid"] for t in study.trials}) == 2  # both workers took trials
    # each trial's run happened in exactly one worker's directory
    for t in study.get_trials(states=(TrialState.COMPLETE,)):
        homes = [
            tmp_path / f"machine{i}" / "pg" / "trials" / f"trial-{t.number:04d}" for i in (0, 1)
        ]
        assert sum(h.exists() for h in homes) == 1


@pytest.mark.slow
def test_postgres_killed_worker_then_continue(tiny_model_dir, tmp_path, postgres_url):
    path = write_tune_yaml(tmp_path / "pgkill.yaml")
    cmd = worker_command(path, tiny_model_dir, tmp_path / "runs", 50, "--storage", postgres_url,
                  "--heartbeat", "1")  # fmt: skip
    proc = subprocess.Popen(
        cmd, env=one_thread_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    running = []
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and not running:
            time.sleep(0.2)
            try:
                study = _load(postgres_url, "pgkill")
            except KeyError:  # the study is not created yet
                continue
            running = [t for t in study.get_trials(states=(TrialState.RUNNING,)) if t.params]
        assert running, "no trial started"
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    killed = running[0]
    # pretend the dead worker ran on another machine: only its missing heartbeat can tell
    set_trial_user_attr(study, killed, "host", "another-machine")
    time.sleep(3)  # past the grace period (2 heartbeats)
    cmd[cmd.index("--trials") + 1] = "3"
    done = subprocess.run(cmd, env=one_thread_env(), timeout=600, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    study = _load(postgres_url, "pgkill")
    assert study.trials[killed.number].state == TrialState.FAIL
    check_study_consistent(study, 3)
    retried = [t for t in study.trials if t.system_attrs.get("failed_trial") == killed.number]
    # the killed trial was run again from what it had stored (the kill may land between two
    # of its suggestions: then a part of the space), the rest sampled anew
    stored = study.trials[killed.number].params
    assert stored and retried and stored.items() <= retried[0].params.items()
