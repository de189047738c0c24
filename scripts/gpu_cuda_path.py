"""Checks of the CUDA path that need a GPU (run by scripts/gpu_check.sh; prints one line
per check and exits non-zero if one fails):

* a checkpoint saved from CUDA tensors (model, AdamW state, CUDA RNG) resumes into a
  CPU model, and the CUDA RNG state round-trips on the GPU;
* a causal LM with `model.dtype=auto` loads in bfloat16 on the GPU and scores text;
* one `protonet` meta-loss and its gradient on CUDA equal the CPU's (tolerance 1e-4).
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import torch

from metalm.checkpoint import load_checkpoint, save_checkpoint
from metalm.data import EpisodeSampler, builtin_dataset
from metalm.learners import ProtoNet, ProtoNetConfig
from metalm.models.encoder import EncoderConfig, TextEncoder

FAILED: list[str] = []


def check(name: str, ok: bool, detail: str = "") -> None:
    print(f"{'ok  ' if ok else 'FAIL'} {name} {detail}", flush=True)
    if not ok:
        FAILED.append(name)


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
    if not torch.cuda.is_available():
        sys.exit("no GPU here: nothing to check")
    with tempfile.TemporaryDirectory() as tmp:
        for step in (checkpoint_across_devices, causal_lm_in_bf16):
            try:
                step(Path(tmp))
            except Exception as err:  # report and go on to the next check
                check(step.__name__, False, f"{type(err).__name__}: {err}")
    try:
        protonet_cuda_equals_cpu()
    except Exception as err:
        check("protonet_cuda_equals_cpu", False, f"{type(err).__name__}: {err}")
    sys.exit(1 if FAILED else 0)


if __name__ == "__main__":
    main()
