"""One checkpoint function for every training loop: JSON state plus, when there is any, tensor state.

dataflex's state is mostly small and JSON-safe (samplers, schedules, policies, score stores), but a
few deciders carry tensors (online DoReMi's proxy model and its optimizer; the plain loop's model).
:func:`save_state` writes both beside each other; :func:`load_state` reads them back and refuses a
pair that was not written by the same save (a crash between the two writes would otherwise combine
step-N tensors with an older JSON state and resume wrong without a word).

How: the tensor file is written first, each file atomically (temporary file, fsync, rename), and
both carry the same random ``commit`` token; the JSON, written last, names the token it expects.
Used by the Trainer adapter (``dataflex.hf``) and the plain loop (``dataflex.proxies.loop``).
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import Any

import torch

from dataflex.state import read_json, write_json_atomic

__all__ = ["json_path", "load_state", "save_state", "tensors_path"]


def json_path(folder: str | os.PathLike[str], name: str) -> Path:
    return Path(folder) / f"{name}.json"


def tensors_path(folder: str | os.PathLike[str], name: str) -> Path:
    return Path(folder) / f"{name}.pt"


def save_state(
    folder: str | os.PathLike[str], name: str, state: dict[str, Any], tensors: dict[str, Any] | None
) -> None:
    """Write ``<name>.json`` (and ``<name>.pt`` when ``tensors`` is given) into ``folder``.

    ``state`` must be JSON-safe; ``tensors`` anything ``torch.save`` takes. Call on one rank.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    commit = uuid.uuid4().hex
    if tensors is not None:
        final = tensors_path(folder, name)
        tmp = final.with_name(final.name + ".tmp")
        with open(tmp, "wb") as f:
            torch.save({"commit": commit, "tensors": tensors}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, final)
    write_json_atomic(json_path(folder, name), {**state, "commit": commit if tensors is not None else None})


def load_state(folder: str | os.PathLike[str], name: str) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """Read what :func:`save_state` wrote: ``(json_state, tensors or None)``.

    Raises ``FileNotFoundError`` when the JSON (or a tensor file it names) is missing and ``ValueError``
    when the two files come from different saves.
    """
    path = json_path(folder, name)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist")
    state = read_json(path)
    if not isinstance(state, dict):
        raise ValueError(f"{path} holds a {type(state).__name__}, not a dataflex state object")
    commit = state.pop("commit", None)
    if commit is None:
        return state, None
    tpath = tensors_path(folder, name)
    if not tpath.is_file():
        raise FileNotFoundError(f"{path} was saved with tensor state, but {tpath} does not exist")
    saved = torch.load(tpath, map_location="cpu", weights_only=False)
    found = saved.get("commit") if isinstance(saved, dict) else None
    if found != commit:
        raise ValueError(
            f"{tpath} and {path} come from different saves (commit {found!r} vs {commit!r}): the process was "
            "interrupted between the two writes; resume from an earlier checkpoint"
        )
    return state, saved["tensors"]
