"""Causal-LM cross-entropy per token and per example: the one place these losses are computed.

The HF Trainer only sees the batch-mean loss. Here token-level cross-entropy is recomputed from the
logits the forward pass already produced (no second model forward), on the model's device. Labels
follow the HF causal-LM convention: position ``t`` predicts label ``t + 1``; ``-100`` is ignored.

* :func:`token_cross_entropy` — ``(batch, seq - 1)`` per-token losses, ignored tokens 0, with gradient.
* :func:`per_example_mean_loss` — token-mean loss of each example, with gradient (influence, weighting).
* :func:`per_example_token_loss` — the same under ``no_grad``, with NaN and a ``valid`` mask for
  examples that have no counted token or a non-finite loss (scoring, statistics).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["IGNORE_INDEX", "per_example_mean_loss", "per_example_token_loss", "token_cross_entropy"]

IGNORE_INDEX = -100


def _check_shapes(logits: torch.Tensor, labels: torch.Tensor) -> None:
    if logits.dim() != 3 or labels.dim() != 2 or logits.shape[:2] != labels.shape:
        raise ValueError(
            f"expected logits (batch, seq, vocab) and labels (batch, seq) with matching batch/seq; got "
            f"logits {tuple(logits.shape)} and labels {tuple(labels.shape)}"
        )


def token_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-token loss ``(batch, seq - 1)`` with the causal shift, in float32; ignored tokens get 0."""
    _check_shapes(logits, labels)
    shifted = labels[:, 1:].to(logits.device)
    vocab = logits.shape[-1]
    return F.cross_entropy(
        logits[:, :-1].reshape(-1, vocab).float(), shifted.reshape(-1), ignore_index=IGNORE_INDEX, reduction="none"
    ).view(shifted.shape)


def _counted_tokens(labels: torch.Tensor, device: torch.device) -> torch.Tensor:
    return (labels[:, 1:] != IGNORE_INDEX).sum(dim=1).to(device)


def per_example_mean_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Token-mean cross-entropy of each example *with* gradient; an example with no counted token gives 0."""
    return token_cross_entropy(logits, labels).sum(1) / _counted_tokens(labels, logits.device).clamp(min=1)


@torch.no_grad()
def per_example_token_loss(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Token-mean cross-entropy of each example, without gradient.

    Returns ``(loss, valid)``, both ``(batch,)`` on the logits' device. ``valid`` is False for an example
    with no counted token (its loss is NaN) or with a non-finite loss; the caller masks those.
    """
    counted = _counted_tokens(labels, logits.device)
    loss = token_cross_entropy(logits, labels).sum(1) / counted.clamp(min=1)
    loss = torch.where(counted > 0, loss, torch.full_like(loss, float("nan")))
    return loss, (counted > 0) & torch.isfinite(loss)
