"""Per-token loss weights inside backprop: token selection (Rho-1) and user-given token weights.

:class:`TokenWeightedLoss` is a ``compute_loss_func`` for a stock ``transformers.Trainer``: the causal-LM
cross-entropy of every counted target token, times a weight from a rule, normalised like the stock loss:

    loss = sum_t w_t * l_t / (num_items_in_batch * mean_t w_t)

``num_items_in_batch`` is the Trainer's count of counted tokens in the whole optimizer step and the mean
weight is over this micro-batch's counted tokens. With every weight 1 this *is* the stock loss (the same
sum over the same count, so training is unchanged); a 0/1 selection of a share ``k`` of the tokens gives
the mean loss over the selected tokens, as Rho-1 trains (Lin et al., "Rho-1: Not All Tokens Are What You
Need", arXiv 2404.07965).

Rules:

* :func:`rho1` — excess loss ``l_t - l_ref_t`` over a reference model's token losses (computed once per
  example beforehand with :func:`reference_token_losses`, the paper's offline reference pass, so training
  costs no second forward); the top ``keep`` share of each micro-batch's counted tokens gets weight 1.
* any callable ``rule(token_loss, counted, ids) -> weights`` of shape ``(batch, seq - 1)`` (no gradient).

The micro-batch's example ids come from the dataflex callback (``callback.wrap_loss`` scores the batch before
the loss is computed); the effective token share (selected or weighted tokens / counted tokens) is logged
through that callback as ``dataflex/effective_token_share`` at the Trainer's logging steps.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from dataflex.checks import real_number
from dataflex.losses import IGNORE_INDEX, check_causal_lm, check_causal_output, segment_columns, token_cross_entropy

__all__ = ["ReferenceTokenLosses", "TokenWeightedLoss", "reference_token_losses", "rho1"]

Rule = Callable[[torch.Tensor, torch.Tensor, np.ndarray], torch.Tensor]


class ReferenceTokenLosses:
    """A reference model's loss of every counted target token of every example, in position order."""

    def __init__(self, per_example: Sequence[np.ndarray]) -> None:
        self.per_example = [np.asarray(x, dtype=np.float32) for x in per_example]

    def __len__(self) -> int:
        return len(self.per_example)

    def for_batch(self, ids: np.ndarray, counted: torch.Tensor) -> torch.Tensor:
        """``(batch, seq - 1)`` reference losses placed at the counted positions of this micro-batch."""
        out = torch.zeros(counted.shape, dtype=torch.float32)
        for row, i in enumerate(np.asarray(ids).tolist()):
            values = self.per_example[i]
            where = counted[row].nonzero()[:, 0].cpu()
            if where.numel() != values.size:
                raise ValueError(
                    f"example {i} has {where.numel()} counted tokens in this batch but its reference losses cover "
                    f"{values.size}; the reference pass used other labels or truncation"
                )
            out[row, where] = torch.from_numpy(values)
        return out.to(counted.device)


@torch.no_grad()
def reference_token_losses(
    model: torch.nn.Module, dataset: Any, collate: Callable[[list[dict]], dict[str, torch.Tensor]], batch_size: int = 32
) -> ReferenceTokenLosses:
    """One forward of ``model`` over ``dataset`` (batches of ``batch_size``, in order): the reference losses
    Rho-1 compares against. Costs ``len(dataset)`` forward passes once; count it against the method."""
    from tqdm.auto import tqdm

    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1; got {batch_size!r}")
    check_causal_lm(model)
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    out: list[np.ndarray] = []
    try:
        for start in tqdm(range(0, len(dataset), batch_size), desc="reference token losses", leave=False):
            batch = collate([dataset[i] for i in range(start, min(start + batch_size, len(dataset)))])
            batch = {k: v.to(device) for k, v in batch.items()}
            labels = batch.pop("labels")
            loss = token_cross_entropy(model(**batch).logits, labels)
            counted = labels[:, 1:] != IGNORE_INDEX
            out += [loss[r][counted[r]].float().cpu().numpy() for r in range(loss.shape[0])]
    finally:
        model.train(was_training)
    return ReferenceTokenLosses(out)


def rho1(reference: ReferenceTokenLosses, keep: float = 0.6) -> Rule:
    """Rho-1's selection: weight 1 for the ``keep`` share of counted tokens with the highest excess loss
    (current minus reference) in the micro-batch, 0 for the rest (ties broken by position)."""
    if not 0 < real_number("keep", keep) <= 1:
        raise ValueError(f"keep must be in (0, 1]; got {keep!r}")

    def rule(token_loss: torch.Tensor, counted: torch.Tensor, ids: np.ndarray) -> torch.Tensor:
        excess = token_loss - reference.for_batch(ids, counted)
        flat = excess[counted]
        k = int(np.ceil(keep * flat.numel()))
        weights = torch.zeros_like(token_loss)
        if k:
            chosen = torch.zeros_like(flat)
            chosen[flat.topk(k).indices] = 1.0
            weights[counted] = chosen
        return weights

    return rule


