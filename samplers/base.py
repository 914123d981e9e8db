"""What every dataflex sampler shares: epochs, exact resume, and the record of the order it produced.

A subclass defines ``_chunk(epoch, start, carry)``: the example ids of positions ``start ..
start + chunk_size - 1`` of an epoch as one numpy array, a pure function of its seed, the epoch, its
schedule and ``carry`` — whatever the chunk needs from the positions before it (the mixture sampler's
per-domain draw counts; ``None`` for samplers without such state) — plus the carry after the chunk, and
``_settings()`` (what must match to resume). Chunks are computed with numpy in one go; a resume at
position ``k`` computes the ``k / chunk_size`` chunks before it without yielding them (no Python work per
sample). This base turns that into a ``torch.utils.data.Sampler`` that

* resumes exactly: ``state_dict(consumed=k)`` / ``load_state_dict`` restart at position ``k``;
* records which example sat at each position of the current epoch, so a consumer that only knows
  positions (the HF callback) can name the examples of every batch (:meth:`ids_at`);
* tells its schedule how far it has generated, so a late schedule change raises instead of landing at
  a timing-dependent sample.

A saved state also holds the carry at the chunk where the resume starts (``O(domains)`` numbers, with a
digest), so a resume deep into a long epoch computes one chunk instead of replaying the ones before it; a
state without it (older versions) still resumes, by replaying.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from typing import Any

import numpy as np
from torch.utils.data import Sampler

from dataflex.checks import seed_number
from dataflex.samplers.length import LengthGrouping
from dataflex.state import DatasetFingerprint, saved_count

__all__ = ["ScheduledSampler"]


class ScheduledSampler(Sampler[int]):
    """Base class; see the module docstring. ``schedule`` needs ``version``, ``frontier`` and ``state_dict``."""

    #: Settings introduced after states were first saved, with the value those older states implied.
    SETTINGS_ADDED_LATER: dict[str, Any] = {}

    def __init__(self, num_samples: int, schedule: Any, seed: int, fingerprint: DatasetFingerprint) -> None:
        if num_samples <= 0:
            raise ValueError(f"num_samples must be positive; got {num_samples}")
        self.num_samples = int(num_samples)
        self.schedule = schedule
        self.seed = seed_number("seed", seed)
        self.fingerprint = fingerprint
        self.epoch = 0
        self._resume_position = 0
        self._yielded = 0
        self._active_epoch: int | None = None  # epoch of the iteration most recently started
        self._order_epoch = -1
        self._order = np.full(self.num_samples, -1, dtype=np.int64)  # -1 = not generated yet
        self.length_grouping: LengthGrouping | None = None
        self._carry_epoch = -1
        self._carry_version = -1
        self._carries: dict[int, Any] = {}  # chunk start -> carry, for the epoch being generated

    # -- to implement ----------------------------------------------------------------------------
    #: Positions per chunk (a subclass whose random streams are seeded per chunk sets its own).
    chunk_size: int = 4096

    def _initial_carry(self, epoch: int) -> Any:
        """What the first chunk of ``epoch`` starts from (see the module docstring)."""
        return None

    def _chunk(self, epoch: int, start: int, carry: Any) -> tuple[np.ndarray, Any]:
        """Example ids of positions ``start .. min(start + chunk_size, num_samples) - 1`` and the next carry."""
        raise NotImplementedError

    def _advance(self, epoch: int, start: int, carry: Any) -> Any:
        """Only the carry after a chunk (a subclass may skip producing the examples)."""
        return self._chunk(epoch, start, carry)[1] if carry is not None else None

    def _carry_to_json(self, carry: Any) -> Any:
        """``carry`` as JSON (a subclass with a carry overrides this and :meth:`_carry_from_json`)."""
        return None

    def _carry_from_json(self, saved: Any, start: int) -> Any:
        """The carry at chunk ``start`` back from JSON, validated: a wrong carry would resume silently wrong."""
        raise ValueError("sampler state holds a carry, but this kind of sampler has none")

    def _settings(self) -> dict[str, Any]:
        """Settings that change the order: a state saved with other values cannot be resumed."""
        return {"seed": self.seed, "num_samples": self.num_samples}

    def group_by_length(self, grouping: LengthGrouping | None) -> None:
        """Order each block of positions by example length (see :mod:`dataflex.samplers.length`); None: off.

        Call before iterating. Which examples each epoch holds is unchanged; a saved state records the
        grouping and refuses to resume under another one.
        """
        if grouping is not None and grouping.lengths.size != self.fingerprint.num_examples:
            raise ValueError(
                f"length grouping has {grouping.lengths.size} lengths but the dataset has "
                f"{self.fingerprint.num_examples} examples"
            )
        self.length_grouping = grouping
        self._order_epoch = -1

    # -- chunks ----------------------------------------------------------------------------------
    def _carry_at(self, epoch: int, start: int) -> Any:
        """The carry at chunk ``start`` of ``epoch``, computed forward from the nearest cached one.

        Carries of chunks past the sampler's frontier are dropped whenever the schedule changed: a new
        event lands beyond the frontier, so the draws (and the carries) after it may differ.
        """
        if self._carry_epoch != epoch:
            self._carry_epoch, self._carries = epoch, {0: self._initial_carry(epoch)}
            self._carry_version = self.schedule.version
        elif self._carry_version != self.schedule.version:
            self._carry_version = self.schedule.version
            first_open = self.schedule.frontier + 1 - epoch * self.num_samples
            self._carries = {c: v for c, v in self._carries.items() if c <= max(first_open, 0)}
        if start not in self._carries:
            c = max(k for k in self._carries if k <= start)
            self._carries[start] = self._advance_span(epoch, c, start, self._carries[c])
        return self._carries[start]

    def _advance_span(self, epoch: int, start: int, stop: int, carry: Any) -> Any:
        """The carry at chunk ``stop`` from the carry at chunk ``start`` (a subclass may batch the chunks)."""
        for c in range(start, stop, self.chunk_size):
            carry = self._advance(epoch, c, carry)
        return carry

    def _resume_chunk(self, position: int) -> int:
        """The chunk a resume at ``position`` starts generating from (its unit may begin before it)."""
        first = position - position % self._unit()
        return first - first % self.chunk_size

    def _carry_digest(self, epoch: int, start: int, value: Any) -> str:
        text = json.dumps([self.seed, epoch, start, value], separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def _saved_carry(self, epoch: int, position: int) -> dict[str, Any] | None:
        """The carry a resume at ``position`` of ``epoch`` needs, as JSON; None when there is nothing to carry."""
        start = self._resume_chunk(position)
        if start == 0 or self._initial_carry(epoch) is None:
            return None
        if self._carry_epoch == epoch:  # normally cached: the sampler produced these positions already
            carry = self._carry_at(epoch, start)
        else:  # another epoch than the one being generated: compute it without disturbing that cache
            carry = self._advance_span(epoch, 0, start, self._initial_carry(epoch))
        value = self._carry_to_json(carry)
        return {"start": start, "value": value, "digest": self._carry_digest(epoch, start, value)}

    def _load_carry(self, saved: Any, epoch: int, position: int) -> None:
        """Seed the carry cache from a saved carry, after checking it belongs to this state."""
        if not isinstance(saved, dict) or set(saved) != {"start", "value", "digest"}:
            raise ValueError(f"sampler state 'carry' must hold start, value and digest; got {saved!r:.120}")
        start = saved_count(saved, "start", "sampler carry")
        if start != self._resume_chunk(position):
            raise ValueError(
                f"sampler state 'carry' is for chunk {start}, but a resume at position {position} starts at "
                f"chunk {self._resume_chunk(position)}"
            )
        if saved["digest"] != self._carry_digest(epoch, start, saved["value"]):
            raise ValueError(
                "sampler state 'carry' does not match its digest: the state was altered or damaged, and "
                "resuming from it would produce another order"
            )
        carry = self._carry_from_json(saved["value"], start)
        self._carry_epoch, self._carry_version = epoch, self.schedule.version
        self._carries = {0: self._initial_carry(epoch), start: carry}

    def _range(self, epoch: int, a: int, b: int) -> np.ndarray:
        """Example ids of positions ``a .. b - 1`` of ``epoch`` under the schedule as it is now."""
        parts = []
        for c in range(a - a % self.chunk_size, b, self.chunk_size):
            ids, after = self._chunk(epoch, c, self._carry_at(epoch, c))
            self._carries.setdefault(c + self.chunk_size, after)
            parts.append(ids[max(a - c, 0) : b - c])
        return np.concatenate(parts) if parts else np.zeros(0, np.int64)

    def _unit(self) -> int:
        """Positions fixed together: a chunk, or a length-grouping block."""
        return self.chunk_size if self.length_grouping is None else self.length_grouping.megabatch

    def _unit_ids(self, epoch: int, a: int, b: int) -> np.ndarray:
        ids = self._range(epoch, a, b)
        return ids if self.length_grouping is None else self.length_grouping.sort_block(ids)

    def _all_settings(self) -> dict[str, Any]:
        grouping = None if self.length_grouping is None else self.length_grouping.settings()
        return {**self._settings(), "length_grouping": grouping}

    # -- Sampler ---------------------------------------------------------------------------------
    def __len__(self) -> int:
        return self.num_samples

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self._resume_position = 0
        self.epoch = int(epoch)

    def __iter__(self) -> Iterator[int]:
        epoch, start = self.epoch, self._resume_position
        self._active_epoch = epoch
        self._resume_position = 0
        self._yielded = start
        if epoch != self._order_epoch:
            self._order_epoch = epoch
            self._order.fill(-1)
        base, n, unit, schedule = epoch * self.num_samples, self.num_samples, self._unit(), self.schedule
        grouped = self.length_grouping is not None
        for a in range(start - start % unit, n, unit):
            b = min(a + unit, n)
            version = schedule.version
            ids = self._order[a:b] = self._unit_ids(epoch, a, b)
            todo = ids.tolist()
            for j in range(max(start - a, 0), b - a):
                if schedule.version != version:  # a decision arrived: positions after it may change
                    version = schedule.version
                    ids = self._order[a:b] = self._unit_ids(epoch, a, b)
                    todo = ids.tolist()
                # What is fixed once this example is out: itself, or its whole length-sorted block.
                fixed = base + (b - 1 if grouped else a + j)
                if fixed > schedule.frontier:
                    schedule.frontier = fixed
                self._yielded = a + j + 1
                yield todo[j]
        # A finished epoch moves on, so a state saved now resumes at the start of the next one.
        self.epoch = epoch + 1
        self._yielded = 0

    # -- order -----------------------------------------------------------------------------------
    def epoch_order(self, epoch: int, upto: int | None = None) -> np.ndarray:
        """Example ids of positions ``0..upto-1`` of ``epoch`` (whole epoch by default), without consuming."""
        upto = self.num_samples if upto is None else min(int(upto), self.num_samples)
        unit = self._unit()
        parts = [self._unit_ids(epoch, a, min(a + unit, self.num_samples)) for a in range(0, upto, unit)]
        return np.concatenate(parts)[:upto] if parts else np.zeros(0, np.int64)

    def ids_at(self, epoch: int, positions: np.ndarray) -> np.ndarray:
        """Example ids at ``positions`` of ``epoch`` (normally already generated by iteration)."""
        positions = np.asarray(positions, dtype=np.int64)
        if epoch == self._order_epoch:
            ids = self._order[positions]
            if (ids >= 0).all():
                return ids
        # Not generated in this process (for example after a resume that skipped ahead): replay.
        return self.epoch_order(epoch, upto=int(positions.max()) + 1)[positions]

    # -- Stateful --------------------------------------------------------------------------------
    def state_dict(self, consumed: int | None = None) -> dict[str, Any]:
        """Save progress. ``consumed`` = samples of the current epoch the *consumer* has used.

        With data-loader workers the sampler runs ahead of training, so pass the consumer's count;
        without it the number of yielded samples is used (exact only for ``num_workers=0``).
        ``consumed`` counts within the epoch of the iteration most recently started, even if the
        sampler has already produced that whole epoch (workers prefetch ahead of the consumer).
        """
        if consumed is None or self._active_epoch is None:
            position, epoch = (self._yielded if consumed is None else int(consumed)), self.epoch
        else:
            position, epoch = int(consumed), self._active_epoch
        if not 0 <= position <= self.num_samples:
            raise ValueError(f"consumed={position} is outside the epoch [0, {self.num_samples}]")
        if position == self.num_samples:
            epoch, position = epoch + 1, 0
        state = {
            "fingerprint": self.fingerprint.to_json(),
            **self._all_settings(),
            "epoch": epoch,
            "position": position,
            "schedule": self.schedule.state_dict(),
        }
        carry = self._saved_carry(epoch, position)
        return state if carry is None else {**state, "carry": carry}

    def load_state_dict(self, state: dict[str, Any], *, restore_position: bool = True) -> None:
        """Restore settings-checked state, schedule and epoch.

        ``restore_position=False`` restores everything but the position within the epoch: use it when
        the consumer fast-forwards by itself (the HF Trainer skips consumed batches on resume, so the
        sampler must start the epoch from 0 or the data would be skipped twice).
        """
        self.fingerprint.check_matches(state["fingerprint"])
        added_later = {"length_grouping": None, **self.SETTINGS_ADDED_LATER}
        for key, mine in self._all_settings().items():
            if key not in state and key not in added_later:
                raise ValueError(f"sampler state has no setting {key!r}; it was not saved by this kind of sampler")
            saved = state.get(key, added_later.get(key))
            if saved != mine:
                raise ValueError(
                    f"sampler state has {key}={saved!r} but this sampler has {key}={mine!r}; "
                    "the order would differ, so the state cannot be resumed here"
                )
        epoch = saved_count(state, "epoch", "sampler")
        position = saved_count(state, "position", "sampler")
        if position >= self.num_samples:
            raise ValueError(f"sampler state 'position' must lie in [0, {self.num_samples}); got {position}")
        self.schedule.load_state_dict(state["schedule"])
        self.epoch = epoch
        self._resume_position = position if restore_position else 0
        self._yielded = self._resume_position
        if restore_position and state.get("carry") is not None:
            self._load_carry(state["carry"], epoch, position)
