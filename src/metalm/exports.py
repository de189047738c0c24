"""A metalm model's encoder in the formats other tools load.

`to_sentence_transformers(model, out)` writes a folder that `SentenceTransformer(out)`
loads as it is: the (meta-trained) transformer and tokenizer, then metalm's pooling
(`mean` or `cls`) and, if the model normalizes, a `Normalize` module, with metalm's
`max_length` as `max_seq_length`, so that it embeds texts as metalm does. A README
model card says where it came from.

Example:
    >>> out = to_sentence_transformers(saved_model, "st-model")
    >>> sorted(p.name for p in out.iterdir())[:4]
    ['1_Pooling', '2_Normalize', 'README.md', 'config.json']
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from metalm.atomic import replace_dir
from metalm.errors import MetalmError

FORMATS = ("metalm", "onnx", "sentence-transformers")


def add_onnx(model: str | Path, calibration: Sequence[str] = ()) -> Path:
    """Export the encoder of metalm model directory `model` for ONNX Runtime into its
    `onnx/` folder (float32 and dynamic int8, and static int8 calibrated on the texts
    `calibration` when given), so that `--backend onnx` finds them there and exports
    nothing when it loads; returns the folder."""
    from metalm.layout import ONNX_DIR, fingerprint
    from metalm.models.onnx_runtime import prepare
    from metalm.pretrained import from_pretrained

    directory = Path(model)
    learner = from_pretrained(directory, device="cpu")
    stamp = fingerprint(directory)
    # the int8 file is made from the float32 one, so one call writes both
    prepare(learner.encoder.model, directory / ONNX_DIR, "int8", stamp)
    if calibration:
        learner.encoder.use_onnx(directory / ONNX_DIR, "int8-static", stamp=stamp)
        learner.encoder.calibrate(calibration)
    return directory / ONNX_DIR


def _modules(normalize: bool) -> list[dict]:
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {
            "idx": 1,
            "name": "1",
            "path": "1_Pooling",
            "type": "sentence_transformers.models.Pooling",
        },
    ]
    if normalize:
        modules.append(
            {
                "idx": 2,
                "name": "2",
                "path": "2_Normalize",
                "type": "sentence_transformers.models.Normalize",
            }
        )
    return modules


def _pooling(dim: int, pooling: str) -> dict:
    return {
        "word_embedding_dimension": dim,
        "pooling_mode_cls_token": pooling == "cls",
        "pooling_mode_mean_tokens": pooling == "mean",
        "pooling_mode_max_tokens": False,
        "pooling_mode_mean_sqrt_len_tokens": False,
        "pooling_mode_weightedmean_tokens": False,
        "pooling_mode_lasttoken": False,
        "include_prompt": True,
    }


def _card(source: Path, learner: str, pooling: str, normalize: bool, max_length: int) -> str:
    steps = f"{pooling} pooling" + (", L2-normalized" if normalize else "")
    return f"""---
library_name: sentence-transformers
tags:
- sentence-transformers
- feature-extraction
- metalm
---

# Encoder of the metalm model `{source.name}`

The sentence encoder of a metalm `{learner}` model (`{source}`), exported by
`metalm export --format sentence-transformers`: the transformer, then {steps}, texts cut
to {max_length} tokens, as metalm embeds them. The task head is not part of it: metalm
adapts one per task from a few labeled examples.

```python
from sentence_transformers import SentenceTransformer

model = SentenceTransformer("path/to/this/folder")
embeddings = model.encode(["my card has not arrived", "how do I change my PIN?"])
```

The metalm model's own card (licenses of its weights and training data) is
`metalm_model_card.md` beside this file.
"""


def to_sentence_transformers(model: str | Path, out: str | Path) -> Path:
    """Write the encoder of metalm model directory `model` as a sentence-transformers
    folder `out` (replaced atomically); returns `out`."""
    from metalm.models.encoder import TextEncoder
    from metalm.pretrained import MODEL_CARD, from_pretrained, read_metadata, resolve_pretrained

    directory = resolve_pretrained(model)
    learner = from_pretrained(directory, device="cpu")
    encoder: TextEncoder = learner.encoder
    if getattr(encoder.model, "peft_config", None) is not None:
        raise MetalmError(f"{directory}: a LoRA-adapted encoder; merge it before exporting")
    config = encoder.config
    name = read_metadata(directory).get("learner", {}).get("name", "?")

    def write(tmp: Path) -> None:
        encoder.model.save_pretrained(str(tmp), safe_serialization=True)
        encoder.tokenizer.save_pretrained(str(tmp))
        (tmp / "modules.json").write_text(json.dumps(_modules(config.normalize), indent=2))
        (tmp / "sentence_bert_config.json").write_text(
            json.dumps({"max_seq_length": config.max_length, "do_lower_case": False}, indent=2)
        )
        (tmp / "config_sentence_transformers.json").write_text(
            json.dumps({"prompts": {}, "default_prompt_name": None, "similarity_fn_name": "cosine"})
        )
        (tmp / "1_Pooling").mkdir()
        (tmp / "1_Pooling" / "config.json").write_text(
            json.dumps(_pooling(encoder.dim, config.pooling), indent=2)
        )
        if config.normalize:
            (tmp / "2_Normalize").mkdir()
        card = _card(directory, name, config.pooling, config.normalize, config.max_length)
        (tmp / "README.md").write_text(card, encoding="utf-8")
        if (directory / MODEL_CARD).exists():
            (tmp / "metalm_model_card.md").write_text(
                (directory / MODEL_CARD).read_text(encoding="utf-8"), encoding="utf-8"
            )

    return replace_dir(out, write)
