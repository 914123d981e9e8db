"""The public Trainer callbacks: mixing, selection and curriculum, each a :class:`TrainerAdapter` with its decider.

::

    dfx = DataFlexCallback(ODM(), update_every=50)        # labels from the dataset's "domain" column
    trainer = Trainer(model=model, args=args, train_dataset=ds, callbacks=[dfx])
    dfx.attach(trainer)                                   # or DataFlexCallback(..., trainer=trainer)
    trainer.train()

The classes add only their constructor and read-outs; the machinery is in :mod:`dataflex.hf.adapter`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np
from transformers import Trainer

from dataflex.curriculum import Curriculum
from dataflex.embeddings import EmbeddingCache
from dataflex.hf.adapter import TrainerAdapter
from dataflex.hf.deciders import CurriculumDecider, MixingDecider, SelectionDecider
from dataflex.policies.base import MixingPolicy
from dataflex.samplers.mixture import ExhaustionMode
from dataflex.selectors import Selector

__all__ = ["DataFlexCallback", "DataFlexCurriculumCallback", "DataFlexSelectCallback"]

_COMMON_ARGS = """
        seed: sampler seed; defaults to the Trainer's data seed (``TrainingArguments.data_seed``, else ``seed``).
        lookahead_batches: per-rank micro-batches between the step a decision is made and the sample it
            takes effect at. Default: gradient accumulation + workers × prefetch factor + 2, more than the
            Trainer and the DataLoader can ever have prefetched.
        check_ids: compare a few batches' ``input_ids`` with the dataset after each (re)start and raise if
            dataflex's idea of which examples are in a batch is wrong.
        allow_missing_state: resume even when the checkpoint has no dataflex state (order and decisions
            then differ from the uninterrupted run); by default that raises.
        embeddings: an :class:`~dataflex.embeddings.EmbeddingCache` filled from the training forward (no
            extra pass) with each example's embedding and the step it was taken at; saved in checkpoints.
        embeddings_from: ``"text"`` (mean-pooled last hidden state) or ``"image"`` (the projected image
            features of a LLaVA-style model, or of a Qwen2-VL-style patch merger, mean over each image's tokens;
            one image per example).
        check_images: on a model with an image token, check every training batch before its forward and
            raise a ``ValueError`` naming the example ids instead of silently training without the image.
        dynamics: keep a per-example training-dynamics record (:class:`~dataflex.dynamics.TrainingDynamics`:
            loss mean/variance/EMA, AUM margin, cartography confidence and variability, forgetting events)
            from the training forward's logits, saved in checkpoints, as ``callback.dynamics``. Detector
            selectors turn it on themselves.
        trainer: the Trainer to attach to (same as calling :meth:`attach`)."""


class DataFlexCallback(TrainerAdapter):
    __doc__ = (
        """Mix domains online while a stock ``transformers.Trainer`` trains.

    Args:
        policy: a mixing policy (``Uniform()``, ``Natural()``, ``Temperature(tau)``, ``Static(w)``, ``ODM()``,
            ``ADO()``, ``dataflex.proxies.doremi.DoReMiOnline(proxy, reference)``).
        domains: the domain label of every training example, in the order of the dataset the Trainer
            trains on. Optional when that dataset has the ``domain_column`` column (the Trainer keeps it
            in ``trainer.train_dataset`` even with ``remove_unused_columns=True``); when both exist they
            must agree, or the dataset was reordered or filtered after the labels were taken (an error).
        domain_column: the label column; ``None`` when the dataset has none (labels are then not checked).
        update_every: optimizer steps between policy updates.
        warmup_steps: no update before this many steps (losses are still recorded).
        replacement / when_exhausted / stratified: see :class:`~dataflex.samplers.DomainMixtureSampler`;
            with clusters as domains, ``Uniform()`` and ``stratified=True`` this is cluster-balanced sampling."""
        + _COMMON_ARGS
        + "\n    "
    )

    def __init__(
        self,
        policy: MixingPolicy,
        domains: Sequence[str] | None = None,
        *,
        domain_column: str | None = "domain",
        update_every: int = 50,
        warmup_steps: int = 0,
        replacement: bool = False,
        when_exhausted: ExhaustionMode = "reshuffle",
        stratified: bool = False,
        seed: int | None = None,
        lookahead_batches: int | None = None,
        check_ids: bool = True,
        allow_missing_state: bool = False,
        embeddings: EmbeddingCache | None = None,
        embeddings_from: Literal["text", "image"] = "text",
        check_images: bool = True,
        dynamics: bool = False,
        trainer: Trainer | None = None,
    ) -> None:
        self.policy = policy
        decider = MixingDecider(
            policy,
            update_every=update_every,
            replacement=replacement,
            when_exhausted=when_exhausted,
            stratified=stratified,
        )
        super().__init__(
            decider,
            labels=domains,
            label_column=domain_column,
            labels_required=True,
            warmup_steps=warmup_steps,
            seed=seed,
            lookahead_batches=lookahead_batches,
            check_ids=check_ids,
            allow_missing_state=allow_missing_state,
            embeddings=embeddings,
            embeddings_from=embeddings_from,
            check_images=check_images,
            dynamics=dynamics,
            trainer=trainer,
        )

    @property
    def weights(self) -> dict[str, float]:
        """The most recently scheduled weights by domain name."""
        if self.sampler is None:
            raise RuntimeError("training has not started: weights are set in on_train_begin")
        return dict(zip(self.domain_names, self.sampler.schedule.current.tolist()))


class DataFlexSelectCallback(TrainerAdapter):
    __doc__ = (
        """Re-select the training subset every ``update_every`` steps with ``selector``.

    Every ``update_every`` steps after ``warmup_steps`` the selector scores a candidate pool with the
    current model (batched) and the :class:`~dataflex.samplers.SubsetSampler` trains on the chosen
    examples from a deterministic sample index on.

    Args:
        selector: a :mod:`dataflex.selectors` selector (LossFocus, RhoLoss, Influence, RandomSelection,
            FixedSubset).
        labels: optional per-example labels (task names, question types) for ``per_label`` selection,
            per-label logging and the dataset fingerprint, in the order of the dataset the Trainer trains on.
        label_column: read the labels from this column of the Trainer's dataset (and check ``labels``
            against it); by default labels come only from ``labels``.
        update_every: optimizer steps between re-selections.
        warmup_steps: no re-selection before this many steps (the whole pool trains until then).
        score_batch_size: batch size of the candidate scoring passes."""
        + _COMMON_ARGS
        + "\n    "
    )

    def __init__(
        self,
        selector: Selector,
        labels: Sequence[str] | None = None,
        *,
        label_column: str | None = None,
        update_every: int = 50,
        warmup_steps: int = 0,
        score_batch_size: int = 32,
        seed: int | None = None,
        lookahead_batches: int | None = None,
        check_ids: bool = True,
        allow_missing_state: bool = False,
        embeddings: EmbeddingCache | None = None,
        embeddings_from: Literal["text", "image"] = "text",
        check_images: bool = True,
        dynamics: bool = False,
        trainer: Trainer | None = None,
    ) -> None:
        self.selector = selector
        decider = SelectionDecider(selector, update_every=update_every, score_batch_size=score_batch_size)
        super().__init__(
            decider,
            labels=labels,
            label_column=label_column,
            labels_required=False,
            warmup_steps=warmup_steps,
            seed=seed,
            lookahead_batches=lookahead_batches,
            check_ids=check_ids,
            allow_missing_state=allow_missing_state,
            embeddings=embeddings,
            embeddings_from=embeddings_from,
            check_images=check_images,
            dynamics=dynamics,
            trainer=trainer,
        )

    @property
    def selected(self) -> np.ndarray:
        """The most recently scheduled subset."""
        if self.sampler is None:
            raise RuntimeError("training has not started")
        return self.sampler.schedule.current


class DataFlexCurriculumCallback(TrainerAdapter):
    __doc__ = (
        """Train easiest-first with ``curriculum``'s pacing.

    ::

        curriculum = Curriculum(reference_losses, pacing="competence", c0=0.1)
        trainer = Trainer(..., callbacks=[DataFlexCurriculumCallback(curriculum)])

    With a scorer-based curriculum and ``rescore_every=N`` the examples are re-ranked with the live
    model every N steps; each new order takes effect at a deterministic sample index.

    Args:
        curriculum: difficulty source, pacing and direction.
        labels: optional per-example labels (for the dataset fingerprint).
        label_column: read the labels from this column of the Trainer's dataset (off by default).
        horizon_steps: optimizer steps until the whole pool is open; default: the run's ``max_steps``.
        rescore_every: re-rank with the curriculum's scorer every this many steps (0 = never)."""
        + _COMMON_ARGS
        + "\n    "
    )

    def __init__(
        self,
        curriculum: Curriculum,
        labels: Sequence[str] | None = None,
        *,
        label_column: str | None = None,
        horizon_steps: int | None = None,
        rescore_every: int = 0,
        seed: int | None = None,
        lookahead_batches: int | None = None,
        check_ids: bool = True,
        allow_missing_state: bool = False,
        embeddings: EmbeddingCache | None = None,
        embeddings_from: Literal["text", "image"] = "text",
        check_images: bool = True,
        dynamics: bool = False,
        trainer: Trainer | None = None,
    ) -> None:
        self.curriculum = curriculum
        decider = CurriculumDecider(curriculum, horizon_steps=horizon_steps, rescore_every=rescore_every)
        super().__init__(
            decider,
            labels=labels,
            label_column=label_column,
            labels_required=False,
            warmup_steps=0,
            seed=seed,
            lookahead_batches=lookahead_batches,
            check_ids=check_ids,
            allow_missing_state=allow_missing_state,
            embeddings=embeddings,
            embeddings_from=embeddings_from,
            check_images=check_images,
            dynamics=dynamics,
            trainer=trainer,
        )

    @property
    def open_fraction(self) -> float:
        """Fraction of the pool open at the most recently generated sample."""
        return self.decider.open_fraction()
