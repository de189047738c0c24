"""Data-parallel meta-training (`metalm.distributed`): 2 gloo ranks give the weights of one
process with the same global meta-batch, for every meta-trained learner; a SIGKILL of one
rank, then `--resume` under 2 processes, ends equal to an uninterrupted run; bad input.

Everything runs on CPU on the tiny random BERT of `conftest.py`; torchrun's `--standalone`
rendezvous takes a free port, so parallel test runs do not collide.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import tiny_overrides
from run_tools import assert_same_runs, kill_b_then_resume, logged_steps, one_thread_env, read_log
from safetensors.torch import load_file

from metalm import distributed
from metalm.cli import main
from metalm.distributed import World
from metalm.errors import MetalmError

TESTS = Path(__file__).parent
WORKER = TESTS / "distributed_worker.py"
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
TIMEOUT = 240.0


def _env() -> dict[str, str]:
    """One torch thread per process (two ranks share this machine's cores)."""
    return one_thread_env(PYTHONWARNINGS="ignore")


# ---------------------------------------------------------------------------- shares


@pytest.mark.parametrize(("size", "batch"), [(1, 3), (2, 4), (3, 6), (4, 4)])
def test_shards_cover_the_meta_batch_once(size: int, batch: int):
    shares = [list(distributed.shard(batch, World(rank, size))) for rank in range(size)]
    assert sorted(i for share in shares for i in share) == list(range(batch))
    assert len({len(share) for share in shares}) == 1


def test_uneven_or_too_small_meta_batches_are_refused():
    with pytest.raises(MetalmError, match="not divisible by the 2 processes"):
        distributed.check_meta_batch(3, 2)
    with pytest.raises(MetalmError, match=r"4 processes but train\.meta_batch_size=2"):
        distributed.check_meta_batch(2, 4)


def test_backend_choice_and_nccl_without_cuda():
    assert distributed.pick_backend("cpu") == "gloo"
    assert distributed.pick_backend("cpu", "gloo") == "gloo"
    with pytest.raises(MetalmError, match="--backend must be one of"):
        distributed.pick_backend("cpu", "mpi")
    if not torch.cuda.is_available():
        assert distributed.pick_backend("auto") == "gloo"
        with pytest.raises(MetalmError, match="nccl needs CUDA GPUs"):
            distributed.pick_backend("auto", "nccl")


def test_one_named_gpu_is_refused_under_torchrun(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(MetalmError, match="names one GPU"):
        distributed.setup("cuda:1", "gloo")


def test_the_process_group_waits_train_dist_timeout(monkeypatch: pytest.MonkeyPatch):
    """Under torchrun the group is joined with `train.dist_timeout` seconds, so that
    rank 0 may evaluate alone longer than the backend's default before others give up."""
    import datetime

    from metalm.config import load_config

    seen = {}
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(distributed.dist, "is_initialized", lambda: False)
    monkeypatch.setattr(distributed.dist, "init_process_group", lambda b, **kw: seen.update(kw))
    config = load_config(None, ["train.dist_timeout=5400", "model.device=cpu"])
    distributed.setup(config.model.device, "gloo", timeout=config.train.dist_timeout)
    assert seen["timeout"] == datetime.timedelta(seconds=5400)
    with pytest.raises(MetalmError, match="dist_timeout must be > 0"):
        load_config(None, ["train.dist_timeout=0"])


def test_vmapped_meta_batches_with_dropout_are_refused_under_torchrun(
    tiny_encoder, monkeypatch: pytest.MonkeyPatch
):
    from learner_tools import learner_for

    learner = learner_for(tiny_encoder, name="anil", vectorize=True)
    distributed.check_learner(learner, 5)  # one process: vmap is fine
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(MetalmError, match=r"learner\.vectorize=false under torchrun"):
        distributed.check_learner(learner, 5)
    distributed.check_learner(learner_for(tiny_encoder, name="anil"), 5)  # a loop is fine


def test_one_process_is_untouched():
    assert distributed.world() == World() and World().is_main
    param = torch.nn.Parameter(torch.ones(2))
    param.grad = torch.full((2,), 3.0)
    assert distributed.all_reduce_gradients([param], 1.5) == 1.5
    assert torch.equal(param.grad, torch.full((2,), 3.0))
    assert distributed.broadcast_object({"a": 1}) == {"a": 1}


def _reduce_worker(rank: int, store_path: str) -> None:
    store = torch.distributed.FileStore(store_path, 2)
    torch.distributed.init_process_group("gloo", store=store, rank=rank, world_size=2)
    a, b, c = (torch.nn.Parameter(torch.zeros(3, dtype=torch.float64)) for _ in range(3))
    a.grad = torch.full((3,), float(rank + 1), dtype=torch.float64)
    if rank == 1:  # b has a gradient on one rank only; c on none
        b.grad = torch.full((3,), 5.0, dtype=torch.float64)
    total = distributed.all_reduce_gradients([a, b, c], 0.25 * (rank + 1))
    assert total == 0.75
    assert torch.equal(a.grad, torch.full((3,), 3.0, dtype=torch.float64))
    assert b.grad is not None and torch.equal(b.grad, torch.full((3,), 5.0, dtype=torch.float64))
    assert c.grad is None
    assert distributed.same_on_all_ranks({"x": torch.arange(3)})
    assert not distributed.same_on_all_ranks({"x": torch.arange(3) + rank})
    distributed.teardown(wait_for_peers=True)


@pytest.mark.slow
def test_gradients_are_summed_and_missing_ones_stay_missing(tmp_path: Path):
    torch.multiprocessing.spawn(_reduce_worker, args=(str(tmp_path / "store"),), nprocs=2)


# ------------------------------------------------------- 2 ranks == 1 process (key test)


@pytest.mark.slow
def test_two_ranks_give_the_weights_of_one_process(tiny_model_dir: Path, tmp_path: Path):
    """Every meta-trained learner (and hard-negative/cluster samplers, hypergradient
    rates), 3 steps of global meta-batch 4 in float64: 2 ranks vs 1 process."""
    from distributed_worker import CASES

    one, two = tmp_path / "one", tmp_path / "two"
    args = [str(WORKER), str(tiny_model_dir)]
    err_one, err_two = tmp_path / "one.err", tmp_path / "two.err"
    with open(err_one, "w") as e1, open(err_two, "w") as e2:
        procs = [
            subprocess.Popen([sys.executable, *args, str(one)], env=_env(), stderr=e1),
            subprocess.Popen(
                [*TORCHRUN, "--nproc-per-node=2", *args, str(two)], env=_env(), stderr=e2
            ),
        ]
    try:
        for proc, err in zip(procs, (err_one, err_two), strict=True):
            assert proc.wait(timeout=TIMEOUT) == 0, err.read_text()[-3000:]
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    for case in CASES:
        a, b = (
            load_file(one / case / "final.safetensors"),
            load_file(two / case / "final.safetensors"),
        )
        assert a.keys() == b.keys()
        assert all(v.dtype == torch.float64 for v in a.values())
        worst = max(float((a[k] - b[k]).abs().max()) for k in a)
        assert worst <= 1e-9, f"{case}: weights differ by {worst:.3g}"  # seen: ~1e-14
        log_a, log_b = read_log(one / case), read_log(two / case)
        assert [r["step"] for r in log_a] == [r["step"] for r in log_b] == [1, 2, 3]
        for ra, rb in zip(log_a, log_b, strict=True):
            assert abs(ra["loss"] - rb["loss"]) <= 1e-12, case
            assert ra["lr"] == pytest.approx(rb["lr"], abs=1e-15), case
            assert ra.get("val_accuracy") == rb.get("val_accuracy"), case
        result_a = json.loads((one / case / "result.json").read_text())
        assert result_a == json.loads((two / case / "result.json").read_text()), case


# ------------------------------------------------ SIGKILL of one rank, resume under 2


STEPS = 16
KILL_AFTER = 6  # checkpoints every 4 steps: the kill lands between two of them
KILL_EXTRA = {
    "train.steps": STEPS,
    "train.meta_batch_size": 2,
    "train.checkpoint_every": 4,
    "train.eval_every": 3,
    "train.lr": 0.03,
}


TRAIN_2 = [sys.executable, "-m", "metalm", "-q", "train", "--nproc", "2"]


def _train(model_dir: Path, out: Path) -> list[str]:
    return [*TRAIN_2, *tiny_overrides(model_dir, out, **KILL_EXTRA)]


def _descendants(pid: int) -> list[int]:
    found, todo = [], [pid]
    while todo:
        parent = todo.pop()
        for task in Path(f"/proc/{parent}/task").glob("*"):
            children = (task / "children").read_text().split()
            found += [int(c) for c in children]
            todo += [int(c) for c in children]
    return found


def _rank_pid(launcher: int, rank: int) -> int | None:
    for pid in _descendants(launcher):
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"RANK={rank}".encode() in environ and b"LOCAL_RANK=" + str(rank).encode() in environ:
            return pid
    return None


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="finds ranks through /proc")
def test_sigkill_of_one_rank_then_resume_equals_an_uninterrupted_run(
    tiny_model_dir: Path, tmp_path: Path
):
    run_a, run_b = tmp_path / "a" / "run", tmp_path / "b" / "run"
    killed = kill_b_then_resume(  # the launcher of B stops rank 0 and fails
        _train(tiny_model_dir, tmp_path / "a"),
        _train(tiny_model_dir, tmp_path / "b"),
        [*TRAIN_2, "--resume", str(run_b)],
        run_b,
        kill_after=KILL_AFTER,
        steps=STEPS,
        env=_env(),
        timeout=TIMEOUT,
        errors=tmp_path,
        victim=lambda launcher: _rank_pid(launcher, 1),
    )
    context = f"(rank 1 of B killed, resumed from step {killed.step})"
    report_a, report_b = assert_same_runs(run_a, run_b, STEPS, context)
    assert [r["per_episode"] for r in report_a["results"]] == [
        r["per_episode"] for r in report_b["results"]
    ]


# ------------------------------------------------------------------- tune, distributed


@pytest.mark.slow
def test_tune_trials_run_on_every_rank_and_pruning_stops_them_all(
    tiny_model_dir: Path, tmp_path: Path
):
    err = tmp_path / "tune.err"
    command = [*TORCHRUN, "--nproc-per-node=2", str(WORKER), str(tiny_model_dir), str(tmp_path)]
    with open(err, "w") as handle:
        done = subprocess.run([*command, "tune"], env=_env(), stderr=handle, timeout=TIMEOUT)
    assert done.returncode == 0, err.read_text()[-3000:]
    assert json.loads((tmp_path / "tune.json").read_text()) == ["COMPLETE", "PRUNED", "COMPLETE"]
    trials = tmp_path / "study" / "trials"
    # pruned at the validation of step 2, before that step was logged
    assert logged_steps(trials / "trial-0001" / "log.jsonl") == [1]
    assert logged_steps(trials / "trial-0002" / "log.jsonl") == list(range(1, 7))


@pytest.mark.slow
def test_tune_nproc_runs_the_study_and_the_final_run(tiny_model_dir: Path, tmp_path: Path):
    config = tmp_path / "tiny.yaml"
    config.write_text(
        "learner: {name: protonet}\nsearch:\n  train.lr: {low: 1.0e-4, high: 1.0e-2, log: true}\n"
    )
    extra = {"train.meta_batch_size": 2, "train.steps": 4, "train.eval_every": 2}
    command = [sys.executable, "-m", "metalm", "-q", "tune", "-c", str(config), "--nproc", "2"]
    command += ["--trials", "2", "--sampler", "random", "--seed", "0"]
    command += tiny_overrides(tiny_model_dir, tmp_path / "runs", **extra)
    done = subprocess.run(command, env=_env(), capture_output=True, text=True, timeout=TIMEOUT)
    assert done.returncode == 0, done.stderr[-3000:]
    study = tmp_path / "runs" / "tiny"
    assert (study / "trials.csv").exists() and (study / "best" / "report.json").exists()
    assert logged_steps(study / "best" / "log.jsonl") == [1, 2, 3, 4]
    assert done.stdout.count("study outputs in") == 1  # rank 0 alone prints


# ---------------------------------------------------------------------- bad input


def test_nproc_bad_input_is_a_clear_error(
    tiny_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
):
    overrides = tiny_overrides(tiny_model_dir, tmp_path, **{"train.meta_batch_size": 4})
    assert main(["train", "--nproc", "3", *overrides]) == 2
    assert "not divisible by the 3 processes" in capsys.readouterr().err
    assert main(["train", "--nproc", "8", *overrides]) == 2
    assert "8 processes but train.meta_batch_size=4" in capsys.readouterr().err
    assert main(["train", "--nproc", "0", *overrides]) == 2
    assert "--nproc must be >= 1" in capsys.readouterr().err
    assert main(["train", "--nproc", "2", *overrides, "learner.name=frozen"]) == 2
    assert "does not meta-train" in capsys.readouterr().err
    assert main(["train", "--nproc", "2", "--resume", str(tmp_path / "none")]) == 2
    assert "not a run directory" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert main(["train", "--nproc", "2", "--backend", "nccl", *overrides]) == 2
        assert "nccl needs CUDA GPUs" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_tune_error_on_rank_0_alone_stops_every_rank(tiny_model_dir: Path, tmp_path: Path):
    """Under a file-size limit that the tiny model's checkpoint is over, rank 0 (which
    alone writes checkpoints) fails each trial; the other rank learns it at the same step,
    both go on to the next trial and, when no trial completed, both exit with the error,
    long before the process group's timeout."""
    config = tmp_path / "tiny.yaml"
    config.write_text(
        "learner: {name: protonet}\nsearch:\n  train.lr: {low: 1.0e-4, high: 1.0e-2, log: true}\n"
    )
    # the checkpoint of step 2 fails, before the first validation (step 4)
    extra = {"train.meta_batch_size": 2, "train.steps": 4, "train.eval_every": 4}
    extra |= {"train.checkpoint_every": 2, "train.dist_timeout": 90}
    command = [sys.executable, "-m", "metalm", "-q", "tune", "-c", str(config), "--nproc", "2"]
    command += ["--trials", "2", "--sampler", "random", "--seed", "0"]
    command += tiny_overrides(tiny_model_dir, tmp_path / "runs", **extra)
    limit = 1_000_000  # the checkpoint's optimizer state takes ~1.5 MB (its weights ~0.7
    # MB, the tiny BERT's with a 5,000-wordpiece vocabulary); the study's database less

    def file_size_limit() -> None:
        import resource

        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))

    started = time.monotonic()
    done = subprocess.run(
        command,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        preexec_fn=file_size_limit,
    )
    seconds = time.monotonic() - started
    assert done.returncode != 0, done.stdout[-2000:]
    assert seconds < 80, f"took {seconds:.0f} s: a rank waited for the group's timeout"
    assert done.stderr.count("could not save") >= 2, done.stderr[-3000:]  # both trials
    assert "no trial of study 'tiny' completed" in done.stderr, done.stderr[-3000:]
    assert "rank 0 stopped the study" in done.stderr, done.stderr[-3000:]
