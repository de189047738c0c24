"""`metalm.models.base`: what both model kinds share; the kind table and the choice
fields of `EncoderConfig` agree and are checked in one place."""

from __future__ import annotations

import typing

import pytest

from metalm.errors import MetalmError
from metalm.models.base import MODEL_CLASSES, EncoderConfig, ModelKind


def test_the_kind_choices_are_the_kind_table():
    assert set(typing.get_args(ModelKind)) == set(MODEL_CLASSES)


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("kind", "rnn", r"model\.kind must be one of encoder, causal; got 'rnn'"),
        ("pooling", "max", r"model\.pooling must be one of mean, cls; got 'max'"),
        ("dtype", "int8", r"model\.dtype must be one of auto, float32, bfloat16, float16"),
        ("backend", "tensorrt", r"model\.backend must be one of torch, onnx"),
    ],
)
def test_a_bad_choice_names_the_field_and_the_valid_values(field, value, message):
    with pytest.raises(MetalmError, match=message):
        EncoderConfig(**{field: value})
