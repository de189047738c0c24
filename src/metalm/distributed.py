"""Data-parallel meta-training on `torch.distributed`: the process group, each rank's
share of a meta-batch, and one all-reduce of the meta-gradients per step.

Launch with `torchrun --nproc-per-node N -m metalm train ...`, or `metalm train --nproc N
...` (the same through torch's elastic launcher). Every rank builds the same learner and
samplers; step `s` takes the episodes `s * B + i` (B = `train.meta_batch_size`), rank `r`
of `W` the contiguous share `i in [r * B/W, (r + 1) * B/W)`: none is seen twice, none
skipped. The backend is gloo on CPU and NCCL on CUDA (each rank on `cuda:LOCAL_RANK`).

Why an explicit all-reduce and not `DistributedDataParallel`: DDP reduces gradients from
hooks armed by its own `forward`, once per backward. The meta-loss is no module forward
(inner loops run through `torch.func.functional_call` on a dict of tensors), the trainer
accumulates one backward per episode, and which parameters get a gradient depends on the
learner (a head-only inner loop, Meta-SGD's rates). So each rank accumulates the
gradients of its episodes, each loss weighted by `1/B`, and `all_reduce_gradients` sums
them over the ranks in one flat all-reduce: the sum is the gradient of the global
meta-batch mean, exactly what one process with meta-batch B computes (up to the order of
float additions). Clipping, hypergradient steps and AdamW then run on identical
gradients and weights on every rank.

Example:
    >>> world = setup("auto")             # under torchrun: joins the group; else World()
    >>> list(shard(8, World(rank=1, size=2)))
    [4, 5, 6, 7]
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import Tensor

from metalm.errors import MetalmError, first_line

BACKENDS = ("auto", "gloo", "nccl")
BACKEND_ENV = "METALM_DIST_BACKEND"  # how `metalm train --backend` reaches the workers

T = TypeVar("T")


@dataclass(frozen=True)
class World:
    """This process's place among the training processes (one process: rank 0 of 1)."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        """Rank 0: the one that logs, validates and writes checkpoints."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


class StoppedByMain(MetalmError):
    """Raised on ranks other than 0 when rank 0 stopped training with an exception (e.g.
    a pruned trial, a checkpoint it could not save); rank 0 raises the exception itself.
    Every rank stops at the same point, so the group stays in step."""

    # every rank stops with it at the same point: they can meet before leaving the group
    all_ranks_know = True


def launched() -> bool:
    """Whether this process is one of several started by torchrun (WORLD_SIZE > 1)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def world() -> World:
    """This process's `World`: from the process group once `setup` joined it."""
    if dist.is_available() and dist.is_initialized():
        local = int(os.environ.get("LOCAL_RANK", "0"))
        return World(dist.get_rank(), dist.get_world_size(), local)
    return World()


