"""Loss capture: per-example losses from the forward the training step already runs.

A forward hook on the model reads each training forward's logits and labels and hands
``(inputs, per-example loss, has_tokens)`` to a sink; evaluation, generation and forwards outside the
optimizer step (``active`` is False, or the module is in eval mode) are ignored. When the Trainer
uses a ``compute_loss_func`` it pops ``labels`` before the forward, so the hook keeps the outputs and
:meth:`LossCapture.wrap_loss` scores them when the Trainer calls the loss function with the labels.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import torch

from dataflex.losses import IGNORE_INDEX, per_example_token_loss

__all__ = ["LossCapture", "output_logits"]

Sink = Callable[[dict[str, Any], torch.Tensor, torch.Tensor], None]


def output_logits(output: Any) -> torch.Tensor:
    """The logits of a causal-LM forward's output (a ModelOutput, a dict or a ``(loss, logits, ...)`` tuple)."""
    if hasattr(output, "keys"):
        if "logits" in output.keys() and output["logits"] is not None:
            return output["logits"]
        raise ValueError(
            f"the model's forward returned the keys {sorted(output.keys())} without 'logits'; dataflex computes "
            "per-example losses from the logits of the training forward"
        )
    if isinstance(output, (tuple, list)) and len(output) > 1 and isinstance(output[1], torch.Tensor):
        return output[1]  # return_dict=False with labels: (loss, logits, ...)
    raise ValueError(f"cannot find logits in the model's output of type {type(output).__name__}")


class LossCapture:
    """Hooks a model's forward and reports every training micro-batch's per-example losses to ``sink``."""

    def __init__(self, sink: Sink) -> None:
        self.sink = sink
        self.active = False  # True between on_step_begin and on_step_end
        self.missing_labels = 0  # training forwards without labels (cannot be scored)
        self._loss_wrapped = False
        self._pending: tuple[dict[str, Any], Any] | None = None
        self._handle: torch.utils.hooks.RemovableHandle | None = None

    def attach(self, model: torch.nn.Module) -> None:
        self.detach()
        self._handle = model.register_forward_hook(self._on_forward, with_kwargs=True)

    def detach(self) -> None:
        if self._handle is not None:
            self._handle.remove()
        self._handle = None
        self._pending = None

    def is_training_forward(self, module: torch.nn.Module) -> bool:
        return self.active and module.training

    def _on_forward(self, module: torch.nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        if not self.is_training_forward(module):
            return
        labels = kwargs.get("labels")
        if labels is None and self._loss_wrapped:
            self._pending = (kwargs, output)  # the wrapped compute_loss_func brings the labels
            return
        if labels is None:
            self.missing_labels += 1
            if self.missing_labels == 1:
                warnings.warn("a training forward had no `labels`: dataflex cannot score it", stacklevel=2)
            return
        self._score(kwargs, output, labels)

    def _score(self, inputs: dict[str, Any], output: Any, labels: torch.Tensor) -> None:
        loss, _ = per_example_token_loss(output_logits(output), labels)
        has_tokens = (labels[:, 1:] != IGNORE_INDEX).any(dim=1).to(loss.device)
        self.sink({**inputs, "labels": labels}, loss, has_tokens)

    def wrap_loss(self, loss_func: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
        """A ``compute_loss_func`` that lets dataflex see the labels, then calls ``loss_func``."""
        self._loss_wrapped = True

        def compute_loss(outputs: Any, labels: torch.Tensor, num_items_in_batch: Any = None) -> torch.Tensor:
            pending, self._pending = self._pending, None
            if pending is not None:
                self._score(pending[0], pending[1], labels)
            return loss_func(outputs, labels, num_items_in_batch)

        return compute_loss
