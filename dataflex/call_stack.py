"""The object a method on the call stack belongs to: how dataflex finds the Trainer that runs it when it was not
handed one (a callback never attached, a loss function given to ``compute_loss_func`` without the callback)."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

__all__ = ["caller_self"]


def caller_self(matches: Callable[[Any], bool]) -> Any | None:
    """The nearest ``self`` on the call stack for which ``matches`` holds, or None. Reads each frame's ``self``
    only (a few microseconds for a Trainer's depth of calls)."""
    frame = inspect.currentframe()
    try:
        while frame is not None:
            owner = frame.f_locals.get("self")
            if owner is not None and matches(owner):
                return owner
            frame = frame.f_back
        return None
    finally:
        del frame  # (a frame kept alive would keep every local of the stack alive)
