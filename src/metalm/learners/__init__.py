"""Few-shot learners, one registration each (see `LEARNERS`)."""

from metalm.learners.adapted_params import select_params
from metalm.learners.base import (
    LEARNERS,
    LearnerConfig,
    MetaLearner,
    TaskState,
    build_learner,
    learner_class,
    method_label,
    register_learner,
)
from metalm.learners.finetune import Finetune, FinetuneConfig
from metalm.learners.gradient import EncoderAdaptConfig, GradientConfig, GradientLearner
from metalm.learners.heads import fit_logreg
from metalm.learners.icl import ICL, ICLConfig, MetaICL, MetaICLConfig
from metalm.learners.inner_loops import inner_loop
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
from metalm.learners.protonet import (
    HEADS,
    EmbeddingHeadConfig,
    FrozenCentroids,
    FrozenConfig,
    ProtoNet,
    ProtoNetConfig,
)
from metalm.learners.proximal import Proximal, ProximalConfig
from metalm.learners.reptile import Reptile, ReptileConfig

__all__ = [
    "ANIL",
    "FOMAML",
    "HEADS",
    "ICL",
    "LEARNERS",
    "MAML",
    "ANILConfig",
    "EmbeddingHeadConfig",
    "EncoderAdaptConfig",
    "FOMAMLConfig",
    "Finetune",
    "FinetuneConfig",
    "FrozenCentroids",
    "FrozenConfig",
    "GradientConfig",
    "GradientLearner",
    "ICLConfig",
    "LSTMMeta",
    "LSTMMetaConfig",
    "LearnerConfig",
    "MAMLConfig",
    "MetaICL",
    "MetaICLConfig",
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
    "fit_logreg",
    "inner_loop",
    "learner_class",
    "method_label",
    "register_learner",
    "select_params",
]
