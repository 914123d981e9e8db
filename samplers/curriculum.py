"""Curriculum sampler: early training draws only from the easiest examples, then the pool opens up.

Difficulty is an :class:`~dataflex.schedule.OrderSchedule` (example ids, easiest first; re-rankings are
events at a global sample index, like every other dataflex decision) and a pacing function ``c(t)``
(:mod:`dataflex.pacing`) says which fraction of that order is open at progress ``t = g / horizon``, where
``g`` is the global sample index. Position ``i`` of epoch ``e`` (``g = e * num_samples + i``) draws
uniformly among the ``ceil(c(t) * n)`` easiest examples with a uniform number from a generator seeded by
``SeedSequence([seed, e, 3, i // chunk_size])``: the order is a pure function of ``(seed, epoch,
schedule, pacing, horizon)``, so resuming needs no replay and every rank computes the same sequence.

Random order is ``pacing`` that is 1 everywhere (``c0=1``); an anti-curriculum is the reversed order.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from dataflex.domains import encode_domains
from dataflex.pacing import Pacing
from dataflex.samplers.base import ScheduledSampler
from dataflex.schedule import OrderSchedule
from dataflex.state import DatasetFingerprint

__all__ = ["CurriculumSampler"]

_CURRICULUM_STREAM = 3


class CurriculumSampler(ScheduledSampler):
    """Sample among the easiest ``ceil(pacing(g / horizon) * n)`` examples at global sample ``g``.

    Args:
        schedule: difficulty orders (easiest first) over ``schedule.num_examples`` examples.
        pacing: fraction open at progress t in [0, 1]; see :mod:`dataflex.pacing`.
        horizon: global samples after which the whole pool is open (``t = g / horizon``).
        pacing_name: recorded in the state so a resume with another pacing is refused.
        seed, num_samples, labels, chunk_size: as for the other dataflex samplers.
    """

    def __init__(
        self,
        schedule: OrderSchedule,
        pacing: Pacing,
        *,
        horizon: int,
        pacing_name: str = "custom",
        seed: int = 0,
        num_samples: int | None = None,
        labels: Sequence[str] | None = None,
        chunk_size: int = 4096,
    ) -> None:
        n = schedule.num_examples
        if horizon <= 0:
            raise ValueError(f"horizon (samples until the whole pool is open) must be positive; got {horizon}")
        if chunk_size <= 0:
            raise ValueError(f"chunk_size must be positive; got {chunk_size}")
        if labels is not None and len(labels) != n:
            raise ValueError(f"got {len(labels)} labels for a pool of {n} examples")
        ids, names = encode_domains(labels) if labels is not None else (np.zeros(n, np.int64), ["pool"])
        super().__init__(num_samples or n, schedule, seed, DatasetFingerprint.from_labels(ids, names))
        self.pacing, self.horizon, self.pacing_name = pacing, int(horizon), pacing_name
        self.chunk_size = int(chunk_size)

    def open_count(self, global_index: int) -> int:
        """How many of the easiest examples are open at ``global_index``."""
        n = self.schedule.num_examples
        c = float(self.pacing(min(1.0, global_index / self.horizon)))
        if not 0 < c <= 1 + 1e-12:
            raise ValueError(f"pacing returned {c} at t={global_index / self.horizon:.4f}; it must lie in (0, 1]")
        return max(1, min(n, math.ceil(c * n - 1e-9)))

    def _chunk(self, epoch: int, start: int, carry: None) -> tuple[np.ndarray, None]:
        """Position ``j`` of the chunk takes ``order[int(u_j * open_count(g))]`` with the order in force at ``g``."""
        seq = np.random.SeedSequence([self.seed, epoch, _CURRICULUM_STREAM, start // self.chunk_size])
        u = np.random.default_rng(seq).random(self.chunk_size)
        g0 = epoch * self.num_samples + start
        length = min(self.chunk_size, self.num_samples - start)
        out = np.empty(length, dtype=np.int64)
        for j in range(length):  # the pacing function is scalar Python: one call per position
            out[j] = self.schedule.value_at(g0 + j)[int(u[j] * self.open_count(g0 + j))]
        return out, None

    def _settings(self) -> dict[str, Any]:
        return {
            "seed": self.seed,
            "num_samples": self.num_samples,
            "horizon": self.horizon,
            "pacing": self.pacing_name,
            "chunk_size": self.chunk_size,
        }
