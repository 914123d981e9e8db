"""Loss capture: per-example losses from the forward the training step already runs.

A forward hook on the model reads each training forward's output and labels and hands
``(inputs, per-example loss, has_tokens)`` to a sink. Output forms understood (:func:`per_example_loss`):

* the per-token losses of the step's own loss: on a transformers causal LM whose loss is the stock
  ``ForCausalLMLoss``, the model's ``loss_function`` is replaced for training forwards by one that
  computes the same cross-entropy with ``reduction="none"`` and sums it (the same operations; the sum
  may differ from ``reduction="sum"`` in the last bits), keeping the detached per-token values — no
  second pass over the logits, no extra memory beyond ``(batch, seq)`` floats;
* ``logits`` (any causal LM) — cross-entropy of the counted positions, in bounded-memory chunks;
* ``log_probs`` + ``label_mask`` (TRL's fused LM head, ``SFTTrainer`` from trl 1.15 on) — the per-token
  log-probabilities the step's own loss is made of, so scoring costs nothing extra;
* neither (fused linear cross-entropy kernels such as Liger's or Cut Cross-Entropy return only the loss):
  the last hidden state, kept by a hook on the model's decoder, goes through the LM head again for the
  counted positions only, without gradient, in chunks of at most ``SCORING_CHUNK_ELEMENTS`` logits. That
  costs one extra LM-head forward (``2 × tokens × hidden × vocab`` FLOPs; no backward) per micro-batch and
  is announced by a warning the first time (measured in ``benchmarks/loss_memory``).

A training forward is one inside the optimizer step (``active``), in train mode and with gradients
enabled: evaluation, generation and no-grad forwards (TRL's second forward that only feeds its
metrics) are ignored, so they never count as a micro-batch. When the Trainer uses a
``compute_loss_func`` it pops ``labels`` before the forward; the hook keeps the outputs and
:meth:`LossCapture.wrap_loss` scores them when the Trainer calls the loss function with the labels.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from dataflex.dynamics import visit_statistics
from dataflex.embeddings import decoder_of, last_hidden_state
from dataflex.losses import (
    IGNORE_INDEX,
    hidden_state_logits,
    hidden_state_positions,
    log_prob_positions,
    padding_free_segments,
    per_example_mean,
    scored_positions,
)

__all__ = ["LossCapture", "per_example_loss", "per_example_loss_from_token_losses", "visits_of_forward"]

Sink = Callable[[dict[str, Any], torch.Tensor, torch.Tensor], None]


def per_example_loss_from_token_losses(
    token_losses: torch.Tensor, shift_labels: torch.Tensor, position_ids: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(token-mean loss, has_tokens)`` per example from the loss computation's own ``(batch, seq)`` per-token
    losses and its padded shifted labels (position t holds the loss of predicting token t + 1; the last
    position predicts nothing)."""
    rows, positions = torch.nonzero(shift_labels[:, :-1] != IGNORE_INDEX, as_tuple=True)
    segments = padding_free_segments(token_losses.shape[0], position_ids)
    loss, counted = per_example_mean(token_losses[rows, positions], rows, positions, token_losses.shape[0], segments)
    return loss, counted > 0


