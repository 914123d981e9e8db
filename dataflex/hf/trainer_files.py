"""A record of the Trainer's own checkpoint files (size and CRC-32 of each), kept with dataflex's state.

dataflex's state carries sha256 digests, so a changed byte there is refused. The Trainer's files beside it —
the weights (safetensors has no checksum), ``optimizer.pt``, ``scheduler.pt``, the RNG states, DeepSpeed's
shards — carry none: ``torch.load`` reads a flipped byte of the Adam moments as another moment, and a resume
from such a checkpoint continues a different run without a word. When dataflex moves its state into a
checkpoint (``on_save``, after the Trainer wrote every file of it), it records each file's size and CRC-32
(``trainer_files.json``, itself digested); :func:`verify_trainer_files` recomputes them before a resume.

CRC-32 (zlib) detects every burst of up to 32 changed bits, against storage damage rather than a deliberate
edit, and is cheaper than sha256. Reading the files back costs a second pass over each checkpoint — 0.37 s for
1 GB here, 0.23x the time of writing it (``benchmarks/checkpoint_sums``) —: set ``verify_trainer_files = False``
on the callback (or pass it to :func:`~dataflex.hf.checkpoint.last_complete_checkpoint`) for checkpoints too
large for that.
"""

from __future__ import annotations

import os
import zlib

from dataflex.state import read_json, write_json_atomic

__all__ = ["TRAINER_FILES", "record_trainer_files", "trainer_file_sums", "verify_trainer_files"]

TRAINER_FILES = "trainer_files.json"
_CHUNK = 16 << 20


def _crc32(path: str) -> int:
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            crc = zlib.crc32(chunk, crc)
    return crc


def trainer_file_sums(checkpoint: str, skip: str) -> dict[str, list[int]]:
    """``{path relative to checkpoint: [size, crc32]}`` of every file under ``checkpoint`` but the ``skip``
    sub-folder (dataflex's own, which has its digests)."""
    sums: dict[str, list[int]] = {}
    for root, dirs, files in os.walk(checkpoint):
        if root == checkpoint and skip in dirs:
            dirs.remove(skip)
        for name in files:
            path = os.path.join(root, name)
            if os.path.isfile(path):  # (not a broken link)
                sums[os.path.relpath(path, checkpoint)] = [os.path.getsize(path), _crc32(path)]
    return sums


def record_trainer_files(checkpoint: str, into: str, skip: str) -> None:
    """Write the sums of ``checkpoint``'s files into the folder ``into`` (dataflex's staged state)."""
    write_json_atomic(os.path.join(into, TRAINER_FILES), {"files": trainer_file_sums(checkpoint, skip)}, digest=True)


def verify_trainer_files(checkpoint: str, state_folder: str) -> None:
    """Raise ``ValueError`` naming the files of ``checkpoint`` that are missing or changed since dataflex recorded
    them (its record in ``state_folder``); a checkpoint without a record (older dataflex) passes."""
    path = os.path.join(state_folder, TRAINER_FILES)
    if not os.path.isfile(path):
        return
    missing, changed = [], []
    for name, (size, crc) in sorted(read_json(path)["files"].items()):
        file = os.path.join(checkpoint, name)
        if not os.path.isfile(file):
            missing.append(name)
        elif os.path.getsize(file) != size or _crc32(file) != crc:  # (the size first: no read when it differs)
            changed.append(name)
    if missing or changed:
        what = "; ".join([f"changed: {changed}"] * bool(changed) + [f"missing: {missing}"] * bool(missing))
        raise ValueError(
            f"the Trainer's files of {checkpoint} are not those it saved ({what}; size or CRC-32 differs from "
            "dataflex's record of them): resuming would continue another run. Resume from an earlier checkpoint "
            "(dataflex.hf.last_complete_checkpoint skips this one), or, if the change is yours, delete "
            f"{path} to accept the files as they are"
        )
