"""Studies: storage (an embedded journal file, or an RDB URL), the Optuna samplers and
pruners that `metalm.tune.options` names, warm start from earlier studies, and recovery
from workers killed mid-trial.

Example:
    >>> from metalm.tune import TuneOptions
    >>> study = open_study("runs/tune", TuneOptions(sampler="tpe", pruner="median"))
    >>> study.directions
    [<StudyDirection.MAXIMIZE: 2>]
"""

from __future__ import annotations

import os
import random
import socket
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState

from metalm.errors import MetalmError, first_line
from metalm.tune.options import TuneOptions, check_pruner, check_sampler
from metalm.tune.optuna_private import set_trial_state

JOURNAL_FILE = "study.journal"
RDB_PREFIXES = ("postgresql", "postgres", "mysql", "sqlite", "oracle", "mssql")
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)


def is_rdb_url(url: str) -> bool:
    return "://" in url and url.split("://", 1)[0].split("+", 1)[0] in RDB_PREFIXES


def journal_storage(path: str | Path) -> optuna.storages.JournalStorage:
    """A study file that several local processes can share (file-locked appends)."""
    from optuna.storages.journal import JournalFileBackend

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return optuna.storages.JournalStorage(JournalFileBackend(str(path)))


def _retry_callback():
    """Re-queue a trial whose worker stopped beating (Optuna >= 4.9 name, older alias)."""
    retry = getattr(optuna.storages, "RetryHeartbeatStaleTrialCallback", None)
    if retry is None:
        retry = optuna.storages.RetryFailedTrialCallback
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return retry(max_retry=1)


def make_storage(url: str | None, study_dir: str | Path, heartbeat: int = 60):
    """`None`: the embedded journal file `study_dir/study.journal`; a `.journal` path or
    `journal:PATH`: that file; an RDB URL (`postgresql://user@host/db`): that database,
    with heartbeats so that a killed worker's trial is failed and retried."""
    if url is None:
        return journal_storage(Path(study_dir) / JOURNAL_FILE)
    if url.startswith("journal:"):
        return journal_storage(url.removeprefix("journal:"))
    if is_rdb_url(url):
        if url.startswith("postgres://"):
            url = "postgresql://" + url.removeprefix("postgres://")
        # workers starting together on a fresh database race to create the tables:
        # the losers see a duplicate-key error, and the tables exist when they retry
        for attempt in range(5):
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                    return optuna.storages.RDBStorage(
                        url,
                        heartbeat_interval=heartbeat,
                        grace_period=2 * heartbeat,
                        heartbeat_stale_trial_callback=_retry_callback(),
                        engine_kwargs=None if url.startswith("sqlite") else {"pool_pre_ping": True},
                    )
            except Exception as err:  # sqlalchemy/driver errors: one clear line
                racing = "duplicate key" in str(err) or "already exists" in str(err)
                if attempt == 4 or not racing:
                    first = first_line(err)
                    raise MetalmError(f"cannot open storage {url!r}: {first}") from None
                time.sleep(0.5 + random.random())
    if url.endswith(".journal") or Path(url).is_file():
        return journal_storage(url)
    raise MetalmError(
        f"--storage {url!r}: give an RDB URL (postgresql://user:pw@host:5432/db, sqlite:///f.db) "
        "or a journal file (path ending in .journal)"
    )


def make_sampler(
    name: str,
    seed: int | None = None,
    multi_objective: bool = False,
    startup_trials: int | None = None,
):
    """The Optuna sampler `name`. `startup_trials`: random trials before the model-based
    samplers (tpe, gp, cmaes) take over (None: Optuna's default, 10); small budgets
    want fewer."""
    check_sampler(name, startup_trials)
    startup = {} if startup_trials is None else {"n_startup_trials": startup_trials}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        if name == "random":
            return optuna.samplers.RandomSampler(seed=seed)
        if name == "tpe":
            # multivariate + group: conditional parameters get their own sub-models
            return optuna.samplers.TPESampler(seed=seed, multivariate=True, group=True, **startup)
        if name == "nsga2":
            return optuna.samplers.NSGAIISampler(seed=seed)
        if multi_objective and name == "cmaes":
            raise MetalmError("the cmaes sampler is single-objective; use tpe, gp or nsga2")
        try:
            if name == "gp":
                import scipy  # noqa: F401  (GPSampler needs scipy and torch)

                return optuna.samplers.GPSampler(
                    seed=seed, warn_independent_sampling=False, **startup
                )
            import cmaes  # noqa: F401

            return optuna.samplers.CmaEsSampler(
                seed=seed, warn_independent_sampling=False, **startup
            )
        except ImportError as err:
            raise MetalmError(
                f"the {name} sampler needs {err.name}: pip install 'metalm[tune]'"
            ) from None


