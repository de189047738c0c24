"""Task heads fitted on cached support embeddings: nearest centroid and a
prototype-initialised multinomial logistic regression at a fixed L2 strength
(`DEFAULT_LOGREG_L2`, chosen on validation data) or one chosen by leave-one-shot-out on
the support set.

Example:
    >>> x = torch.nn.functional.normalize(torch.randn(20, 8), dim=-1)
    >>> y = torch.arange(4).repeat(5)
    >>> head = fit_logreg(x, y, 4)
    >>> head["head.weight"].shape, head["head.bias"].shape
    (torch.Size([4, 8]), torch.Size([4]))

Speed (`benchmarks/logreg_head.py`): BANKING77 77-way 5-shot on MiniLM embeddings (385
support texts), the fit with its choice of L2 takes about 0.2 s on one CPU thread. Every
problem of the L2 selection (grid value x fold) is fitted at once, each by its own
L-BFGS (its own curvature pairs and backtracking step, so that one slow problem does not
hold back the others), with the weights of all problems in one matrix so that a loss
and gradient evaluation is two matrix products (`[n, d+1] x [d+1, P*N]` and back). The
start is the prototype head scaled by the temperature that fits the support best,
already close to the solution; the selection runs `SELECT_ITER` iterations only (it
needs the ranking of the grid values, not the exact optimum) over at most `MAX_FOLDS`
folds.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from metalm.learners import base
from metalm.learners.base import one_hot_means

# L2 strengths tried by leave-one-shot-out: the penalty is `l2/2 · ‖W‖²` added to the
# mean cross-entropy (l2 = 1/(C·n) in scikit-learn's terms: C=10 at n=385 is 2.6e-4).
# On unit-norm MiniLM embeddings, full-way BANKING77/CLINC150 test accuracy is flat
# within ~1 point over 1e-5..3e-4 and drops from 1e-3 on (benchmarks/logreg_head.py).
L2_GRID: tuple[float, ...] = (3e-5, 1e-4, 3e-4)
DEFAULT_L2 = 1e-4  # one example per class: nothing to hold out
# The L2 strength of `learner.head=logreg` (`learner.logreg_l2`). Chosen on the `valid`
# splits of BANKING77 and CLINC150 (full-way 5/10-shot, 5-way 1/5-shot episodes; frozen
# MiniLM) among fixed strengths, scikit-learn's 1/(C·n) for several C and the
# leave-one-shot-out rule: 1e-4 and C=30 had the best mean (90.43 / 90.45 %, a tie), and
# 1e-4 was never below scikit-learn's LogisticRegression(C=10) by more than 0.06 on any
# of the eight (C=30: -0.13); the leave-one-shot-out likelihood picks the smallest
# strength of its grid and was 0.33 below on CLINC150 5-shot
# (`benchmarks/logreg_l2_rule.py --split valid`, BENCHMARKS.md).
DEFAULT_LOGREG_L2 = 1e-4
MAX_FOLDS = 5  # K > MAX_FOLDS shots: fold f holds out the shots f, f+5, ...
SELECT_ITER = 10  # L-BFGS iterations of each selection problem
FIT_ITER = 100  # L-BFGS iterations of the final fit
LBFGS_TOL = 1e-4  # a problem stops when no gradient entry is above this
_HISTORY = 10  # L-BFGS curvature pairs kept per problem
# rows x classes up to which a fit on an accelerator runs on the CPU instead: L-BFGS on a
# 5-way 1-shot task is a hundred rounds of tiny kernels, each waiting for the device
SMALL_FIT = 4096

Objective = Callable[[Tensor], tuple[Tensor, Tensor]]


def prototype_head(features: Tensor, labels: Tensor, n_way: int) -> tuple[Tensor, Tensor]:
    """The prototype head (W = 2m, b = −‖m‖², `metalm.learners.base.prototype_head`) of
    the class means of `features`, as a pair (W, b)."""
    head = base.prototype_head(one_hot_means(features, labels, n_way))
    return head["head.weight"], head["head.bias"]


def _dot(a: Tensor, b: Tensor) -> Tensor:
    """Per-problem inner products [P] of two [P, ...] tensors."""
    return torch.linalg.vecdot(a.reshape(len(a), -1), b.reshape(len(b), -1))


def _per(values: Tensor) -> Tensor:
    """[P] -> [P, 1, 1], to scale each problem's [N, D] block."""
    return values[:, None, None]


