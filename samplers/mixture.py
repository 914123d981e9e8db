"""Domain-mixture sampler: draws examples so that domain shares follow a :class:`WeightSchedule`.

Determinism contract
--------------------
For fixed domain labels, seed, epoch length and schedule, the order of example ids in an epoch is a
pure function of ``(seed, epoch, schedule)``:

* position ``i`` of epoch ``e`` picks its domain from a uniform number ``u_i`` drawn by a generator
  seeded with ``SeedSequence([seed, e, i // chunk_size])`` (never a global RNG), mapped through the
  inverse CDF of the weights the schedule gives for global index ``e * num_samples + i``;
* inside a domain, examples come from a permutation seeded with ``SeedSequence([seed, e, 1, d, pass])``
  (without replacement) or from a second uniform per position (with replacement).

Because the uniforms do not depend on the weights, a schedule change alters only positions at or after
its ``effective_at`` index. Resuming after ``k`` consumed samples replays the cheap per-position
bookkeeping up to ``k`` and then yields exactly positions ``k, k+1, ...``.

Every rank builds the same global sequence; a distributed wrapper (accelerate's ``BatchSamplerShard``)
deals consecutive batches to ranks. See ``tests/test_sampler_sharding.py``.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any, Literal

import numpy as np

from dataflex.samplers.base import ScheduledSampler
from dataflex.schedule import WeightSchedule
from dataflex.state import DatasetFingerprint

__all__ = ["DomainMixtureSampler"]

ExhaustionMode = Literal["reshuffle", "redistribute"]
_WITHIN_DOMAIN_STREAM = 1


class DomainMixtureSampler(ScheduledSampler):
    """Sample example indices so each domain's share follows the schedule's weights.

    Args:
        domain_ids: domain index (0..K-1) of every example, in dataset order.
        schedule: weights over the K domains by global sample index; the sampler reads it lazily.
        seed: base seed of every random stream.
        num_samples: epoch length; defaults to the dataset size.
        replacement: draw each example independently (True) or walk a per-domain permutation (False).
        when_exhausted: without replacement, what to do when a domain has been fully used in an epoch:
            ``"reshuffle"`` starts a fresh permutation of it (small domains are upsampled and the
            weights are honoured exactly); ``"redistribute"`` retires it for the rest of the epoch
            and renormalises the other domains' weights (no example repeats within an epoch).
        chunk_size: positions per seeded random chunk.
        stratified: draw the domain uniforms of each chunk stratified (one per stratum of width 1/L for
            the chunk's L positions, in a seeded random order) instead of independently: with constant
            weights every domain then gets its quota ``w_k * L`` to within one example per chunk, instead
            of a multinomial count (cluster-balanced sampling uses this).
    """

    SETTINGS_ADDED_LATER = {"stratified": False}  # states saved before the option existed were not stratified

    def __init__(
        self,
        domain_ids: Sequence[int] | np.ndarray,
        schedule: WeightSchedule,
        *,
        seed: int = 0,
        num_samples: int | None = None,
        replacement: bool = False,
        when_exhausted: ExhaustionMode = "reshuffle",
        chunk_size: int = 4096,
        stratified: bool = False,
    ) -> None:
        ids = np.asarray(domain_ids, dtype=np.int64).reshape(-1)
        k = len(schedule.domain_names)
        if ids.size == 0:
            raise ValueError("domain_ids is empty: the sampler needs at least one example")
        if ids.min() < 0 or ids.max() >= k:
            raise ValueError(
                f"domain ids must lie in [0, {k}) for domains {schedule.domain_names}; got range "
                f"[{ids.min()}, {ids.max()}]"
            )
        counts = np.bincount(ids, minlength=k)
        empty = [schedule.domain_names[d] for d in np.flatnonzero(counts == 0)]
        if empty:
            raise ValueError(f"domain(s) {empty} have no examples; every scheduled domain needs at least one")
        if when_exhausted not in ("reshuffle", "redistribute"):
            raise ValueError(f"when_exhausted={when_exhausted!r}; valid values are 'reshuffle', 'redistribute'")
        if when_exhausted == "redistribute" and not replacement and num_samples is not None and num_samples > ids.size:
            raise ValueError(
                f"num_samples={num_samples} exceeds the dataset size {ids.size}, which "
                "when_exhausted='redistribute' without replacement cannot supply"
            )
        if chunk_size <= 0:
            raise ValueError(f"chunk_size must be positive; got {chunk_size}")
        super().__init__(
            int(num_samples) if num_samples is not None else int(ids.size),
            schedule,
            seed,
            DatasetFingerprint.from_labels(ids, schedule.domain_names),
        )
        self.domain_ids = ids
        self.replacement = bool(replacement)
        self.when_exhausted: ExhaustionMode = when_exhausted
        self.chunk_size = int(chunk_size)
        self.stratified = bool(stratified)
        self.members = [np.flatnonzero(ids == d) for d in range(k)]
        self._perm_cache: dict[tuple[int, int, int], np.ndarray] = {}

    def _permutation(self, epoch: int, domain: int, pass_index: int) -> np.ndarray:
        key = (epoch, domain, pass_index)
        perm = self._perm_cache.get(key)
        if perm is None:
            if len(self._perm_cache) > 8 * len(self.members) + 64:
                self._perm_cache.clear()  # bound memory across epochs; entries are cheap to rebuild
            rng = np.random.default_rng(
                np.random.SeedSequence([self.seed, epoch, _WITHIN_DOMAIN_STREAM, domain, pass_index])
            )
            perm = rng.permutation(self.members[domain])
            self._perm_cache[key] = perm
        return perm

    def _generate(self, epoch: int) -> Iterator[tuple[int, int]]:
        """Yield ``(position, example_id)`` for the whole epoch, in order."""
        n, k = self.num_samples, len(self.members)
        base = epoch * n
        sizes = np.array([m.size for m in self.members])
        drawn = np.zeros(k, dtype=np.int64)
        retired = np.zeros(k, dtype=bool)
        cdf: np.ndarray | None = None
        segment_end = -1  # global index where the cached cdf stops being valid
        seen_version = -1  # schedule events added while we run must invalidate the cache
        for chunk_start in range(0, n, self.chunk_size):
            rng = np.random.default_rng(np.random.SeedSequence([self.seed, epoch, chunk_start // self.chunk_size]))
            u_domain = rng.random(self.chunk_size)
            u_within = rng.random(self.chunk_size)
            if self.stratified:  # one uniform per stratum [s/L, (s+1)/L) of the L positions used, in random order
                used = min(self.chunk_size, n - chunk_start)
                u_domain[:used] = (rng.permutation(used) + u_domain[:used]) / used
            for j in range(min(self.chunk_size, n - chunk_start)):
                pos = chunk_start + j
                g = base + pos
                if cdf is None or g >= segment_end or self.schedule.version != seen_version:
                    seen_version = self.schedule.version
                    cdf = self._cdf(g, retired)
                    nxt = self.schedule.next_change_after(g)
                    segment_end = nxt if nxt is not None else np.iinfo(np.int64).max
                d = min(int(np.searchsorted(cdf, u_domain[j] * cdf[-1], side="right")), k - 1)
                if self.replacement:
                    example = int(self.members[d][int(u_within[j] * sizes[d])])
                else:
                    pass_index, offset = divmod(int(drawn[d]), int(sizes[d]))
                    example = int(self._permutation(epoch, d, pass_index)[offset])
                    drawn[d] += 1
                    if self.when_exhausted == "redistribute" and drawn[d] == sizes[d]:
                        retired[d] = True
                        cdf = None
                yield pos, example

    def _cdf(self, global_index: int, retired: np.ndarray) -> np.ndarray:
        w = self.schedule.weights_at(global_index)
        if retired.any():
            w = np.where(retired, 0.0, w)
            if w.sum() <= 0:
                # Every domain with weight left is used up: fall back to uniform over what remains.
                w = (~retired).astype(np.float64)
        return np.cumsum(w)

    def _settings(self) -> dict[str, Any]:
        return {
            "seed": self.seed,
            "num_samples": self.num_samples,
            "replacement": self.replacement,
            "when_exhausted": self.when_exhausted,
            "chunk_size": self.chunk_size,
            "stratified": self.stratified,
        }