def make_pruner(name: str, max_steps: int = 0, eval_every: int = 1):
    """`median`: below the median of earlier trials at the same step; `asha`: successive
    halving; `hyperband`: several ASHA brackets; resources are training steps."""
    check_pruner(name)
    if name == "none":
        return optuna.pruners.NopPruner()
    if name == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=0)
    if name == "asha":
        return optuna.pruners.SuccessiveHalvingPruner(min_resource=max(1, eval_every))
    return optuna.pruners.HyperbandPruner(
        min_resource=max(1, eval_every), max_resource=max(max_steps, eval_every, 1)
    )


def open_study(
    study_dir: str | Path, options: TuneOptions, max_steps: int = 0, eval_every: int = 1
) -> optuna.Study:
    """Create the study `options` describe, or load it to continue (other workers, a
    restart); `max_steps`/`eval_every` (the base config's) size the pruners."""
    directions = options.directions
    multi = len(directions) > 1
    study = optuna.create_study(
        study_name=options.study_name,
        storage=make_storage(options.storage, study_dir, options.heartbeat),
        sampler=make_sampler(options.sampler, options.seed, multi, options.startup_trials),
        pruner=make_pruner("none" if multi else options.pruner, max_steps, eval_every),
        directions=directions,
        load_if_exists=True,
    )
    if list(study.directions) != [optuna.study.StudyDirection[d.upper()] for d in directions]:
        raise MetalmError(
            f"study {options.study_name!r} exists with other objectives; pick another --study-name"
        )
    fail_dead_local_trials(study)
    return study


def mark_worker(trial: optuna.Trial) -> None:
    """Record which process runs `trial` (to recover it if that process dies)."""
    trial.set_user_attr("host", socket.gethostname())
    trial.set_user_attr("pid", os.getpid())


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def fail_dead_local_trials(study: optuna.Study) -> list[int]:
    """Trials left RUNNING by a dead worker of this machine become FAIL, and their
    parameters are queued again. (RDB storages also do this through heartbeats.)"""
    host, failed = socket.gethostname(), []
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        pid = trial.user_attrs.get("pid")
        if trial.user_attrs.get("host") != host or not isinstance(pid, int) or _alive(pid):
            continue
        try:
            set_trial_state(study, trial, TrialState.FAIL)
        except (RuntimeError, optuna.exceptions.UpdateFinishedTrialError):
            continue  # another worker got there first
        failed.append(trial.number)
        if trial.params:
            study.enqueue_trial(trial.params, user_attrs={"retry_of": trial.number})
    return failed


def load_source_study(source: str) -> optuna.Study:
    """An earlier study: a study directory, a journal file, or `URL#study_name`."""
    url, _, name = source.partition("#") if is_rdb_url(source) else (source, "", "")
    path = Path(url)
    if is_rdb_url(url):
        storage: Any = optuna.storages.RDBStorage(url)
    elif path.is_dir() and (path / JOURNAL_FILE).exists():
        storage = journal_storage(path / JOURNAL_FILE)
    elif path.is_file():
        storage = journal_storage(path)
    else:
        raise MetalmError(f"--warm-start-from {source!r}: no study there (no {JOURNAL_FILE})")
    names = optuna.study.get_all_study_names(storage)
    if not name:
        if len(names) != 1:
            raise MetalmError(f"{source!r} holds studies {names}; name one as SOURCE#name")
        name = names[0]
    if name not in names:
        raise MetalmError(f"{source!r} holds no study {name!r} (it holds {names})")
    return optuna.load_study(study_name=name, storage=storage)


def warm_start(
    study: optuna.Study, sources: Sequence[str], space_names: Sequence[str], top_k: int = 1
) -> list[dict[str, Any]]:
    """Queue the `top_k` best configurations of each earlier study (only the parameters
    the new space has) ahead of the sampler; already queued or tried ones are skipped."""
    queued = []
    for source in sources:
        earlier = load_source_study(source)
        if len(earlier.directions) != 1:
            raise MetalmError(f"--warm-start-from {source!r}: a multi-objective study")
        done = [t for t in earlier.get_trials(states=(TrialState.COMPLETE,)) if t.value is not None]
        reverse = earlier.direction == optuna.study.StudyDirection.MAXIMIZE
        for trial in sorted(done, key=lambda t: t.value, reverse=reverse)[:top_k]:
            params = {k: v for k, v in trial.params.items() if k in space_names}
            if params:
                study.enqueue_trial(
                    params,
                    user_attrs={"warm_start_from": f"{source}:{trial.number}"},
                    skip_if_exists=True,
                )
                queued.append(params)
    return queued


def finished_count(study: optuna.Study) -> int:
    return len(study.get_trials(deepcopy=False, states=FINISHED))
