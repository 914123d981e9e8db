"""Gradient-influence scores: LESS (arXiv 2402.04333) and TracIn (arXiv 2002.08484).

Each example is represented by its projected, normalised gradient of the trainable (LoRA) parameters;
the score of a training example is the cosine with the mean such feature of a target set (the few
validation examples of the task we want to improve). TracIn uses the raw SGD gradient. LESS uses the
Adam update direction the example would produce from the live optimizer state::

    m' = b1 m + (1 - b1) g,   v' = b2 v + (1 - b2) g^2,   Gamma = m'_hat / (sqrt(v'_hat) + eps)

with the usual bias corrections. Per-example gradients come from :class:`PerExampleGradients` (one
batched backward), never from a loop over examples.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Literal

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from dataflex.grads import PerExampleGradients, RademacherProjector
from dataflex.losses import check_causal_lm, padding_free_segments, per_example_mean_loss
from dataflex.modes import eval_mode

__all__ = ["GradientFeaturizer"]


def _whole(moment: torch.Tensor | None, shape: torch.Size, like: torch.Tensor) -> torch.Tensor:
    """An Adam moment of a whole weight, ``(1, *shape)``: zeros before the first step; under FSDP2 each rank holds
    a shard of it (a DTensor, as the weight outside the forward), gathered here whole — a collective, which every
    rank reaches as often, each scoring the same number of examples (``selectors.scored_across_ranks``)."""
    if moment is None:
        return torch.zeros((1, *shape), dtype=like.dtype, device=like.device)
    if isinstance(moment, DTensor):
        moment = moment.full_tensor()
    if moment.shape != shape:  # a shard or a flattened copy: read as the whole, it would mix up the weights
        raise ValueError(
            f"mode='less' needs the Adam moments of each whole scored weight {tuple(shape)}; the optimizer holds "
            f"{tuple(moment.shape)} (sharded or flattened by the training stack): use mode='tracin' there"
        )
    return moment.to(like.device).unsqueeze(0)


class GradientFeaturizer:
    """Projected per-example gradient features of some linear layers, optionally Adam-preconditioned.

    Args:
        model: a causal LM (typically a peft LoRA model).
        layers: the linear layers to differentiate (e.g. ``lora_linears(model)``).
        dim: projection dimension.
        seed: projection seed.
        mode: ``"tracin"`` (raw gradient) or ``"less"`` (Adam direction from ``optimizer``'s state).
        optimizer: the live Adam/AdamW optimizer (required for ``"less"``).
        micro_batch: examples per forward/backward. Small enough that one layer's activations stay in
            cache (elementwise ops on CPU are memory-bound: 8 x 128 tokens ran ~1.5x faster per example
            than 32 or 128 here), large enough to amortise the per-call overhead.
        grad_buffer_bytes: per-example gradients are accumulated over micro-batches up to this size and
            then projected together, so the projection matrix is streamed once per buffer, not per
            micro-batch.
        projector: share another featurizer's projection (and its cached matrices) instead of
            building one from ``dim`` and ``seed``.
    """

    def __init__(
        self,
        model: nn.Module,
        layers: Mapping[str, nn.Linear],
        *,
        dim: int = 1024,
        seed: int = 0,
        mode: Literal["tracin", "less"] = "tracin",
        optimizer: torch.optim.Optimizer | None = None,
        micro_batch: int = 8,
        grad_buffer_bytes: int = 256 << 20,
        projector: RademacherProjector | None = None,
    ) -> None:
        if micro_batch <= 0:
            raise ValueError(f"micro_batch must be positive; got {micro_batch}")
        if mode not in ("tracin", "less"):
            raise ValueError(f"mode={mode!r}; valid values are 'tracin', 'less'")
        if mode == "less" and optimizer is None:
            raise ValueError("mode='less' needs the training optimizer (its Adam moments precondition the gradient)")
        check_causal_lm(model)
        self.model, self.mode, self.optimizer = model, mode, optimizer
        self.capture = PerExampleGradients(layers)
        if optimizer is not None:
            self._check_adam_moments(optimizer)
        self.projector = projector or RademacherProjector(dim, seed=seed)
        self.micro_batch, self.grad_buffer_bytes = int(micro_batch), int(grad_buffer_bytes)
        # From each layer's shape, not its weight: outside the forward DeepSpeed ZeRO-3 leaves an empty placeholder
        # and FSDP1 a shard, which would make the gradient buffer below unbounded.
        self._params_per_example = sum(layer.in_features * layer.out_features for layer in self.capture.layers.values())

    def _check_adam_moments(self, optimizer: torch.optim.Optimizer) -> None:
        """LESS's preconditioner is the optimizer's Adam moments of each scored weight. An optimizer without
        betas (SGD) or one that does not hold the model's own weights (DeepSpeed ZeRO and FSDP optimise flattened
        copies) has none: read as empty, they would turn every feature into the sign of its gradient silently."""
        held = {id(p) for group in optimizer.param_groups for p in group["params"]}
        missing = [name for name, layer in self.capture.layers.items() if id(layer.weight) not in held]
        if missing:
            raise ValueError(
                f"mode='less' preconditions with the optimizer's Adam moments, but {type(optimizer).__name__} does "
                f"not hold the weight of {missing[0]} ({len(missing)} of {len(self.capture.layers)} scored layers; "
                "DeepSpeed ZeRO and FSDP optimise flattened copies): use mode='tracin' there"
            )
        if any("betas" not in group for group in optimizer.param_groups):
            raise ValueError(
                f"mode='less' needs an Adam-family optimizer (its moments precondition the gradient); "
                f"{type(optimizer).__name__} has no betas: use mode='tracin'"
            )

    def _precondition(self, grads: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        assert self.optimizer is not None
        out = {}
        for name, g in grads.items():
            param = self.capture.layers[name].weight
            state = self.optimizer.state.get(param, {})
            if state and not {"exp_avg", "exp_avg_sq"} <= set(state):  # before the first step there is none yet
                raise ValueError(
                    f"mode='less' reads Adam's exp_avg and exp_avg_sq; {type(self.optimizer).__name__} keeps "
                    f"{sorted(state)} for {name}: use mode='tracin' with this optimizer"
                )
            group = next(gr for gr in self.optimizer.param_groups if any(p is param for p in gr["params"]))
            b1, b2 = group["betas"]
            eps = group.get("eps", 1e-8)
            step = float(state.get("step", 0)) + 1
            m, v = (_whole(state.get(key), g.shape[1:], g) for key in ("exp_avg", "exp_avg_sq"))
            m_new = (b1 * m + (1 - b1) * g) / (1 - b1**step)
            v_new = (b2 * v + (1 - b2) * g * g) / (1 - b2**step)
            out[name] = m_new / (v_new.sqrt() + eps)
        return out

    def _gradients(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Per-example gradients of one micro-batch (outputs-only backward; parameters untouched)."""
        with self.capture.recording():
            logits = self.model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask")).logits
            loss = per_example_mean_loss(logits, batch["labels"]).sum()
        self.capture.backward(loss)
        return self.capture.per_example()

    def _project(self, chunks: list[dict[str, torch.Tensor]], modes: Sequence[str]) -> dict[str, torch.Tensor]:
        grads = {name: torch.cat([c[name] for c in chunks]) for name in chunks[0]}
        return {m: self.projector.project(self._precondition(grads) if m == "less" else grads) for m in modes}

    def features(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """``(batch, dim)`` unit-norm features of the examples in ``batch`` (needs ``labels``)."""
        return self.feature_sets(batch, (self.mode,))[self.mode]

    def feature_sets(self, batch: dict[str, torch.Tensor], modes: Sequence[str]) -> dict[str, torch.Tensor]:
        """Features of several kinds (``"tracin"``, ``"less"``) from one shared forward/backward."""
        bad = [m for m in modes if m not in ("tracin", "less")]
        if bad or not modes:
            raise ValueError(f"modes={list(modes)!r}; valid values are 'tracin', 'less'")
        if "less" in modes and self.optimizer is None:
            raise ValueError("'less' features need the training optimizer (give optimizer= to the featurizer)")
        device = next(self.model.parameters()).device
        batch = {k: v.to(device) for k, v in batch.items() if isinstance(v, torch.Tensor)}
        if padding_free_segments(batch["input_ids"].shape[0], batch.get("position_ids")) is not None:
            raise NotImplementedError(
                "gradient features need one example per row; this batch is padding-free (several examples in one "
                "row): give the scorer a padding collator (e.g. the Trainer without padding_free)"
            )
        n = batch["input_ids"].shape[0]
        bytes_per_example = 4 * self._params_per_example
        per_buffer = max(self.micro_batch, self.grad_buffer_bytes // max(bytes_per_example, 1))
        parts: list[dict[str, torch.Tensor]] = []
        pending, pending_rows = [], 0
        with eval_mode(self.model):  # no dropout: a feature must not depend on the random mask
            for start in range(0, n, self.micro_batch):
                pending.append(self._gradients({k: v[start : start + self.micro_batch] for k, v in batch.items()}))
                pending_rows += min(self.micro_batch, n - start)
                if pending_rows + self.micro_batch > per_buffer:
                    parts.append(self._project(pending, modes))
                    pending, pending_rows = [], 0
            if pending:
                parts.append(self._project(pending, modes))
        out = {}
        for m in modes:
            feats = torch.cat([p[m] for p in parts])
            out[m] = feats / feats.norm(dim=1, keepdim=True).clamp(min=1e-12)
        return out
