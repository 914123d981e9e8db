"""The ``Accelerator`` dataflex makes when a caller passes none (the plain loop, the mixture recipe).

accelerate keeps one ``AcceleratorState`` per process, and an ``Accelerator`` made later in the process takes
its mixed precision and compile backend from it, whatever the process was launched with. So a Trainer run with
``bf16=True`` or ``torch_compile=True`` earlier in the same process (a notebook, a test session, a script that
finetunes and then mixes) would silently make a later ``train_mixture`` call train under bf16 autocast or a
compiled model: other numbers than the same call in a fresh process, with nothing said. :func:`own_accelerator`
refuses that case, naming the inherited settings; passing an ``Accelerator`` explicitly accepts them.
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["changed_numerics", "own_accelerator"]


def _fresh_process_settings() -> dict[str, str]:
    """What an ``Accelerator()`` in a fresh process would take (``accelerate launch`` passes them as env vars)."""
    from accelerate.utils import TorchDynamoPlugin, parse_choice_from_env

    return {
        "mixed_precision": str(parse_choice_from_env("ACCELERATE_MIXED_PRECISION", "no")),
        "dynamo_backend": str(TorchDynamoPlugin().backend.value).lower(),
    }


def _process_settings(state: Any) -> dict[str, str]:
    plugin = getattr(state, "dynamo_plugin", None)
    backend = plugin.backend.value if plugin is not None else "no"
    return {"mixed_precision": str(state.mixed_precision), "dynamo_backend": str(backend).lower()}


def changed_numerics(accelerator: Any | None) -> dict[str, str]:
    """The settings of ``accelerator`` that change what training computes, those left at "no" omitted (so run
    folders recorded before they were recorded stay valid). ``None`` stands for :func:`own_accelerator`'s."""
    settings = _fresh_process_settings() if accelerator is None else _process_settings(accelerator.state)
    return {key: value for key, value in settings.items() if value != "no"}


def own_accelerator(caller: str) -> Any:
    """An ``Accelerator`` (on the GPU when there is one) that computes what it would in a fresh process.

    Raises ``RuntimeError`` when accelerate's per-process state, set by an earlier ``Accelerator`` in this
    process, would change the mixed precision or compile backend; the message names both and the way out.
    """
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    if AcceleratorState._shared_state:  # an Accelerator already fixed this process's settings
        inherited = _process_settings(AcceleratorState())
        fresh = _fresh_process_settings()
        differ = {key: value for key, value in inherited.items() if value != fresh[key]}
        if differ:
            found = ", ".join(f"{key}={value!r} (a fresh process: {fresh[key]!r})" for key, value in differ.items())
            raise RuntimeError(
                f"{caller} was given no accelerator and would make one, but an earlier Accelerator in this process "
                f"(a Trainer with bf16/fp16 or torch_compile, say) fixed accelerate's per-process state: {found}. "
                "It would train with those settings, unlike the same call in a fresh process. Pass "
                "accelerator=Accelerator() to train with them knowingly; for a fresh process's settings, run the call "
                "in a new process or reset accelerate's state first as TrainingArguments does "
                "(accelerate.state.AcceleratorState._reset_state(reset_partial_state=True))."
            )
    return Accelerator(cpu=not torch.cuda.is_available())
