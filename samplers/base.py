"""What every dataflex sampler shares: epochs, exact resume, and the record of the order it produced.

A subclass defines ``_generate(epoch)``, yielding ``(position, example_id)`` for the whole epoch as a pure
function of its seed, the epoch and its schedule, plus ``_settings()`` (what must match to resume).
This base turns that into a ``torch.utils.data.Sampler`` that

* resumes exactly: ``state_dict(consumed=k)`` / ``load_state_dict`` restart at position ``k``;
* records which example sat at each position of the current epoch, so a consumer that only knows
  positions (the HF callback) can name the examples of every batch (:meth:`ids_at`);
* tells its schedule how far it has generated, so a late schedule change raises instead of landing at
  a timing-dependent sample.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
from torch.utils.data import Sampler

from dataflex.samplers.length import LengthGrouping
from dataflex.state import DatasetFingerprint

__all__ = ["ScheduledSampler"]


class ScheduledSampler(Sampler[int]):
    """Base class; see the module docstring. ``schedule`` needs ``mark_generated`` and ``state_dict``."""

    #: Settings introduced after states were first saved, with the value those older states implied.
    SETTINGS_ADDED_LATER: dict[str, Any] = {}

    def __init__(self, num_samples: int, schedule: Any, seed: int, fingerprint: DatasetFingerprint) -> None:
        if num_samples <= 0:
            raise ValueError(f"num_samples must be positive; got {num_samples}")
        self.num_samples = int(num_samples)
        self.schedule = schedule
        self.seed = int(seed)
        self.fingerprint = fingerprint
        self.epoch = 0
        self._resume_position = 0
        self._yielded = 0
        self._active_epoch: int | None = None  # epoch of the iteration most recently started
        self._order_epoch = -1
        self._order = np.full(self.num_samples, -1, dtype=np.int64)  # -1 = not generated yet
        self.length_grouping: LengthGrouping | None = None

    # -- to implement ----------------------------------------------------------------------------
    def _generate(self, epoch: int) -> Iterator[tuple[int, int]]:
        raise NotImplementedError

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

    def _ordered(self, epoch: int) -> Iterator[tuple[int, int]]:
        """``_generate`` with length grouping applied when it is on."""
        order = self._generate(epoch)
        return order if self.length_grouping is None else self.length_grouping.regroup(order)

    def _generated_upto(self, position: int) -> int:
        """Last position whose example is fixed once ``position`` has been yielded."""
        if self.length_grouping is None:
            return position
        return self.length_grouping.block_end(position, self.num_samples)

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
        base = epoch * self.num_samples
        for pos, example in self._ordered(epoch):
            self.schedule.mark_generated(base + self._generated_upto(pos))
            self._order[pos] = example
            if pos < start:
                continue
            self._yielded = pos + 1
            yield example
        # A finished epoch moves on, so a state saved now resumes at the start of the next one.
        self.epoch = epoch + 1
        self._yielded = 0

    # -- order -----------------------------------------------------------------------------------
    def epoch_order(self, epoch: int, upto: int | None = None) -> np.ndarray:
        """Example ids of positions ``0..upto-1`` of ``epoch`` (whole epoch by default), without consuming."""
        upto = self.num_samples if upto is None else min(int(upto), self.num_samples)
        out = np.empty(upto, dtype=np.int64)
        if upto == 0:
            return out
        for pos, example in self._ordered(epoch):
            out[pos] = example
            if pos + 1 >= upto:
                break
        return out

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
        return {
            "fingerprint": self.fingerprint.to_json(),
            **self._all_settings(),
            "epoch": epoch,
            "position": position,
            "schedule": self.schedule.state_dict(),
        }

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
        self.schedule.load_state_dict(state["schedule"])
        self.epoch = int(state["epoch"])
        self._resume_position = int(state["position"]) if restore_position else 0
        self._yielded = self._resume_position
