"""Pure inner loops on dicts of parameters (`torch.func`), and which parameters adapt.

Nothing here changes a module: an inner loop takes a dict of tensors and hands back a new
dict (as optax does), so meta-parameters can never be overwritten by an adaptation. The
update rule is an `InnerOptimizer` from `metalm.learners.optim`.

Example:
    >>> from metalm.learners.optim import sgd
    >>> params = {"w": torch.zeros(3, requires_grad=True)}
    >>> loss_fn = lambda model, p, batch: ((p["w"] - batch) ** 2).sum()
    >>> new = inner_loop(None, params, loss_fn, torch.ones(3), steps=1, optimizer=sgd(0.25))
    >>> new["w"]
    tensor([0.5000, 0.5000, 0.5000], grad_fn=<SubBackward0>)
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor, nn

from metalm.errors import MetalmError
from metalm.learners.optim import InnerOptimizer, Params

LossFn = Callable[[Any, Params, Any], Tensor]

ADAPT_MODES = ("all", "head", "last_n", "bias", "lora")
_LAYER_INDEX = re.compile(r"(?:^|\.)(?:layer|layers|h|block|blocks)\.(\d+)\.")


# -- the inner loop -------------------------------------------------------------------
def inner_loop(
    model: Any,
    params: Params,
    loss_fn: LossFn,
    batch: Any,
    steps: int,
    optimizer: InnerOptimizer,
    first_order: bool = False,
) -> Params:
    """Adapt `params` by `steps` steps of `optimizer` on `loss_fn(model, params, batch)`.

    A pure function: returns new tensors and never touches `model` (which is only
    passed through to `loss_fn`; use `torch.func.functional_call` there).

    * second order by default: the result stays differentiable w.r.t. `params` (and
      anything the loss or the optimizer closes over, e.g. Meta-SGD's learned rates)
      through every inner gradient, as MAML needs;
    * `first_order=True` computes each inner gradient without an outer graph, so the
      result depends on `params` only through the identity path (FOMAML);
    * `optimizer`: an `InnerOptimizer` (`sgd`, `adam`, `learned_rates`, `proximal`, see
      `metalm.learners.optim`); its `penalty`, if any, joins the inner objective.

    Inside `torch.func.vmap` it adapts one task per batch entry.
    """
    if steps < 0:
        raise MetalmError(f"inner steps must be >= 0, got {steps}")
    penalty = optimizer.penalty

    def objective(p: Params, state: Any) -> Tensor:
        loss = loss_fn(model, p, batch)
        if penalty is not None:
            loss = loss + penalty(p, state)
        return loss

    gradient = torch.func.grad(objective)
    params = dict(params)
    state = optimizer.init(params)
    for _ in range(steps):
        if first_order:
            with torch.no_grad():  # no outer graph: the inner gradient is a constant
                grads = gradient(params, state)
        else:
            grads = gradient(params, state)
        params, state = optimizer.update(grads, state, params)
    return params


# -- which parameters adapt ----------------------------------------------------------
def layer_indices(names: list[str]) -> dict[str, int]:
    """Transformer block index of each parameter name that has one (`layer.3.` -> 3)."""
    found = {}
    for name in names:
        match = _LAYER_INDEX.search(name)
        if match:
            found[name] = int(match.group(1))
    return found


def embedding_tables(encoder: Any) -> set[str]:
    """Names of the token/position embedding tables (`nn.Embedding` weights)."""
    model = getattr(encoder, "model", encoder)
    return {
        f"{name}.weight" if name else "weight"
        for name, module in model.named_modules()
        if isinstance(module, nn.Embedding)
    }


def select_params(
    encoder: Any, mode: str, last_n: int = 1, embeddings: bool = True
) -> dict[str, nn.Parameter]:
    """The encoder tensors the inner loop adapts, by name (as in
    `encoder.model.named_parameters()`), for `mode`:

    * `all`: every tensor; `head`: none (only the task head adapts, ANIL);
    * `last_n`: the last `last_n` transformer blocks; `bias`: every bias (BitFit);
    * `lora`: the LoRA adapter tensors (the model must have been wrapped by PEFT).

    The pooler is never adapted: mean/CLS pooling does not use it, so it gets no gradient.
    `embeddings=False` leaves out the embedding tables (`nn.Embedding` weights): their
    inner gradient is a dense, mostly zero copy of the vocabulary matrix every step.

    Example:
        >>> sorted(select_params(encoder, "last_n", 1))[:1]   # a 2-layer encoder
        ['encoder.layer.1.attention.output.LayerNorm.bias']
    """
    model = getattr(encoder, "model", encoder)
    skip = set() if embeddings else embedding_tables(model)
    named = {
        n: p for n, p in model.named_parameters() if ".pooler." not in f".{n}" and n not in skip
    }
    if mode == "all":
        return {n: p for n, p in named.items() if "lora_" not in n}
    if mode == "head":
        return {}
    if mode == "bias":
        return {n: p for n, p in named.items() if n.endswith("bias") and "lora_" not in n}
    if mode == "lora":
        chosen = {n: p for n, p in named.items() if "lora_" in n}
        if not chosen:
            raise MetalmError("learner.adapt=lora but the encoder has no LoRA tensors")
        return chosen
    if mode == "last_n":
        index = layer_indices(list(named))
        if not index:
            raise MetalmError("learner.adapt=last_n: cannot find numbered layers in the encoder")
        depth = max(index.values()) + 1
        if not 1 <= last_n <= depth:
            raise MetalmError(f"learner.last_n must be in 1..{depth}, got {last_n}")
        return {
            n: p
            for n, p in named.items()
            if index.get(n, -1) >= depth - last_n and "lora_" not in n
        }
    raise MetalmError(f"learner.adapt must be one of {list(ADAPT_MODES)}, got {mode!r}")


# -- making a Hugging Face encoder safe under vmap ------------------------------------
def attention_mask_4d(model: nn.Module, mask: Tensor) -> Tensor:
    """A ready 4D attention mask [B, 1, 1, L] that Hugging Face uses as-is.

    Under `vmap`, building the mask from a 2D one fails: transformers checks
    `padding_mask.all()` (data-dependent control flow). A 4D mask skips that code.
    Boolean for SDPA attention, additive (0 / dtype min) for eager attention.
    """
    keep = mask[:, None, None, :].bool()
    config = getattr(model, "config", None)
    if getattr(config, "_attn_implementation", "eager") == "sdpa":
        return keep
    dtype = next(model.parameters()).dtype
    return (~keep).to(dtype) * torch.finfo(dtype).min


def _layer_norm_decomposed(
    input: Tensor,
    normalized_shape: Any,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    eps: float = 1e-5,
) -> Tensor:
    dims = tuple(range(-len(tuple(normalized_shape)), 0))
    mean = input.mean(dims, keepdim=True)
    var = (input - mean).pow(2).mean(dims, keepdim=True)
    out = (input - mean) * torch.rsqrt(var + eps)
    if weight is not None:
        out = out * weight
    if bias is not None:
        out = out + bias
    return out


@contextlib.contextmanager
def vmap_safe_layer_norm() -> Iterator[None]:
    """Within the block, `nn.LayerNorm` computes with plain ops instead of the fused kernel.

    On torch 2.13, `vmap` over an inner `torch.func.grad` and then an outer backward gives
    wrong meta-gradients for a LayerNorm *bias* (several % off; loops and finite
    differences agree with each other): a batching-rule bug in the fused layer-norm
    backward. The decomposed layer norm is exact; we use it only in vmapped meta-losses.
    """
    functional = torch.nn.functional
    original = functional.layer_norm
    functional.layer_norm = _layer_norm_decomposed  # type: ignore[assignment]
    try:
        yield
    finally:
        functional.layer_norm = original  # type: ignore[assignment]


def math_attention() -> contextlib.AbstractContextManager:
    """SDPA restricted to its plain-math kernel: the fused CPU flash-attention kernel has
    no double backward (second-order MAML) and no vmap batching rule."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel(SDPBackend.MATH)


def conjugate_gradient(
    matvec: Callable[[list[Tensor]], list[Tensor]], b: list[Tensor], steps: int
) -> list[Tensor]:
    """Approximately solve `A x = b` (A symmetric, given as `matvec` over lists of
    tensors) by `steps` conjugate-gradient iterations from x = 0.

    Truncated where A shows non-positive curvature (A is then not positive definite, e.g.
    a proximal term too weak for the loss's curvature): returns the iterate so far, or
    `b` itself (the first-order answer) if that happens on the first iteration.
    """

    def dot(u: list[Tensor], v: list[Tensor]) -> Tensor:
        return sum((a * c).sum() for a, c in zip(u, v, strict=True))  # type: ignore[return-value]

    x = [torch.zeros_like(t) for t in b]
    r = [t.clone() for t in b]
    p = [t.clone() for t in r]
    rs = dot(r, r)
    for _ in range(steps):
        if rs <= 1e-20:
            break
        ap = matvec(p)
        curvature = dot(p, ap)
        if not curvature > 0:
            return x if any(bool(t.any()) for t in x) else [t.clone() for t in b]
        alpha = rs / curvature
        x = [xi + alpha * pi for xi, pi in zip(x, p, strict=True)]
        r = [ri - alpha * ai for ri, ai in zip(r, ap, strict=True)]
        rs_new = dot(r, r)
        p = [ri + (rs_new / rs) * pi for ri, pi in zip(r, p, strict=True)]
        rs = rs_new
    return x
