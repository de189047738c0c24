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
from metalm.learners.functional import inner_loop, select_params
from metalm.learners.gradient import EncoderAdaptConfig, GradientConfig, GradientLearner
from metalm.learners.lstm_meta import LSTMMeta, LSTMMetaConfig
from metalm.learners.maml import (
    ANIL,
    FOMAML,
    MAML,
    ANILConfig,
    FOMAMLConfig,
    MAMLConfig,
    MetaSGD,
    MetaSGDConfig,
)
from metalm.learners.metanet import MetaNet, MetaNetConfig
from metalm.learners.protonet import FrozenCentroids, FrozenConfig, ProtoNet, ProtoNetConfig
from metalm.learners.proximal import Proximal, ProximalConfig
from metalm.learners.reptile import Reptile, ReptileConfig

__all__ = [
    "ANIL",
    "FOMAML",
    "LEARNERS",
    "MAML",
    "ANILConfig",
    "EncoderAdaptConfig",
    "FOMAMLConfig",
    "Finetune",
    "FinetuneConfig",
    "FrozenCentroids",
    "FrozenConfig",
    "GradientConfig",
    "GradientLearner",
    "LSTMMeta",
    "LSTMMetaConfig",
    "LearnerConfig",
    "MAMLConfig",
    "MetaLearner",
    "MetaNet",
    "MetaNetConfig",
    "MetaSGD",
    "MetaSGDConfig",
    "ProtoNet",
    "ProtoNetConfig",
    "Proximal",
    "ProximalConfig",
    "Reptile",
    "ReptileConfig",
    "TaskState",
    "build_learner",
    "inner_loop",
    "learner_class",
    "register_learner",
    "select_params",
]
