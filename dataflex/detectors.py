"""Noisy-example detectors built on the training-dynamics record, and the selector that drops what they flag.

Scores are *noise scores*: higher means more likely mislabeled. Examples never trained on have no
evidence and are never dropped.

* ``"aum"`` — minus the area under the margin (Pleiss et al., arXiv 2001.10528): a mislabeled example's
  target keeps losing to another token, so its margin averaged over visits stays low or negative.
  :func:`plant_threshold_examples` adds the paper's *threshold examples* — a small seeded share whose answers
  are deliberately replaced by another example's — and :func:`aum_threshold` takes the given percentile
  (99 in the paper) of their AUM as the cut: an example whose AUM is at or below it is flagged. The cut is
  then learned from examples known to be wrong instead of guessed. The paper's 99th percentile flags nearly
  every example that behaves like a wrong one, at the cost of clean examples whose margins overlap theirs;
  a lower ``percentile`` keeps more clean data and lets more noise through.
* ``"cartography"`` — minus the mean confidence (Swayamdipta et al., arXiv 2009.10795): the
  *hard-to-learn* region (low confidence, low variability) is where the paper finds mislabeled examples.
  :func:`cartography_regions` names each example's region.
* ``"loss"`` — the mean training loss over visits (the small-loss criterion of co-teaching and its kin).
* ``"forgetting"`` — forgetting events (Toneva et al., arXiv 1812.05159), ties broken by the mean loss.
* ``"last_loss"`` — the loss at the example's latest visit: the model's current judgement, the small-loss
  criterion as co-teaching applies it (Han et al., arXiv 1804.06872). Averages over visits (``"aum"``,
  ``"cartography"``, ``"loss"``) carry the visits before the model could tell right from wrong; on the VLM
  benchmark the latest visit separates the wrong answers best (``benchmarks/vlm/detectors``).

**Class-conditional scores** (``classes``): a score is compared within its example's given label — the
answer class, or question type and answer — by standardising it over the visited examples of that class
(minus the class mean, over the class standard deviation). Confident learning (Northcutt et al., arXiv
1911.00068) sets one threshold per given label, the mean self-confidence of the examples carrying it, for
the same reason: answers differ in base difficulty (a wrong "7" among ten digits costs more loss than a
right one, a right "odd" less than either), so one cut across labels flags the hard classes instead of the
wrong answers. On the VLM benchmark this lifts the margin and loss detectors' AUROC (AUM 0.72 -> 0.95, latest-visit
loss 0.83 -> 0.98), not forgetting's (0.67 -> 0.63: event counts carry no class-specific level to remove).

Offline, :func:`out_of_fold_scores` scores every example with a proxy that never trained on it (k small runs,
each scoring the fold it left out), the held-out setting of confident learning (Northcutt et al., arXiv
1911.00068): a wrong answer that a model fitted on the other folds cannot predict stands out, where the same
model trained on it would have memorised it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from dataflex.checks import real_number
from dataflex.dynamics import TrainingDynamics
from dataflex.run_folder import describe_differences
from dataflex.selectors import SelectionContext, Selector
from dataflex.state import floats_from_json, read_json, write_json_atomic

__all__ = [
    "DETECTORS",
    "DropNoisy",
    "detection_quality",
    "keep_priority",
    "aum_threshold",
    "cartography_regions",
    "noise_scores",
    "out_of_fold_scores",
    "plant_threshold_examples",
    "standardised_within",
    "class_codes",
]

DETECTORS = ("aum", "cartography", "loss", "forgetting", "last_loss")


def noise_scores(
    record: TrainingDynamics, detector: str, classes: Sequence[Any] | np.ndarray | None = None
) -> np.ndarray:
    """Per-example noise score (higher = more likely wrong); NaN for examples never visited.

    ``classes`` (one given label per example) makes the scores class-conditional (module docstring).
    """
    score = _raw_noise_scores(record, detector)
    return score if classes is None else standardised_within(score, classes)


def standardised_within(score: np.ndarray, classes: Sequence[Any] | np.ndarray) -> np.ndarray:
    """``score`` minus its class mean over its class standard deviation (finite scores only; NaN stays NaN).

    A class with one finite score, or with equal scores, gets 0 (no evidence either way).
    """
    classes = np.asarray(classes)
    if classes.shape != score.shape:
        raise ValueError(f"classes must give one label per example ({score.shape[0]}); got shape {classes.shape}")
    code = class_codes(classes)
    finite = np.isfinite(score)
    k = int(code.max()) + 1 if code.size else 0
    count = np.bincount(code[finite], minlength=k).astype(np.float64)
    total = np.bincount(code[finite], weights=score[finite], minlength=k)
    mean = np.divide(total, count, out=np.zeros(k), where=count > 0)
    deviation = np.where(finite, score - mean[code], 0.0)
    spread = np.sqrt(
        np.divide(np.bincount(code, weights=deviation**2, minlength=k), count, out=np.zeros(k), where=count > 0)
    )
    with np.errstate(invalid="ignore", divide="ignore"):
        z = np.where(spread[code] > 0, deviation / spread[code], 0.0)
    return np.where(finite, z, np.nan)


def class_codes(classes: Sequence[Any] | np.ndarray) -> np.ndarray:
    """Each label as an integer in [0, number of examples): the same grouping as ``classes``.

    Labels that already are such integers are used as they are; others (strings, say) are sorted once by
    ``np.unique`` — :class:`DropNoisy` does it at construction, not at every decision.
    """
    classes = np.asarray(classes).reshape(-1)
    if classes.dtype.kind in "iu" and (classes.size == 0 or (classes.min() >= 0 and classes.max() < classes.size)):
        return classes.astype(np.int64, copy=False)
    return np.unique(classes, return_inverse=True)[1].reshape(-1)


def _folded(record: TrainingDynamics) -> TrainingDynamics:
    """``record``, refused while it holds visits not folded into its arrays: every detector reads the arrays,
    which would silently miss the latest visits (a finished run's last ones stay buffered until a gather)."""
    if record.pending:
        raise ValueError(
            f"the training-dynamics record holds {record.pending} visits not folded in yet; call record.gather() "
            "(on every rank) before scoring it"
        )
    return record


def _raw_noise_scores(record: TrainingDynamics, detector: str) -> np.ndarray:
    visited = _folded(record).visits > 0
    if detector in ("aum", "forgetting") and visited.any() and np.isnan(record.margin_mean[visited]).all():
        # A forward that returns per-token log-probabilities only (TRL's fused LM head) gives losses but no
        # margins or argmax: every AUM would be NaN and every example would look unvisited (kept).
        raise ValueError(
            f"detector={detector!r} needs margins, but this run's training forwards gave no logits (per-token "
            "log-probabilities only, e.g. TRL's fused LM head); use detector='loss' or 'cartography', or return logits"
        )
    if detector == "aum":
        score = -record.aum
    elif detector == "cartography":
        score = -record.confidence_mean
    elif detector == "loss":
        score = record.loss_mean.copy()
    elif detector == "last_loss":
        score = record.loss_last.copy()
    elif detector == "forgetting":
        # Forgetting counts are small integers: the loss orders examples with equal counts (a monotone map of
        # the loss into [0, 1) keeps the count dominant).
        loss = np.nan_to_num(record.loss_mean, nan=0.0)
        score = record.forgetting + loss / (1.0 + np.abs(loss))
    else:
        raise ValueError(f"detector={detector!r}; valid detectors are {', '.join(DETECTORS)}")
    return np.where(visited, score, np.nan)


def detection_quality(scores: np.ndarray, wrong: np.ndarray) -> dict[str, float]:
    """How well noise ``scores`` find the examples of a known ``wrong`` mask (planted noise, threshold
    examples): AUROC, and the recall among the top ``wrong.mean()`` share (recall at the true noise rate).
    Examples without a score count as least suspect."""
    from sklearn.metrics import roc_auc_score

    wrong = np.asarray(wrong, dtype=bool)
    finite = np.isfinite(scores)
    floor = scores[finite].min() - 1.0 if finite.any() else 0.0
    ranked = np.where(finite, scores, floor)
    top = np.argsort(-ranked, kind="stable")[: int(wrong.sum())]
    return {"auroc": float(roc_auc_score(wrong, ranked)), "recall_at_noise_rate": float(wrong[top].mean())}


def out_of_fold_scores(
    n: int,
    k: int,
    train_and_score: Callable[[np.ndarray, np.ndarray, int], np.ndarray],
    *,
    seed: int = 0,
    cache: str | os.PathLike[str] | None = None,
    cache_key: Mapping[str, Any] | None = None,
) -> np.ndarray:
    """A noise score for each of ``n`` examples from ``k`` proxy runs, each blind to the examples it scores.

    The ids are split into ``k`` seeded folds; ``train_and_score(train_ids, held_out_ids, fold)`` trains a
    small proxy on ``train_ids`` and returns a noise score (e.g. the token-mean loss) for each of
    ``held_out_ids``. With ``cache`` (a folder), each finished fold is written atomically and a rerun after
    a crash skips it. ``cache_key`` is required with ``cache``: what the scores depend on that this function
    cannot see inside ``train_and_score`` — the data's digest (e.g. :func:`dataflex.state.token_digest`), the
    proxy's model and training knobs. A fold cached with another key, ``n``, ``k`` or ``seed`` is refused,
    naming each difference (another data set of the same size would otherwise get the first one's scores).
    """
    if not 2 <= k <= n:
        raise ValueError(f"k must be in [2, n={n}]; got {k!r}")
    if cache is not None and cache_key is None:
        raise ValueError(
            "out_of_fold_scores(cache=...) needs cache_key: the data and proxy settings the scores come from "
            "(e.g. {'data': token_digest(dataset), 'steps': 200, 'lr': 1e-3}); without it a cache made from other "
            "data of the same size would be reused"
        )
    key = json.loads(json.dumps({"n": n, "k": k, "seed": seed, **dict(cache_key or {})}, sort_keys=True, default=str))
    order = np.random.default_rng(np.random.SeedSequence([seed, 0x0F])).permutation(n)
    folds = np.array_split(order, k)
    scores = np.full(n, np.nan)
    for f, held_out in enumerate(folds):
        held_out = np.sort(held_out)
        path = None if cache is None else Path(cache) / f"fold-{f}-of-{k}.json"
        if path is not None and path.is_file():
            saved = read_json(path)
            differences = describe_differences(saved.get("key"), key)
            if differences:
                raise ValueError(
                    f"{path} was written for other settings ({differences}): delete it, or give this call a cache "
                    "folder of its own"
                )
            scores[held_out] = floats_from_json(saved["scores"])
            continue
        train = np.sort(np.concatenate([folds[j] for j in range(k) if j != f]))
        fold_scores = np.asarray(train_and_score(train, held_out, f), dtype=np.float64)
        if fold_scores.shape != held_out.shape:
            raise ValueError(
                f"train_and_score returned {fold_scores.shape[0] if fold_scores.ndim else 'a scalar'} scores for "
                f"fold {f}'s {held_out.size} held-out examples"
            )
        scores[held_out] = fold_scores
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            values = [None if not np.isfinite(v) else float(v) for v in fold_scores]
            write_json_atomic(path, {"key": key, "fold": f, "scores": values}, digest=True)
    return scores


def plant_threshold_examples(
    answers: Sequence[Any], share: float, seed: int, groups: Sequence[Any] | None = None
) -> tuple[list[Any], np.ndarray]:
    """Give a seeded ``share`` of examples another example's answer (within the same group when ``groups``
    is given, e.g. the task): returns the new answers and the ids of these threshold examples.

    Each threshold example takes the answer of a different example of its group whose answer differs from
    its own, so every threshold example is surely wrong (when its group has another answer at all).
    """
    if not 0 < share < 1:
        raise ValueError(f"share must be in (0, 1); got {share!r}")
    n = len(answers)
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0x7A]))
    chosen = np.sort(rng.choice(n, size=max(1, int(round(share * n))), replace=False))
    group = np.zeros(n, dtype=np.int64) if groups is None else np.unique(np.asarray(groups), return_inverse=True)[1]
    new = list(answers)
    planted = []
    for i in chosen.tolist():
        donors = [j for j in np.flatnonzero(group == group[i]).tolist() if answers[j] != answers[i]]
        if donors:
            new[i] = answers[donors[int(rng.integers(len(donors)))]]
            planted.append(i)
    return new, np.asarray(planted, dtype=np.int64)