class HiddenStateScorer:
    """Scores a forward that returned no logits from its last hidden state and the model's LM head."""

    def __init__(self, model: torch.nn.Module) -> None:
        config = getattr(model, "config", None)
        #: Why logits cannot be rebuilt from hidden states for this model (None: they can).
        self.unsupported = next(
            (
                f"{type(model).__name__} scales its logits ({name}={getattr(config, name)}), so dataflex cannot "
                "rebuild them from hidden states; return logits from the training forward"
                for name in ("logit_scale", "logits_scaling")
                if getattr(config, name, None) not in (None, 1, 1.0)
            ),
            None,
        )
        self.head = model.get_output_embeddings()
        self.softcap = getattr(config, "final_logit_softcapping", None)
        self.hidden: torch.Tensor | None = None
        self.warned = False
        self._gathered = contextlib.ExitStack()
        self._whole: tuple[torch.Tensor, torch.Tensor | None] | None = None  # a ZeRO-3 head's gathered (weight, bias)

    @property
    def vocab(self) -> int:
        weight = self.head.weight
        return int(getattr(weight, "ds_shape", weight.shape)[0])  # (ds_shape: a ZeRO-3 weight's whole shape)

    def logits_at(self) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
        """Logits of shifted positions ``(rows, positions)`` of the kept hidden state, without gradient."""
        self._check()
        return hidden_state_logits(self.hidden, self._apply_head, self.softcap)

    def positions(self, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        self._check()
        hidden, self.hidden = self.hidden, None
        if not self.warned:
            self.warned = True
            width = int(getattr(self.head.weight, "ds_shape", self.head.weight.shape)[1])
            warnings.warn(
                "the training forward returned no logits (a fused linear cross-entropy kernel?): dataflex scores "
                f"examples from the last hidden state instead, one extra LM-head forward without gradient "
                f"({self.vocab:,} x {width} per counted token) per micro-batch",
                stacklevel=4,
            )
        return hidden_state_positions(hidden, self._apply_head, labels, vocab=self.vocab, softcap=self.softcap)

    def release(self) -> None:
        """End of a forward's scoring: forget its hidden state and give back an LM head gathered for it."""
        self.hidden, self._whole = None, None
        self._gathered.close()

    def _apply_head(self, rows: torch.Tensor) -> torch.Tensor:
        if self._whole is None:
            return self.head(rows)
        # Not the module: DeepSpeed's hooks on it would partition the weight again after every call and gather it
        # at the next, a collective per chunk of counted tokens, whose number differs between ranks.
        return F.linear(rows, *self._whole)

    def _check(self) -> None:
        if self.unsupported:
            raise ValueError(self.unsupported)
        weight, bias = self.head.weight, getattr(self.head, "bias", None)
        if self._whole is None and hasattr(weight, "ds_id") and weight.numel() == 0:
            # DeepSpeed ZeRO-3 partitions the head again once the forward is over: gathered here, at the first use
            # of a forward's scoring, and kept until release() (the record and the loss share one gather). A
            # collective, which every rank reaches once per training forward, as each scores its micro-batches.
            import deepspeed

            whole = [weight] if bias is None else [weight, bias]
            self._gathered.enter_context(deepspeed.zero.GatheredParameters(whole, modifier_rank=None))
            self._whole = (weight, bias)
        if self._whole is None and (weight.dim() != 2 or weight.numel() == 0):
            # FSDP1 leaves each rank a flat shard of it by then (empty on some ranks, 1-D on all), which no rank
            # could apply; FSDP2 keeps the root module's weights whole through the forward.
            raise RuntimeError(
                f"the LM head's weight is sharded when dataflex scores the forward (shape {tuple(weight.shape)}; as "
                "under FSDP1), so dataflex cannot score a forward without logits from its hidden states; return "
                "logits (or log-probabilities) from the training forward, or use FSDP2 (fsdp_config version 2) or "
                "DeepSpeed ZeRO-3, under which dataflex scores it"
            )


def _log_probs_of(output: Any) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(log_probs, label_mask)`` of a fused LM head's output (TRL), or None."""
    if hasattr(output, "keys") and output.get("log_probs") is not None and output.get("label_mask") is not None:
        return output["log_probs"], output["label_mask"]
    return None


def _logits_of(output: Any) -> torch.Tensor | None:
    """The ``(batch, seq, vocab)`` logits of a forward's output, whatever its form, or None."""
    if hasattr(output, "keys"):
        return output.get("logits")
    if isinstance(output, (tuple, list)) and len(output) > 1 and torch.is_tensor(output[1]):
        return output[1]  # return_dict=False with labels: (loss, logits, ...)
    if torch.is_tensor(output) and output.dim() == 3:
        return output
    return None


def _unscorable(output: Any) -> str:
    seen = list(output.keys()) if hasattr(output, "keys") else type(output).__name__
    return (
        f"dataflex cannot score this training forward: its output holds {seen}, but dataflex needs either "
        "'logits' (batch, seq, vocab), per-token 'log_probs' with a 'label_mask' (a fused LM head), or a "
        "transformers model whose decoder (get_decoder()) returns the last hidden state"
    )


def visits_of_forward(
    output: Any,
    labels: torch.Tensor,
    position_ids: torch.Tensor | None,
    hidden: HiddenStateScorer | None,
    token_losses: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """Per-example training-dynamics statistics (:func:`dataflex.dynamics.visit_statistics`) of one forward,
    from whichever of log-probabilities, logits or hidden states it gives; call before :func:`per_example_loss`
    (which releases the kept hidden state)."""
    segments = padding_free_segments(labels.shape[0], position_ids)
    log_probs, logits = _log_probs_of(output), _logits_of(output)
    if log_probs is not None:
        return visit_statistics(None, labels, vocab=0, segments=segments, log_probs=log_probs)
    if logits is not None:
        labels = labels.to(logits.device)
        return visit_statistics(
            lambda r, t: logits[r, t],
            labels,
            vocab=logits.shape[-1],
            segments=segments,
            token_losses=token_losses,
            logits=logits,
        )
    if hidden is not None and hidden.hidden is not None:
        labels = labels.to(hidden.hidden.device)
        return visit_statistics(hidden.logits_at(), labels, vocab=hidden.vocab, segments=segments)
    raise ValueError(_unscorable(output))


def per_example_loss(
    output: Any,
    labels: torch.Tensor,
    position_ids: torch.Tensor | None = None,
    hidden: HiddenStateScorer | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(token-mean loss, has_tokens)`` per example from a causal-LM forward's output and its labels.

    ``has_tokens`` is True for an example with counted positions, whether or not its loss is finite.

    A padding-free batch (one row, ``position_ids`` restarting at 0 for each example) gives one loss per
    example of the row. An output without logits or log-probabilities is scored by ``hidden`` when it
    holds this forward's last hidden state; otherwise ``ValueError`` names the output's keys.
    """
    log_probs, logits = _log_probs_of(output), _logits_of(output)
    if log_probs is not None:
        parts = log_prob_positions(*log_probs)
    elif logits is not None:
        parts = scored_positions(logits, labels)
    elif hidden is not None and hidden.hidden is not None:
        parts = hidden.positions(labels)
    else:
        raise ValueError(_unscorable(output))
    segments = padding_free_segments(labels.shape[0], position_ids)
    loss, counted = per_example_mean(*parts, labels.shape[0], segments)
    return loss, counted > 0


def _without_label(
    token: int, output: Any, labels: torch.Tensor, tapped: tuple[torch.Tensor, torch.Tensor] | None
) -> tuple[Any, torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]:
    """The same forward with every position whose target is ``token`` left out of scoring: in the labels,
    in the tapped per-token losses' shifted labels, and in a fused LM head's ``label_mask`` (whose column t
    predicts token t + 1; aligned from the right, as TRL aligns it)."""
    labels = labels.masked_fill(labels == token, IGNORE_INDEX)
    if tapped is not None:
        tapped = (tapped[0], tapped[1].masked_fill(tapped[1] == token, IGNORE_INDEX))
    fused = _log_probs_of(output)
    if fused is not None:
        log_probs, mask = fused
        targets = labels[:, 1:]
        width = min(mask.shape[1], targets.shape[1])
        keep = torch.ones(mask.shape, dtype=torch.bool, device=mask.device)
        keep[:, mask.shape[1] - width :] = targets[:, targets.shape[1] - width :].to(mask.device) != IGNORE_INDEX
        output = {"log_probs": log_probs, "label_mask": mask.bool() & keep}
    return output, labels, tapped


class LossCapture:
    """Hooks a model's forward and reports every training micro-batch's per-example losses to ``sink``."""

    def __init__(self, sink: Sink) -> None:
        self.sink = sink
        #: Also hand the sink each example's training-dynamics statistics (``visits_of_forward``) as a
        #: fourth argument; set by the adapter when a training-dynamics record is kept.
        self.record_visits = False
        self.active = False  # True between on_step_begin and on_step_end
        self.missing_labels = 0  # training forwards without labels (cannot be scored)
        #: A label id never scored: a VLM's image placeholder, which some collators (TRL's vision collator)
        #: leave in the labels. Predicting it says nothing about the example and, counted, it would pull the
        #: token mean of short texts toward the placeholder's (learnt, near-zero) loss.
        self.ignored_label: int | None = None
        self._loss_wrapped = False
        self._smoother_wrapped = False  # see wrap_label_smoother
        self.wrapped_loss: Callable[..., torch.Tensor] | None = None
        self.loss_call_scored = False  # see wrap_loss
        self._pending: tuple[dict[str, Any], Any] | None = None
        self._position_ids: torch.Tensor | None = None  # of the latest forward
        self._handle: torch.utils.hooks.RemovableHandle | None = None
        self._loss_owner: torch.nn.Module | None = None  # the model whose loss_function is tapped
        self._token_losses: tuple[torch.Tensor, torch.Tensor] | None = None  # (per-token loss, shifted labels)
        self._hidden: HiddenStateScorer | None = None  # last hidden states, for outputs without logits
        self._decoder_handle: torch.utils.hooks.RemovableHandle | None = None

    def attach(self, model: torch.nn.Module) -> None:
        self.detach()
        self._handle = model.register_forward_hook(self._on_forward, with_kwargs=True)
        self._tap_loss_function(model)
        self._keep_hidden_states(model)

    def detach(self) -> None:
        if self._handle is not None:
            self._handle.remove()
        self._handle = None
        if self._decoder_handle is not None:
            self._decoder_handle.remove()
        self._decoder_handle, self._hidden = None, None
        self._pending = None
        self._token_losses = None
        if self._loss_owner is not None:
            del self._loss_owner._loss_function  # back to the model's own (LOSS_MAPPING) loss
            self._loss_owner = None

    def _tap_loss_function(self, model: torch.nn.Module) -> None:
        """Take per-token losses from the model's own loss computation when it is the stock causal-LM loss."""
        from transformers import PreTrainedModel
        from transformers.loss.loss_utils import ForCausalLMLoss

        owner = model.get_base_model() if callable(getattr(model, "get_base_model", None)) else model
        if not isinstance(owner, PreTrainedModel) or hasattr(owner, "_loss_function"):
            return  # not a transformers model, or its loss was customised: score from the outputs instead
        if owner.loss_function is not ForCausalLMLoss:
            return

        def loss_function(
            logits, labels, vocab_size, num_items_in_batch=None, ignore_index=IGNORE_INDEX, shift_labels=None, **kwargs
        ):
            if not (self.active and owner.training and torch.is_grad_enabled()) or kwargs or shift_labels is not None:
                return ForCausalLMLoss(
                    logits, labels, vocab_size, num_items_in_batch, ignore_index, shift_labels, **kwargs
                )
            shift_labels = F.pad(labels, (0, 1), value=ignore_index)[..., 1:].to(logits.device)
            per_token = F.cross_entropy(
                logits.float().reshape(-1, vocab_size),
                shift_labels.reshape(-1),
                ignore_index=ignore_index,
                reduction="none",
            )
            self._token_losses = (per_token.detach().view(shift_labels.shape), shift_labels)
            if num_items_in_batch is None:  # as ForCausalLMLoss: the mean over counted tokens
                return per_token.sum() / (shift_labels != ignore_index).sum()
            if torch.is_tensor(num_items_in_batch):
                num_items_in_batch = num_items_in_batch.to(per_token.device)
            return per_token.sum() / num_items_in_batch

        owner.loss_function = loss_function
        self._loss_owner = owner

    def _keep_hidden_states(self, model: torch.nn.Module) -> None:
        """Hook the decoder so a forward that returns no logits can still be scored from its hidden states."""
        owner = model.get_base_model() if callable(getattr(model, "get_base_model", None)) else model
        decoder, get_head = decoder_of(model), getattr(owner, "get_output_embeddings", None)
        if decoder is None or not callable(get_head):
            return
        if not isinstance(getattr(get_head(), "weight", None), torch.Tensor):
            return
        scorer = HiddenStateScorer(owner)

        def keep(module: torch.nn.Module, args: tuple, output: Any) -> None:
            if self.is_training_forward(module):
                scorer.hidden = last_hidden_state(output)

        self._hidden = scorer
        self._decoder_handle = decoder.register_forward_hook(keep)

    def is_training_forward(self, module: torch.nn.Module) -> bool:
        return self.active and module.training and torch.is_grad_enabled()

    def _on_forward(self, module: torch.nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        self._position_ids = kwargs.get("position_ids")  # any forward's, evaluation too: see wrap_loss
        if not self.is_training_forward(module):
            return
        labels = kwargs.get("labels")
        if labels is None and (self._loss_wrapped or self._smoother_wrapped):
            self._pending = (kwargs, output)  # the wrapped compute_loss_func (or label smoother) brings the labels
            return
        if labels is None:
            self.missing_labels += 1
            if self.missing_labels == 1:
                warnings.warn("a training forward had no `labels`: dataflex cannot score it", stacklevel=2)
            return
        self._score(kwargs, output, labels)

    def _score(self, inputs: dict[str, Any], output: Any, labels: torch.Tensor) -> None:
        tapped, self._token_losses = self._token_losses, None
        if self.ignored_label is not None:
            output, labels, tapped = _without_label(self.ignored_label, output, labels, tapped)
        position_ids = inputs.get("position_ids")
        visits = None
        try:
            if self.record_visits:  # the tapped per-token losses spare a second cross-entropy
                own = None if tapped is None else tapped[0]
                visits = visits_of_forward(output, labels, position_ids, self._hidden, own)
            if tapped is not None:
                loss, has_tokens = per_example_loss_from_token_losses(*tapped, position_ids)
            else:
                loss, has_tokens = per_example_loss(output, labels, position_ids, self._hidden)
        finally:
            if self._hidden is not None:
                self._hidden.release()  # never reused by a later forward
        if visits is None:
            self.sink({**inputs, "labels": labels}, loss, has_tokens)
        else:
            self.sink({**inputs, "labels": labels}, loss, has_tokens, visits)

    def wrap_label_smoother(self, smoother: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
        """The Trainer's label smoother (``label_smoothing_factor > 0``), letting dataflex see the labels the
        Trainer pops before the forward; it scores the forward's own (unsmoothed) per-example cross-entropy, as
        without smoothing, then returns the smoother's loss unchanged. Undone by :meth:`unwrap_label_smoother`."""
        inner = getattr(smoother, "dataflex_inner", smoother)  # a retry's second train begin: wrap once

        def smooth(model_output: Any, labels: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
            if not kwargs.get("shift_labels", args[0] if args else False):
                # The Trainer shifts only for class names in transformers' causal-LM mapping, which LLaVA- and
                # Qwen-VL-style models are not in: it would train each position on its own input token.
                raise ValueError(
                    "label_smoothing_factor > 0: the Trainer's label smoother was called without shift_labels "
                    "for this causal model (it shifts only for class names in transformers' causal-LM mapping), "
                    "so it would train each position to predict its own input token instead of the next one; "
                    "set label_smoothing_factor=0"
                )
            pending, self._pending = self._pending, None
            if pending is not None:
                self._score(pending[0], pending[1], labels)
            return inner(model_output, labels, *args, **kwargs)

        smooth.dataflex_inner = inner
        self._smoother_wrapped = True
        return smooth

    def unwrap_label_smoother(self, smoother: Any) -> Any:
        self._smoother_wrapped = False
        self._pending = None
        return getattr(smoother, "dataflex_inner", smoother)

    def wrap_loss(self, loss_func: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
        """A ``compute_loss_func`` that lets dataflex see the labels, then calls ``loss_func``."""
        self._loss_wrapped = True
        self.wrapped_loss = loss_func  # the adapter checks its settings against the Trainer's at train begin

        takes_segments = getattr(loss_func, "takes_segments", False)

        def compute_loss(outputs: Any, labels: torch.Tensor, num_items_in_batch: Any = None) -> torch.Tensor:
            pending, self._pending = self._pending, None
            if pending is not None:
                self._score(pending[0], pending[1], labels)
            # Whether this loss belongs to a micro-batch just scored (False for evaluation forwards): a loss
            # that looks up the micro-batch's example ids must not take the previous micro-batch's.
            self.loss_call_scored = pending is not None
            if not takes_segments:
                return loss_func(outputs, labels, num_items_in_batch)
            # A loss per example (dataflex's own) must see where each example of a padding-free row lies, or it
            # would take the row for one example; the labels alone do not say it, the forward's inputs do.
            segments = padding_free_segments(labels.shape[0], self._position_ids)
            return loss_func(outputs, labels, num_items_in_batch, segments=segments)

        return compute_loss
