"""Fast LP-FT: fine-tune only the top transformer blocks of the encoder on a support set.

The hidden states of the support texts entering the top `blocks` layers are computed
once, without gradients (`TopBlockInputs`); each AdamW step then runs only those layers
(forward and backward) on a mini-batch, instead of the whole model as
`metalm.learners.finetune.finetune_encoder` does. Only the top layers' tensors adapt, so
a task state holds just those (`encoder.encoder.layer.5.…`), and
`TextEncoder.embed(texts, params=...)` applies them (`torch.func.functional_call` keeps
the model's own weights for the names it is not given).

`adapt_top_blocks` can also choose the number of steps on the support set (early
stopping, leave-one-shot-out): one shot of each class is held out, the linear probe is
fitted on the rest and fine-tuned for up to `steps` steps, and the step count with the
lowest held-out cross-entropy (0: no fine-tuning) is then run on the whole support set.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from metalm.errors import MetalmError
from metalm.learners.base import head_loss
from metalm.learners.heads import fit_logreg
from metalm.models.encoder import FORWARD_TOKENS, TextEncoder, length_groups

logger = logging.getLogger(__name__)


def encoder_layers(model: nn.Module) -> nn.ModuleList:
    """The transformer layers of a BERT-like model (`model.encoder.layer`)."""
    layers = getattr(getattr(model, "encoder", None), "layer", None)
    if not isinstance(layers, nn.ModuleList):
        raise MetalmError(
            "learner.lpft_blocks needs a BERT-like encoder (model.encoder.layer); "
            "set learner.lpft_blocks=0 to fine-tune the whole model"
        )
    return layers


def top_block_names(model: nn.Module, blocks: int) -> list[str]:
    """Names (as in `model.named_parameters()`) of the parameters of the top `blocks` layers.

    Example:
        >>> top_block_names(encoder.model, 1)[:2]   # the tiny BERT has 2 layers
        ['encoder.layer.1.attention.self.query.weight', 'encoder.layer.1.attention.self.query.bias']
    """
    start = _first_block(model, blocks)
    prefixes = tuple(f"encoder.layer.{i}." for i in range(start, len(encoder_layers(model))))
    return [name for name, _ in model.named_parameters() if name.startswith(prefixes)]


def _first_block(model: nn.Module, blocks: int) -> int:
    n_layers = len(encoder_layers(model))
    if not 1 <= blocks <= n_layers:
        raise MetalmError(f"learner.lpft_blocks must be in 0..{n_layers} (0: all), got {blocks}")
    return n_layers - blocks


class _Reached(Exception):
    """Raised by a forward pre-hook to stop the model once the wanted layer is reached."""


@dataclass
class TopBlockInputs:
    """The hidden states entering layer `start` for each text ([tokens, dim] each),
    computed once without gradients; `features` runs only the layers from `start` up.

    Example:
        >>> inputs = TopBlockInputs.compute(encoder, texts, blocks=1)
        >>> torch.allclose(inputs.features(range(len(texts))), encoder.embed(texts), atol=1e-5)
        True
    """

    encoder: TextEncoder
    start: int
    hidden: list[Tensor]

    @classmethod
    @torch.no_grad()
    def compute(cls, encoder: TextEncoder, texts: Sequence[str], blocks: int) -> TopBlockInputs:
        """Run the model's lower layers (all but the top `blocks`) on `texts` once."""
        if not texts:
            raise MetalmError("cannot encode an empty list of texts")
        model = encoder.model
        start = _first_block(model, blocks)
        seen: list[Tensor] = []

        def stop(_module: nn.Module, args: tuple, kwargs: dict) -> None:
            seen.append(args[0] if args else kwargs["hidden_states"])
            raise _Reached

        hidden: list[Tensor | None] = [None] * len(texts)
        counts = encoder.token_counts(texts)
        was_training = encoder.training
        encoder.eval()
        hook = encoder_layers(model)[start].register_forward_pre_hook(stop, with_kwargs=True)
        try:
            for group in length_groups(counts, FORWARD_TOKENS):
                seen.clear()
                with contextlib.suppress(_Reached):
                    model(**encoder.tokenize([texts[i] for i in group]))
                for row, i in enumerate(group):
                    hidden[i] = seen[0][row, : counts[i]].clone()
        finally:
            hook.remove()
            encoder.train(was_training)
        return cls(encoder, start, [h for h in hidden if h is not None])

    def features(self, rows: Sequence[int], params: dict[str, Tensor] | None = None) -> Tensor:
        """Pooled embeddings [len(rows), dim] of the texts `rows`, with gradients, the top
        layers running with `params` (by name; the model's own weights for the others).
        Texts of similar length go together, as in `TextEncoder.forward`; dropout is off
        (eval mode), as at prediction time."""
        was_training = self.encoder.training
        self.encoder.eval()
        try:
            return self._features(list(rows), params)
        finally:
            self.encoder.train(was_training)

    def _features(self, rows: list[int], params: dict[str, Tensor] | None) -> Tensor:
        model = self.encoder.model
        layers = encoder_layers(model)
        per_layer: list[dict[str, Tensor]] = []
        for i in range(self.start, len(layers)):
            prefix = f"encoder.layer.{i}."
            own = (params or {}).items()
            per_layer.append({k[len(prefix) :]: v for k, v in own if k.startswith(prefix)})
        counts = [len(self.hidden[i]) for i in rows]
        groups = length_groups(counts, FORWARD_TOKENS)
        parts = []
        for group in groups:
            width = max(counts[j] for j in group)
            first = self.hidden[rows[group[0]]]
            hidden = first.new_zeros(len(group), width, first.shape[-1])
            mask = torch.zeros(len(group), width, dtype=torch.long, device=first.device)
            for row, j in enumerate(group):
                hidden[row, : counts[j]] = self.hidden[rows[j]]
                mask[row, : counts[j]] = 1
            attention = _attention_mask(model, hidden, mask)
            for layer, own in zip(list(layers)[self.start :], per_layer, strict=True):
                kwargs = {"attention_mask": attention}
                if own:
                    out = torch.func.functional_call(layer, own, args=(hidden,), kwargs=kwargs)
                else:
                    out = layer(hidden, **kwargs)
                hidden = out[0] if isinstance(out, tuple) else out
            parts.append(self.encoder.pool(hidden, mask))
        order = torch.tensor([j for group in groups for j in group], device=parts[0].device)
        return torch.cat(parts)[torch.argsort(order)]


