"""`metalm.models.tiny`: the tiny random models of the tests, with MiniLM's tokenizer cut
to its most frequent wordpieces."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from metalm.models.encoder import default_model_path
from metalm.models.tiny import cut_vocabulary

TEXTS = [
    "my card hasn't arrived yet, what's the ETA?",
    "Zürich übersetzung naïve café",
    "cryptocurrency exchange 1234",
]


def test_the_tests_tokenizer_is_minilms_cut(tiny_model_dir, tiny_llama_dir):
    full = AutoTokenizer.from_pretrained(default_model_path())
    cut = AutoTokenizer.from_pretrained(tiny_model_dir)
    assert cut.vocab_size == 5000 < full.vocab_size
    config = json.loads((tiny_model_dir / "config.json").read_text())
    assert config["vocab_size"] == cut.vocab_size  # the embedding table has one row each
    llama = json.loads((tiny_llama_dir / "config.json").read_text())
    assert llama["vocab_size"] == AutoTokenizer.from_pretrained(tiny_llama_dir).vocab_size == 5000
    for text in TEXTS:
        ids = cut(text)["input_ids"]
        assert ids[0] == cut.cls_token_id and ids[-1] == cut.sep_token_id
        assert cut.unk_token_id not in ids  # every character is kept: no unknown words
        # the same words (lower-cased, accents as MiniLM's has them), in more pieces
        assert cut.decode(ids, skip_special_tokens=True) == full.decode(
            full(text)["input_ids"], skip_special_tokens=True
        )
    assert cut.pad_token_id == cut.convert_tokens_to_ids("[PAD]") == 0
    # frequent words stay whole; rarer ones are spelt in pieces
    assert cut.tokenize("the card") == ["the", "card"]
    assert len(cut.tokenize("cryptocurrency")) > len(full.tokenize("cryptocurrency"))


def test_a_vocabulary_too_small_for_every_character_is_refused(tiny_model_dir, tmp_path: Path):
    tokenizer_file = tmp_path / "tokenizer.json"
    shutil.copy(tiny_model_dir / "tokenizer.json", tokenizer_file)
    with pytest.raises(ValueError, match="vocab_size must be at least"):
        cut_vocabulary(tokenizer_file, 100)
    cut_vocabulary(tokenizer_file, 4000)  # cut again: the 4,000 first of the 5,000
    assert AutoTokenizer.from_pretrained(tmp_path).vocab_size == 4000
