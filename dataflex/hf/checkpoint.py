"""Checkpoint I/O of the Trainer adapter: file names, save, restore, the resume folder, the LLaVA weight repair.

dataflex's state goes into the Trainer's own checkpoint folder, as one sub-folder
``checkpoint-<step>/dataflex/``: ``dataflex_state.json`` always, ``dataflex_state.pt`` when a decider
holds tensors (online DoReMi's proxy and optimizer; see :mod:`dataflex.checkpoint`) and
``dataflex_embeddings.npz`` when embeddings are collected.

Crash safety. The Trainer writes a checkpoint's files one after another and then deletes older
checkpoints (``save_total_limit``) *before* callbacks hear ``on_save``. Writing dataflex's state in
``on_save`` would leave a window in which the newest checkpoint has no dataflex state and the previous
one is already gone. So the state is written *before* the Trainer saves — at ``on_step_end`` /
``on_epoch_end`` once the Trainer has decided to save — into ``<output_dir>/.dataflex-pending/
checkpoint-<step>/`` (written in a temporary folder, then renamed: complete or absent), and ``on_save``
moves that folder into the checkpoint with one rename. A kill at any instant leaves the state either in
the checkpoint or in the pending area; :func:`state_folder` looks in both, and
:func:`last_complete_checkpoint` names the newest checkpoint whose Trainer files and dataflex state are
all there. Checkpoints written by older dataflex versions (files directly in ``checkpoint-<step>``)
are still read.

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
import re
import shutil
import uuid
import warnings
import weakref
import zipfile
from typing import Any

import torch
from transformers import TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint

from dataflex import dist
from dataflex.checkpoint import fsync_dir, load_state, save_state, verify_state
from dataflex.hf import trainer_files

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
STATE_DIRNAME = "dataflex"  # checkpoint-<step>/dataflex/ holds the files above
PENDING_DIRNAME = ".dataflex-pending"  # <output_dir>/.dataflex-pending/checkpoint-<step>/: staged, not yet moved
TRAINER_STATE = "trainer_state.json"  # the Trainer writes it last, after weights, optimizer and RNG states
WEIGHT_FILES = (
    WEIGHTS,
    WEIGHTS_INDEX,
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
    "adapter_model.safetensors",
    "adapter_model.bin",
)
_CHECKPOINT = re.compile(rf"^{PREFIX_CHECKPOINT_DIR}-(\d+)$")
# FSDP's weights (accelerate's FSDP_MODEL_NAME): pytorch_model_fsdp.bin (full), pytorch_model_fsdp_rank<r>.bin
# (local) or, sharded, a folder pytorch_model_fsdp_<i>/ of torch.distributed.checkpoint files whose ".metadata" is
# written last, once every rank's shard is.
_FSDP_WEIGHTS = re.compile(r"^pytorch_model_fsdp(_rank\d+)?\.bin$")
_FSDP_SHARDED_WEIGHTS = re.compile(r"^pytorch_model_fsdp_\d+$")

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


def barrier_after_rank_files(trainer: Any) -> None:
    """Make every rank finish its own checkpoint file before rank 0 declares the checkpoint complete.

    In ``Trainer._save_checkpoint`` each rank writes its ``rng_state_<rank>.pth``, then rank 0 alone writes
    ``trainer_state.json`` and deletes older checkpoints, with no barrier in between: a rank killed while
    writing its RNG file leaves a checkpoint that looks complete (and, with ``save_total_limit=1``, the
    previous one already deleted) whose resume fails or silently restarts that rank's RNG. A barrier after
    the RNG files (every rank writes one, so every rank reaches it) closes the window.
    """
    original = trainer._save_rng_state
    if getattr(original, "_dataflex_barrier", False):
        return

    @functools.wraps(original)
    def save_rng_state(output_dir: str) -> None:
        original(output_dir)
        dist.barrier()

    save_rng_state._dataflex_barrier = True  # type: ignore[attr-defined]
    trainer._save_rng_state = save_rng_state


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


def pending_folder(checkpoint: str) -> str:
    """Where dataflex stages the state of ``checkpoint`` before the Trainer has written it."""
    parent, name = os.path.split(os.path.normpath(checkpoint))
    return os.path.join(parent, PENDING_DIRNAME, name)


def stage(checkpoint: str, state: dict[str, Any], tensors: dict[str, Any] | None, embeddings: Any = None) -> str:
    """Write dataflex's files for ``checkpoint`` into its pending folder, completely or not at all."""
    final = pending_folder(checkpoint)
    os.makedirs(os.path.dirname(final), exist_ok=True)
    tmp = f"{final}.tmp-{uuid.uuid4().hex}"
    save_state(tmp, STATE_NAME, state, tensors)
    if embeddings is not None:
        embeddings.save(os.path.join(tmp, EMBEDDINGS_FILENAME))
    fsync_dir(tmp)
    if os.path.isdir(final):  # staged by an earlier attempt at this step (a resumed run): replace it
        shutil.rmtree(final)
    os.replace(tmp, final)
    fsync_dir(os.path.dirname(final))
    return final


