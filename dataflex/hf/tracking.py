"""Batch tracking: which positions of the epoch each training micro-batch holds, and when a decision lands.

The Trainer never tells a callback which examples a batch holds. They follow from arithmetic on the
prepared DataLoader instead (see :mod:`dataflex.batching`): this rank's micro-batches of an epoch
cover fixed positions, the Trainer consumes ``gradient_accumulation_steps`` of them per optimizer
step (the last step of an epoch may take fewer), and a resumed Trainer skips the consumed batches of
the current epoch itself. :class:`BatchTracker` turns Trainer events into that arithmetic; it knows
nothing about models, samplers or the Trainer, so it is tested with plain event sequences.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from dataflex.batching import LoaderLayout, rank_position_batches

__all__ = ["BatchTracker"]


@dataclass
class BatchTracker:
    """Positions, epoch and micro-batch index of this rank, and the global sample index of each step.

    Args:
        positions: this rank's micro-batches of one epoch, as positions within the epoch.
        accumulation: micro-batches per optimizer step.
        samples_per_micro_batch: examples of one micro-batch summed over ranks.
        num_samples: samples per epoch (the sampler's length).
        lookahead_batches: per-rank micro-batches between a decision and the first sample it may
            change; must exceed what the Trainer and the DataLoader workers can have prefetched.
    """

    positions: list[np.ndarray]
    accumulation: int
    samples_per_micro_batch: int
    num_samples: int
    lookahead_batches: int
    epoch: int = 0
    micro: int = field(default=0)

    @classmethod
    def from_layout(
        cls,
        layout: LoaderLayout,
        num_samples: int,
        accumulation: int,
        lookahead_batches: int | None = None,
        block_batches: int = 0,
    ) -> BatchTracker:
        """Default look-ahead: accumulation + workers × prefetch factor + 2 micro-batches, plus
        ``block_batches`` when the sampler fixes that many batches at once (length grouping)."""
        if accumulation < 1:
            raise ValueError(f"gradient_accumulation_steps must be >= 1; got {accumulation}")
        lookahead = (
            lookahead_batches or accumulation + layout.num_workers * layout.prefetch_factor + 2
        ) + block_batches
        return cls(
            positions=rank_position_batches(num_samples, layout),
            accumulation=int(accumulation),
            samples_per_micro_batch=layout.world_size * layout.batch_size,
            num_samples=int(num_samples),
            lookahead_batches=int(lookahead),
        )

    @property
    def updates_per_epoch(self) -> int:
        """Optimizer steps per epoch: the last one may accumulate fewer micro-batches."""
        n = len(self.positions)
        return max(-(-n // self.accumulation), 1)

    @property
    def lookahead_samples(self) -> int:
        return self.lookahead_batches * self.samples_per_micro_batch

    # -- Trainer events --------------------------------------------------------------------------
    def start_epoch(self, global_step: int) -> int:
        """At ``on_epoch_begin``: the epoch the Trainer is about to run (it resumes mid-epoch too)."""
        self.epoch = global_step // self.updates_per_epoch
        return self.epoch

    def start_step(self, global_step: int) -> None:
        """At ``on_step_begin``: the first micro-batch of this optimizer step."""
        self.micro = (global_step - self.epoch * self.updates_per_epoch) * self.accumulation

    def peek(self) -> np.ndarray | None:
        """Positions of the micro-batch about to be trained on (None past the end of the epoch)."""
        return self.positions[self.micro] if self.micro < len(self.positions) else None

    def take(self) -> np.ndarray:
        """Positions of the micro-batch just trained on; advances to the next one."""
        if self.micro >= len(self.positions):
            raise RuntimeError(
                f"dataflex saw micro-batch {self.micro} of epoch {self.epoch} but this rank only has "
                f"{len(self.positions)}; batch bookkeeping is out of sync (a forward ran outside the training step?)"
            )
        positions = self.positions[self.micro]
        self.micro += 1
        return positions

    # -- where decisions land --------------------------------------------------------------------
    def consumed_samples(self, global_step: int) -> int:
        """Global sample index reached after ``global_step`` optimizer steps (counted at the consumer)."""
        epoch, within = divmod(global_step, self.updates_per_epoch)
        per_step = self.accumulation * self.samples_per_micro_batch
        return epoch * self.num_samples + min(self.num_samples, within * per_step)

    def effective_at(self, global_step: int) -> int:
        """The first global sample index a decision taken after ``global_step`` may change."""
        return self.consumed_samples(global_step) + self.lookahead_samples
