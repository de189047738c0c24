"""`metalm <command>`: a thin shell over the Python API (`metalm.runs.recipe` and friends).

`main` runs one command and turns errors users can fix into exit codes; `parser` builds
the arguments, `train_commands` and `use_commands` hold the commands themselves.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

from metalm.cli.parser import build_parser
from metalm.cli.train_commands import (
    cmd_compare,
    cmd_datasets,
    cmd_demo,
    cmd_eval,
    cmd_overlap,
    cmd_sample,
    cmd_train,
    cmd_tune,
)
from metalm.cli.use_commands import cmd_adapt, cmd_export, cmd_predict, cmd_score, cmd_serve
from metalm.errors import MetalmError

__all__ = [
    "build_parser",
    "cmd_adapt",
    "cmd_compare",
    "cmd_datasets",
    "cmd_demo",
    "cmd_eval",
    "cmd_export",
    "cmd_overlap",
    "cmd_predict",
    "cmd_sample",
    "cmd_score",
    "cmd_serve",
    "cmd_train",
    "cmd_tune",
    "main",
]


def main(argv: Sequence[str] | None = None) -> int:
    if argv is not None and any("\0" in token for token in argv):  # a shell cannot pass one
        print("error: an argument contains a NUL byte; remove it", file=sys.stderr)
        return 2
    args = build_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # for --nproc's relaunch
    if args.quiet:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    meet_peers = False  # every rank ends here alike: meet before leaving the group
    try:
        args.func(args)
        sys.stdout.flush()  # a closed pipe shows here, not at exit
        meet_peers = True
    except MetalmError as err:
        print(f"error{_rank_suffix()}: {err}", file=sys.stderr)
        meet_peers = getattr(err, "all_ranks_know", False)
        return 2
    except BrokenPipeError:  # the reader stopped early (`metalm predict ... | head`)
        _silence_stdout()
        return 128 + 13  # as a process killed by SIGPIPE, quietly
    except OSError as err:  # a path the user gave: missing, a directory, not writable, ...
        where = f"{err.filename}: " if err.filename else ""
        print(f"error: {where}{err.strerror or err}; check the path", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    finally:
        if "metalm.distributed" in sys.modules:  # only a training command imports it
            sys.modules["metalm.distributed"].teardown(wait_for_peers=meet_peers)
    return 0


def _silence_stdout() -> None:
    """Point stdout at /dev/null, so that Python's flush at exit does not fail again."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())


def _rank_suffix() -> str:
    """` (rank R)` in a process of a distributed run, else nothing."""
    module = sys.modules.get("metalm.distributed")
    where = module.world() if module is not None else None
    return f" (rank {where.rank})" if where is not None and where.distributed else ""
