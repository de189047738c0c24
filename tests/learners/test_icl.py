"""The in-context learners `icl` and `metaicl` on a tiny random Llama (fast), through
the learner interface, the trainer, save/load and the CLI; and on the shipped SmolLM2
(slow, real weights)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import tiny_overrides
from safetensors.torch import load_file

import metalm
from metalm import FewShotClassifier, MetalmError, from_pretrained, save_pretrained
from metalm.cli import main
from metalm.config import load_config
from metalm.data.episodes import Episode
from metalm.learners import ICLConfig, MetaICLConfig, build_learner
from metalm.learners.icl import PROMPT_KEY, decode_prompt
from metalm.models.base import build_model
from metalm.models.causal import CausalLM
from metalm.models.encoder import EncoderConfig
from metalm.models.prompting import PromptScorer
from metalm.runs.existing import export_run

TEXTS = ["will it rain today", "set an alarm for 7", "play some jazz", "is it sunny out"]
LABELS = [0, 1, 2, 0]
NAMES = ["weather", "alarm_clock", "music"]
QUERIES = ["rain tomorrow?", "wake me at six", "a song please"]


def tiny_lm(path) -> CausalLM:
    return build_model(EncoderConfig(kind="causal", name_or_path=str(path), device="cpu"))


def episode() -> Episode:
    return Episode(TEXTS, LABELS, QUERIES, [0, 1, 2], NAMES)


@pytest.mark.parametrize("scoring", ["direct", "channel"])
def test_icl_predicts_the_scorers_scores_from_a_prompt_state(tiny_llama_dir, scoring):
    learner = build_learner(tiny_lm(tiny_llama_dir), ICLConfig(scoring=scoring))
    state = learner.adapt_named(TEXTS, LABELS, NAMES)
    prefix, labels = decode_prompt(state)
    assert labels == ["weather", "alarm clock", "music"]  # names written as words
    assert all(text in prefix for text in TEXTS) and set(state) == {PROMPT_KEY}
    logits = learner.predict(state, QUERIES)
    assert logits.shape == (3, 3) and torch.isfinite(logits).all()
    scorer = PromptScorer(learner.encoder.model, learner.encoder.tokenizer, learner.template)
    plain = scorer.score_channel if scoring == "channel" else scorer.score
    torch.testing.assert_close(logits, plain(prefix, QUERIES, labels, use_cache=False))
    torch.testing.assert_close(learner.predict(state, QUERIES), logits)  # cached prompt
    assert len(learner._caches) == 1


def test_icl_seed_orders_the_demonstrations_and_templates_are_configurable(tiny_llama_dir):
    lm = tiny_lm(tiny_llama_dir)
    a = decode_prompt(build_learner(lm, ICLConfig(seed=0)).adapt_named(TEXTS, LABELS, NAMES))[0]
    b = decode_prompt(build_learner(lm, ICLConfig(seed=3)).adapt_named(TEXTS, LABELS, NAMES))[0]
    assert a != b and sorted(a.split("\n\n")) == sorted(b.split("\n\n"))
    custom = ICLConfig(demo_template="Q: {text} A: {label}\n", query_template="Q: {text} A:")
    prefix = decode_prompt(build_learner(lm, custom).adapt_named(TEXTS, LABELS, NAMES))[0]
    assert "Q: play some jazz A: music\n" in prefix
    with pytest.raises(MetalmError, match=r"must contain \{label\}"):
        ICLConfig(demo_template="Q: {text}")  # configs check themselves when made
    with pytest.raises(
        MetalmError, match=r"query_template must contain \{label\} \(scoring=channel"
    ):
        ICLConfig(scoring="channel", query_template="Q: {text} A:")
    with pytest.raises(MetalmError, match=r"query_template must contain \{text\}"):
        ICLConfig(query_template="Classify:")
    with pytest.raises(MetalmError, match="scoring must be one of"):
        load_config(None, ["model.kind=causal", "learner.name=icl", "learner.scoring=noisy"])
    with pytest.raises(MetalmError, match="calibrate works with scoring=direct"):
        ICLConfig(scoring="channel", calibrate=True)


def test_a_prompt_longer_than_the_context_is_refused_clearly(tiny_llama_dir):
    learner = build_learner(tiny_lm(tiny_llama_dir), ICLConfig(max_prompt_tokens=40))
    with pytest.raises(MetalmError, match="fewer examples per class"):
        learner.adapt_named(TEXTS * 3, LABELS * 3, NAMES)
    with pytest.raises(MetalmError, match="3 classes but 2 label names"):
        learner.adapt_named(TEXTS, LABELS, NAMES[:2])
    with pytest.raises(MetalmError, match="distinct words"):
        learner.adapt_named(TEXTS, LABELS, ["a_b", "a b", "c"])


def test_learners_refuse_a_model_of_the_other_kind(tiny_llama_dir, tiny_model_dir):
    encoder = build_model(EncoderConfig(name_or_path=str(tiny_model_dir)))
    with pytest.raises(MetalmError, match=r"set model\.kind=causal$"):
        build_learner(encoder, ICLConfig())
    with pytest.raises(MetalmError, match=r"set model\.kind=encoder$"):
        build_learner(tiny_lm(tiny_llama_dir), metalm.learners.FrozenConfig())
    with pytest.raises(MetalmError, match="must be one of encoder, causal"):
        build_model(EncoderConfig(kind="seq2seq"))


@pytest.mark.parametrize(
    "scoring, loss",
    [("direct", "lm"), ("direct", "choice"), ("channel", "lm"), ("channel", "choice")],
)
def test_metaicl_trains_lora_adapters_only_and_its_loss_falls(tiny_llama_dir, scoring, loss):
    lm = tiny_lm(tiny_llama_dir)
    icl_logits = build_learner(lm, ICLConfig(scoring=scoring)).predict(
        build_learner(lm, ICLConfig(scoring=scoring)).adapt_named(TEXTS, LABELS, NAMES), QUERIES
    )
    learner = build_learner(lm, MetaICLConfig(scoring=scoring, loss=loss, lora_r=4))
    trainable = [n for n, p in learner.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    # LoRA starts as the identity: before training, metaicl is icl
    state = learner.adapt_named(TEXTS, LABELS, NAMES)
    torch.testing.assert_close(learner.eval().predict(state, QUERIES), icl_logits)
    learner.train()
    # (at 1e-2 the choice loss oscillates around log 3 on the tiny Llama; 3e-3 descends)
    optimizer = torch.optim.Adam([p for p in learner.parameters() if p.requires_grad], lr=3e-3)
    losses = []
    for _ in range(8):
        loss_value = learner.meta_loss(episode())
        optimizer.zero_grad()
        loss_value.backward()
        optimizer.step()
        losses.append(loss_value.item())
    assert all(math.isfinite(v) for v in losses) and losses[-1] < losses[0]


def test_metaicl_without_lora_trains_every_weight(tiny_llama_dir):
    learner = build_learner(tiny_lm(tiny_llama_dir), MetaICLConfig(lora=False))
    assert all(p.requires_grad for p in learner.parameters())
    learner.meta_loss(episode()).backward()
    assert learner.encoder.model.get_input_embeddings().weight.grad is not None
    with pytest.raises(MetalmError, match="loss must be one of"):
        MetaICLConfig(loss="mse")
    with pytest.raises(MetalmError, match="lora_r must be >= 1"):
        MetaICLConfig(lora_r=0)


def icl_overrides(tiny_llama_dir, tmp_path, **extra):
    return tiny_overrides(
        tiny_llama_dir,
        tmp_path,
        **{
            "model.kind": "causal",
            "learner.name": "metaicl",
            "learner.lora_r": 2,
            "train.steps": 4,
            "train.lr": 1e-2,
            "eval.baselines": "[{name: icl}]",
            **extra,
        },
    )


@pytest.mark.slow
def test_metaicl_run_checkpoints_resumes_and_reports_beside_icl(tiny_llama_dir, tmp_path):
    report = metalm.run(load_config(None, icl_overrides(tiny_llama_dir, tmp_path)), progress=False)
    run_dir = tmp_path / "run"
    log = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3, 4] and all(math.isfinite(r["loss"]) for r in log)
    assert [r.method for r in report.results] == ["metaicl", "icl"]
    # checkpoints hold the adapters, not the frozen LM
    for weights in (run_dir / "best.safetensors", run_dir / "checkpoint" / "learner.safetensors"):
        assert all("lora_" in key for key in load_file(weights))
    assert all(r.episodes == 5 and 0 <= r.accuracy <= 1 for r in report.results)
    # resuming a finished run continues from its last checkpoint and ends the same
    again = metalm.resume_run(run_dir, progress=False)
    assert again.results[0].accuracy == report.results[0].accuracy
    out = export_run(run_dir, tmp_path / "exported")
    clf = FewShotClassifier.from_pretrained(out)
    assert clf.adapt(TEXTS, [NAMES[y] for y in LABELS]).predict(QUERIES)[0] in NAMES


@pytest.mark.slow
def test_the_classifier_and_cli_adapt_predict_and_save_tasks(tiny_llama_dir, tmp_path, capsys):
    model_dir = tmp_path / "icl-model"
    main(
        [
            "export",
            "--learner",
            "icl",
            "--out",
            str(model_dir),
            "model.kind=causal",
            f"model.name_or_path={tiny_llama_dir}",
            "learner.scoring=channel",
        ]
    )
    metadata = json.loads((model_dir / "metalm.json").read_text())
    assert metadata["encoder"]["kind"] == "causal" and not (model_dir / "encoder").exists()
    clf = FewShotClassifier.from_pretrained(model_dir, device="cpu")
    clf.adapt(TEXTS, [NAMES[y] for y in LABELS])
    probs = clf.predict_proba(QUERIES)
    assert probs.shape == (3, 3) and abs(float(probs.sum(1).mean()) - 1) < 1e-5
    clf.save_task(tmp_path / "task")
    again = FewShotClassifier.load_task(tmp_path / "task")
    assert again.predict(QUERIES) == clf.predict(QUERIES)
    train = tmp_path / "train.csv"
    train.write_text(
        "text,label\n" + "".join(f"{t},{NAMES[y]}\n" for t, y in zip(TEXTS, LABELS, strict=True))
    )
    queries = tmp_path / "queries.txt"
    queries.write_text("\n".join(QUERIES) + "\n")
    main(
        ["adapt", "--model", str(model_dir), "--support", str(train), "--out", str(tmp_path / "t2")]
    )
    capsys.readouterr()
    main(["predict", "--task", str(tmp_path / "t2"), "--input", str(queries)])
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 3 and all(any(n in line for n in NAMES) for line in lines)


def test_a_saved_metaicl_keeps_its_trained_adapters(tiny_llama_dir, tmp_path):
    learner = build_learner(tiny_lm(tiny_llama_dir), MetaICLConfig(lora_r=2))
    with torch.no_grad():
        for p in learner.parameters():
            if p.requires_grad:
                p.add_(0.1)
    out = save_pretrained(learner.eval(), tmp_path / "m")
    loaded = from_pretrained(out, device="cpu")
    state = learner.adapt_named(TEXTS, LABELS, NAMES)
    torch.testing.assert_close(loaded.predict(state, QUERIES), learner.predict(state, QUERIES))
    untrained = build_learner(tiny_lm(tiny_llama_dir), ICLConfig())
    assert not torch.allclose(untrained.predict(state, QUERIES), learner.predict(state, QUERIES))


# -- the shipped SmolLM2-135M --------------------------------------------------------------
@pytest.mark.slow
def test_smollm2_icl_classifier_on_banking77_names(tmp_path):
    model_dir = tmp_path / "smollm2-icl"
    main(["export", "--learner", "icl", "--out", str(model_dir), "model.kind=causal"])
    clf = FewShotClassifier.from_pretrained(model_dir, device="cpu")
    clf.adapt(
        [
            "my card has not arrived yet",
            "still waiting for my new card",
            "I want to change my PIN",
            "how can I set a new pin",
            "what is the exchange rate",
            "how much is a dollar in euros",
        ],
        [y for y in ("card_arrival", "change_pin", "exchange_rate") for _ in range(2)],
    )
    queries = [
        "when will my new card come",
        "how do I reset my pin number",
        "what rate do you use for pounds",
    ]
    assert clf.predict(queries) == ["card_arrival", "change_pin", "exchange_rate"]


@pytest.mark.slow
def test_smollm2_metaicl_meta_trains_two_steps(tmp_path):
    overrides = [
        "model.kind=causal",
        "learner.name=metaicl",
        f"output_dir={tmp_path}",
        "run_name=run",
        "episode.n_way=3",
        "episode.k_shot=1",
        "episode.q_queries=2",
        "train.steps=2",
        "train.meta_batch_size=1",
        "train.warmup_steps=0",
        "train.eval_every=2",
        "train.val_episodes=2",
        "train.tensorboard=false",
        "train.lr=3e-4",
        "eval.episodes=2",
        "eval.q_queries=2",
        "eval.settings=[{n_way: 3, k_shot: 1}]",
        "eval.full_way_shots=[]",
        "eval.baselines=[]",
    ]
    report = metalm.run(load_config(None, overrides), progress=False)
    log = [json.loads(x) for x in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2] and all(math.isfinite(r["loss"]) for r in log)
    assert report.results[0].method == "metaicl" and report.results[0].episodes == 2


@pytest.mark.slow
def test_metalm_serve_answers_from_an_in_context_model(tiny_llama_dir, tmp_path):
    import httpx
    from run_tools import Server

    model_dir = tmp_path / "metaicl-model"
    main(
        [
            "export",
            "--learner",
            "metaicl",
            "--out",
            str(model_dir),
            "model.kind=causal",
            f"model.name_or_path={tiny_llama_dir}",
            "learner.lora_r=2",
        ]
    )
    server = Server(model_dir, tmp_path / "tasks")
    try:
        with httpx.Client(base_url=server.url, timeout=30) as client:
            examples = [{"text": t, "label": NAMES[y]} for t, y in zip(TEXTS, LABELS, strict=True)]
            created = client.post("/tasks", json={"examples": examples})
            assert created.status_code == 201, created.text
            tid = created.json()["task_id"]
            body = client.post(f"/tasks/{tid}/classify", json={"texts": QUERIES}).json()
            assert body["classes"] == sorted(NAMES) and len(body["predictions"]) == 3
            for prediction in body["predictions"]:
                assert abs(sum(prediction["probabilities"]) - 1) < 1e-5
            again = client.post(f"/tasks/{tid}/classify", json={"texts": QUERIES}).json()
            assert again == body
    finally:
        server.stop()
