"""Module modes: run a block in eval mode and always give the model back in the mode it was in.

Scoring, embedding and gradient features must not depend on dropout's random mask, and a scorer
called in the middle of training must not leave the model in eval mode (the next training step
would silently run without dropout).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

__all__ = ["eval_mode"]


@contextmanager
def eval_mode(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """``with eval_mode(model):`` — eval mode inside, the previous train/eval mode restored after (even on error)."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)
