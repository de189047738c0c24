"""Labeled text data, class splits and few-shot episodes."""

from metalm.data.dataset import (
    BUILTIN_DATASETS,
    LabeledTextDataset,
    builtin_dataset,
    from_hf,
    load_csv,
    load_jsonl,
)
from metalm.data.episodes import Episode, EpisodeSampler, TaskSampler, full_way_episode
from metalm.data.sources import DataSource, EvalSource, load_source
from metalm.data.splits import ClassSplit, explicit_split, split_classes

__all__ = [
    "BUILTIN_DATASETS",
    "ClassSplit",
    "DataSource",
    "Episode",
    "EpisodeSampler",
    "EvalSource",
    "LabeledTextDataset",
    "TaskSampler",
    "builtin_dataset",
    "explicit_split",
    "from_hf",
    "full_way_episode",
    "load_csv",
    "load_jsonl",
    "load_source",
    "split_classes",
]
