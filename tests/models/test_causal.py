"""`metalm.models.causal`: loading causal LMs: a tiny random Llama saved locally (fast)
and the shipped SmolLM2-135M-Instruct GGUF (slow, real weights)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from metalm import MetalmError
from metalm.models.causal import default_causal_path, load_causal_lm


def test_a_local_directory_loads_in_eval_mode_as_float32(tiny_llama_dir):
    model, tokenizer = load_causal_lm(str(tiny_llama_dir), device="cpu")
    assert not model.training
    assert next(model.parameters()).dtype == torch.float32
    ids = tokenizer(["hello world", "hi"], return_tensors="pt", padding=True)
    logits = model(**ids).logits
    assert logits.shape[:2] == ids["input_ids"].shape
    assert logits.shape[-1] == model.config.vocab_size
    assert tokenizer.pad_token_id is not None


def test_model_dtype_loads_the_lm_in_half_precision_and_is_checked(tiny_llama_dir):
    from metalm.models.causal import CausalLM
    from metalm.models.encoder import EncoderConfig

    config = EncoderConfig(kind="causal", name_or_path=str(tiny_llama_dir), dtype="bfloat16")
    lm = CausalLM.from_config(config)
    assert next(lm.model.parameters()).dtype == torch.bfloat16
    ids = lm.tokenizer(["hello world"], return_tensors="pt")
    assert torch.isfinite(lm.model(**ids).logits.float()).all()
    auto = CausalLM.from_config(EncoderConfig(kind="causal", name_or_path=str(tiny_llama_dir)))
    assert next(auto.model.parameters()).dtype == torch.float32  # auto on the CPU
    with pytest.raises(MetalmError, match=r"model\.dtype must be one of"):
        EncoderConfig(kind="causal", dtype="fp8")
    with pytest.raises(MetalmError, match="is for causal LMs"):
        EncoderConfig(dtype="bfloat16")


def test_bad_paths_are_clear_errors(tmp_path):
    with pytest.raises(MetalmError, match="no such GGUF file"):
        load_causal_lm(str(tmp_path / "missing.gguf"))
    with pytest.raises(MetalmError, match="give a Hugging Face model id"):
        load_causal_lm(str(tmp_path / "not-a-model"))


@pytest.mark.slow
def test_the_shipped_smollm2_gguf_loads_and_knows_a_fact():
    path = default_causal_path()
    assert path.endswith(".gguf") and Path(path).is_file()
    model, tokenizer = load_causal_lm(device="cpu")
    assert sum(p.numel() for p in model.parameters()) > 100_000_000
    ids = tokenizer("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        next_token = model(**ids).logits[0, -1].argmax()
    assert tokenizer.decode(next_token).strip() == "Paris"