def aum_threshold(record: TrainingDynamics, threshold_ids: np.ndarray, percentile: float = 99.0) -> float:
    """The ``percentile`` of the threshold examples' AUM (those visited): examples at or below it are flagged."""
    aum = _folded(record).aum[np.asarray(threshold_ids, dtype=np.int64)]
    aum = aum[np.isfinite(aum)]
    if aum.size == 0:
        raise ValueError("no threshold example has been trained on yet; the AUM threshold is not defined")
    return float(np.percentile(aum, percentile))


def cartography_regions(record: TrainingDynamics) -> np.ndarray:
    """``"easy"``, ``"ambiguous"``, ``"hard"`` or ``""`` (never visited) per example.

    The paper draws regions on the confidence / variability map by eye; here, reproducibly: *ambiguous* is
    the top third of variability, the rest split at the median confidence into *easy* (above) and *hard*.
    """
    visited = _folded(record).visits > 0
    out = np.full(record.num_examples, "", dtype=object)
    if not visited.any():
        return out
    variability, confidence = record.variability, record.confidence_mean
    ambiguous = visited & (variability >= np.quantile(variability[visited], 2 / 3))
    rest = visited & ~ambiguous
    median = np.median(confidence[rest]) if rest.any() else 0.0
    out[rest & (confidence > median)] = "easy"
    out[rest & (confidence <= median)] = "hard"
    out[ambiguous] = "ambiguous"
    return out


