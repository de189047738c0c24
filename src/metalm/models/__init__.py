"""Text encoders and causal LMs (the model kinds of `metalm.models.base`)."""

from metalm.models.base import EncoderConfig
from metalm.models.encoder import TextEncoder, default_model_path

__all__ = ["EncoderConfig", "TextEncoder", "default_model_path"]
