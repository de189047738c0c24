"""Text encoders."""

from metalm.models.encoder import EncoderConfig, TextEncoder, default_model_path

__all__ = ["EncoderConfig", "TextEncoder", "default_model_path"]
