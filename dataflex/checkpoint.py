"""One checkpoint function for every training loop: JSON state plus, when there is any, tensor state.

dataflex's state is mostly small and JSON-safe (samplers, schedules, policies, score stores), but a
few deciders carry tensors (online DoReMi's proxy model and its optimizer; the plain loop's model).
:func:`save_state` writes both beside each other; :func:`load_state` reads them back and refuses a
pair that was not written by the same save (a crash between the two writes would otherwise combine
step-N tensors with an older JSON state and resume wrong without a word).

How: the tensor file is written first, each file atomically (temporary file, fsync, rename), and
both carry the same random ``commit`` token; the JSON, written last, names the token it expects.

Damage after the write (a flipped bit on disk, a hand edit, a partial copy) must not resume either: most
changed bytes still parse, and a changed number would silently steer the rest of the run. The JSON therefore
carries the sha256 of its own canonical content and of the tensor file's bytes; :func:`load_state` checks
both before anything is used. A state written before digests existed (no ``sha256`` field) is still read.

Per-example data stays out of the JSON: every numpy array in ``state`` (scores, loss histories, selected
id sets) is moved into the binary file and replaced by a ``{"$array": key}`` marker, so the JSON holds
settings and per-domain values only (``O(domains)``), and writing a 10M-example state costs a memory copy,
not a text conversion. Each array is stored in a lossless compact form (:mod:`dataflex.array_codec`: id
sets as bitmasks, integers and float32-exact values narrowed). Loading puts the arrays back where they were.
Used by the Trainer adapter (``dataflex.hf``) and the plain loop (``dataflex.proxies.loop``).

A loop that owns its checkpoints writes each one with :func:`save_step` as its own folder
``step-<N>/``, built under a temporary name and renamed into place: a checkpoint folder is complete
or absent, the previous ones stay until the new one is in place, and :func:`latest_step` resumes from
the newest, so a kill at any instant never combines files of two steps.
"""

from __future__ import annotations

import hashlib
import io
import os
import pickle
import re
import shutil
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dataflex.array_codec import decode, encode
from dataflex.state import HashingWriter, read_json, write_json_atomic

__all__ = [
    "fsync_dir",
    "join_arrays",
    "split_arrays",
    "json_path",
    "latest_step",
    "load_state",
    "verify_state",
    "save_state",
    "save_step",
    "tensors_path",
]

_STEP = re.compile(r"^step-(\d+)$")


def json_path(folder: str | os.PathLike[str], name: str) -> Path:
    return Path(folder) / f"{name}.json"


def tensors_path(folder: str | os.PathLike[str], name: str) -> Path:
    return Path(folder) / f"{name}.pt"


ARRAY_MARKER = "$array"


def _may_hold_arrays(items: list | tuple) -> bool:
    """Short lists and lists of containers are searched; long lists of scalars (already JSON) are not walked."""
    return bool(items) and (len(items) <= 64 or isinstance(items[0], (dict, list, tuple, np.ndarray)))


def split_arrays(state: Any, arrays: dict[str, np.ndarray] | None = None) -> tuple[Any, dict[str, np.ndarray]]:
    """``state`` with every numpy array replaced by a marker, and the arrays by marker key."""
    arrays = {} if arrays is None else arrays
    if isinstance(state, np.ndarray):
        key = f"a{len(arrays)}"
        arrays[key] = state
        return {ARRAY_MARKER: key}, arrays
    if isinstance(state, dict):
        return {k: split_arrays(v, arrays)[0] for k, v in state.items()}, arrays
    if isinstance(state, (list, tuple)) and _may_hold_arrays(state):
        return [split_arrays(v, arrays)[0] for v in state], arrays
    return state, arrays


def join_arrays(state: Any, arrays: dict[str, np.ndarray]) -> Any:
    """Inverse of :func:`split_arrays`."""
    if isinstance(state, dict):
        if set(state) == {ARRAY_MARKER}:
            key = state[ARRAY_MARKER]
            if key not in arrays:
                raise ValueError(f"the state names array {key!r}, which its binary file does not hold")
            return arrays[key]
        return {k: join_arrays(v, arrays) for k, v in state.items()}
    if isinstance(state, list) and _may_hold_arrays(state):
        return [join_arrays(v, arrays) for v in state]
    return state


