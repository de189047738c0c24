"""Checks of the CUDA path (run first by scripts/gpu_check.sh; prints one line per
check, writes them as JSON with --out, and exits non-zero if one fails):

* every learner's forward and backward on the GPU equal the CPU's: `meta_loss` and the
  norm of its gradient for the meta-trained learners, adapt + predict logits for the
  others (tiny random BERT / Llama, same weights, eval mode, TF32 off; relative
  tolerance 1e-3);
* a checkpoint saved from CUDA tensors (model, AdamW state, CUDA RNG) resumes into a
  CPU model, and the CUDA RNG state round-trips on the GPU;
* a causal LM with `model.dtype=auto` loads in bfloat16 on the GPU and scores text;
* one `protonet` meta-loss and its gradient on MiniLM, CUDA against the CPU.

    python scripts/gpu_cuda_path.py                      # on a GPU machine
    python scripts/gpu_cuda_path.py --device cpu --learners-only   # the learner check, CPU
    against CPU (what tests/test_gpu_scripts.py runs here, so the script stays runnable)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

import torch

from metalm.checkpoint import load_checkpoint, save_checkpoint
from metalm.data import EpisodeSampler, builtin_dataset
from metalm.errors import MetalmError
from metalm.learners import ProtoNet, ProtoNetConfig
from metalm.models.encoder import EncoderConfig, TextEncoder

FAILED: list[str] = []
RESULTS: list[dict] = []
RELATIVE = 1e-3  # float32 kernels differ between devices in the last bits, over 2 layers


def check(name: str, ok: bool, detail: str = "") -> None:
    print(f"{'ok  ' if ok else 'FAIL'} {name} {detail}", flush=True)
    RESULTS.append({"check": name, "ok": ok, "detail": detail})
    if not ok:
        FAILED.append(name)


def _learner_outputs(name: str, model_dir: Path, device: str, state: dict | None) -> dict:
    """Learner `name` on `device` (weights `state` when given): its meta-loss and the
    norm of the gradient, or its logits on a task; and its weights."""
    from metalm.config import parse_learner_config
    from metalm.learners import LEARNERS, build_learner
    from metalm.models.base import build_model

    kind = LEARNERS[name].model_kind
    torch.manual_seed(0)
    model = build_model(
        EncoderConfig(kind=kind, name_or_path=str(model_dir), max_length=32, device=device)
    )
    extra = {"lora_r": 2} if name == "metaicl" else {}
    learner = build_learner(model, parse_learner_config({"name": name, **extra})).to(device)
    if state is not None:
        learner.load_state_dict(state)
    learner.eval()
    episode = EpisodeSampler(builtin_dataset("banking77", "test"), 3, 2, 2, seed=0).sample(0)
    out: dict = {"state": {k: v.detach().cpu() for k, v in learner.state_dict().items()}}
    try:
        loss = learner.meta_loss(episode)
    except MetalmError:  # not meta-trained: compare what it predicts
        task = learner.adapt_named(
            episode.support_texts, episode.support_labels, episode.label_names
        )
        out["logits"] = learner.predict(task, episode.query_texts).detach().float().cpu()
        return out
    loss.backward()
    grads = [p.grad.float().norm() for p in learner.parameters() if p.grad is not None]
    out["loss"] = loss.item()
    out["grad_norm"] = float(torch.stack(grads).norm()) if grads else 0.0
    return out


def every_learner_on(device: str, tmp: Path) -> None:
    """Each learner's outputs on `device` against the CPU's, from the same weights."""
    from metalm.learners import LEARNERS
    from metalm.models.tiny import save_tiny_bert, save_tiny_llama

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    dirs = {"encoder": save_tiny_bert(tmp / "bert"), "causal": save_tiny_llama(tmp / "llama")}
    for name in sorted(LEARNERS):
        model_dir = dirs[LEARNERS[name].model_kind]
        try:
            cpu = _learner_outputs(name, model_dir, "cpu", None)
            other = _learner_outputs(name, model_dir, device, cpu["state"])
        except Exception as err:  # report and go on to the next learner
            check(f"learner {name}: {device} = cpu", False, f"{type(err).__name__}: {err}")
            continue
        if "logits" in cpu:
            gap = float((cpu["logits"] - other["logits"]).abs().max())
            scale = float(cpu["logits"].abs().max()) or 1.0
            ok, detail = gap <= RELATIVE * max(scale, 1.0), f"max |Δ logits| {gap:.2e}"
        else:
            loss_gap = abs(cpu["loss"] - other["loss"])
            grad_gap = abs(cpu["grad_norm"] - other["grad_norm"])
            ok = loss_gap <= RELATIVE * max(abs(cpu["loss"]), 1.0) and grad_gap <= RELATIVE * max(
                cpu["grad_norm"], 1e-6
            )
            detail = (
                f"loss {cpu['loss']:.6f} / {other['loss']:.6f}, "
                f"|grad| {cpu['grad_norm']:.6f} / {other['grad_norm']:.6f}"
            )
        check(f"learner {name}: {device} = cpu", ok, detail)


def checkpoint_across_devices(tmp: Path) -> None:
    net = torch.nn.Linear(4, 3).cuda()
    optimizer = torch.optim.AdamW(net.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    net(torch.randn(2, 4, device="cuda")).sum().backward()
    optimizer.step()
    save_checkpoint(tmp / "c", net, optimizer, scheduler, {"step": 1})
    cuda_next = torch.rand(3, device="cuda")
    cpu_net = torch.nn.Linear(4, 3)
    cpu_optimizer = torch.optim.AdamW(cpu_net.parameters(), lr=0.1)
    cpu_scheduler = torch.optim.lr_scheduler.LambdaLR(cpu_optimizer, lambda _: 1.0)
    state = load_checkpoint(tmp / "c", cpu_net, cpu_optimizer, cpu_scheduler)
    same = torch.equal(cpu_net.weight, net.weight.cpu())
    moments = cpu_optimizer.state_dict()["state"][0]["exp_avg"]
    check("checkpoint: saved on CUDA, resumed on the CPU", state == {"step": 1} and same,
          f"(exp_avg on {moments.device})")  # fmt: skip
    check("checkpoint: CUDA RNG restored", torch.equal(torch.rand(3, device="cuda"), cuda_next))


def causal_lm_in_bf16(tmp: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from metalm.models.causal import CausalLM

    vocab = {w: i for i, w in enumerate(["<unk>", "</s>", "hello", "world", "hi"])}
    raw = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=raw, eos_token="</s>", unk_token="<unk>")
    config = LlamaConfig(
        vocab_size=5,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
    )
    LlamaForCausalLM(config).save_pretrained(tmp / "llama")
    tokenizer.save_pretrained(tmp / "llama")
    lm = CausalLM.from_config(EncoderConfig(kind="causal", name_or_path=str(tmp / "llama")))
    dtype = next(lm.model.parameters()).dtype
    ids = lm.tokenizer(["hello world"], return_tensors="pt").to("cuda")
    finite = bool(torch.isfinite(lm.model(**ids).logits.float()).all())
    check("causal LM: model.dtype=auto on the GPU", dtype == torch.bfloat16 and finite, str(dtype))


def protonet_cuda_equals_cpu() -> None:
    episode = EpisodeSampler(builtin_dataset("banking77", "test"), 5, 2, 2, seed=0).sample(0)
    losses, grads = [], []
    for device in ("cpu", "cuda"):
        torch.manual_seed(0)
        model = os.environ.get("METALM_GPU_MODEL", "")  # empty: the shipped MiniLM
        encoder = TextEncoder.from_config(EncoderConfig(name_or_path=model, device=device))
        learner = ProtoNet(encoder, ProtoNetConfig()).to(device).eval()
        loss = learner.meta_loss(episode)
        loss.backward()
        losses.append(float(loss))
        grads.append(encoder.model.embeddings.word_embeddings.weight.grad.norm().item())
    close = abs(losses[0] - losses[1]) < 1e-4 and abs(grads[0] - grads[1]) < 1e-4 * grads[0]
    check("protonet meta-loss and gradient: CUDA = CPU", close, f"loss {losses}, |grad| {grads}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda", help="the device compared to the CPU")
    parser.add_argument("--learners-only", action="store_true")
    parser.add_argument("--out", help="write the checks as JSON here")
    args = parser.parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        sys.exit("no GPU here: nothing to check (--device cpu checks the script itself)")
    with tempfile.TemporaryDirectory() as tmp:
        every_learner_on(args.device, Path(tmp))
        if not args.learners_only:
            for step in (checkpoint_across_devices, causal_lm_in_bf16):
                try:
                    step(Path(tmp))
                except Exception as err:  # report and go on to the next check
                    check(step.__name__, False, f"{type(err).__name__}: {err}")
            try:
                protonet_cuda_equals_cpu()
            except Exception as err:
                check("protonet_cuda_equals_cpu", False, f"{type(err).__name__}: {err}")
    if args.out:
        Path(args.out).write_text(json.dumps({"device": args.device, "checks": RESULTS}, indent=1))
    sys.exit(1 if FAILED else 0)


if __name__ == "__main__":
    main()
