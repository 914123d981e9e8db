"""Repair a resume whose model weights the Trainer silently failed to load (LLaVA-style models).

Found while testing resume on a tiny LLaVA (transformers 5.23): ``save_pretrained`` writes the weights
under the *legacy* key names (``language_model.model.*``, ``vision_tower.*``) while
``Trainer._load_from_checkpoint`` calls ``model.load_state_dict(state, strict=False)`` without the
key renaming that ``from_pretrained`` applies. Every key misses, the Trainer logs a warning and the
run "resumes" from the initial weights with the checkpoint's optimizer state. dataflex's resume
promise covers the model too, so the callbacks check the key sets and, when they differ, reload the
checkpoint through ``from_pretrained`` (which knows the renaming) and copy the weights in place (the
optimizer keeps pointing at the same tensors).
"""

from __future__ import annotations

import json
import logging
import os

import torch

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
