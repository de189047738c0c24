"""Saves a second version of a model directory, a task directory and a checkpoint under
a small file-size limit (`RLIMIT_FSIZE`, as `ulimit -f` sets), each write cut short with
EFBIG; prints each save's outcome as JSON. Run by `tests/test_write_faults.py`:

    python tests/write_fault_child.py TINY_MODEL_DIR WORK_DIR
"""

from __future__ import annotations

import json
import resource
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from run_tools import TEXTS, tiny_learner

from metalm import FewShotClassifier, save_pretrained
from metalm.checkpoint import save_checkpoint
from metalm.errors import WriteFailed

# each limit lets the small files through and cuts the largest one short
LIMITS = {"model": 64_000, "checkpoint": 64_000, "task": 256}


def second_versions(model_dir: Path, work: Path) -> dict:
    """What each save writes: other weights, another task, a later step."""
    learner = tiny_learner(model_dir, "protonet")
    with torch.no_grad():
        for parameter in learner.parameters():
            parameter.mul_(1.5)
    task = FewShotClassifier.from_pretrained(work / "model", device="cpu")
    task.adapt(TEXTS[:4], ["a", "a", "b", "b"])
    optimizer = torch.optim.AdamW(learner.parameters())
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    return {
        "model": lambda: save_pretrained(learner, work / "model"),
        "task": lambda: task.save_task(work / "task"),
        "checkpoint": lambda: save_checkpoint(
            work / "checkpoint", learner, optimizer, scheduler, {"step": 2}
        ),
    }


def main(model_dir: Path, work: Path) -> None:
    saves = second_versions(model_dir, work)
    _soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    outcome = {}
    for name, save in saves.items():
        resource.setrlimit(resource.RLIMIT_FSIZE, (LIMITS[name], hard))
        try:
            save()
            outcome[name] = "saved"
        except WriteFailed as err:
            outcome[name] = str(err)
        finally:
            resource.setrlimit(resource.RLIMIT_FSIZE, (hard, hard))
    print(json.dumps(outcome))


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