def _objective(
    x1: Tensor, labels: Tensor, weights: Tensor, l2: Tensor, center: Tensor | None = None
) -> Objective:
    """Loss [P] and gradient [P, N, D] of P weighted logistic regressions.

    `x1` [n, D]: features with a trailing 1 (the bias); `weights` [n, P]: each problem's
    weight on each row (its training rows, summing to 1); `l2` [P]. `theta` [P, N, D]:
    weights with the bias as the last column (not penalised). `center` [P, N, D-1]: the
    weights the L2 penalty pulls towards (default 0).
    """
    n, dim = x1.shape
    problems = weights.shape[1]

    def evaluate(theta: Tensor) -> tuple[Tensor, Tensor]:
        n_way = theta.shape[1]
        logits = (x1 @ theta.view(problems * n_way, dim).T).view(n, problems, n_way)
        logp = logits.log_softmax(-1)
        target = labels.view(n, 1, 1).expand(n, problems, 1)
        nll = -logp.gather(2, target).squeeze(2)  # [n, P]
        offset = theta[:, :, :-1] if center is None else theta[:, :, :-1] - center
        loss = (nll * weights).sum(0) + 0.5 * l2 * _dot(offset, offset)
        dlogits = logp.exp_()  # softmax - onehot, weighted: d loss / d logits
        dlogits.scatter_add_(2, target, torch.full_like(target, -1, dtype=dlogits.dtype))
        dlogits.mul_(weights[:, :, None])
        grad = (dlogits.view(n, problems * n_way).T @ x1).view(problems, n_way, dim)
        grad[:, :, :-1].addcmul_(_per(l2), offset)
        return loss, grad

    return evaluate


def _lbfgs(objective: Objective, theta: Tensor, max_iter: int, tol: float = LBFGS_TOL) -> Tensor:
    """Minimise P independent problems at once: each keeps its own L-BFGS memory and
    its own backtracking (Armijo) step; a problem stops when its largest gradient entry
    is below `tol` or no step lowers its loss."""
    loss, grad = objective(theta)
    memory: list[tuple[Tensor, Tensor, Tensor]] = []  # (s, y, 1/s·y) per problem
    active = grad.abs().amax((1, 2)) > tol
    for _ in range(max_iter):
        if not bool(active.any()):
            break
        direction = grad.neg()
        alphas = []
        for s, y, rho in reversed(memory):
            alpha = rho * _dot(s, direction)
            direction.addcmul_(_per(-alpha), y)
            alphas.append(alpha)
        if memory:
            s, y, _ = memory[-1]
            sy, yy = _dot(s, y), _dot(y, y)
            ok = (sy > 0) & (yy > 0)
            gamma = torch.where(ok, sy / yy.clamp(min=1e-30), torch.ones_like(sy))
        else:
            gamma = 1 / grad.abs().sum((1, 2)).clamp(min=1.0)
        direction.mul_(_per(gamma))
        for (s, y, rho), alpha in zip(memory, reversed(alphas), strict=True):
            direction.addcmul_(_per(alpha - rho * _dot(y, direction)), s)
        slope = _dot(grad, direction)
        uphill = slope >= 0
        if bool(uphill.any()):  # a stale memory: steepest descent for that problem
            direction = torch.where(_per(uphill), -grad, direction)
            slope = _dot(grad, direction)
        step = active.to(theta.dtype)
        slack = 1e-6 * loss.abs().clamp(min=1.0)  # float32 rounding of the loss
        for _ in range(10):
            candidate = theta + _per(step) * direction
            new_loss, new_grad = objective(candidate)
            accepted = (new_loss <= loss + 1e-4 * step * slope + slack) | (step == 0)
            if bool(accepted.all()):
                break
            step = torch.where(accepted, step, step * 0.25)
        else:  # no decrease found: that problem has converged as far as it can
            step = torch.where(accepted, step, torch.zeros_like(step))
            active = active & accepted
            candidate = theta + _per(step) * direction
            new_loss, new_grad = objective(candidate)
        s, y = candidate - theta, new_grad - grad
        sy = _dot(s, y)
        memory.append(
            (s, y, torch.where(sy > 1e-10, 1 / sy.clamp(min=1e-10), torch.zeros_like(sy)))
        )
        if len(memory) > _HISTORY:
            memory.pop(0)
        theta, loss, grad = candidate, new_loss, new_grad
        active = active & (grad.abs().amax((1, 2)) > tol)
    return theta


