"""Pure inner loops on dicts of parameters (`torch.func`), and which parameters adapt.

Nothing here changes a module: an inner loop takes a dict of tensors and hands back a new
dict (as optax does), so meta-parameters can never be overwritten by an adaptation.

Example:
    >>> params = {"w": torch.zeros(3, requires_grad=True)}
    >>> loss_fn = lambda model, p, batch: ((p["w"] - batch) ** 2).sum()
    >>> new = inner_loop(None, params, loss_fn, torch.ones(3), steps=1, lr=0.25)
    >>> new["w"]
    tensor([0.5000, 0.5000, 0.5000], grad_fn=<SubBackward0>)
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from metalm.errors import MetalmError

Params = dict[str, Tensor]
LossFn = Callable[[Any, Params, Any], Tensor]
LearningRate = float | Tensor | Mapping[str, float | Tensor]

ADAPT_MODES = ("all", "head", "last_n", "bias", "lora")
INNER_OPTIMIZERS = ("sgd", "adam")
ADAM_BETAS = (0.9, 0.999)
ADAM_EPS = 1e-8
_LAYER_INDEX = re.compile(r"(?:^|\.)(?:layer|layers|h|block|blocks)\.(\d+)\.")


# -- updates -----------------------------------------------------------------------
def _lr_for(lr: LearningRate, name: str) -> float | Tensor:
    return lr[name] if isinstance(lr, Mapping) else lr


def sgd_update(params: Params, grads: Params, lr: LearningRate) -> Params:
    """One differentiable SGD step: `p - lr * g` for every tensor (lr: scalar, tensor or
    per-name mapping, e.g. Meta-SGD's learned rates)."""
    return {k: p - _lr_for(lr, k) * grads[k] for k, p in params.items()}


def adam_update(
    params: Params,
    grads: Params,
    state: dict[str, Params],
    step: int,
    lr: LearningRate,
    betas: tuple[float, float] = ADAM_BETAS,
    eps: float = ADAM_EPS,
) -> tuple[Params, dict[str, Params]]:
    """One differentiable Adam step (bias-corrected); returns new params and new state.

    The denominator is `sqrt(v_hat + eps**2)` rather than `sqrt(v_hat) + eps`: equal to
    within eps, but smooth at zero, so second-order gradients stay finite.
    `step` counts from 1; `state` holds `m` and `v` (empty on the first step).
    """
    b1, b2 = betas
    m_old, v_old = state.get("m", {}), state.get("v", {})
    m = {k: b1 * m_old[k] + (1 - b1) * g if k in m_old else (1 - b1) * g for k, g in grads.items()}
    v = {
        k: b2 * v_old[k] + (1 - b2) * g * g if k in v_old else (1 - b2) * g * g
        for k, g in grads.items()
    }
    c1, c2 = 1 - b1**step, 1 - b2**step
    new = {
        k: p - _lr_for(lr, k) * (m[k] / c1) / torch.sqrt(v[k] / c2 + eps * eps)
        for k, p in params.items()
    }
    return new, {"m": m, "v": v}


def proximal_penalty(params: Params, anchor: Params, lam: float) -> Tensor:
    """`lam * sum ||p - anchor||^2` over the tensors of `params`."""
    return lam * sum(((p - anchor[k]) ** 2).sum() for k, p in params.items())


def inner_loop(
    model: Any,
    params: Params,
    loss_fn: LossFn,
    batch: Any,
    steps: int,
    lr: LearningRate,
    first_order: bool = False,
    *,
    optimizer: str = "sgd",
    proximal: float = 0.0,
    anchor: Params | None = None,
) -> Params:
    """Adapt `params` by `steps` gradient steps on `loss_fn(model, params, batch)`.

    A pure function: returns new tensors and never touches `model` (which is only
    passed through to `loss_fn`; use `torch.func.functional_call` there).

    * second order by default: the result stays differentiable w.r.t. `params` (and
      anything the loss closes over) through every inner gradient, as MAML needs;
    * `first_order=True` computes each inner gradient without an outer graph, so the
      result depends on `params` only through the identity path (FOMAML);
    * `optimizer`: `sgd`, or `adam` (a differentiable Adam-style update);
    * `lr`: a float, a tensor, or a mapping name -> float/tensor (Meta-SGD: learned
      per-tensor or per-element rates, which then receive meta-gradients);
    * `proximal=lam` adds `lam * ||p - anchor||^2` to the inner objective (anchor: the
      starting `params` unless given), pulling each task toward the meta-parameters.

    Inside `torch.func.vmap` it adapts one task per batch entry.
    """
    if steps < 0:
        raise MetalmError(f"inner steps must be >= 0, got {steps}")
    if optimizer not in INNER_OPTIMIZERS:
        raise MetalmError(f"learner.inner_optimizer must be 'sgd' or 'adam', got {optimizer!r}")
    start = dict(params)
    anchor = start if anchor is None else anchor

    def objective(p: Params) -> Tensor:
        loss = loss_fn(model, p, batch)
        if proximal:
            loss = loss + proximal_penalty(p, anchor, proximal)
        return loss

    gradient = torch.func.grad(objective)
    params, state = start, {}
    for step in range(1, steps + 1):
        if first_order:
            with torch.no_grad():  # no outer graph: the inner gradient is a constant
                grads = gradient(params)
        else:
            grads = gradient(params)
        if optimizer == "sgd":
            params = sgd_update(params, grads, lr)
        else:
            params, state = adam_update(params, grads, state, step, lr)
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
        >>> sorted(select_params(encoder, "last_n", 1))[:1]
        ['encoder.layer.5.attention.output.LayerNorm.bias']
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
