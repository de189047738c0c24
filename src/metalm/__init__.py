"""metalm: meta-learning with language models.

Example:
    >>> import metalm
    >>> config = metalm.load_config(None, tiny)  # overrides, e.g. ["train.steps=50"]
    >>> report = metalm.run(config, progress=False)
    >>> [(result.method, result.protocol) for result in report.results]
    [('protonet', '3-way 1-shot')]
"""

from metalm.errors import MetalmError

try:
    import torch as _torch
except ImportError:  # an install for inference on ONNX Runtime only: metalm.onnx_predict
    __all__ = ["MetalmError"]
else:
    from metalm.classifier import FewShotClassifier
    from metalm.config import RunConfig, load_config
    from metalm.data import DataSource, Episode, EpisodeSampler, LabeledTextDataset
    from metalm.learners import LEARNERS, LearnerConfig, MetaLearner, build_learner
    from metalm.models import EncoderConfig, TextEncoder
    from metalm.pretrained import from_pretrained, save_pretrained
    from metalm.runs.accuracy import MethodResult
    from metalm.runs.existing import evaluate_run, resume_run
    from metalm.runs.recipe import run
    from metalm.runs.report import EvalReport
    from metalm.trainer import MetaTrainer

    del _torch

    __all__ = [
        "LEARNERS",
        "DataSource",
        "EncoderConfig",
        "Episode",
        "EpisodeSampler",
        "EvalReport",
        "FewShotClassifier",
        "LabeledTextDataset",
        "LearnerConfig",
        "MetaLearner",
        "MetaTrainer",
        "MetalmError",
        "MethodResult",
        "RunConfig",
        "TextEncoder",
        "build_learner",
        "evaluate_run",
        "from_pretrained",
        "load_config",
        "resume_run",
        "run",
        "save_pretrained",
    ]