def _scaled_prototypes(
    x1: Tensor, onehot: Tensor, row_weights: Tensor, weights: Tensor, l2: Tensor
) -> tuple[Tensor, Tensor]:
    """Each problem's prototype head (from its own training rows) [P, N, D], times the
    temperature τ that minimises its penalised loss along that ray (a few Newton steps
    on the convex 1-D problem); and τ [P]."""
    n, dim = x1.shape
    problems, n_way = row_weights.shape[0], onehot.shape[1]
    counts = row_weights @ onehot  # [P, N]
    sums = (row_weights[:, :, None] * onehot).transpose(1, 2) @ x1[:, :-1]  # [P, N, d]
    means = sums / counts.clamp(min=1)[:, :, None]
    theta = torch.cat([2 * means, -means.pow(2).sum(-1, keepdim=True)], -1)
    logits = (x1 @ theta.view(problems * n_way, dim).T).view(n, problems, n_way)
    target = (logits * onehot[:, None, :]).sum(-1)  # [n, P]
    norm = _dot(theta[:, :, :-1], theta[:, :, :-1])
    squared = logits.square()
    tau = torch.ones(problems, device=x1.device)
    for _ in range(6):  # MiniLM full-way: τ ≈ 8-10, within 0.1% after 5 steps
        probs = (tau.view(1, -1, 1) * logits).softmax(-1)
        mean = (probs * logits).sum(-1)
        variance = (probs * squared).sum(-1) - mean.square()
        slope = ((mean - target) * weights).sum(0) + l2 * tau * norm
        curvature = (variance * weights).sum(0) + l2 * norm
        tau = (tau - slope / curvature.clamp(min=1e-12)).clamp(tau / 4, tau * 4)
    return theta * _per(tau), tau


def _fit_batched(
    features: Tensor,
    labels: Tensor,
    n_way: int,
    row_weights: Tensor,
    l2: Tensor,
    max_iter: int,
    tol: float = LBFGS_TOL,
    prior: Tensor | None = None,
    prior_weight: float = 1.0,
) -> tuple[Tensor, Tensor]:
    """Fit P independent logistic regressions at once (see `_lbfgs`).

    `row_weights` [P, n]: how much each support row counts in each problem (0: left
    out; a row of weight 2 counts as two copies); `l2` [P]: each problem's L2 strength.
    Returns W [P, N, dim] and b [P, N], each started from the (temperature-scaled)
    prototypes of the rows it trains on.

    `prior` [N, dim] (e.g. the embeddings of the class names): the penalty becomes
    `l2/2·‖W‖² + prior_weight·l2/2·‖W − τ·2·prior‖²`, a Gaussian prior centred on the
    prototype head of `prior` at the temperature τ of the problem's start.
    """
    x = features.detach().float()
    x1 = torch.cat([x, x.new_ones(len(x), 1)], 1)
    onehot = torch.nn.functional.one_hot(labels, n_way).to(x.dtype)
    row_weights = row_weights.to(x)
    weights = (row_weights / row_weights.sum(1, keepdim=True).clamp(min=1e-12)).T.contiguous()
    l2 = l2.to(x)
    with torch.no_grad():
        theta, tau = _scaled_prototypes(x1, onehot, row_weights, weights, l2)
        center = None
        if prior is not None:  # l2‖W‖² + w·l2‖W − C‖² = (1+w)·l2‖W − w/(1+w)·C‖² + const
            share = prior_weight / (1 + prior_weight)
            center = _per(share * tau) * 2 * prior.detach().to(x)[None]
            l2 = l2 * (1 + prior_weight)
        objective = _objective(x1, labels, weights, l2, center)
        theta = _lbfgs(objective, theta.contiguous(), max_iter, tol)
    return theta[:, :, :-1].contiguous(), theta[:, :, -1].contiguous()


def shot_folds(labels: Tensor, n_way: int, max_folds: int = MAX_FOLDS) -> Tensor:
    """Leave-one-shot-out folds [F, n] (1 = train row): fold f holds out the f-th
    example of every class that has more than one; F is the largest class size, at most
    `max_folds` (>= 2): beyond that, fold f holds out the examples f, f+F, f+2F, ..."""
    if max_folds < 2:
        raise ValueError(f"max_folds must be >= 2, got {max_folds}")
    rank = torch.zeros_like(labels)
    seen = [0] * n_way
    for i, label in enumerate(labels.tolist()):
        rank[i] = seen[label]
        seen[label] += 1
    sizes = torch.tensor(seen, device=labels.device)[labels]
    folds = min(max(seen), max_folds)
    held_out = (rank[None, :] % folds == torch.arange(folds, device=labels.device)[:, None]) & (
        sizes[None, :] > 1
    )
    return (~held_out).float()


