"""Per-example loss from the logits the training forward pass already produced.

The HF Trainer only sees the batch-mean loss. Here we recompute token-mean cross-entropy *per example*
from the same logits and labels (no second model forward), under ``no_grad`` and on the model's device.
Labels follow the HF causal-LM convention: position ``t`` predicts label ``t + 1``; ``-100`` is ignored.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


@torch.no_grad()
def per_example_token_loss(
    logits: torch.Tensor, labels: torch.Tensor, *, ignore_index: int = IGNORE_INDEX, shift: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token-mean cross-entropy of each example.

    Args:
        logits: ``(batch, seq, vocab)`` from the model.
        labels: ``(batch, seq)``; ``ignore_index`` marks tokens that do not count (prompt, padding, image).
        shift: shift labels left by one as HF causal LMs do internally.

    Returns:
        ``(loss, valid)``, both ``(batch,)`` on the logits' device. ``valid`` is False for an example with
        no counted token or with a non-finite loss; its ``loss`` entry is then NaN or the non-finite value
        and must be masked by the caller.
    """
    if logits.dim() != 3 or labels.dim() != 2 or logits.shape[:2] != labels.shape:
        raise ValueError(
            f"expected logits (batch, seq, vocab) and labels (batch, seq) with matching batch/seq; got "
            f"logits {tuple(logits.shape)} and labels {tuple(labels.shape)}"
        )
    if shift:
        logits, labels = logits[:, :-1, :], labels[:, 1:]
    labels = labels.to(logits.device)
    batch, seq, vocab = logits.shape
    token_loss = F.cross_entropy(
        logits.reshape(-1, vocab).float(), labels.reshape(-1), ignore_index=ignore_index, reduction="none"
    ).view(batch, seq)
    counted = (labels != ignore_index).sum(dim=1)
    loss = token_loss.sum(dim=1) / counted.clamp(min=1)
    loss = torch.where(counted > 0, loss, torch.full_like(loss, float("nan")))
    valid = (counted > 0) & torch.isfinite(loss)
    return loss, valid