class PaddingFreeLayout:
    """A padding-free row's per-token values as one row per example (padded with 0), and back: what a token
    rule sees for a padding-free batch is what it would see for the same examples padded."""

    def __init__(self, segments: torch.Tensor, counted: torch.Tensor) -> None:
        owner, column, self.examples, width = segment_columns(segments.to(counted.device))
        if bool((counted[0] & (column < 0)).any()):
            raise ValueError(
                "this padding-free batch counts the first token of an example as a target of the example before "
                "it (its label is not -100): a token rule has no place for it; mask it as TRL's collator does"
            )
        self.keep = column >= 0
        self.owner, self.column, self.width = owner[self.keep], column[self.keep], width

    def rows(self, *values: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Each ``(1, seq - 1)`` value as ``(examples, width)``."""
        out = []
        for value in values:
            grid = value.new_zeros((self.examples, self.width))
            grid[self.owner, self.column] = value[0, self.keep]
            out.append(grid)
        return tuple(out)

    def flat(self, rows: torch.Tensor) -> torch.Tensor:
        """``(examples, width)`` back to the padding-free row's ``(1, seq - 1)``; 0 where no example is."""
        out = rows.new_zeros((1, self.keep.numel()))
        out[0, self.keep] = rows[self.owner, self.column]
        return out


class TokenWeightedLoss:
    """A ``compute_loss_func`` with a weight per target token; see the module docstring.

    Evaluation forwards (no gradient, no training micro-batch) get the plain loss: every weight 1.

    ``Trainer(..., compute_loss_func=callback.wrap_loss(TokenWeightedLoss(rule, callback)))``: ``callback`` is
    the run's dataflex callback (it knows which examples the micro-batch holds and logs the token share).
    """

    smooths_labels = False  # label_smoothing_factor > 0 is refused at train begin (the Trainer would drop it)
    takes_segments = True  # the callback's wrap_loss passes where each example of a padding-free row lies

    def __init__(self, rule: Rule, callback: Any) -> None:
        if not callable(rule):
            raise TypeError(f"rule must be callable (token_loss, counted, ids) -> weights; got {type(rule).__name__}")
        self.rule, self.callback = rule, callback
        self.effective_tokens = 0.0  # sum of weights since the last log
        self.counted_tokens = 0
        self.last_weights: torch.Tensor | None = None
        callback.add_log_metrics(self._log_metrics)

    def __call__(
        self,
        outputs: Any,
        labels: torch.Tensor,
        num_items_in_batch: Any = None,
        *,
        segments: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``segments``: where each example of a padding-free row lies, handed over by the callback's
        ``wrap_loss``; the rule then sees one row per example, as in a padded batch."""
        check_causal_output(outputs)
        logits = outputs.get("logits") if hasattr(outputs, "get") else getattr(outputs, "logits", None)
        if logits is None:  # a fused linear cross-entropy forward: no logits to weight token by token
            raise ValueError(
                "TokenWeightedLoss needs the forward's logits; this model's output has none (a fused linear "
                "cross-entropy kernel?): turn the fused loss off for token-weighted training"
            )
        labels = labels.to(logits.device)
        token_loss = token_cross_entropy(logits, labels)  # (batch, seq - 1), ignored positions 0
        counted = labels[:, 1:] != IGNORE_INDEX
        n_counted = int(counted.sum())
        ids = self.callback.current_ids()
        if ids is None and not torch.is_grad_enabled():
            weights = counted.to(token_loss.dtype)  # an evaluation forward: the plain loss, every token 1
        else:
            layout = None if segments is None else PaddingFreeLayout(segments, counted)
            examples = labels.shape[0] if layout is None else layout.examples
            if ids is None or len(ids) != examples:
                raise RuntimeError(
                    f"TokenWeightedLoss needs the micro-batch's example ids from its dataflex callback (got "
                    f"{'none' if ids is None else len(ids)} for {examples} examples): pass "
                    "compute_loss_func=callback.wrap_loss(TokenWeightedLoss(rule, callback))"
                )
            rule_loss, rule_counted = (token_loss, counted) if layout is None else layout.rows(token_loss, counted)
            with torch.no_grad():
                weights = self.rule(rule_loss.detach(), rule_counted, ids)
            # Checked before masking: a (batch, 1) answer would otherwise broadcast into a plausible shape.
            if weights.shape != rule_loss.shape or not bool(torch.isfinite(weights).all()) or bool((weights < 0).any()):
                raise ValueError(
                    f"token weights must be finite, >= 0 and of shape {tuple(rule_loss.shape)}; got "
                    f"{tuple(weights.shape)}"
                )
            if layout is not None:
                weights = layout.flat(weights)
            weights = weights.to(token_loss.dtype) * counted
            self.effective_tokens += float(weights.sum())  # the logged share counts training tokens only
            self.counted_tokens += n_counted
        self.last_weights = weights
        if n_counted == 0:
            return (token_loss * 0.0).sum()
        mean_weight = weights.sum() / n_counted
        total = num_items_in_batch if num_items_in_batch is not None else n_counted
        if torch.is_tensor(total):
            total = total.to(token_loss.device)
        scale = total * mean_weight
        return (weights * token_loss).sum() / torch.clamp(scale, min=torch.finfo(token_loss.dtype).tiny)

    def _log_metrics(self) -> dict[str, float]:
        if not self.counted_tokens:
            return {}
        share = self.effective_tokens / self.counted_tokens
        metrics = {"dataflex/effective_tokens": self.effective_tokens, "dataflex/effective_token_share": share}
        self.effective_tokens, self.counted_tokens = 0.0, 0
        return metrics
