"""A causal LM whose training forward returns only the loss, as fused linear cross-entropy kernels do.

Liger's ``FusedLinearCrossEntropy`` and Cut Cross-Entropy compute the loss from the last hidden state
and the LM head's weight chunk by chunk, never materialising ``(batch, seq, vocab)`` logits, and return
``logits=None`` in training. Those kernels need a GPU; :class:`FusedLossLlama` reproduces their interface
and memory profile on CPU (each chunk's logits are recomputed in the backward through activation
checkpointing) so dataflex's hidden-state fallback is tested and measured against the same kind of model.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint
from transformers import LlamaForCausalLM
from transformers.modeling_outputs import CausalLMOutputWithPast

from dataflex.losses import IGNORE_INDEX

__all__ = ["FusedLossLlama", "chunked_linear_cross_entropy"]


def chunked_linear_cross_entropy(
    hidden: torch.Tensor, weight: torch.Tensor, shift_labels: torch.Tensor, chunk_tokens: int = 1024
) -> torch.Tensor:
    """Summed cross-entropy of ``hidden @ weight.T`` against ``shift_labels``, ``chunk_tokens`` rows at a time."""
    hidden, shift_labels = hidden.reshape(-1, hidden.shape[-1]), shift_labels.reshape(-1)

    def chunk_loss(h: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy((h @ weight.T).float(), y, ignore_index=IGNORE_INDEX, reduction="sum")

    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, hidden.shape[0], chunk_tokens):
        h, y = hidden[start : start + chunk_tokens], shift_labels[start : start + chunk_tokens]
        total = total + checkpoint(chunk_loss, h, y, use_reentrant=False)
    return total


class FusedLossLlama(LlamaForCausalLM):
    """``LlamaForCausalLM`` whose training forward with labels returns the loss and ``logits=None``."""

    def forward(self, input_ids=None, labels=None, num_items_in_batch=None, **kwargs: Any) -> CausalLMOutputWithPast:
        if labels is None or not self.training:
            return super().forward(input_ids=input_ids, labels=labels, **kwargs)
        outputs = self.model(input_ids=input_ids, **kwargs)
        shift_labels = F.pad(labels, (0, 1), value=IGNORE_INDEX)[..., 1:]
        total = chunked_linear_cross_entropy(outputs.last_hidden_state, self.lm_head.weight, shift_labels)
        count = num_items_in_batch if num_items_in_batch is not None else (shift_labels != IGNORE_INDEX).sum()
        if torch.is_tensor(count):
            count = count.to(total.device)
        return CausalLMOutputWithPast(loss=total / count, logits=None)
