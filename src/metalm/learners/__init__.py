"""Few-shot learners, one registration each (see `LEARNERS`)."""

from metalm.learners.base import (
    LEARNERS,
    LearnerConfig,
    MetaLearner,
    TaskState,
    build_learner,
    learner_class,
    register_learner,
)
from metalm.learners.finetune import Finetune, FinetuneConfig
from metalm.learners.protonet import FrozenCentroids, FrozenConfig, ProtoNet, ProtoNetConfig

__all__ = [
    "LEARNERS",
    "Finetune",
    "FinetuneConfig",
    "FrozenCentroids",
    "FrozenConfig",
    "LearnerConfig",
    "MetaLearner",
    "ProtoNet",
    "ProtoNetConfig",
    "TaskState",
    "build_learner",
    "learner_class",
    "register_learner",
]
