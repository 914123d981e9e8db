"""Length grouping on top of any scheduled order: batches of similar length, still deterministic and resumable.

The stock ``LengthGroupedSampler`` (``train_sampling_strategy="group_by_length"``) shuffles the dataset, cuts
the permutation into *mega-batches* of ``mult × batch`` examples and sorts each one by length, longest first,
so each batch pads to a similar length. :class:`LengthGrouping` applies the same rule to a dataflex order:
the order's positions are cut into blocks of ``megabatch`` consecutive positions and the examples of each
block are sorted by length (descending; ties keep their order), so which examples are trained in an epoch —
the mixture, subset or curriculum decision — is unchanged; only their order inside each block is.

Two deliberate differences from the stock sampler, both because the order is produced lazily while decisions
keep arriving: the stock sampler also moves the epoch's longest example to the very front, which needs the
whole epoch in advance (here each block starts with its own longest batch); and a block must be generated
completely before its first example is trained, so a decision can only land after the current block —
the Trainer adapter adds ``megabatch`` samples to its look-ahead.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

__all__ = ["LengthGrouping", "default_megabatch"]


def default_megabatch(num_samples: int, batch: int) -> int:
    """The stock rule: ``mult × batch`` with ``mult = min(num_samples // (4 × batch), 50)``, at least one batch."""
    if batch < 1:
        raise ValueError(f"batch must be a positive integer; got {batch!r}")
    return max(1, min(num_samples // (4 * batch), 50)) * batch


@dataclass(frozen=True)
class LengthGrouping:
    """Sort blocks of ``megabatch`` consecutive positions by the length of their examples, longest first."""

    lengths: np.ndarray
    megabatch: int

    def __post_init__(self) -> None:
        lengths = np.asarray(self.lengths)
        if lengths.ndim != 1 or lengths.size == 0:
            raise ValueError(f"lengths must be a non-empty 1-D sequence; got shape {lengths.shape}")
        if not np.issubdtype(lengths.dtype, np.number) or not np.isfinite(lengths).all() or (lengths < 0).any():
            raise ValueError("lengths must be finite numbers >= 0, one per example")
        if not isinstance(self.megabatch, (int, np.integer)) or self.megabatch < 1:
            raise ValueError(f"megabatch must be a positive integer; got {self.megabatch!r}")
        object.__setattr__(self, "lengths", lengths.astype(np.int64))
        object.__setattr__(self, "megabatch", int(self.megabatch))

    def settings(self) -> dict[str, object]:
        """What must match to resume: the block size and a digest of the lengths."""
        digest = hashlib.sha256(self.lengths.tobytes()).hexdigest()[:16]
        return {"megabatch": self.megabatch, "lengths_sha256": digest, "num_examples": int(self.lengths.size)}

    def sort_block(self, examples: np.ndarray) -> np.ndarray:
        """A block's examples sorted by length, longest first (ties keep their order)."""
        return examples[np.argsort(-self.lengths[examples], kind="stable")]
