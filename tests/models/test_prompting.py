"""`metalm.models.prompting`: prompts from support sets, packed and cached scoring,
calibration, channel scoring."""

from __future__ import annotations

import pytest
import torch

from metalm import MetalmError
from metalm.label_names import verbalize
from metalm.models.causal import load_causal_lm
from metalm.models.prompting import (
    CHANNEL_TEMPLATE,
    PromptScorer,
    PromptTemplate,
    build_prefix,
)

# -- in-context scoring ------------------------------------------------------------------
SUPPORT = ["will it rain today", "set an alarm for 7", "play some jazz", "is it sunny out"]


SUPPORT_LABELS = ["weather", "alarm", "music", "weather"]


def plain_prompt_score(model, tokenizer, prompt: str, target: str) -> float:
    """The reference: the whole prompt and target in one plain forward pass (no cache,
    no packing, no custom mask), mean log-probability of the target's tokens."""
    ids = lambda text: tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]  # noqa: E731
    context, tail = ids(prompt), ids(target)
    with torch.no_grad():
        logits = model(torch.cat([context, tail], 1)).logits[0]
    logprobs = logits[context.shape[1] - 1 : -1].log_softmax(-1)
    return float(logprobs.gather(1, tail[0][:, None]).mean())


def test_verbalize_and_seeded_prefix():
    assert verbalize("card_arrival") == "card arrival"
    assert verbalize("get-  balance") == "get balance"
    a = build_prefix(SUPPORT, SUPPORT_LABELS, seed=1)
    assert a == build_prefix(SUPPORT, SUPPORT_LABELS, seed=1)
    assert a != build_prefix(SUPPORT, SUPPORT_LABELS, seed=2)  # another order
    assert all(
        f"Input: {t}\nIntent: {y}\n" in a for t, y in zip(SUPPORT, SUPPORT_LABELS, strict=True)
    )
    with pytest.raises(MetalmError, match="as many labels as texts"):
        build_prefix(SUPPORT, SUPPORT_LABELS[:2])


def test_packed_cached_scores_equal_plain_full_prompt_scores(tiny_llama_dir):
    model, tokenizer = load_causal_lm(str(tiny_llama_dir), device="cpu")
    scorer = PromptScorer(model, tokenizer)
    prefix = build_prefix(SUPPORT, SUPPORT_LABELS)
    queries, labels = ["rain tomorrow?", "wake me at six"], ["weather", "alarm clock", "music"]
    cached = scorer.score(prefix, queries, labels, use_cache=True)
    full = scorer.score(prefix, queries, labels, use_cache=False)
    assert cached.shape == (2, 3)
    plain = torch.tensor(
        [
            [
                plain_prompt_score(model, tokenizer, prefix + f"Input: {q}\nIntent:", " " + y)
                for y in labels
            ]
            for q in queries
        ]
    )
    torch.testing.assert_close(cached, plain, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(full, plain, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(cached[:, 0], cached[:, 1])  # labels are told apart


def test_packing_splits_long_batches_into_chunks_with_the_same_scores(tiny_llama_dir, monkeypatch):
    from metalm.models import prompting

    model, tokenizer = load_causal_lm(str(tiny_llama_dir), device="cpu")
    scorer = PromptScorer(model, tokenizer)
    prefix = build_prefix(SUPPORT, SUPPORT_LABELS)
    queries, labels = [f"query number {i}" for i in range(7)], ["weather", "alarm", "music"]
    whole = scorer.score(prefix, queries, labels)
    monkeypatch.setattr(prompting, "PACK_TOKENS", 10)  # one query per pass
    assert len(prompting.chunks([prompting.Segment([1] * 6, [[2]] * 3)] * 4)) == 4
    torch.testing.assert_close(scorer.score(prefix, queries, labels), whole, atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_smollm2_classifies_obvious_intents_in_context():
    model, tokenizer = load_causal_lm(device="cpu")
    scorer = PromptScorer(model, tokenizer)
    prefix = build_prefix(SUPPORT, SUPPORT_LABELS)
    queries = ["will it snow tonight", "wake me up at six", "put on some rock music"]
    scores = scorer.score(prefix, queries, ["weather", "alarm", "music"])
    assert scores.argmax(-1).tolist() == [0, 1, 2]
    channel_prefix = build_prefix(SUPPORT, SUPPORT_LABELS, CHANNEL_TEMPLATE)
    channel = PromptScorer(model, tokenizer, CHANNEL_TEMPLATE).score_channel(
        channel_prefix, queries, ["weather", "alarm", "music"]
    )
    assert channel.argmax(-1).tolist() == [0, 1, 2]


def test_calibration_subtracts_the_content_free_scores(tiny_llama_dir):
    model, tokenizer = load_causal_lm(str(tiny_llama_dir), device="cpu")
    scorer = PromptScorer(model, tokenizer)
    prefix = build_prefix(SUPPORT, SUPPORT_LABELS)
    labels = ["weather", "alarm", "music"]
    plain = scorer.score(prefix, ["rain tomorrow?", "N/A"], labels)
    calibrated = scorer.score(prefix, ["rain tomorrow?", "N/A"], labels, calibrate=True)
    torch.testing.assert_close(calibrated[0], plain[0] - plain[1])
    torch.testing.assert_close(calibrated[1], torch.zeros(3))


def test_channel_scores_with_and_without_the_cache_agree(tiny_llama_dir):
    model, tokenizer = load_causal_lm(str(tiny_llama_dir), device="cpu")
    scorer = PromptScorer(model, tokenizer, CHANNEL_TEMPLATE)
    prefix = build_prefix(SUPPORT, SUPPORT_LABELS, CHANNEL_TEMPLATE)
    assert prefix.startswith("Intent: ")
    queries, labels = ["rain tomorrow?", "wake me at six"], ["weather", "alarm", "music"]
    cached = scorer.score_channel(prefix, queries, labels)
    full = scorer.score_channel(prefix, queries, labels, use_cache=False)
    torch.testing.assert_close(cached, full, atol=1e-5, rtol=1e-5)
    plain = plain_prompt_score(
        model, tokenizer, prefix + "Intent: alarm\nInput:", " wake me at six"
    )
    assert abs(float(cached[1, 1]) - plain) < 1e-5
    assert cached.shape == (2, 3) and not torch.allclose(cached[0], cached[1])


def test_channel_scores_use_the_scorers_own_query_template(tiny_llama_dir):
    model, tokenizer = load_causal_lm(str(tiny_llama_dir), device="cpu")
    custom = PromptTemplate(demo="Topic {label} says: {text}\n", query="Topic {label} says:")
    prefix = build_prefix(SUPPORT, SUPPORT_LABELS, custom)
    scores = PromptScorer(model, tokenizer, custom).score_channel(prefix, ["play jazz"], ["music"])
    plain = plain_prompt_score(model, tokenizer, prefix + "Topic music says:", " play jazz")
    assert abs(float(scores[0, 0]) - plain) < 1e-5
    with pytest.raises(MetalmError, match="query contains \\{label\\}"):
        PromptScorer(model, tokenizer).score_channel(prefix, ["play jazz"], ["music"])