_UNVISITED = np.finfo(np.float64).max  # the ranking key of an example without a score: kept first


def keep_priority(noise: np.ndarray) -> np.ndarray:
    """Higher = kept first: minus the noise score, and examples without one (never visited, no evidence) ahead
    of all (the largest finite key: the ranking puts non-finite keys last)."""
    noise = np.asarray(noise, dtype=np.float64)
    return np.where(np.isfinite(noise), -noise, _UNVISITED)


class DropNoisy(Selector):
    """Train on the examples a detector does not flag, re-decided from the training-dynamics record.

    Either ``drop`` (the share of the pool with the highest noise scores is left out; with ``per_label``, that
    share of every label, as the other selectors do) or, for ``"aum"``, ``threshold_ids`` (examples whose AUM
    is at or below :func:`aum_threshold` are left out; so are the threshold examples themselves, which are
    wrong by construction). Examples never visited stay in. Used through
    :class:`~dataflex.hf.DataFlexSelectCallback`, which keeps the record when a selector sets
    ``needs_dynamics``; ``last_scores`` holds the noise scores of each decision (NaN: never visited).
    ``classes`` (one given label per pool example, e.g. question type and answer) makes the scores
    class-conditional (module docstring); ``per_label`` still sets the groups whose shares are kept.
    """

    needs_dynamics = True

    def __init__(
        self,
        detector: str = "aum",
        *,
        drop: float | None = None,
        threshold_ids: Sequence[int] | np.ndarray | None = None,
        percentile: float = 99.0,
        per_label: bool = False,
        classes: Sequence[Any] | np.ndarray | None = None,
    ) -> None:
        if detector not in DETECTORS:
            raise ValueError(f"detector={detector!r}; valid detectors are {', '.join(DETECTORS)}")
        if (drop is None) == (threshold_ids is None):
            raise ValueError(
                "give exactly one of drop (a share to leave out) or threshold_ids (AUM threshold examples)"
            )
        if threshold_ids is not None and detector != "aum":
            raise ValueError(f"threshold_ids set the AUM threshold; they do not apply to detector={detector!r}")
        drop = None if drop is None else real_number("drop", drop)
        if drop is not None and not 0 < drop < 1:
            raise ValueError(f"drop must be in (0, 1); got {drop!r}")
        if classes is not None and threshold_ids is not None:
            raise ValueError(
                "classes (class-conditional scores) apply to drop=...; threshold_ids compare raw AUM with the "
                "threshold examples' — give one or the other"
            )
        if not 0 < percentile <= 100:
            raise ValueError(f"percentile must be in (0, 100]; got {percentile!r}")
        if threshold_ids is not None and per_label is True:
            raise ValueError(
                "per_label keeps the same share of every label, which applies to drop=...; threshold_ids drop every "
                "example below one AUM threshold, whatever its label — give one or the other"
            )
        super().__init__(fraction=1.0 if drop is None else 1.0 - drop, per_label=per_label)
        self.detector, self.drop, self.percentile = detector, drop, float(percentile)
        self.threshold_ids = None if threshold_ids is None else np.asarray(threshold_ids, dtype=np.int64)
        self.threshold: float | None = None  # the AUM cut of the last decision (threshold mode)
        # Integer codes, sorted once here rather than at every decision (string labels at millions of examples).
        self.classes = None if classes is None else class_codes(classes)

    def _record(self, ctx: SelectionContext) -> TrainingDynamics:
        if ctx.dynamics is None:
            raise RuntimeError("DropNoisy needs the run's training-dynamics record (use DataFlexSelectCallback)")
        return ctx.dynamics

    def score(self, ids: np.ndarray, ctx: SelectionContext) -> np.ndarray:
        """Higher = kept: minus the noise score; examples never visited first of all (no evidence)."""
        return keep_priority(self._noise_scores(self._record(ctx))[ids])

    def initial_subset(self, n: int) -> np.ndarray:
        self._check_classes(n)  # at the start of training, not after the warm-up
        return super().initial_subset(n)

    def _check_classes(self, n: int) -> None:
        if self.classes is not None and self.classes.shape[0] != n:
            raise ValueError(
                f"DropNoisy classes give {self.classes.shape[0]} labels but the pool has {n} examples; "
                "give one label per pool example"
            )

    def _noise_scores(self, record: TrainingDynamics) -> np.ndarray:
        self._check_classes(record.num_examples)
        return noise_scores(record, self.detector, self.classes)

    def select(self, ctx: SelectionContext) -> np.ndarray:
        if self.threshold_ids is None:
            chosen = super().select(ctx)
            # Record the noise scores (NaN = never visited), not the ranking keys: those put unvisited examples
            # at the float maximum, which would reach the score store and overflow the logged means.
            pool, keys = self.last_scores
            self.last_scores = (pool, np.where(keys == _UNVISITED, np.nan, -keys))
            return chosen
        record = self._record(ctx)
        self.last_scores = (np.arange(record.num_examples), noise_scores(record, "aum"))
        self.threshold = aum_threshold(record, self.threshold_ids, self.percentile)
        keep = ~np.isfinite(record.aum) | (record.aum > self.threshold)
        keep[self.threshold_ids] = False
        return np.flatnonzero(keep)

    def keep_ids(self, record: TrainingDynamics, labels: np.ndarray | None = None) -> np.ndarray:
        """The ids this rule keeps given a finished run's record, for a subset file (offline use):
        ``write_subset(path, rule.keep_ids(callback.dynamics), pool=..., method="aum", fraction=...)``."""
        n = record.num_examples
        ctx = SelectionContext(
            model=None, dataset=range(n), collate=None, step=0, seed=0, labels=labels, dynamics=record
        )
        return self.select(ctx)

    def state_dict(self) -> dict[str, Any]:
        return {"threshold": self.threshold}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        threshold = state["threshold"]
        if threshold is not None and not (isinstance(threshold, float) and np.isfinite(threshold)):
            raise ValueError(f"DropNoisy threshold must be a finite number or null; got {threshold!r}")
        self.threshold = threshold
