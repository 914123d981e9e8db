"""Checkpoint I/O of the Trainer adapter: file names, save, restore, the resume folder, the LLaVA weight repair.

dataflex's state goes into the Trainer's own checkpoint folder (``checkpoint-<step>``), written in
``on_save`` after the Trainer wrote its files: ``dataflex_state.json`` always, ``dataflex_state.pt``
when a decider holds tensors (online DoReMi's proxy and optimizer; see :mod:`dataflex.checkpoint`)
and ``dataflex_embeddings.npz`` when embeddings are collected.

The resumed folder is the one the user passed to ``Trainer.train(resume_from_checkpoint=...)``
(recorded by :func:`record_resume_requests` when the callback is attached to the trainer), the
newest checkpoint of ``output_dir`` for ``resume_from_checkpoint=True``, and otherwise
``output_dir/checkpoint-<global_step>``.

LLaVA weight repair. Found while testing resume on a tiny LLaVA (transformers 5.23): ``save_pretrained``
writes the weights under the *legacy* key names (``language_model.model.*``, ``vision_tower.*``) while
``Trainer._load_from_checkpoint`` calls ``model.load_state_dict(state, strict=False)`` without the
key renaming that ``from_pretrained`` applies. Every key misses, the Trainer logs a warning and the
run "resumes" from the initial weights with the checkpoint's optimizer state. dataflex's resume
promise covers the model too, so the adapter checks the key sets and, when they differ, reloads the
checkpoint through ``from_pretrained`` (which knows the renaming) and copies the weights in place (the
optimizer keeps pointing at the same tensors).
"""

from __future__ import annotations

import functools
import json
import logging
import os
import weakref
from typing import Any

import torch
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint

from dataflex.checkpoint import load_state, save_state

logger = logging.getLogger(__name__)

WEIGHTS = "model.safetensors"
WEIGHTS_INDEX = "model.safetensors.index.json"


def checkpoint_weight_keys(folder: str) -> set[str] | None:
    """The tensor names stored in a Trainer checkpoint's safetensors weights (None if it has none)."""
    single, index = os.path.join(folder, WEIGHTS), os.path.join(folder, WEIGHTS_INDEX)
    if os.path.isfile(single):
        from safetensors import safe_open

        with safe_open(single, framework="pt") as f:
            return set(f.keys())
    if os.path.isfile(index):
        with open(index, encoding="utf-8") as f:
            return set(json.load(f)["weight_map"])
    return None


def repair_resumed_weights(model: torch.nn.Module, folder: str) -> bool:
    """Reload ``folder``'s weights into ``model`` if their names do not match ``model``'s; True if it did.

    A no-op for checkpoints without full safetensors weights (peft adapters, DeepSpeed/FSDP shards)
    and when the names already match (the Trainer loaded them).
    """
    stored = checkpoint_weight_keys(folder)
    if stored is None:
        return False
    own = set(model.state_dict())
    if not stored - own:  # every stored name is the model's (tied weights may be absent): loaded as is
        return False
    from_pretrained = getattr(type(model), "from_pretrained", None)
    if from_pretrained is None:
        raise RuntimeError(
            f"the checkpoint {folder} stores weights under names the model does not have "
            f"(e.g. {sorted(stored - own)[:3]}) and {type(model).__name__} has no from_pretrained to rename them"
        )
    logger.warning("the Trainer did not load %s's weights (key names differ); reloading them", folder)
    loaded = from_pretrained(folder, dtype=next(model.parameters()).dtype)
    with torch.no_grad():
        model.load_state_dict(loaded.state_dict(), strict=True)
    del loaded
    return True


STATE_NAME = "dataflex_state"  # dataflex_state.json (+ dataflex_state.pt with tensor state)
STATE_FILENAME = STATE_NAME + ".json"
EMBEDDINGS_FILENAME = "dataflex_embeddings.npz"

# What each attached trainer's latest train() call asked to resume from (str, True or None).
_RESUME_REQUESTS: weakref.WeakKeyDictionary[Any, Any] = weakref.WeakKeyDictionary()


def record_resume_requests(trainer: Any) -> None:
    """Wrap ``trainer.train`` (on this instance only) to remember its ``resume_from_checkpoint`` argument."""
    original = trainer.train
    if getattr(original, "_dataflex_records_resume", False):
        return

    @functools.wraps(original)
    def train(resume_from_checkpoint: Any = None, *args: Any, **kwargs: Any) -> Any:
        _RESUME_REQUESTS[trainer] = resume_from_checkpoint
        return original(resume_from_checkpoint, *args, **kwargs)

    train._dataflex_records_resume = True  # type: ignore[attr-defined]
    trainer.train = train


def checkpoint_folder(output_dir: str, global_step: int) -> str:
    """Where the Trainer saves the checkpoint of ``global_step``."""
    return os.path.join(output_dir, f"{PREFIX_CHECKPOINT_DIR}-{global_step}")


def resume_folder(trainer: Any, output_dir: str, global_step: int, fallback: str | None = None) -> str:
    """The checkpoint folder a Trainer resuming at ``global_step`` loaded."""
    request = _RESUME_REQUESTS.get(trainer) if trainer is not None else None
    if request is True:
        request = get_last_checkpoint(output_dir)
    if isinstance(request, (str, os.PathLike)):
        return os.fspath(request)
    return fallback or checkpoint_folder(output_dir, global_step)


def save(folder: str, state: dict[str, Any], tensors: dict[str, Any] | None, embeddings: Any = None) -> None:
    """Write dataflex's files into a Trainer checkpoint folder (call on the main process)."""
    save_state(folder, STATE_NAME, state, tensors)
    if embeddings is not None:
        embeddings.save(os.path.join(folder, EMBEDDINGS_FILENAME))


def restore(folder: str, embeddings: Any = None) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """Read dataflex's files from a Trainer checkpoint folder: ``(state, tensors or None)``."""
    state, tensors = load_state(folder, STATE_NAME)
    path = os.path.join(folder, EMBEDDINGS_FILENAME)
    if embeddings is not None and os.path.isfile(path):
        embeddings.load(path)
    return state, tensors


def has_state(folder: str) -> bool:
    return os.path.isfile(os.path.join(folder, STATE_FILENAME))


__all__ = [
    "EMBEDDINGS_FILENAME",
    "STATE_FILENAME",
    "checkpoint_folder",
    "has_state",
    "record_resume_requests",
    "repair_resumed_weights",
    "restore",
    "resume_folder",
    "save",
]
