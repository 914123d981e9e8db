"""Subset sampler: trains on whichever examples the current selection holds, with exact resume.

Selections (loss focus, RHO-LOSS, influence, random; see :mod:`dataflex.selection`) are events of a
:class:`~dataflex.schedule.SubsetSchedule`. Position ``i`` of epoch ``e`` (global index ``g``) falls in
the selection segment ``s`` in force at ``g``; counting ``k`` positions from the later of the segment's
start and the epoch's start, it takes element ``k mod |S|`` of a permutation of the subset seeded by
``(seed, e, s, k // |S|)``. So every position is computed directly — no replay is needed to resume —
and the order is a pure function of ``(seed, epoch, schedule)``: within a segment every selected example
is seen once before any is repeated.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from dataflex.domains import encode_domains
from dataflex.samplers.base import ScheduledSampler
from dataflex.schedule import SubsetSchedule
from dataflex.state import DatasetFingerprint

__all__ = ["SubsetSampler"]

_SUBSET_STREAM = 2


class SubsetSampler(ScheduledSampler):
    """Sample the selected subset in force at each position.

    Args:
        schedule: the selections over a pool of ``schedule.num_examples`` examples.
        seed: base seed.
        num_samples: epoch length (default: the pool size, so epochs line up with the Trainer's).
        labels: optional per-example labels (e.g. task names) for the dataset fingerprint.
    """

    def __init__(
        self,
        schedule: SubsetSchedule,
        *,
        seed: int = 0,
        num_samples: int | None = None,
        labels: Sequence[str] | None = None,
    ) -> None:
        n = schedule.num_examples
        if labels is not None and len(labels) != n:
            raise ValueError(f"got {len(labels)} labels for a pool of {n} examples")
        ids, names = encode_domains(labels) if labels is not None else (np.zeros(n, np.int64), ["pool"])
        super().__init__(num_samples or n, schedule, seed, DatasetFingerprint.from_labels(ids, names))
        self._perm_cache: dict[tuple[int, int, int], np.ndarray] = {}

    def _permutation(self, epoch: int, segment: int, pass_index: int, subset: np.ndarray) -> np.ndarray:
        key = (epoch, segment, pass_index)
        perm = self._perm_cache.get(key)
        if perm is None:
            if len(self._perm_cache) > 64:
                self._perm_cache.clear()
            rng = np.random.default_rng(np.random.SeedSequence([self.seed, epoch, _SUBSET_STREAM, segment, pass_index]))
            perm = self._perm_cache[key] = rng.permutation(subset)
        return perm

    def _chunk(self, epoch: int, start: int, carry: None) -> tuple[np.ndarray, None]:
        """Position ``g`` takes entry ``(g - segment start) mod size`` of its segment's seeded permutation."""
        base = epoch * self.num_samples
        g = base + np.arange(start, min(start + self.chunk_size, self.num_samples), dtype=np.int64)
        starts = np.array([self.schedule.segment(i)[0] for i in range(len(self.schedule))], dtype=np.int64)
        segment = np.searchsorted(starts, g, side="right") - 1
        out = np.empty(g.size, dtype=np.int64)
        for seg in np.unique(segment).tolist():
            at = np.flatnonzero(segment == seg)
            effective_at, subset = self.schedule.segment(seg)
            passes, offsets = np.divmod(g[at] - max(effective_at, base), subset.shape[0])
            for p in np.unique(passes).tolist():
                hit = passes == p
                out[at[hit]] = self._permutation(epoch, seg, p, subset)[offsets[hit]]
        return out, None

    def _settings(self) -> dict[str, Any]:
        return {"seed": self.seed, "num_samples": self.num_samples}
