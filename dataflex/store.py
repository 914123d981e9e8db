"""Per-example scores and per-domain statistics, synchronised across ranks.

The training hook adds one record per micro-batch (example ids, per-example loss, whether the
example had any counted token). Records stay on the model's device until :meth:`ScoreStore.flush`,
which is called once per policy update: it gathers every rank's records, reduces them to per-domain
statistics in a canonical order (sorted by example id, float64). Every rank therefore hands
bit-identical statistics to its policy, and so computes bit-identical weights. Selector scores
(identical on every rank) are kept per example with the step they were taken at, in float32: they are a
record for logs and inspection (no decision reads them back), computed from float32 model outputs, and
float32 halves the memory and the checkpoint of a large pool (40 MB instead of 80 at 10M examples).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from dataflex import dist
from dataflex.state import floats_from_json

__all__ = ["DomainStats", "ScoreStore"]


@dataclass
class DomainStats:
    """Per-domain loss statistics over one update window, identical on every rank."""

    loss_sum: np.ndarray  # (K,) sum of finite per-example losses
    count: np.ndarray  # (K,) number of examples with a finite loss
    non_finite: int  # examples whose loss was NaN/Inf although they had counted tokens
    masked: int  # examples whose labels were all ignore_index

    @property
    def mean_loss(self) -> np.ndarray:
        """Mean loss per domain; NaN for a domain with no valid example in the window."""
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(self.count > 0, self.loss_sum / np.maximum(self.count, 1), np.nan)


def _floats(values: Any) -> np.ndarray:
    """A saved float array: numpy (binary state) or a JSON list with null for NaN (older states)."""
    return values.astype(np.float64) if isinstance(values, np.ndarray) else floats_from_json(values)


SCORE_DTYPE = np.float32  # see the module docstring
STEP_DTYPE = np.int32  # a step count (2**31 steps is far beyond any run); half the bytes of int64


class ScoreStore:
    """Collects per-example losses between updates; keeps selector scores per example."""

    def __init__(self, domain_ids: np.ndarray, num_domains: int) -> None:
        self.domain_ids = np.asarray(domain_ids, dtype=np.int64)
        self.num_domains = int(num_domains)
        n = self.domain_ids.shape[0]
        self.total_non_finite = 0
        self.total_masked = 0
        # Scores a selector computed at re-selection time (same on every rank), with their step.
        self.score = np.full(n, np.nan, dtype=SCORE_DTYPE)
        self.score_step = np.full(n, -1, dtype=STEP_DTYPE)
        # Records of this rank not yet gathered: (ids, loss, has_tokens), loss on the model's device.
        self._local: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        # Records already gathered from all ranks (identical everywhere): restored from a checkpoint.
        self._gathered: list[np.ndarray] = []

    def add(self, ids: torch.Tensor | np.ndarray, loss: torch.Tensor, has_tokens: torch.Tensor) -> None:
        ids_t = torch.as_tensor(np.asarray(ids, dtype=np.int64)) if not isinstance(ids, torch.Tensor) else ids
        if ids_t.shape[0] != loss.shape[0] or loss.shape != has_tokens.shape:
            raise ValueError(
                f"ids {tuple(ids_t.shape)}, loss {tuple(loss.shape)} and has_tokens {tuple(has_tokens.shape)} "
                "must have one entry per example"
            )
        self._local.append((ids_t.cpu(), loss.detach(), has_tokens.detach()))

    def _local_array(self) -> np.ndarray:
        """This rank's pending records as an ``(m, 3)`` float64 array [id, loss, has_tokens]."""
        if not self._local:
            return np.zeros((0, 3))
        ids = torch.cat([r[0] for r in self._local]).double()
        loss = torch.cat([r[1].float() for r in self._local]).double().cpu()  # one device sync
        has = torch.cat([r[2] for r in self._local]).double().cpu()
        return torch.stack([ids, loss, has], dim=1).numpy()

    def gather_pending(self) -> np.ndarray:
        """Move every rank's pending records into the gathered list (collective: call on all ranks)."""
        parts = dist.all_gather_objects(self._local_array())
        self._local.clear()
        self._gathered.extend(p for p in parts if p.shape[0])
        return np.concatenate(self._gathered) if self._gathered else np.zeros((0, 3))

    def flush(self, step: int) -> DomainStats:
        """Gather all ranks' records and return their per-domain statistics."""
        records = self.gather_pending()
        self._gathered.clear()
        # Canonical order makes float sums independent of rank count and of checkpoint boundaries.
        if records.shape[0]:
            records = records[np.lexsort((records[:, 1], records[:, 0]))]
        ids = records[:, 0].astype(np.int64)
        loss = records[:, 1]
        has = records[:, 2] > 0.5
        finite = np.isfinite(loss)
        valid = has & finite
        domains = self.domain_ids[ids]
        k = self.num_domains
        stats = DomainStats(
            loss_sum=np.bincount(domains[valid], weights=loss[valid], minlength=k).astype(np.float64),
            count=np.bincount(domains[valid], minlength=k).astype(np.int64),
            non_finite=int((has & ~finite).sum()),
            masked=int((~has).sum()),
        )
        self.total_non_finite += stats.non_finite
        self.total_masked += stats.masked
        return stats

    def record_scores(self, ids: np.ndarray, values: np.ndarray, step: int) -> None:
        """Keep selector scores (already identical on every rank) with the step they were taken at."""
        ids = np.asarray(ids, dtype=np.int64)
        self.score[ids] = np.asarray(values, dtype=SCORE_DTYPE)
        self.score_step[ids] = step

    # -- Stateful --------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Collective when records are pending: every rank must call it (the callback does, in on_save)."""
        pending = self.gather_pending()
        scored = bool((self.score_step >= 0).any())  # only selectors record scores; mixing never does
        return {
            "total_non_finite": self.total_non_finite,
            "total_masked": self.total_masked,
            # Per-example arrays go to the binary file beside the JSON (dataflex.checkpoint.split_arrays),
            # and only when there is something in them.
            "score": self.score.copy() if scored else None,
            "score_step": self.score_step.copy() if scored else None,
            "pending": pending.copy(),  # (m, 3): id, loss (NaN kept), has_tokens
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        n = self.score.shape[0]
        if state["score"] is None:  # nothing was scored when it was saved
            state = {**state, "score": np.full(n, np.nan), "score_step": np.full(n, -1, dtype=STEP_DTYPE)}
        score = _floats(state["score"]).astype(SCORE_DTYPE)  # states of earlier versions kept float64
        if score.shape != self.score.shape:
            raise ValueError(f"score store was saved for {score.shape[0]} examples, this run has {self.score.shape[0]}")
        totals = {k: state[k] for k in ("total_non_finite", "total_masked")}
        if any(not isinstance(v, int) or v < 0 for v in totals.values()):
            raise ValueError(f"score store counts must be integers >= 0; got {totals}")
        score_step = np.asarray(state["score_step"])
        if score_step.shape != (n,) or (score_step.size and not np.issubdtype(score_step.dtype, np.integer)):
            raise ValueError(f"score store 'score_step' must hold {n} integers; got shape {score_step.shape}")
        if score_step.size and (score_step.min() < -1 or score_step.max() > np.iinfo(STEP_DTYPE).max):
            raise ValueError(
                f"score store 'score_step' must hold steps >= 0 or -1 (not scored); got values in "
                f"[{score_step.min()}, {score_step.max()}]"
            )
        if isinstance(state["pending"], np.ndarray):
            pending = state["pending"].astype(np.float64).reshape(-1, 3)
        else:  # a state written before arrays went to the binary file: [[id, loss or null, has_tokens], ...]
            pending = np.array(
                [[i, np.nan if v is None else v, h] for i, v, h in state["pending"]], dtype=np.float64
            ).reshape(-1, 3)
        ids = pending[:, 0]
        if ((ids < 0) | (ids >= n) | (ids != np.round(ids))).any():
            bad = ids[(ids < 0) | (ids >= n) | (ids != np.round(ids))][:5].tolist()
            raise ValueError(f"score store 'pending' names example ids {bad} outside [0, {n})")
        if not np.isin(pending[:, 2], (0.0, 1.0)).all():
            raise ValueError("score store 'pending' has_tokens flags must be 0 or 1")
        self.total_non_finite, self.total_masked = totals["total_non_finite"], totals["total_masked"]
        self.score = score
        self.score_step = score_step.astype(STEP_DTYPE)
        self._local.clear()
        self._gathered = [pending] if pending.shape[0] else []