def commit(checkpoint: str, record_files: bool = True) -> bool:
    """Move the staged state into ``checkpoint/dataflex`` (one rename); False if nothing was staged. With
    ``record_files``, the sizes and CRC-32s of the Trainer's files, all written by now, go with it."""
    staged, target = pending_folder(checkpoint), os.path.join(checkpoint, STATE_DIRNAME)
    if not os.path.isdir(staged) or not os.path.isdir(checkpoint):
        return False
    if record_files:
        trainer_files.record_trainer_files(checkpoint, staged, STATE_DIRNAME)
    if os.path.isdir(target):  # a checkpoint rewritten at the same step: the new state wins
        shutil.rmtree(target)
    os.replace(staged, target)
    fsync_dir(checkpoint)
    _drop_stale_pending(os.path.dirname(staged), _step_of(checkpoint))
    return True


def _step_of(checkpoint: str) -> int:
    match = _CHECKPOINT.match(os.path.basename(os.path.normpath(checkpoint)))
    return int(match.group(1)) if match else -1


def _drop_stale_pending(pending_root: str, step: int) -> None:
    """Staged states of earlier steps whose Trainer save never finished, and half-written staging folders."""
    for name in os.listdir(pending_root):
        match = _CHECKPOINT.match(name)
        if ".tmp-" in name or (match and int(match.group(1)) < step):
            shutil.rmtree(os.path.join(pending_root, name), ignore_errors=True)


def drop_orphans(output_dir: str) -> None:
    """Staged states whose checkpoint was never written (an evaluation under save_strategy="best" that was
    not a new best): nothing can resume from them once training has ended."""
    pending_root = os.path.join(output_dir, PENDING_DIRNAME)
    if not os.path.isdir(pending_root):
        return
    for name in os.listdir(pending_root):
        if not os.path.isdir(os.path.join(output_dir, name)):
            shutil.rmtree(os.path.join(pending_root, name), ignore_errors=True)


def state_folder(checkpoint: str) -> str | None:
    """The folder holding ``checkpoint``'s dataflex state: committed, still pending, or (older versions)
    the checkpoint itself; None when there is none."""
    for folder in (os.path.join(checkpoint, STATE_DIRNAME), pending_folder(checkpoint), checkpoint):
        if os.path.isfile(os.path.join(folder, STATE_FILENAME)):
            return folder
    return None


