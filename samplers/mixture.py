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


_FEW_DOMAINS = 32  # up to here K passes over a chunk beat a binary search (or a sort) per position


def _count_at_most(cdf: np.ndarray, values: np.ndarray) -> np.ndarray:
    """``np.searchsorted(cdf, values, side="right")`` for a non-decreasing ``cdf``: entries <= each value."""
    if cdf.size > _FEW_DOMAINS:
        return np.searchsorted(cdf, values, side="right")
    count = np.zeros(values.size, dtype=np.int64)
    for edge in cdf.tolist():  # K vector comparisons beat a binary search per value when K is small
        count += values >= edge
    return count


def _positions_by_domain(domain: np.ndarray, k: int) -> Iterator[tuple[int, np.ndarray]]:
    """``(domain, its positions in increasing order)`` for every domain present in ``domain``."""
    if k <= _FEW_DOMAINS:
        for dom in np.flatnonzero(np.bincount(domain, minlength=k)).tolist():
            yield dom, np.flatnonzero(domain == dom)
        return
    by_domain = np.argsort(domain, kind="stable")
    bounds = np.concatenate([[0], np.cumsum(np.bincount(domain, minlength=k))])
    for dom in np.flatnonzero(np.diff(bounds)).tolist():
        yield dom, by_domain[bounds[dom] : bounds[dom + 1]]


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
        # Positions of each domain, int32 when the pool allows: shuffling them is the cost of a fresh epoch
        # (and of a resume); int32 shuffles 1.7x faster than int64 with the same draws, so the same order.
        index_dtype = np.int32 if ids.size < 2**31 else np.int64
        self.members = [np.flatnonzero(ids == d).astype(index_dtype) for d in range(k)]
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

    def _initial_carry(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """Draws taken from each domain so far in the epoch, and which domains are retired."""
        k = len(self.members)
        return np.zeros(k, dtype=np.int64), np.zeros(k, dtype=bool)

    def _carry_to_json(self, carry: tuple[np.ndarray, np.ndarray]) -> list[int]:
        return carry[0].tolist()  # the retired flags follow from the counts

    def _carry_from_json(self, saved: Any, start: int) -> tuple[np.ndarray, np.ndarray]:
        k, sizes = len(self.members), np.array([m.size for m in self.members])
        ok = isinstance(saved, list) and len(saved) == k
        ok = ok and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in saved)
        if not ok:
            raise ValueError(f"sampler state 'carry' value must be {k} integers >= 0; got {saved!r:.120}")
        drawn = np.array(saved, dtype=np.int64)
        expected = 0 if self.replacement else start  # without replacement every position draws once
        retiring = self.when_exhausted == "redistribute" and not self.replacement
        if int(drawn.sum()) != expected or (retiring and (drawn > sizes).any()):
            raise ValueError(
                f"sampler state 'carry' value {saved} cannot be the draws before position {start} "
                f"(they must sum to {expected}{' and stay within the domain sizes' if retiring else ''})"
            )
        return drawn, (drawn == sizes) if retiring else np.zeros(k, dtype=bool)

    def _domains(
        self, epoch: int, start: int, carry: tuple[np.ndarray, np.ndarray], within: bool = True
    ) -> tuple[np.ndarray, np.ndarray | None, np.ndarray, np.ndarray]:
        """Each position's domain in one seeded chunk, its within-domain uniform (``within``), and the carry
        after it."""
        n, k = self.num_samples, len(self.members)
        drawn, retired = carry[0].copy(), carry[1].copy()
        length = min(self.chunk_size, n - start)
        u_domain, u_within = self._uniforms(epoch, start, within)
        domain = np.empty(length, dtype=np.int64)
        retiring = self.when_exhausted == "redistribute" and not self.replacement
        j, g0 = 0, epoch * n + start
        while j < length:
            # One stretch under one cdf: up to the next schedule change or, when domains retire, the next retirement.
            cdf = self._cdf(g0 + j, retired)
            nxt = self.schedule.next_change_after(g0 + j)
            end = length if nxt is None else min(length, nxt - g0)
            d = np.minimum(_count_at_most(cdf, u_domain[j:end] * cdf[-1]), k - 1)
            if retiring:
                end, d = self._until_retirement(d, j, drawn, retired)
                drawn += np.bincount(d, minlength=k)
            domain[j:end] = d
            j = end
        if not retiring and not self.replacement:
            drawn += np.bincount(domain, minlength=k)
        return domain, None if u_within is None else u_within[:length], drawn, retired

    def _uniforms(self, epoch: int, start: int, within: bool = True) -> tuple[np.ndarray, np.ndarray | None]:
        """The chunk's domain uniforms and (if ``within``) its within-domain uniforms, from its own seed."""
        length = min(self.chunk_size, self.num_samples - start)
        rng = np.random.default_rng(np.random.SeedSequence([self.seed, epoch, start // self.chunk_size]))
        u_domain = rng.random(self.chunk_size)
        if within or self.stratified:
            u_within = rng.random(self.chunk_size)
        else:  # only the counts are wanted: skip the draws (one 64-bit word each) instead of making them
            rng.bit_generator.advance(self.chunk_size)
            u_within = None
        if self.stratified:  # one uniform per stratum [s/L, (s+1)/L) of the L positions used, in random order
            u_domain[:length] = (rng.permutation(length) + u_domain[:length]) / length
        return u_domain, u_within

    def _advance_span(
        self, epoch: int, start: int, stop: int, carry: tuple[np.ndarray, np.ndarray]
    ) -> tuple[np.ndarray, np.ndarray]:
        """Per-domain draw counts over many skipped chunks at once (a resume): chunks under one cdf are
        counted together, the same comparisons as chunk by chunk; chunks with a schedule change or a
        retirement inside take the chunk path."""
        if self.replacement:
            return carry  # drawing with replacement leaves nothing to carry
        if self.when_exhausted == "redistribute":
            return super()._advance_span(epoch, start, stop, carry)
        k, base = len(self.members), epoch * self.num_samples
        drawn, retired = carry[0].copy(), carry[1]
        batch: list[np.ndarray] = []
        cdf: np.ndarray | None = None

        def count() -> None:
            if batch:
                values = np.concatenate(batch) * cdf[-1]
                drawn[:] += np.bincount(np.minimum(_count_at_most(cdf, values), k - 1), minlength=k)
                batch.clear()

        for c in range(start, stop, self.chunk_size):
            g0, length = base + c, min(self.chunk_size, self.num_samples - c)
            nxt = self.schedule.next_change_after(g0)
            if nxt is not None and nxt < g0 + length:  # a change inside this chunk
                count()
                drawn = self._advance(epoch, c, (drawn, retired))[0]
                cdf = None
                continue
            here = self._cdf(g0, retired)
            if cdf is not None and not np.array_equal(here, cdf):
                count()
            cdf = here
            batch.append(self._uniforms(epoch, c, within=False)[0][:length])
        count()
        return drawn, retired

    def _advance(self, epoch: int, start: int, carry: tuple[np.ndarray, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """The carry after a chunk without producing its examples (what a resume needs for skipped chunks)."""
        _, _, drawn, retired = self._domains(epoch, start, carry, within=False)
        return drawn, retired

    def _chunk(
        self, epoch: int, start: int, carry: tuple[np.ndarray, np.ndarray]
    ) -> tuple[np.ndarray, tuple[np.ndarray, np.ndarray]]:
        """Positions ``start ..`` of one seeded chunk, vectorised (see the module docstring for the rule)."""
        domain, u_within, drawn, retired = self._domains(epoch, start, carry)
        examples = np.empty(domain.size, dtype=np.int64)
        for dom, where in _positions_by_domain(domain, len(self.members)):
            size = self.members[dom].size
            if self.replacement:
                examples[where] = self.members[dom][(u_within[where] * size).astype(np.int64)]
                continue
            index = int(carry[0][dom]) + np.arange(where.size)  # this chunk's draws from the domain
            passes, offsets = np.divmod(index, size)
            if passes[0] == passes[-1]:
                examples[where] = self._permutation(epoch, dom, int(passes[0]))[offsets]
                continue
            for p in range(int(passes[0]), int(passes[-1]) + 1):
                at = passes == p
                examples[where[at]] = self._permutation(epoch, dom, p)[offsets[at]]
        return examples, (drawn, retired)

    def _until_retirement(
        self, d: np.ndarray, j: int, drawn: np.ndarray, retired: np.ndarray
    ) -> tuple[int, np.ndarray]:
        """Cut a stretch of domain draws at the first one that uses up its domain (which then retires)."""
        first_end = d.size
        for dom, hits in _positions_by_domain(d, len(self.members)):
            left = int(self.members[dom].size - drawn[dom])
            if hits.size >= left:
                first_end = min(first_end, int(hits[left - 1]) + 1)
        d = d[:first_end]
        counts = np.bincount(d, minlength=len(self.members))
        retired |= (drawn + counts) == np.array([m.size for m in self.members])
        return j + first_end, d

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
