"""`metalm.data.overlap` and the strict split: test classes whose (near-)name is a
meta-train class, found, reported and removable."""

from __future__ import annotations

import pytest
import torch

from metalm.cli import main
from metalm.config import load_config
from metalm.data.overlap import class_overlap, name_words, overlapping_train_classes
from metalm.errors import MetalmError
from metalm.tasks import build_pools, pools_overlap


def fake_embed(names):
    """Names with a shared first word are alike (cosine 1), others orthogonal."""
    firsts = sorted({name_words(n)[0] for n in names} | {"card", "play", "top"})
    return torch.stack(
        [torch.nn.functional.one_hot(torch.tensor(firsts.index(name_words(n)[0])), len(firsts))
         for n in names]
    ).float()  # fmt: skip


def test_names_words_and_containment_overlap():
    found = class_overlap(
        ["exchange_rate", "pin_change", "transfer", "weather", "alarms"],
        ["exchange_rate", "change_pin", "failed_transfer", "top_up", "alarm"],
        similarity=None,
    )
    reasons = {(o.test_class, o.train_class): o.reason for o in found}
    assert reasons == {
        ("exchange_rate", "exchange_rate"): "same name",
        ("change_pin", "pin_change"): "same words",
        ("failed_transfer", "transfer"): "contains",
        ("alarm", "alarms"): "same words",  # a plural s is dropped
    }
    assert overlapping_train_classes(found) == ["alarms", "exchange_rate", "pin_change", "transfer"]


def test_similar_names_overlap_above_the_threshold_only():
    found = class_overlap(["card_declined", "play_music"], ["card_arrival"], 0.9, embed=fake_embed)
    assert [(o.train_class, o.reason, o.similarity) for o in found] == [
        ("card_declined", "similar", 1.0)
    ]
    assert class_overlap(["play_music"], ["card_arrival"], 0.9, embed=fake_embed) == []


def test_a_strict_split_removes_the_overlapping_meta_train_and_val_classes():
    overrides = ["data.classes.name_similarity=null"]
    loose = build_pools(load_config(None, overrides).data)
    strict = build_pools(load_config(None, [*overrides, "data.classes.strict=true"]).data)
    found = pools_overlap(loose, None)
    removed = set(overlapping_train_classes(found))
    assert {"exchange_rate", "pin_change", "transfer", "balance"} <= removed
    kept = set(strict.train.classes) | set(strict.val.classes)
    assert kept == (set(loose.train.classes) | set(loose.val.classes)) - removed
    assert pools_overlap(strict, None) == []
    assert {o.train_class for o in strict.removed_overlap} == removed
    assert strict.test.classes == loose.test.classes  # the test classes stay


def test_a_strict_split_that_leaves_nothing_is_a_clear_error(tmp_path):
    """Every meta-train class of the file is also a BANKING77 intent."""
    rows = "text,label\n" + "".join(f"t{i},exchange_rate\nu{i},card_arrival\n" for i in range(6))
    (tmp_path / "b.csv").write_text(rows)
    config = load_config(
        None,
        [
            f"data.train={tmp_path / 'b.csv'}",
            "data.test=banking77",
            "data.classes.fractions=[0.5, 0.5, 0.0]",
            "data.classes.strict=true",
            "data.classes.name_similarity=null",
        ],
    )
    with pytest.raises(MetalmError, match="removes every meta-train class"):
        build_pools(config.data)


def test_bad_similarity_is_a_clear_error():
    with pytest.raises(MetalmError, match="name_similarity"):
        load_config(None, ["data.classes.name_similarity=1.5"])


def test_metalm_overlap_lists_the_pairs_and_what_strict_removes(capsys):
    assert main(["overlap", "data.classes.name_similarity=null"]) == 0
    out = capsys.readouterr().out
    assert "| change_pin | pin_change | same words |" in out
    assert "a strict split (data.classes.strict=true) leaves out" in out


@pytest.mark.slow
def test_the_shipped_encoder_finds_the_near_synonyms_of_clinc150_and_banking77():
    """CLINC150's meta-train classes that the issue named as near-synonyms of BANKING77
    intents are all found with the default similarity."""
    pools = build_pools(load_config(None, []).data)
    removed = set(overlapping_train_classes(pools_overlap(pools, 0.6)))
    named = {"exchange_rate", "pin_change", "card_declined", "report_lost_card", "transfer",
             "balance", "expiration_date"}  # fmt: skip
    assert named <= removed
    assert len(removed) < 20  # related intents, not the whole domain