def restore(checkpoint: str, embeddings: Any = None) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """Read dataflex's files of a Trainer checkpoint: ``(state, tensors or None)``."""
    folder = state_folder(checkpoint)
    if folder is None:
        raise FileNotFoundError(f"{checkpoint} has no dataflex state ({STATE_DIRNAME}/{STATE_FILENAME})")
    state, tensors = load_state(folder, STATE_NAME)
    path = os.path.join(folder, EMBEDDINGS_FILENAME)
    if embeddings is not None:
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"{path} does not exist, but this run collects embeddings and every dataflex checkpoint of such a "
                "run holds them; the checkpoint was written without an embedding cache or the file was removed"
            )
        embeddings.load(path)
    return state, tensors


def has_state(checkpoint: str) -> bool:
    return state_folder(checkpoint) is not None


def verify_checkpoint_files(checkpoint: str) -> None:
    """Refuse (``ValueError`` naming them) Trainer files of ``checkpoint`` that changed since dataflex recorded
    them at its save (:mod:`dataflex.hf.trainer_files`); a checkpoint without that record passes."""
    # (a Trainer without a dataflex callback keeps the record alone in that folder: RecordTrainerFiles)
    trainer_files.verify_trainer_files(checkpoint, state_folder(checkpoint) or os.path.join(checkpoint, STATE_DIRNAME))


class RecordTrainerFiles(TrainerCallback):
    """The record of :mod:`dataflex.hf.trainer_files` for a Trainer without a dataflex callback (whose save
    writes it): at each save, into ``checkpoint-<step>/dataflex/``, where :func:`verify_checkpoint_files` and
    :func:`last_complete_checkpoint` read it. E.g. LESS's warm-up run, whose ``optimizer.pt`` LESS reads."""

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if state.is_world_process_zero:
            folder = checkpoint_folder(args.output_dir, state.global_step)
            os.makedirs(os.path.join(folder, STATE_DIRNAME), exist_ok=True)
            trainer_files.record_trainer_files(folder, os.path.join(folder, STATE_DIRNAME), STATE_DIRNAME)


def trainer_files_complete(checkpoint: str, world_size: int | None = None) -> bool:
    """The Trainer finished writing ``checkpoint``: its ``trainer_state.json`` (written last) parses and
    names this step, model weights are there (full, sharded, adapter, DeepSpeed or FSDP) and the RNG files are whole
    (one per rank of ``world_size``, see :func:`rng_files_complete`)."""
    try:
        with open(os.path.join(checkpoint, TRAINER_STATE), encoding="utf-8") as f:
            step = json.load(f).get("global_step")
    except (OSError, ValueError, AttributeError):
        return False
    if step != _step_of(checkpoint):
        return False
    names = os.listdir(checkpoint)
    has_weights = any(_weights(checkpoint, name) for name in names)
    return has_weights and rng_files_complete(checkpoint, world_size)


def _weights(checkpoint: str, name: str) -> bool:
    """``name`` in ``checkpoint`` holds model weights: a transformers or peft file, DeepSpeed's
    ``global_step<n>`` folder, FSDP's file or its sharded folder (complete once its ``.metadata`` is there)."""
    if name in WEIGHT_FILES or name.startswith("global_step") or _FSDP_WEIGHTS.match(name):
        return True
    return bool(_FSDP_SHARDED_WEIGHTS.match(name)) and os.path.isfile(os.path.join(checkpoint, name, ".metadata"))