def _attention_mask(model: nn.Module, hidden: Tensor, mask: Tensor) -> Tensor | None:
    """The attention mask the model's layers take for the padding `mask` [batch, tokens]."""
    try:
        from transformers.masking_utils import create_bidirectional_mask
    except ImportError:  # transformers 4.x: the additive [batch, 1, 1, tokens] mask
        return model.get_extended_attention_mask(mask, tuple(mask.shape), dtype=hidden.dtype)
    return create_bidirectional_mask(config=model.config, inputs_embeds=hidden, attention_mask=mask)


def finetune_top_blocks(
    inputs: TopBlockInputs,
    labels: Tensor,
    head: dict[str, Tensor],
    steps: int,
    lr: float,
    head_lr: float,
    weight_decay: float = 0.01,
    batch_size: int = 64,
    seed: int = 0,
    rows: Sequence[int] | None = None,
    held_out: Sequence[int] | None = None,
) -> tuple[dict[str, Tensor], list[float]]:
    """`steps` AdamW steps on the top layers (at `lr`) and `head` (at `head_lr`, updated
    in place), on mini-batches of `batch_size` of the texts `rows` (default all; drawn
    as `finetune_encoder` draws them, with a generator seeded `seed`); eval mode (no
    dropout). Returns the adapted top-layer tensors by parameter name and, when
    `held_out` rows are given, their cross-entropy before each step and after the last
    (`steps + 1` values).

    Example:
        >>> inputs = TopBlockInputs.compute(encoder, texts, blocks=1)
        >>> x, y = encoder.embed(texts), torch.tensor(labels)
        >>> head = {k: v.requires_grad_() for k, v in fit_logreg(x, y, 3).items()}
        >>> params, losses = finetune_top_blocks(inputs, y, head, 3, 1e-3, 1e-3, held_out=[0])
        >>> sorted(params)[0], len(losses)
        ('encoder.layer.1.attention.output.LayerNorm.bias', 4)
    """
    model = inputs.encoder.model
    own = dict(model.named_parameters())
    names = [n for n in own if n.startswith(tuple(_layer_prefixes(inputs)))]
    params = {n: own[n].detach().clone().requires_grad_() for n in names}
    rows = list(range(len(inputs.hidden))) if rows is None else list(rows)
    trained = [head["head.weight"], head["head.bias"]]
    optimizer = torch.optim.AdamW(
        [{"params": trained, "lr": head_lr}, {"params": list(params.values()), "lr": lr}],
        weight_decay=weight_decay,
    )
    generator = torch.Generator().manual_seed(seed)
    losses: list[float] = []
    for step in range(steps + 1):
        if held_out:
            with torch.no_grad():
                features = inputs.features(held_out, params)
                losses.append(float(head_loss(head, features, labels[list(held_out)])))
        if step == steps:
            break
        picked = torch.randperm(len(rows), generator=generator)[:batch_size].tolist()
        batch = [rows[i] for i in picked]
        with torch.enable_grad():
            loss = head_loss(head, inputs.features(batch, params), labels[batch])
            optimizer.zero_grad()
            loss.backward()
        optimizer.step()
    return {k: v.detach() for k, v in params.items()}, losses


