"""Selectors: re-choose, every few steps, the subset of examples training sees next.

A selector turns scores of a candidate pool into a subset (via :mod:`dataflex.selection`). Scores are
computed *batched* on the model's device at re-selection time for the candidates only (never the
whole pool at batch size 1); candidates are split across ranks and the scores gathered, so every rank
chooses the same subset. Each score is kept in the :class:`~dataflex.store.ScoreStore` with its step.

* :class:`LossFocus` — hard / medium / easy by current loss.
* :class:`RhoLoss` — reducible loss = current loss − irreducible loss (arXiv 2206.07137); the
  irreducible losses come from a model trained on a holdout split, precomputed and cached.
* :class:`Influence` — LESS / TracIn cosine with a target set's mean gradient (arXiv 2402.04333,
  2002.08484), from batched per-example LoRA gradients.
* :class:`RandomSelection` — the same budget at random; always reported as the baseline.
* :class:`FixedSubset` — a fixed set (e.g. SemDeDup's kept ids): a filter in front of the sampler.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch

from dataflex import dist
from dataflex.checks import real_number
from dataflex.offline import target_direction, token_mean_losses
from dataflex.selection import budget, select_by_loss, select_random, select_top

__all__ = [
    "FixedSubset",
    "Influence",
    "LossFocus",
    "RandomSelection",
    "RhoLoss",
    "SelectionContext",
    "Selector",
    "candidate_pool",
    "current_losses",
    "scored_across_ranks",
]


@dataclass
class SelectionContext:
    """What a selector may use at re-selection time."""

    model: torch.nn.Module
    dataset: Any  # indexable: dataset[i] -> features dict
    collate: Callable[[list[dict[str, Any]]], dict[str, torch.Tensor]]
    step: int
    seed: int
    optimizer: torch.optim.Optimizer | None = None
    batch_size: int = 32
    labels: np.ndarray | None = None  # integer label (task / question type) of every pool example
    dynamics: Any = None  # dataflex.dynamics.TrainingDynamics of the run, when it keeps one


def candidate_pool(n: int, fraction: float, seed: int, step: int) -> np.ndarray:
    """A seeded random candidate pool (all examples when ``fraction`` is 1)."""
    if fraction >= 1:
        return np.arange(n)
    k = budget(n, fraction)
    return np.sort(np.random.default_rng(np.random.SeedSequence([seed, step, 7])).choice(n, size=k, replace=False))


def _batches(ids: np.ndarray, ctx: SelectionContext):
    for start in range(0, len(ids), ctx.batch_size):
        chunk = ids[start : start + ctx.batch_size]
        yield chunk, ctx.collate([ctx.dataset[int(i)] for i in chunk])


def scored_across_ranks(ids: np.ndarray, score_part: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
    """Score ``ids`` with each rank taking every ``world``-th id, then gather: same result on all ranks.

    Every rank scores the same number of examples (a rank with one fewer repeats an id and drops that score):
    under DeepSpeed ZeRO-3 each forward gathers the partitioned weights with a collective, so a rank running one
    batch more than another would wait for a partner that has moved on to the next collective (gloo stops on the
    size mismatch; NCCL can hang or pair the wrong messages)."""
    world, rank = dist.world_size(), dist.rank()
    mine = ids[rank::world]
    per_rank = -(-len(ids) // world)
    padded = np.concatenate([mine, np.repeat(ids[:1], per_rank - len(mine))]) if len(ids) else mine
    scores = np.asarray(score_part(padded)) if len(padded) else np.zeros(0)
    if scores.shape[0] != len(padded):  # never zip a short list silently: every id needs its own score
        raise RuntimeError(f"scoring returned {scores.shape[0]} scores for {len(padded)} examples")
    scores = scores[: len(mine)]
    parts = dist.all_gather_objects((mine, scores))
    out = np.full(len(ids), np.nan)
    index = {int(i): j for j, i in enumerate(ids)}
    for part_ids, part_scores in parts:
        for i, s in zip(part_ids.tolist(), np.asarray(part_scores).tolist()):
            out[index[i]] = s
    return out


@torch.no_grad()
def current_losses(ids: np.ndarray, ctx: SelectionContext) -> np.ndarray:
    """Per-example token-mean loss of ``ids`` under the current model (eval mode, batched)."""
    score = token_mean_losses(ctx.model)
    out = [score(batch).cpu().numpy() for _, batch in _batches(ids, ctx)]
    return np.concatenate(out) if out else np.zeros(0)


class Selector:
    """Base: ``fraction`` of the pool is trained on; ``candidates`` of the pool is scored per re-selection.

    ``per_label=True`` applies the rule within each label (task, question type) separately, keeping
    ``fraction`` of every label: a score that differs systematically between tasks (answer length,
    number of possible answers) then cannot starve a whole task.
    """

    #: What this selector holds per example, by position in the training set (None: nothing). A trainer that
    #: reorders its dataset after it was given (TRL's ``shuffle_dataset=True``) would move it to other examples.
    positional_input: str | None = None

    def __init__(self, fraction: float, candidates: float = 1.0, per_label: bool = False) -> None:
        fraction, candidates = real_number("fraction", fraction), real_number("candidates", candidates)
        budget(10_000, fraction)  # validates fraction
        if not 0 < candidates <= 1:
            raise ValueError(f"candidates must lie in (0, 1]; got {candidates}")
        if candidates < fraction:
            raise ValueError(f"candidates={candidates} must be at least fraction={fraction}")
        self.fraction, self.candidates = float(fraction), float(candidates)
        self.per_label = bool(per_label)
        self.last_scores: tuple[np.ndarray, np.ndarray] | None = None  # (ids, scores) of the last scoring

    def initial_subset(self, n: int) -> np.ndarray:
        """Before the first scores exist (warm-up), train on the whole pool."""
        return np.arange(n)

    def select(self, ctx: SelectionContext) -> np.ndarray:
        n = len(ctx.dataset)
        pool = candidate_pool(n, self.candidates, ctx.seed, ctx.step)
        scores = self.score(pool, ctx)
        self.last_scores = (pool, scores)
        share = budget(n, self.fraction) / len(pool)
        return self._within_labels(ctx, pool, lambda members: members[self.choose(scores[members], share)])

    def _within_labels(self, ctx: SelectionContext, pool: np.ndarray, pick: Callable[[np.ndarray], np.ndarray]):
        """``pick(positions in pool) -> chosen positions``, over the whole pool or, with ``per_label``, within
        every label separately (the same share of each, by the selector's own rule)."""
        if not self.per_label:
            return pool[pick(np.arange(len(pool)))]
        if ctx.labels is None:
            raise ValueError("per_label=True needs the pool's labels: DataFlexSelectCallback(selector, labels=...)")
        groups = np.asarray(ctx.labels)[pool]
        chosen = [pick(np.flatnonzero(groups == g)) for g in np.unique(groups)]
        return pool[np.sort(np.concatenate(chosen))]

    def score(self, ids: np.ndarray, ctx: SelectionContext) -> np.ndarray:
        raise NotImplementedError

    def choose(self, scores: np.ndarray, fraction: float) -> np.ndarray:
        return select_top(scores, fraction)

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        return None


class LossFocus(Selector):
    """Train on the hardest / medium / easiest ``fraction`` of the pool by current loss.

    ``history="mean"`` ranks by each example's loss averaged over every re-selection so far instead of
    the latest one: an example whose answer is wrong stays hard all along, while a hard but right one
    gets learned, so the average separates the two better than one snapshot (the idea behind the area
    under the margin, Pleiss et al. 2020, arXiv 2001.10528). The running sums are part of the
    selector's state, so resume stays exact.
    """

    def __init__(
        self,
        fraction: float,
        mode: Literal["hard", "medium", "easy"] = "hard",
        candidates: float = 1.0,
        per_label: bool = False,
        history: Literal["last", "mean"] = "last",
    ):
        super().__init__(fraction, candidates, per_label)
        if mode not in ("hard", "medium", "easy"):
            raise ValueError(f"mode={mode!r}; valid values are 'hard', 'medium', 'easy'")
        if history not in ("last", "mean"):
            raise ValueError(f"history={history!r}; valid values are 'last', 'mean'")
        self.mode, self.history = mode, history
        self._loss_sum: np.ndarray | None = None  # per pool example, over the re-selections that scored it
        self._loss_count: np.ndarray | None = None

    def score(self, ids, ctx):
        losses = scored_across_ranks(ids, lambda part: current_losses(part, ctx))
        if self.history == "last":
            return losses
        if self._loss_sum is None:
            self._loss_sum, self._loss_count = np.zeros(len(ctx.dataset)), np.zeros(len(ctx.dataset), dtype=np.int64)
        seen = np.isfinite(losses)  # an example without answer tokens has no loss; it keeps its history
        self._loss_sum[ids[seen]] += losses[seen]
        self._loss_count[ids[seen]] += 1
        count = self._loss_count[ids]
        return np.where(count > 0, self._loss_sum[ids] / np.maximum(count, 1), np.nan)

    def state_dict(self) -> dict[str, Any]:
        if self._loss_sum is None:
            return {}
        return {"loss_sum": self._loss_sum.copy(), "loss_count": self._loss_count.copy()}  # binary state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "loss_sum" in state:
            self._loss_sum = np.asarray(state["loss_sum"], dtype=np.float64)
            self._loss_count = np.asarray(state["loss_count"], dtype=np.int64)

    def choose(self, scores, fraction):
        return select_by_loss(scores, fraction, self.mode)


class RhoLoss(Selector):
    """RHO-LOSS: the highest reducible loss; ``irreducible[i]`` is example i's loss under a holdout model."""

    positional_input = "RhoLoss's irreducible losses"

    def __init__(
        self,
        fraction: float,
        irreducible: np.ndarray | Sequence[float],
        candidates: float = 1.0,
        per_label: bool = False,
    ):
        super().__init__(fraction, candidates, per_label)
        self.irreducible = np.asarray(irreducible, dtype=np.float64)

    def score(self, ids, ctx):
        if self.irreducible.shape[0] != len(ctx.dataset):
            raise ValueError(f"{self.irreducible.shape[0]} irreducible losses for a pool of {len(ctx.dataset)}")
        losses = scored_across_ranks(ids, lambda part: current_losses(part, ctx))
        return losses - self.irreducible[ids]


class FixedSubset(Selector):
    """Train on a fixed set of ids from the first step on (e.g. the examples SemDeDup keeps).

    With :class:`~dataflex.hf.DataFlexSelectCallback` this is a sampler *filter*: the dropped examples
    are never drawn, the order is the usual exact-resume subset order, and re-selection keeps the set.
    """

    positional_input = "FixedSubset's example ids"

    def __init__(self, ids: Sequence[int] | np.ndarray) -> None:
        ids = np.unique(np.asarray(ids, dtype=np.int64))
        if ids.size == 0:
            raise ValueError("FixedSubset needs at least one example id")
        super().__init__(1.0)
        self.ids = ids

    def initial_subset(self, n: int) -> np.ndarray:
        if self.ids[-1] >= n or self.ids[0] < 0:
            raise ValueError(f"FixedSubset ids must lie in [0, {n}); got {self.ids[0]}..{self.ids[-1]}")
        return self.ids

    def select(self, ctx: SelectionContext) -> np.ndarray:
        return self.initial_subset(len(ctx.dataset))


class RandomSelection(Selector):
    """The same budget uniformly at random (re-drawn at every re-selection); with ``per_label``, that share of
    every label drawn at random within it (the baseline for a per-label selector)."""

    def select(self, ctx):
        n = len(ctx.dataset)
        seed = ctx.seed * 1_000_003 + ctx.step
        if not self.per_label:
            return select_random(n, self.fraction, seed=seed)
        rng = np.random.default_rng(np.random.SeedSequence([seed, n]))  # drawn label by label, in sorted order

        def pick(members: np.ndarray) -> np.ndarray:
            return np.sort(rng.choice(members, size=budget(members.size, self.fraction), replace=False))

        return self._within_labels(ctx, np.arange(n), pick)


class Influence(Selector):
    """LESS / TracIn: cosine of each candidate's projected LoRA gradient with the target set's mean.

    Args:
        target: examples (feature dicts, as the dataset returns them) of the task to improve.
        mode: ``"less"`` (Adam-preconditioned with the live optimizer) or ``"tracin"``.
        dim: projection dimension; ``seed``: projection seed.
    """

    def __init__(
        self,
        fraction: float,
        target: Sequence[dict[str, Any]],
        mode: Literal["less", "tracin"] = "less",
        dim: int = 1024,
        seed: int = 0,
        candidates: float = 1.0,
    ) -> None:
        super().__init__(fraction, candidates)
        if not target:
            raise ValueError("the influence target set is empty: give at least one target example")
        self.target, self.mode, self.dim, self.proj_seed = list(target), mode, int(dim), int(seed)

    def score(self, ids, ctx):
        from dataflex.grads import lora_linears
        from dataflex.influence import GradientFeaturizer

        layers = lora_linears(ctx.model)
        optimizer = ctx.optimizer if self.mode == "less" else None
        featurizer = GradientFeaturizer(
            ctx.model, layers, dim=self.dim, seed=self.proj_seed, mode=self.mode, optimizer=optimizer
        )
        # LESS compares Adam directions of training examples with *plain* gradients of the target
        # (the target is never trained on, so it has no optimizer step to precondition).
        target_featurizer = GradientFeaturizer(ctx.model, layers, projector=featurizer.projector)
        target_feats = [
            target_featurizer.features(ctx.collate(self.target[i : i + ctx.batch_size]))
            for i in range(0, len(self.target), ctx.batch_size)
        ]
        target = torch.cat(target_feats)
        direction = torch.as_tensor(target_direction(target.cpu()), dtype=target.dtype, device=target.device)

        def part_scores(part: np.ndarray) -> np.ndarray:
            return np.concatenate(
                [(featurizer.features(batch) @ direction).cpu().numpy() for _, batch in _batches(part, ctx)]
            )

        return scored_across_ranks(ids, part_scores)