def save_state(
    folder: str | os.PathLike[str], name: str, state: dict[str, Any], tensors: dict[str, Any] | None
) -> None:
    """Write ``<name>.json`` (and ``<name>.pt`` when ``tensors`` is given) into ``folder``.

    ``state`` must be JSON-safe; ``tensors`` anything ``torch.save`` takes. Call on one rank.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    commit = uuid.uuid4().hex
    state, arrays = split_arrays(state)
    binary = tensors is not None or bool(arrays)
    tensors_digest = None
    if binary:
        final = tensors_path(folder, name)
        tmp = final.with_name(final.name + ".tmp")
        stored = {k: encode(v) for k, v in arrays.items()}
        with open(tmp, "wb") as f:
            writer = HashingWriter(f)  # the digest is of exactly the bytes written, without a second pass
            torch.save({"commit": commit, "tensors": tensors, "arrays": stored}, writer)
            f.flush()
            os.fsync(f.fileno())
        tensors_digest = writer.sha256.hexdigest()
        os.replace(tmp, final)
    # The digest is taken of the state as it will read back (JSON turns tuples into lists, keys into text).
    content = {**state, "commit": commit if binary else None, TENSORS_DIGEST: tensors_digest}
    write_json_atomic(json_path(folder, name), content, digest=True)


TENSORS_DIGEST = "tensors_sha256"


def _read_checked(folder: str | os.PathLike[str], name: str) -> tuple[dict[str, Any], str | None, bytes | None, bool]:
    """The JSON state (without its digest fields), its commit token, the tensor file's bytes (None without
    one) and whether those bytes were checked against a recorded digest; damaged files raise ``ValueError``."""
    path = json_path(folder, name)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist")
    try:
        state = read_json(path)  # checked against the digest written with it
    except ValueError as err:
        raise ValueError(f"{err}; resume from an earlier checkpoint") from err
    if not isinstance(state, dict):
        raise ValueError(f"{path} holds a {type(state).__name__}, not a dataflex state object")
    tensors_digest = state.pop(TENSORS_DIGEST, None)
    commit = state.pop("commit", None)
    if commit is None:
        return state, None, None, False
    tpath = tensors_path(folder, name)
    if not tpath.is_file():
        raise FileNotFoundError(f"{path} was saved with tensor state, but {tpath} does not exist")
    data = tpath.read_bytes()
    if tensors_digest is not None and hashlib.sha256(data).hexdigest() != tensors_digest:
        raise ValueError(
            f"{tpath} is damaged: its bytes do not match the sha256 recorded in {path.name} (or the two files "
            "come from different saves); resume from an earlier checkpoint"
        )
    return state, commit, data, tensors_digest is not None


def verify_state(folder: str | os.PathLike[str], name: str) -> None:
    """Raise as :func:`load_state` would for a missing or damaged state, without deserialising the tensors
    when their digest vouches for them (a state from before digests is loaded to check it)."""
    _, commit, _, digested = _read_checked(folder, name)
    if commit is not None and not digested:
        load_state(folder, name)


def load_state(folder: str | os.PathLike[str], name: str) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """Read what :func:`save_state` wrote: ``(json_state, tensors or None)``.

    Raises ``FileNotFoundError`` when the JSON (or a tensor file it names) is missing and ``ValueError``
    when a file is damaged or the two files come from different saves.
    """
    state, commit, data, _ = _read_checked(folder, name)
    if commit is None:
        return state, None
    tpath = tensors_path(folder, name)
    try:
        saved = torch.load(io.BytesIO(data), map_location="cpu", weights_only=False)
    except (RuntimeError, EOFError, pickle.UnpicklingError) as err:  # torch's own message does not name the file
        first_line = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ValueError(f"{tpath} cannot be read ({first_line}); the file is damaged") from err
    found = saved.get("commit") if isinstance(saved, dict) else None
    if found != commit:
        raise ValueError(
            f"{tpath} and {json_path(folder, name)} come from different saves (commit {found!r} vs {commit!r}): "
            "the process was interrupted between the two writes; resume from an earlier checkpoint"
        )
    arrays = {k: decode(v) for k, v in saved.get("arrays", {}).items()}
    return join_arrays(state, arrays), saved["tensors"]


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """Make a rename inside ``path`` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _steps(root: Path) -> list[tuple[int, Path]]:
    found = [(int(m.group(1)), root / d) for d in os.listdir(root) if (m := _STEP.match(d)) and (root / d).is_dir()]
    return sorted(found)


def save_step(
    root: str | os.PathLike[str],
    step: int,
    name: str,
    state: dict[str, Any],
    tensors: dict[str, Any] | None,
    keep: int = 2,
) -> Path:
    """Write ``root/step-<step>/`` (``<name>.json`` and ``<name>.pt``) in one commit; keep the newest ``keep``."""
    if keep < 1:
        raise ValueError(f"keep must be >= 1; got {keep}")
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{int(step)}"
    tmp = root / f".{final.name}.tmp-{uuid.uuid4().hex}"
    save_state(tmp, name, state, tensors)
    fsync_dir(tmp)
    if final.is_dir():  # the same step written again (a rerun past an older kill): the new one wins
        shutil.rmtree(final)
    os.replace(tmp, final)
    fsync_dir(root)
    for _, old in _steps(root)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    for leftover in root.glob(".step-*.tmp-*"):  # staging folders of saves a kill interrupted
        shutil.rmtree(leftover, ignore_errors=True)
    return final


def latest_step(root: str | os.PathLike[str], name: str) -> Path | None:
    """The newest ``root/step-<N>/`` holding ``<name>.json`` (complete by construction), else None.

    A ``root`` written by older versions (``<name>.json`` directly inside) is returned as is.
    """
    root = Path(root)
    if not root.is_dir():
        return None
    for _, folder in reversed(_steps(root)):
        if json_path(folder, name).is_file():
            return folder
    return root if json_path(root, name).is_file() else None
