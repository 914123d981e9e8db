"""What ``transformers.Trainer`` does to the result of a ``compute_loss_func`` before backward.

The Trainer treats a custom loss as already normalised over the optimizer step: it does not divide it by the
gradient accumulation, and under ``average_tokens_across_devices`` (the default since transformers 4.54) it
multiplies it by the number of data-parallel processes, because a loss divided by the *global* count of
counted tokens (``num_items_in_batch``, summed over every rank), then averaged across ranks by DDP or
DeepSpeed, would otherwise be that many times too small. A loss that is a mean over its own micro-batch
(:class:`~dataflex.weighting.ExampleWeightedLoss`) has to undo that multiplication, or every gradient of a
P-process run is P times the single-process one (clipping and SGD then see it; Adam mostly does not, which is
why it goes unnoticed).

Read from the Trainer's source (``compute_loss``): from 4.50 the multiplication applies when
``average_tokens_across_devices`` is on, ``num_items_in_batch`` was counted and the model accepts loss kwargs
**or** a ``compute_loss_func`` is set; the factor is the process count over the tensor-parallel size (5.x) or,
with several GPUs in one process (DataParallel, 5.x), the GPU count. Before 4.50 the condition differs, so
a multi-process run there is refused rather than guessed.
"""

from __future__ import annotations

from typing import Any

import transformers
from packaging.version import Version

__all__ = ["custom_loss_multiplier"]

_KNOWN_FROM = Version("4.50")


def custom_loss_multiplier(trainer: Any) -> int | None:
    """The factor this Trainer multiplies a ``compute_loss_func``'s result by when it counted
    ``num_items_in_batch`` (1: none); None when this transformers version's rule is not known."""
    version = Version(transformers.__version__.split("+")[0])
    if version < _KNOWN_FROM:
        return None
    args = trainer.args
    if not getattr(args, "average_tokens_across_devices", False):
        return 1
    if version.major >= 5 and getattr(args, "n_gpu", 1) > 1:
        return int(args.n_gpu)
    tensor_parallel = trainer.get_tp_size() if hasattr(trainer, "get_tp_size") else 1
    return max(1, int(trainer.accelerator.num_processes) // max(1, int(tensor_parallel)))
