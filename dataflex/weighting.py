"""Per-example loss weights inside backprop (loss reweighting).

Each example's loss is standardised over the *global* batch (every rank's examples), mapped through
``f`` and exponentiated: ``w_i ∝ exp(f(z_i) / T)`` with ``z = (l - mean) / std``; the weights are then
scaled to mean 1 over the global batch, so the loss keeps its scale and every rank uses the same
normalisation. ``f`` is ``+z`` to focus on hard examples and ``-z`` to down-weight them (robust to
label noise); ``T → ∞`` recovers the plain mean. Weights never carry gradient.

:class:`ExampleWeightedLoss` plugs this into a stock ``transformers.Trainer`` through its
``compute_loss_func`` argument — no subclass.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any, Literal

import numpy as np
import torch

from dataflex import dist
from dataflex.call_stack import caller_self
from dataflex.checks import real_number, whole_number
from dataflex.losses import (
    IGNORE_INDEX,
    check_causal_output,
    counted_per_example,
    per_example_mean_loss,
    token_cross_entropy,
)

__all__ = ["ExampleWeightedLoss", "loss_weights"]


def check_weighting(temperature: float, direction: str, max_weight: float) -> None:
    """Refuse settings that would silently change what is learnt (a cap below 1 scales every weight down:
    with 0, nothing is learnt at all), naming the value."""
    if not real_number("temperature", temperature) > 0:  # also rejects NaN; inf means uniform weights
        raise ValueError(f"temperature must be > 0 (inf for uniform weights); got {temperature}")
    if direction not in ("hard", "easy"):
        raise ValueError(f"direction={direction!r}; valid values are 'hard', 'easy'")
    if not real_number("max_weight", max_weight) >= 1:  # the weights average 1, so the cap must allow 1
        raise ValueError(f"max_weight must be >= 1 (the weights average 1; inf for no cap); got {max_weight}")


def loss_weights(
    losses: torch.Tensor,
    *,
    temperature: float = 1.0,
    direction: Literal["hard", "easy"] = "hard",
    max_weight: float = 10.0,
) -> torch.Tensor:
    """Weights for this rank's examples, normalised over all ranks' examples (mean 1, finite, <= max_weight).

    Non-finite losses get weight 0 and do not enter the statistics.
    """
    check_weighting(temperature, direction, max_weight)
    local = losses.detach().float()
    finite = torch.isfinite(local)
    parts = dist.all_gather_objects(local.cpu().numpy())
    everything = np.concatenate(parts)
    good = everything[np.isfinite(everything)]
    if good.size == 0:
        return torch.zeros_like(local)
    mean, std = float(good.mean()), float(good.std())
    sign = 1.0 if direction == "hard" else -1.0

    def raw(x: np.ndarray) -> np.ndarray:
        z = (x - mean) / (std + 1e-8)
        logit = np.zeros_like(z) if np.isinf(temperature) else np.clip(sign * z / temperature, -30, 30)
        return np.where(np.isfinite(x), np.exp(logit), 0.0)

    scale = good.size / raw(everything).sum()  # mean 1 over the finite examples of the global batch
    w = np.minimum(raw(local.cpu().numpy()) * scale, max_weight)
    return torch.as_tensor(w, dtype=local.dtype, device=local.device) * finite


class FirstStepCount:
    """How many micro-batches the Trainer's first optimizer step has, read from what a loss function is given.

    The Trainer passes every micro-batch of a step the same ``num_items_in_batch``: the counted label tokens of all
    of them (in one process), shifted by one for a causal loss or not, depending on the model. So the step ends
    where the micro-batches' running token count reaches that total exactly. Two counts (shifted, unshifted)
    reaching it at different micro-batches are ambiguous: then nothing is concluded (0). A total that changes
    before either count reached it is another step's, or a training loop the Trainer restarted (its retry with a
    smaller batch after running out of memory): counting starts afresh there.
    """

    def __init__(self) -> None:
        self.total: int | None = None
        self.calls = 0
        self.counts = [0, 0]  # shifted, unshifted
        self.ends: list[int | None] = [None, None]  # the micro-batch at which each count reached the total

    def add(self, labels: torch.Tensor, num_items_in_batch: Any) -> int | None:
        """Count one training micro-batch; the first step's micro-batches once known (0: cannot tell), else None."""
        total = int(num_items_in_batch)
        if self.total is not None and total != self.total:  # the next step's total, or a restarted loop's
            if any(end is not None for end in self.ends):
                return self._conclusion()
            self.__init__()  # (counting afresh)
        self.total = total
        self.calls += 1
        for i, counted in enumerate((labels[:, 1:] != IGNORE_INDEX, labels != IGNORE_INDEX)):
            self.counts[i] += int(counted.sum())
            if self.counts[i] == self.total and self.ends[i] is None:
                self.ends[i] = self.calls
        return self._conclusion() if min(self.counts) >= self.total else None

    def _conclusion(self) -> int:
        ends = {end for end in self.ends if end is not None}
        return ends.pop() if len(ends) == 1 else 0


