"""Training dynamics per example, from the logits the training forward already produced.

Every time an example is trained on (a *visit*), its counted target tokens give, without gradient:

* the token-mean cross-entropy ``loss``;
* the ``margin``: target logit minus the largest other logit, averaged over the counted tokens. For a
  single-token answer this is exactly the margin of AUM (Pleiss et al., "Identifying Mislabeled Data using
  the Area Under the Margin Ranking", arXiv 2001.10528); for longer answers it is its token average;
* the ``confidence``: mean probability of the target token (Dataset Cartography, Swayamdipta et al.,
  arXiv 2009.10795, take the probability of the gold label; a sequence's is averaged over its tokens);
* ``accuracy``: share of counted tokens whose argmax is the target, and ``correct`` = all of them are
  (exact match under teacher forcing; for one answer token, the classifier's correctness).

:class:`TrainingDynamics` folds visits into per-example statistics across the run: visit count, loss mean,
variance (Welford) and EMA, AUM (mean margin over visits), cartography confidence (mean) and variability
(population standard deviation of confidence across visits), the last correctness and forgetting events
(Toneva et al., arXiv 1812.05159: a visit that is wrong after one that was right).

Determinism: visits are buffered per rank, gathered (collective) and applied in the canonical order
``(step, id, loss)``, so the record does not depend on the number of ranks or on when gathers happen
(every visit of a gather has a later step than those already applied). Arrays are kept in float64.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from dataflex import dist
from dataflex.losses import IGNORE_INDEX, SCORING_CHUNK_ELEMENTS, per_example_mean

__all__ = ["VISIT_FIELDS", "TrainingDynamics", "token_margins", "visit_statistics"]

#: Per-example statistics of one visit, in the column order of the gathered records (after id and step).
VISIT_FIELDS = ("loss", "margin", "confidence", "accuracy")


@torch.no_grad()
def token_margins(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``logits[i, target[i]] - max_{j != target[i]} logits[i, j]`` for ``(m, vocab)`` float logits."""
    return _margins_in_place(logits.clone(), target)