def loo_scores(
    features: Tensor,
    labels: Tensor,
    n_way: int,
    grid: Sequence[float] = L2_GRID,
    max_iter: int = SELECT_ITER,
) -> tuple[Tensor, Tensor] | None:
    """Held-out (negative log-likelihood, accuracy) [G] of each L2 strength in `grid`,
    over the leave-one-shot-out folds of the support set; None when no class has two
    examples."""
    folds = shot_folds(labels, n_way)
    held_out = 1 - folds  # [F, n]
    if held_out.sum() == 0:
        return None
    n_grid, n_folds = len(grid), len(folds)
    row_weights = folds.repeat(n_grid, 1)  # [G*F, n], grid-major
    l2 = torch.tensor([float(v) for v in grid], device=features.device)
    weight, bias = _fit_batched(
        features, labels, n_way, row_weights, l2.repeat_interleave(n_folds), max_iter
    )
    x = features.detach().float()
    problems = len(weight)
    with torch.no_grad():
        logits = (x @ weight.view(problems * n_way, -1).T).view(len(x), problems, n_way)
        logits = logits + bias
        target = labels.view(-1, 1, 1).expand(-1, problems, 1)
        nll = -logits.log_softmax(-1).gather(2, target).squeeze(2).T  # [P, n]
        correct = (logits.argmax(-1) == labels[:, None]).float().T
        mask = held_out.repeat(n_grid, 1)
        total = held_out.sum()
        score = (nll * mask).sum(1).view(n_grid, -1).sum(1) / total
        accuracy = (correct * mask).sum(1).view(n_grid, -1).sum(1) / total
    return score, accuracy


def choose_l2(
    features: Tensor,
    labels: Tensor,
    n_way: int,
    grid: Sequence[float] = L2_GRID,
    max_iter: int = SELECT_ITER,
) -> float:
    """The L2 strength from `grid` with the best leave-one-shot-out log-likelihood on
    the support set (never the queries). With one example per class there is nothing
    to hold out, and `DEFAULT_L2` is returned.

    Not the default (`learner.logreg_l2=0` asks for it): on MiniLM full-way
    BANKING77/CLINC150 the likelihood picks the smallest value of the grid every time,
    and on the `valid` splits it scored below the fixed `DEFAULT_LOGREG_L2` (see there)."""
    if not grid:
        raise ValueError("choose_l2 needs at least one L2 strength in grid")
    if len(grid) == 1:
        return float(grid[0])
    scores = loo_scores(features, labels, n_way, grid, max_iter)
    if scores is None:
        return DEFAULT_L2
    return float(grid[int(scores[0].argmin())])


def fit_logreg(
    features: Tensor,
    labels: Tensor,
    n_way: int,
    l2: float | None = None,
    grid: Sequence[float] = L2_GRID,
    max_iter: int = FIT_ITER,
    tol: float = LBFGS_TOL,
    sample_weight: Tensor | None = None,
    prior: Tensor | None = None,
    prior_weight: float = 1.0,
) -> dict[str, Tensor]:
    """A multinomial logistic regression head `{"head.weight", "head.bias"}` on
    `features`, started from the prototype head; `l2=None` picks it by
    leave-one-shot-out over `grid` (see `choose_l2`). `head.l2` records the strength.
    L-BFGS stops after `max_iter` steps or when no gradient entry is above `tol`.

    `sample_weight` [n]: how much each row counts (default 1 each); `prior` [N, dim],
    `prior_weight`: a Gaussian prior on the weights centred on the prototype head of
    `prior`, e.g. the class names' embeddings (see `_fit_batched`)."""
    device = features.device
    if device.type != "cpu" and len(features) * n_way <= SMALL_FIT:
        state = fit_logreg(
            features.cpu(),
            labels.cpu(),
            n_way,
            l2,
            grid,
            max_iter,
            tol,
            sample_weight.cpu() if sample_weight is not None else None,
            prior.cpu() if prior is not None else None,
            prior_weight,
        )
        return {k: v.to(device) for k, v in state.items()}
    if l2 is None:
        l2 = choose_l2(features, labels, n_way, grid)
    if sample_weight is None:
        rows = torch.ones(1, len(labels), device=features.device)
    else:
        if sample_weight.shape != labels.shape or not bool((sample_weight >= 0).all()):
            raise ValueError("sample_weight needs one weight >= 0 per row")
        rows = sample_weight.detach().float().view(1, -1)
    if prior is not None and prior.shape != (n_way, features.shape[1]):
        raise ValueError(f"prior must be [{n_way}, {features.shape[1]}], got {list(prior.shape)}")
    strength = torch.tensor([float(l2)], device=features.device)
    weight, bias = _fit_batched(
        features, labels, n_way, rows, strength, max_iter, tol, prior, prior_weight
    )
    return {"head.weight": weight[0], "head.bias": bias[0], "head.l2": strength}