class ExampleWeightedLoss:
    """A ``compute_loss_func`` for ``transformers.Trainer`` that weights each example's token-mean loss.

    ``Trainer(..., compute_loss_func=callback.wrap_loss(ExampleWeightedLoss(temperature=1.0,
    gradient_accumulation_steps=k)))``. The Trainer does not divide a custom loss by the accumulation steps, so
    it is done here: by the micro-batches the Trainer's current optimizer step really has when the dataflex
    callback tells it (``step_micro_batches``; the last step of an epoch can have fewer than ``k``, and the stock
    loss keeps its scale there) or, without the callback, the Trainer found calling it on the call stack (a ``k``
    other than the Trainer's is refused there, before any step), else by ``k``. The Trainer also calls a
    ``compute_loss_func`` for its evaluation forwards (``eval_loss``): those get the plain loss the model would
    report, the mean over the batch's counted tokens, neither weighted nor divided, so the reported ``eval_loss``
    compares with a run without reweighting.
    ``last_weights`` keeps the weights of the latest training micro-batch for logging and tests.
    """

    smooths_labels = False  # label_smoothing_factor > 0 is refused at train begin (the Trainer would drop it)
    takes_segments = True  # the callback's wrap_loss passes where each example of a padding-free row lies

    def __init__(
        self,
        *,
        temperature: float = 1.0,
        direction: Literal["hard", "easy"] = "hard",
        max_weight: float = 10.0,
        gradient_accumulation_steps: int = 1,
    ) -> None:
        check_weighting(temperature, direction, max_weight)
        gradient_accumulation_steps = whole_number("gradient_accumulation_steps", gradient_accumulation_steps)
        if gradient_accumulation_steps < 1:
            raise ValueError(f"gradient_accumulation_steps must be >= 1; got {gradient_accumulation_steps}")
        self.temperature, self.direction, self.max_weight = temperature, direction, max_weight
        self.accumulation = int(gradient_accumulation_steps)
        self.last_weights: torch.Tensor | None = None
        # What the Trainer multiplies this loss by (the process count under average_tokens_across_devices,
        # dataflex.hf.loss_scale); set by the dataflex callback at train begin, None until then.
        self.trainer_scale: int | None = None
        # A VLM's image placeholder token, which some collators (TRL's) leave in the labels: excluded from every
        # example's mean like from dataflex's scores, or an example's weight would follow its share of image
        # tokens (near-zero loss) rather than its text. Set by the dataflex callback at train begin.
        self.ignored_label: int | None = None
        # How many micro-batches the Trainer's current optimizer step has; set by the dataflex callback at train
        # begin. None: read from the Trainer found calling this loss (_calling_trainers_micro_batches).
        self.step_micro_batches: Callable[[], int] | None = None
        self._warned_single = False
        # Without the callback: the Trainer calling this loss, looked for on the call stack at every training call
        # (a loss object reused for a second Trainer follows that one), tells each step's micro-batches; in a loop
        # of one's own, the first step's micro-batch count is read from num_items_in_batch (None once checked).
        self._first_step: FirstStepCount | None = FirstStepCount()

    def __call__(
        self,
        outputs: Any,
        labels: torch.Tensor,
        num_items_in_batch: Any = None,
        *,
        segments: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``segments``: where each example of a padding-free row lies (:func:`dataflex.losses.padding_free_segments`),
        handed over by the callback's ``wrap_loss``; without it every row is one example."""
        check_causal_output(outputs)
        logits = outputs["logits"] if isinstance(outputs, dict) else outputs.logits
        labels = labels.to(logits.device)
        if not torch.is_grad_enabled():  # an evaluation forward trains nothing: the loss the model would report,
            # its token losses over the Trainer's token count when it passes one (transformers >= 5), else the mean
            total = num_items_in_batch if num_items_in_batch is not None else (labels[:, 1:] != IGNORE_INDEX).sum()
            if torch.is_tensor(total):
                total = total.to(logits.device)
            return token_cross_entropy(logits, labels).sum() / torch.clamp(torch.as_tensor(total), min=1)
        if self.ignored_label is not None:
            labels = labels.masked_fill(labels == self.ignored_label, -100)
        per_example = per_example_mean_loss(logits, labels, segments)
        if per_example.shape[0] == 1 and torch.is_grad_enabled() and not self._warned_single and dist.world_size() == 1:
            self._warned_single = True  # (an evaluation forward, without gradient, trains nothing: not warned)
            warnings.warn(
                "ExampleWeightedLoss got a micro-batch of one example: its weight is 1, nothing is reweighted. If "
                "the batch is padding-free (several examples in one row), pass the loss through the dataflex "
                "callback (compute_loss_func=callback.wrap_loss(loss)), which tells it where each example lies",
                stacklevel=2,
            )
        has_tokens = counted_per_example(labels, segments).to(per_example.device) > 0
        per_example = torch.where(has_tokens, per_example, torch.full_like(per_example, float("nan")))
        weights = loss_weights(
            per_example, temperature=self.temperature, direction=self.direction, max_weight=self.max_weight
        )
        self.last_weights = weights
        safe = torch.where(weights > 0, per_example, torch.zeros_like(per_example))
        told = self.step_micro_batches is not None
        micro_batches = self.step_micro_batches() if told else self._calling_trainers_micro_batches()
        loss = (weights * safe).sum() / max(per_example.shape[0], 1) / (micro_batches or self.accumulation)
        if num_items_in_batch is None:
            return loss
        # The Trainer multiplies a custom loss only when it counted num_items_in_batch (dataflex.hf.loss_scale).
        loss = loss / self._trainer_scale()
        if self._first_step is not None and micro_batches is None and segments is None and dist.world_size() == 1:
            self._check_accumulation(labels, num_items_in_batch)
        return loss

    def _calling_trainers_micro_batches(self) -> int | None:
        """Without the callback: the micro-batches of the current step of the Trainer whose ``compute_loss_func``
        this is, found on the call stack (None in a loop of one's own). An accumulation count other than the
        Trainer's is refused at the first micro-batch; each step is divided by the micro-batches it really has, as
        the callback makes this loss do (an epoch's short last step has fewer; divided by the configured count,
        its gradient would shrink without a word)."""
        # The Trainer is known by what it holds rather than by class: the core imports no transformers.
        trainer = caller_self(
            lambda owner: getattr(owner, "compute_loss_func", None) is self and hasattr(owner, "args")
        )
        if trainer is None:  # a loop of one's own: the first step's token count tells (_check_accumulation)
            return None
        configured = int(trainer.args.gradient_accumulation_steps)
        if configured != self.accumulation:
            raise ValueError(
                f"ExampleWeightedLoss(gradient_accumulation_steps={self.accumulation}) divides each micro-batch's "
                f"loss by {self.accumulation}, but the Trainer accumulates {configured} micro-batches per step: every "
                f"gradient would be {configured / self.accumulation:.3g} times the stock loss's. Set "
                f"gradient_accumulation_steps={configured}, or pass the loss through the dataflex callback "
                "(compute_loss_func=callback.wrap_loss(loss))"
            )
        return int(getattr(trainer, "current_gradient_accumulation_steps", 0) or configured)

    def _check_accumulation(self, labels: torch.Tensor, num_items_in_batch: Any) -> None:
        """Called by a loop of one's own (no Trainer found calling this loss), this loss divides by the
        ``gradient_accumulation_steps`` it was given; one left at its default under a loop that accumulates 4
        micro-batches would multiply every gradient by 4 without a word. The first optimizer step's micro-batch
        count is read from the ``num_items_in_batch`` it passes (:class:`FirstStepCount`) and refused when it
        differs."""
        micro_batches = self._first_step.add(labels, num_items_in_batch)
        if micro_batches is None:
            return
        self._first_step = None  # (one step tells)
        if micro_batches and micro_batches != self.accumulation:
            raise ValueError(
                f"ExampleWeightedLoss(gradient_accumulation_steps={self.accumulation}) divides each micro-batch's "
                f"loss by {self.accumulation}, but the Trainer's first optimizer step had {micro_batches} "
                f"micro-batches: every gradient would be {micro_batches / self.accumulation:.3g} times the stock "
                "loss's. Pass the loss through the dataflex callback (compute_loss_func=callback.wrap_loss(loss)), "
                f"which follows the Trainer's accumulation, or set gradient_accumulation_steps={micro_batches}"
            )

    def _trainer_scale(self) -> int:
        if self.trainer_scale is not None:
            return self.trainer_scale
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            world = torch.distributed.get_world_size()
            if world > 1:
                raise RuntimeError(
                    f"ExampleWeightedLoss in a {world}-process run must be passed through a dataflex callback "
                    "(compute_loss_func=callback.wrap_loss(ExampleWeightedLoss(...))): the Trainer multiplies a "
                    "custom loss by its process count, and only the callback can tell this loss by how much"
                )
        return 1