def _layer_prefixes(inputs: TopBlockInputs) -> list[str]:
    n_layers = len(encoder_layers(inputs.encoder.model))
    return [f"encoder.layer.{i}." for i in range(inputs.start, n_layers)]


def leave_one_shot_out(labels: Tensor) -> tuple[list[int], list[int]]:
    """Rows kept and rows held out: the last shot of every class that has two or more.

    Example:
        >>> leave_one_shot_out(torch.tensor([0, 0, 1, 2, 2, 2]))
        ([0, 2, 3, 4], [1, 5])
    """
    last: dict[int, int] = {}
    counts: dict[int, int] = {}
    for i, label in enumerate(labels.tolist()):
        last[label] = i
        counts[label] = counts.get(label, 0) + 1
    held = sorted(i for label, i in last.items() if counts[label] >= 2)
    out = set(held)
    kept = [i for i in range(len(labels)) if i not in out]
    return kept, held


def choose_steps(
    inputs: TopBlockInputs,
    features: Tensor,
    labels: Tensor,
    n_way: int,
    l2: float,
    steps: int,
    **finetune: float | int,
) -> tuple[int, list[float]]:
    """The number of fine-tuning steps (0..`steps`) with the lowest held-out
    cross-entropy when one shot per class is held out: the linear probe (at L2 `l2`) is
    fitted on the other shots (rows of `features`), then fine-tuned with
    `finetune_top_blocks(**finetune)`. Returns `steps` when no class has two shots, and
    the held-out losses (empty then)."""
    kept, held = leave_one_shot_out(labels)
    if not held or steps == 0:
        return steps, []
    probe = fit_logreg(features[kept], labels[kept], n_way, l2=l2)
    head = {k: probe[k].clone().requires_grad_() for k in ("head.weight", "head.bias")}
    _, losses = finetune_top_blocks(
        inputs, labels, head, steps, rows=kept, held_out=held, **finetune
    )
    return min(range(len(losses)), key=losses.__getitem__), losses


def adapt_top_blocks(
    inputs: TopBlockInputs,
    features: Tensor,
    labels: Tensor,
    head: dict[str, Tensor],
    steps: int,
    lr: float,
    head_lr: float,
    weight_decay: float = 0.01,
    batch_size: int = 64,
    early_stop: bool = False,
    l2: float = 1e-4,
) -> dict[str, Tensor]:
    """Fine-tune the top layers of `inputs` and the probe `head` (fitted on `features`,
    the support embeddings; updated in place) on the support set: `steps` steps, or with
    `early_stop` the count `choose_steps` picks (at most `steps`; `l2`: the probe's L2
    strength). Returns the adapted tensors by parameter name (empty: no step was taken).

    Example:
        >>> inputs = TopBlockInputs.compute(encoder, texts, blocks=1)
        >>> x, y = encoder.embed(texts), torch.tensor(labels)
        >>> head = {k: v.requires_grad_() for k, v in fit_logreg(x, y, 3).items()}
        >>> params = adapt_top_blocks(inputs, x, y, head, 5, 1e-3, 1e-3, early_stop=True)
        >>> all(name.startswith("encoder.layer.1.") for name in params)
        True
    """
    settings = {"lr": lr, "head_lr": head_lr, "weight_decay": weight_decay}
    settings["batch_size"] = batch_size
    if early_stop:
        n_way = int(labels.max()) + 1
        steps, losses = choose_steps(inputs, features, labels, n_way, l2, steps, **settings)
        logger.info("lpft early stopping: %d steps (held-out losses %s)", steps, losses)
    if steps == 0:
        return {}
    params, _ = finetune_top_blocks(inputs, labels, head, steps, **settings)
    return params
