"""Taps: keep one tensor from every forward of a submodule, without changing what the model computes.

One hook machinery for everything dataflex reads off a forward besides the loss: the last hidden
state (the output of the decoder) for text embeddings, and the projected image features (the output
of a LLaVA-style projector) for image embeddings. A tap is attached for a block (``with tap:``) or
for a whole training run (``attach()``/``detach()``); :meth:`Tap.pop` hands over the latest value
once, so a stale value from an earlier forward is never reused.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

import torch

__all__ = ["Tap"]


class Tap:
    """Keep ``transform(x)`` of a module's first input (``where="input"``) or its output (``"output"``)."""

    def __init__(
        self,
        module: torch.nn.Module,
        where: Literal["input", "output"],
        transform: Callable[[torch.Tensor], torch.Tensor] = lambda x: x,
    ) -> None:
        if where not in ("input", "output"):
            raise ValueError(f"where={where!r}; valid values are 'input', 'output'")
        self.module, self.where, self.transform = module, where, transform
        self._value: torch.Tensor | None = None
        self._handle: torch.utils.hooks.RemovableHandle | None = None

    def _keep_input(self, module: torch.nn.Module, args: tuple) -> None:
        self._value = self.transform(args[0])

    def _keep_output(self, module: torch.nn.Module, args: tuple, output: Any) -> None:
        self._value = self.transform(output)

    def attach(self) -> Tap:
        if self._handle is None:
            if self.where == "input":
                self._handle = self.module.register_forward_pre_hook(self._keep_input)
            else:
                self._handle = self.module.register_forward_hook(self._keep_output)
        return self

    def detach(self) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
        self._value = None

    def pop(self) -> torch.Tensor | None:
        """The value of the latest forward (None if there was none since the last pop)."""
        value, self._value = self._value, None
        return value

    def __enter__(self) -> Tap:
        return self.attach()

    def __exit__(self, *exc: object) -> None:
        self.detach()