def pick_backend(device: str = "auto", backend: str = "auto") -> str:
    """`gloo` or `nccl` for a run on `device` (`model.device`): NCCL when the model
    runs on CUDA, gloo on CPU; an explicit `nccl` needs CUDA."""
    if backend not in BACKENDS:
        raise MetalmError(f"--backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    on_cuda = torch.cuda.is_available() if device == "auto" else device.startswith("cuda")
    if backend == "nccl" and not (torch.cuda.is_available() and dist.is_nccl_available()):
        raise MetalmError(
            "--backend nccl needs CUDA GPUs and a torch built with NCCL; none here: "
            "use --backend gloo (the default on CPU)"
        )
    if backend == "nccl" and not on_cuda:
        raise MetalmError(f"--backend nccl needs the model on CUDA; model.device is {device!r}")
    if backend == "auto":
        return "nccl" if on_cuda and dist.is_nccl_available() else "gloo"
    return backend


def setup(device: str = "auto", backend: str | None = None, timeout: float = 7200.0) -> World:
    """Join the process group that torchrun describes in the environment (once); in a
    single process, nothing to do. On CUDA each rank takes `cuda:LOCAL_RANK`, so
    `model.device` must be `auto` or `cuda`, not one named GPU. `timeout`: seconds a
    collective waits for the other ranks (`train.dist_timeout`; NCCL's own default, 10
    minutes, is shorter than rank 0's evaluation of a causal LM)."""
    if not launched() or (dist.is_available() and dist.is_initialized()):
        return world()
    if not dist.is_available():
        raise MetalmError("this torch build has no torch.distributed; train in one process")
    chosen = pick_backend(device, backend or os.environ.get(BACKEND_ENV, "auto"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device.startswith("cuda") and ":" in device:
        raise MetalmError(
            f"model.device={device} names one GPU, but each training process takes its own "
            "(cuda:LOCAL_RANK): set model.device=auto or cuda"
        )
    if chosen == "nccl" or (device != "cpu" and torch.cuda.is_available()):
        local_size = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        if local_size > torch.cuda.device_count():
            raise MetalmError(
                f"{local_size} processes on this machine but {torch.cuda.device_count()} "
                "GPU(s): start at most one process per GPU (--nproc)"
            )
        torch.cuda.set_device(local)
    dist.init_process_group(chosen, timeout=datetime.timedelta(seconds=timeout))
    return world()


def teardown(wait_for_peers: bool = False) -> None:
    """Leave the process group (if this process joined one). `wait_for_peers` (after a
    command that succeeded on every rank): meet the other ranks first, so that no rank
    tears down its connections while another still uses them (a process whose peer has
    gone can abort at exit)."""
    if dist.is_available() and dist.is_initialized():
        if wait_for_peers and dist.get_world_size() > 1:
            dist.barrier()
        dist.destroy_process_group()


def check_meta_batch(meta_batch_size: int, processes: int) -> None:
    """Each process takes an equal share of the meta-batch: at least one episode."""
    if processes > meta_batch_size:
        raise MetalmError(
            f"{processes} processes but train.meta_batch_size={meta_batch_size}: each "
            f"process needs at least one episode per step; use at most {meta_batch_size} "
            "processes or raise train.meta_batch_size"
        )
    if meta_batch_size % processes:
        raise MetalmError(
            f"train.meta_batch_size={meta_batch_size} is not divisible by the {processes} "
            "processes: every process takes an equal share of each meta-batch; pick a "
            f"multiple of {processes}"
        )


def shard(meta_batch_size: int, where: World) -> range:
    """The positions `i` of a meta-batch that rank `where.rank` computes (contiguous)."""
    check_meta_batch(meta_batch_size, where.size)
    per = meta_batch_size // where.size
    return range(where.rank * per, (where.rank + 1) * per)


def all_reduce_gradients(params: Sequence[Tensor], loss: float) -> float:
    """Sum `.grad` of `params` and the (already share-weighted) `loss` over all ranks,
    in place; returns the summed loss. A gradient that is None on every rank stays None
    (as in one process); one that is None on some ranks counts as zeros there.
    In one process it returns `loss` and touches nothing."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return loss
    device = params[0].device if params else torch.device("cpu")
    present = torch.tensor(
        [float(p.grad is not None) for p in params] + [loss], dtype=torch.float64, device=device
    )
    dist.all_reduce(present)
    by_dtype: dict[torch.dtype, list[tuple[int, Tensor]]] = {}
    for i, p in enumerate(params):
        by_dtype.setdefault(p.dtype, []).append((i, p))
    for group in by_dtype.values():  # one flat all-reduce per dtype (usually one)
        flat = torch.cat(
            [(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for _, p in group]
        )
        dist.all_reduce(flat)
        offset = 0
        for i, p in group:
            summed = flat[offset : offset + p.numel()].view_as(p)
            offset += p.numel()
            if p.grad is not None:
                p.grad.copy_(summed)
            elif present[i] > 0:
                p.grad = summed.clone()
    return float(present[-1])


def broadcast_object(obj: T, src: int = 0) -> T:
    """Rank `src`'s `obj` on every rank (picklable objects); itself in one process."""
    if not (dist.is_available() and dist.is_initialized()):
        return obj
    box: list[Any] = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def on_main(action: Callable[[], T], what: str) -> T | None:
    """Run `action` on rank 0 alone (what it returns; None on the others) and tell every
    rank whether it failed: rank 0 re-raises its error, the others raise `StoppedByMain`
    with its message, so no rank waits in a collective for a rank that has stopped.
    In one process: `action()`.

    Example:
        >>> on_main(lambda: 2 + 2, "adding")
        4
    """
    where = world()
    if not where.distributed:
        return action()
    result, error = None, None
    if where.is_main:
        try:
            result = action()
        except BaseException as err:  # re-raised below, after the others know
            error = err
    failed = broadcast_object(None if error is None else first_line(error))
    if error is not None:
        with contextlib.suppress(AttributeError):  # some built-in errors take no attributes
            error.all_ranks_know = True  # type: ignore[attr-defined]
        raise error
    if failed is not None:
        raise StoppedByMain(f"rank 0 stopped while {what}: {failed}")
    return result


def barrier() -> None:
    """Wait until every rank gets here (no-op in one process)."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def state_digest(state: dict[str, Tensor]) -> str:
    """A hash of tensors (e.g. a sampler's state), to compare them across ranks."""
    digest = hashlib.sha256()
    for key in sorted(state):
        value = state[key].detach().cpu().contiguous()
        digest.update(key.encode() + str(value.dtype).encode() + str(tuple(value.shape)).encode())
        digest.update(value.view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def same_on_all_ranks(state: dict[str, Tensor]) -> bool:
    """Whether every rank holds equal `state` (True in one process)."""
    if not (dist.is_available() and dist.is_initialized()):
        return True
    digests: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(digests, state_digest(state))
    return len(set(digests)) == 1


def launch(argv: Sequence[str], nproc: int) -> None:
    """Run `python -m metalm ARGV` in `nproc` processes through torch's elastic launcher
    (`torchrun --standalone`: a free port on this machine); raises `MetalmError` when a
    process fails (its own error is printed above)."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser
    from torch.distributed.run import run as torch_run

    if nproc < 1:
        raise MetalmError(f"--nproc must be >= 1, got {nproc}")
    threads = max(1, (os.cpu_count() or 1) // nproc)
    os.environ.setdefault("OMP_NUM_THREADS", str(threads))  # torchrun's default is 1
    args = get_args_parser().parse_args(
        ["--standalone", f"--nproc-per-node={nproc}", "--module", "metalm", *argv]
    )
    try:
        torch_run(args)
    except ChildFailedError as err:
        failures = ", ".join(
            f"rank {rank} exit code {failure.exitcode}"
            for rank, failure in sorted(err.failures.items())
        )
        raise MetalmError(
            f"meta-training in {nproc} processes failed ({failures}); see the error above"
        ) from None
    except SignalException as err:  # the launcher was stopped (SIGTERM, ...): so are they
        raise MetalmError(
            f"stopped by signal {err.sigval.name}; the {nproc} processes were stopped too "
            "(a run continues from its last checkpoint with --resume RUN_DIR)"
        ) from None


def check_learner(learner: Any, steps: int) -> None:
    """Under several processes, refuse a run that would not meta-train: they would only
    evaluate the same thing side by side."""
    if launched() and not (getattr(learner, "meta_trainable", False) and steps > 0):
        what = f"learner {learner.name!r} does not meta-train" if steps > 0 else "train.steps=0"
        raise MetalmError(
            f"{what}: there is nothing to split across processes; run it in one process "
            "(without torchrun or --nproc)"
        )
    config = getattr(learner, "config", None)
    model = getattr(getattr(learner, "encoder", None), "model", None)
    vectorized = launched() and getattr(config, "vectorize", False) and model is not None
    if vectorized and any(isinstance(m, torch.nn.Dropout) and m.p > 0 for m in model.modules()):
        raise MetalmError(
            "learner.vectorize=true draws the dropout of a whole vmapped meta-batch at "
            "once, so several processes would not train as one does: set "
            "learner.vectorize=false under torchrun/--nproc (or use a model without dropout)"
        )


def announce(kind: str, payload: Any = None) -> None:
    """On rank 0 of a distributed `metalm tune`: tell the other ranks what to run next
    (`trial`, `run`), that the study is `done`, or that it `failed` (payload: rank 0's
    error, see `announce_failure`) (see `follow`); a no-op elsewhere."""
    where = world()
    if where.distributed and where.is_main:
        broadcast_object((kind, payload))


def announce_failure(err: BaseException) -> None:
    """On rank 0 of a distributed `metalm tune` that stops with `err`: the other ranks
    stop with its message (a no-op elsewhere)."""
    where = world()
    if where.distributed and where.is_main:
        broadcast_object(("failed", first_line(err)))
        with contextlib.suppress(AttributeError):
            err.all_ranks_know = True  # type: ignore[attr-defined]


def follow(handlers: dict[str, Any]) -> None:
    """On the other ranks: run `handlers[kind](payload)` for each announcement of rank 0
    until `done`, or raise `StoppedByMain` when rank 0 announces that it `failed`. A
    `MetalmError` (the same config fails alike on rank 0, or rank 0 stopped the trial,
    e.g. pruned it) moves on to the next announcement.

    Example:
        >>> follow({"trial": lambda job: meta_train(*job), "run": run})  # doctest: +SKIP
    """
    while True:
        kind, payload = broadcast_object(None)
        if kind == "done":
            return
        if kind == "failed":
            raise StoppedByMain(f"rank 0 stopped the study: {payload}")
        try:
            handlers[kind](payload)
        except MetalmError:
            continue