def _recorded_world_size(state_dir: str) -> int | None:
    """The number of processes dataflex recorded in its state (None when it cannot be read)."""
    try:
        with open(os.path.join(state_dir, STATE_FILENAME), encoding="utf-8") as f:
            return int(json.load(f)["batching"]["world_size"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _rng_files(checkpoint: str) -> list[str]:
    """The Trainer's RNG files of ``checkpoint`` (``rng_state.pth``, or one ``rng_state_<rank>.pth`` per rank)."""
    return [n for n in os.listdir(checkpoint) if n.startswith("rng_state") and n.endswith(".pth")]


def rng_files_complete(checkpoint: str, world_size: int | None = None) -> bool:
    """Every ``rng_state*.pth`` of ``checkpoint`` is a whole file (torch's zip format ends with its
    directory, which a cut-off write lacks), and with ``world_size`` > 1 there is one per rank (when the
    checkpoint has RNG files at all: ``save_only_model`` writes none)."""
    names = _rng_files(checkpoint)
    for name in names:
        try:
            with zipfile.ZipFile(os.path.join(checkpoint, name)):
                pass
        except (OSError, zipfile.BadZipFile):
            return False
    if names and world_size is not None and world_size > 1:
        return all(f"rng_state_{rank}.pth" in names for rank in range(world_size))
    return True


def check_resumes_the_run(checkpoint: str) -> None:
    """Refuse to resume from a checkpoint written with ``save_only_model=True``.

    Such a checkpoint holds the weights but no optimizer, learning-rate scheduler or RNG state, and the Trainer
    resumes from it without a word: with a fresh optimizer and its schedule restarted from the first step
    (measured, transformers 5.25: the learning rate jumps back to its peak, so it never decays as planned). That
    is another run than the interrupted one, while dataflex's state would continue the interrupted one's
    decisions. The RNG files are the sign: every full save writes them (under DeepSpeed too).
    """
    if _rng_files(checkpoint):
        return
    raise ValueError(
        f"{checkpoint} holds no optimizer, scheduler or RNG state (it was saved with save_only_model=True): the "
        "Trainer would resume it with a fresh optimizer and restart the learning-rate schedule, so the resumed run "
        "would not continue the interrupted one. Resume from a full checkpoint (save_only_model=False), or start a "
        "new run from these weights (load the model from this folder and train without resume_from_checkpoint)"
    )


def last_complete_checkpoint(
    output_dir: str | os.PathLike[str], require_dataflex: bool = True, verify_trainer_files: bool = True
) -> str | None:
    """The newest ``checkpoint-<step>`` of ``output_dir`` that a resume can use, or None.

    Skips checkpoints the Trainer did not finish writing (killed mid-save) and, with ``require_dataflex``,
    those without dataflex state or whose state fails its digests (damaged on disk; a warning names it), and,
    with ``verify_trainer_files``, those whose Trainer files changed since dataflex recorded them. Use it
    as ``trainer.train(resume_from_checkpoint=last_complete_checkpoint(out))`` after a crash instead of
    ``resume_from_checkpoint=True``, which takes the newest folder whatever it holds.
    """
    output_dir = os.fspath(output_dir)
    if not os.path.isdir(output_dir):
        return None
    steps = sorted(
        (int(m.group(1)), name)
        for name in os.listdir(output_dir)
        if (m := _CHECKPOINT.match(name)) and os.path.isdir(os.path.join(output_dir, name))
    )
    for _, name in reversed(steps):
        folder = os.path.join(output_dir, name)
        state = state_folder(folder) if require_dataflex else None
        if require_dataflex and state is None:
            continue
        if not trainer_files_complete(folder, None if state is None else _recorded_world_size(state)):
            continue
        try:
            if state is not None:
                verify_state(state, STATE_NAME)  # both files' digests; the tensors are loaded by the resume
            if verify_trainer_files:
                verify_checkpoint_files(folder)
        except (OSError, ValueError) as error:
            warnings.warn(f"skipping {folder}: {error}", stacklevel=2)
            continue
        return folder
    return None


__all__ = [
    "EMBEDDINGS_FILENAME",
    "PENDING_DIRNAME",
    "RecordTrainerFiles",
    "STATE_DIRNAME",
    "STATE_FILENAME",
    "check_resumes_the_run",
    "checkpoint_folder",
    "commit",
    "drop_orphans",
    "has_state",
    "last_complete_checkpoint",
    "pending_folder",
    "record_resume_requests",
    "barrier_after_rank_files",
    "rng_files_complete",
    "repair_resumed_weights",
    "restore",
    "resume_folder",
    "stage",
    "state_folder",
    "trainer_files_complete",
    "verify_checkpoint_files",
]