def _margins_in_place(chunk: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """:func:`token_margins` on a chunk the caller owns: the target column is overwritten (one max pass
    instead of a top-2, the cost that matters at large vocabularies)."""
    target_logit = chunk.gather(1, target[:, None])[:, 0]
    chunk.scatter_(1, target[:, None], float("-inf"))
    return target_logit - chunk.amax(dim=-1)  # amax: no indices, several times faster than max on CPU


_DENSE_SHARE = 0.5  # counted share of positions above which the statistics are taken on the whole grid


def _grid_statistics(
    logits: torch.Tensor, shifted: torch.Tensor, token_losses: torch.Tensor, chunk_elements: int
) -> torch.Tensor:
    """Token statistics (``VISIT_FIELDS`` order) of every shifted position of ``(batch, seq, vocab)`` logits,
    ``(batch, seq - 1, 4)``, in whole-grid ops: when nearly every position counts (pretraining-style batches)
    they are cheaper than gathering the counted positions one by one, and need no host sync. The largest
    *other* logit comes from a masked copy of at most ``chunk_elements`` logits at a time (a scatter and a
    values-only max: computing an argmax instead makes the pass several times slower on CPU). Positions that
    do not count hold garbage; the caller masks them."""
    batch, length, vocab = shifted.shape[0], shifted.shape[1], logits.shape[-1]
    view = logits[:, :length]  # position t predicts token t + 1
    target = shifted.clamp(min=0)[..., None]  # a position that does not count reads column 0 (masked later)
    target_logit = view.gather(-1, target)[..., 0].float()
    other = torch.empty_like(target_logit)
    rows = max(1, chunk_elements // max(1, length * vocab))  # whole rows per chunk, or positions of one row
    positions = length if length * vocab <= chunk_elements else max(1, chunk_elements // vocab)
    for b in range(0, batch, rows):
        for p in range(0, length, positions):
            part = (slice(b, b + rows), slice(p, p + positions))
            other[part] = view[part].scatter(-1, target[part], float("-inf")).amax(dim=-1).float()
    return _token_statistics(token_losses[:, :length].float(), target_logit - other)


@torch.no_grad()
def visit_statistics(
    logits_at: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None,
    labels: torch.Tensor,
    *,
    vocab: int,
    segments: torch.Tensor | None = None,
    log_probs: tuple[torch.Tensor, torch.Tensor] | None = None,
    token_losses: torch.Tensor | None = None,
    logits: torch.Tensor | None = None,
    chunk_elements: int = SCORING_CHUNK_ELEMENTS,
) -> dict[str, torch.Tensor]:
    """Per-example ``loss, margin, confidence, accuracy`` (``VISIT_FIELDS``) of one training micro-batch.

    ``logits_at(rows, positions)`` gives the logits of shifted positions (the forward's logits, or the LM
    head applied to its hidden states), evaluated in chunks of at most ``chunk_elements``; the chunks it
    returns are written to (advanced indexing and the LM head both return fresh tensors). ``token_losses``
    ``(batch, seq - 1 or more)``: the step's own per-token losses (position t predicts token t + 1), reused
    instead of recomputing the cross-entropy; with them, ``logits`` (the forward's whole ``(batch, seq,
    vocab)`` tensor) lets every statistic be taken on the whole grid of positions when most of them count
    (equal to the per-position path up to float32 summation order). Without
    logits, ``log_probs = (per-token log-probabilities, label mask)`` (a fused LM head) gives loss and
    confidence; margin and accuracy are then NaN. Examples without counted tokens get NaN everywhere.
    """
    if log_probs is not None:
        values, mask = log_probs
        rows, positions = torch.nonzero(mask.bool(), as_tuple=True)
        token_loss = -values.detach()[rows, positions].float()
        token_stats = _token_statistics(token_loss, torch.full_like(token_loss, float("nan")))
        return _named(per_example_mean(token_stats, rows, positions, values.shape[0], segments)[0])
    shifted = labels[:, 1:]
    counted = shifted != IGNORE_INDEX
    dense = counted.numel() > 0 and counted.sum() >= _DENSE_SHARE * counted.numel()  # length-1 rows: no positions
    if logits is not None and token_losses is not None and dense:
        # The losses are the step's own and nearly every position counts: whole-grid statistics.
        grid = _grid_statistics(logits.detach(), shifted, token_losses.detach(), chunk_elements)
        if segments is None:  # one example per row: a masked mean along each row, no gathers
            n = counted.sum(1, keepdim=True)
            sums = torch.where(counted[..., None], grid, 0.0).sum(1)
            return _named(torch.where(n > 0, sums / n.clamp(min=1), float("nan")))
        rows, positions = torch.nonzero(counted, as_tuple=True)
        return _named(per_example_mean(grid[rows, positions], rows, positions, labels.shape[0], segments)[0])
    rows, positions = torch.nonzero(counted, as_tuple=True)
    given = None if token_losses is None else token_losses.detach()[rows, positions].float()
    token_loss = torch.empty(rows.numel(), dtype=torch.float32, device=labels.device) if given is None else given
    margin = torch.empty(rows.numel(), dtype=torch.float32, device=labels.device)
    step = max(1, chunk_elements // vocab)
    for start in range(0, rows.numel(), step):
        r, t = rows[start : start + step], positions[start : start + step]
        chunk, target = logits_at(r, t).float(), shifted[r, t]
        if given is None:
            token_loss[start : start + step] = F.cross_entropy(chunk, target, reduction="none")
        margin[start : start + step] = _margins_in_place(chunk, target)
    token_stats = _token_statistics(token_loss, margin)
    return _named(per_example_mean(token_stats, rows, positions, labels.shape[0], segments)[0])


def _token_statistics(token_loss: torch.Tensor, margin: torch.Tensor) -> torch.Tensor:
    """``VISIT_FIELDS`` of each token, stacked on a new last axis (accuracy is NaN where the margin is)."""
    accuracy = torch.where(torch.isnan(margin), margin, (margin > 0).float())
    return torch.stack([token_loss, margin, torch.exp(-token_loss), accuracy], dim=-1)


def _named(means: torch.Tensor) -> dict[str, torch.Tensor]:
    return {name: means[:, i] for i, name in enumerate(VISIT_FIELDS)}


# Per-example arrays of the record, with their dtype and the value of an example never visited.
_ARRAYS: dict[str, tuple[Any, float]] = {
    "visits": (np.int64, 0),
    "loss_mean": (np.float64, np.nan),
    "loss_m2": (np.float64, np.nan),  # sum of squared deviations (Welford)
    "loss_ema": (np.float64, np.nan),
    "loss_last": (np.float64, np.nan),
    "margin_mean": (np.float64, np.nan),  # AUM
    "margin_last": (np.float64, np.nan),
    "confidence_mean": (np.float64, np.nan),
    "confidence_m2": (np.float64, np.nan),
    "accuracy_mean": (np.float64, np.nan),
    "correct_visits": (np.int64, 0),  # visits where every counted token was the argmax
    "correct_last": (np.int8, -1),  # -1 never visited (or no argmax known), 0 wrong, 1 right
    "forgetting": (np.int64, 0),  # right -> wrong transitions between consecutive visits
    "last_step": (np.int64, -1),
}


class TrainingDynamics:
    """Per-example statistics of every visit so far (see the module docstring for each quantity).

    Args:
        num_examples: size of the training set (ids ``0 .. n-1``).
        ema: weight of the past in ``loss_ema`` (``ema * old + (1 - ema) * new``; the first visit sets it).
    """

    def __init__(self, num_examples: int, ema: float = 0.9) -> None:
        if not 0 <= ema < 1:
            raise ValueError(f"ema must be in [0, 1); got {ema!r}")
        self.num_examples, self.ema = int(num_examples), float(ema)
        for name, (dtype, empty) in _ARRAYS.items():
            setattr(self, name, np.full(self.num_examples, empty, dtype=dtype))
        self._local: list[torch.Tensor] = []  # this rank's visits not yet gathered: (m, 2 + fields) float64

    # -- recording -------------------------------------------------------------------------------
    def add(self, ids: np.ndarray, step: int, stats: dict[str, torch.Tensor]) -> None:
        """Buffer one micro-batch's visits (``stats`` as :func:`visit_statistics` returns them)."""
        ids = np.asarray(ids, dtype=np.int64)
        columns = [stats[name].detach().double() for name in VISIT_FIELDS]
        if any(c.shape != ids.shape for c in columns):
            raise ValueError(f"visit statistics must have one value per example ({ids.shape[0]})")
        head = torch.as_tensor(np.stack([ids, np.full_like(ids, step)], 1), dtype=torch.float64)
        self._local.append(torch.cat([head.to(columns[0].device), torch.stack(columns, 1)], 1))

    @property
    def pending(self) -> int:
        """This rank's buffered visits not folded into the arrays yet (:meth:`gather` folds them in)."""
        return sum(int(part.shape[0]) for part in self._local)

    def gather(self) -> int:
        """Gather every rank's buffered visits and fold them in (collective: call on all ranks).
        Returns how many visits were applied."""
        local = torch.cat(self._local).cpu().numpy() if self._local else np.zeros((0, 2 + len(VISIT_FIELDS)))
        self._local.clear()
        records = np.concatenate([p for p in dist.all_gather_objects(local)])
        # Visits without counted tokens (NaN loss) carry nothing; non-finite losses neither.
        records = records[np.isfinite(records[:, 2])]
        if records.shape[0]:
            records = records[np.lexsort((records[:, 2], records[:, 0], records[:, 1]))]  # step, id, loss
            self._apply(records)
        return int(records.shape[0])

    def _apply(self, records: np.ndarray) -> None:
        ids = records[:, 0].astype(np.int64)
        if ids.min() < 0 or ids.max() >= self.num_examples:
            raise ValueError(f"visit ids must be in [0, {self.num_examples}); got {ids.min()}..{ids.max()}")
        # An id visited twice in one gather (sampling with replacement) is folded in visit by visit: round r
        # takes every id's r-th visit, so each round updates distinct ids and stays vectorised.
        order = np.argsort(ids, kind="stable")
        first = np.r_[True, ids[order][1:] != ids[order][:-1]]
        starts = np.maximum.accumulate(np.where(first, np.arange(ids.size), 0))
        occurrence = np.empty(ids.size, dtype=np.int64)
        occurrence[order] = np.arange(ids.size) - starts
        for r in range(int(occurrence.max()) + 1):
            self._apply_round(records[occurrence == r])

    def _apply_round(self, rec: np.ndarray) -> None:
        ids, step = rec[:, 0].astype(np.int64), rec[:, 1].astype(np.int64)
        loss, margin, confidence, accuracy = (rec[:, 2 + i] for i in range(len(VISIT_FIELDS)))
        n = self.visits[ids] + 1
        self.visits[ids] = n
        self._welford("loss", ids, loss, n)
        self._welford("confidence", ids, confidence, n)
        self._running_mean("margin_mean", ids, margin, n)
        self._running_mean("accuracy_mean", ids, accuracy, n)
        first = n == 1
        self.loss_ema[ids] = np.where(first, loss, self.ema * self.loss_ema[ids] + (1 - self.ema) * loss)
        self.loss_last[ids], self.margin_last[ids], self.last_step[ids] = loss, margin, step
        known = ~np.isnan(accuracy)
        correct = np.where(known, (accuracy == 1.0).astype(np.int8), np.int8(-1))
        was = self.correct_last[ids]
        self.forgetting[ids] += ((was == 1) & (correct == 0)).astype(np.int64)
        self.correct_visits[ids] += (correct == 1).astype(np.int64)
        self.correct_last[ids] = correct

    def _welford(self, name: str, ids: np.ndarray, value: np.ndarray, n: np.ndarray) -> None:
        mean, m2 = getattr(self, f"{name}_mean"), getattr(self, f"{name}_m2")
        old = np.where(n == 1, 0.0, mean[ids])
        new = old + (value - old) / n
        m2[ids] = np.where(n == 1, 0.0, m2[ids]) + (value - old) * (value - new)
        mean[ids] = new

    def _running_mean(self, name: str, ids: np.ndarray, value: np.ndarray, n: np.ndarray) -> None:
        array = getattr(self, name)
        array[ids] = np.where(n == 1, value, array[ids] + (value - array[ids]) / n)

    # -- read-outs -------------------------------------------------------------------------------
    @property
    def aum(self) -> np.ndarray:
        """Area under the margin: mean margin over visits (NaN where never visited)."""
        return self.margin_mean

    @property
    def loss_variance(self) -> np.ndarray:
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(self.visits > 0, self.loss_m2 / np.maximum(self.visits, 1), np.nan)

    @property
    def variability(self) -> np.ndarray:
        """Cartography variability: population std of confidence across visits."""
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.sqrt(np.where(self.visits > 0, self.confidence_m2 / np.maximum(self.visits, 1), np.nan))

    @property
    def correctness(self) -> np.ndarray:
        """Share of visits that were right (cartography's correctness)."""
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(self.visits > 0, self.correct_visits / np.maximum(self.visits, 1), np.nan)

    # -- Stateful --------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Collective: folds in every rank's buffered visits first. Arrays go to the binary state file."""
        self.gather()
        return {"ema": self.ema, **{name: getattr(self, name).copy() for name in _ARRAYS}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        missing = [k for k in ("ema", *_ARRAYS) if k not in state]
        if missing:
            raise ValueError(f"training-dynamics state lacks {missing}")
        if state["ema"] != self.ema:
            raise ValueError(f"training dynamics were recorded with ema={state['ema']}, this run has ema={self.ema}")
        arrays = {}
        for name, (dtype, _) in _ARRAYS.items():
            value = np.asarray(state[name])
            if value.shape != (self.num_examples,):
                raise ValueError(
                    f"training-dynamics field {name!r} has shape {value.shape}; this run has {self.num_examples} "
                    "examples"
                )
            arrays[name] = value.astype(dtype)
        visited = arrays["visits"] > 0
        if (arrays["visits"] < 0).any() or (arrays["forgetting"] < 0).any():
            raise ValueError("training-dynamics counts (visits, forgetting) must be >= 0")
        for name in ("loss_mean", "loss_m2", "loss_ema", "confidence_mean", "confidence_m2"):
            if not np.isfinite(arrays[name][visited]).all():
                raise ValueError(f"training-dynamics field {name!r} is not finite for a visited example")
        if not np.isin(arrays["correct_last"], (-1, 0, 1)).all():
            raise ValueError("training-dynamics field 'correct_last' must hold -1, 0 or 1")
        if (arrays["correct_visits"] > arrays["visits"]).any() or (arrays["forgetting"] > arrays["visits"]).any():
            raise ValueError("training-dynamics counts exceed the number of visits")
        for name, value in arrays.items():
            setattr(self, name, value)
