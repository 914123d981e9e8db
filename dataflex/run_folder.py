"""One run folder, one run: a rerun of the same command continues from the folder's checkpoints, another
command must not.

Every resumable recipe continues from the newest checkpoint in its output folder, and a finished run just
reports its result again. A folder is named by the policy (or method) and seed, so a second command that
differs in anything else — ``lr=0.01`` after ``lr=0.002``, a config file edited between runs, a sweep over a
setting the folder name leaves out — landed in the same folder and silently continued, or re-reported, the
first run. The first run now writes its settings there (``run_settings.json``); a later one with other
settings is refused, naming every setting that differs. (The recipes' Hydra folders also carry the command's
other overrides, so sweeps get one folder per combination.) A folder that holds nothing but that record and
Hydra's bookkeeping has nothing to continue: a command refused for a bad setting, or killed before it wrote
anything, recorded its settings there, and the corrected command takes the folder over rather than being told
to delete it.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import math
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from dataflex.state import read_json, write_json_atomic

__all__ = [
    "MAX_FOLDER_NAME",
    "MAX_OVERRIDE",
    "RUN_SETTINGS",
    "claim_run_folder",
    "config_settings",
    "describe_differences",
    "folder_name",
    "holds_a_run",
    "settings_digest",
    "split_overrides",
    "weights_summary",
]

RUN_SETTINGS = "run_settings.json"
#: Longest name (bytes) a recipe gives one folder of a run's path. File systems refuse names over 255 bytes, and the
#: recipes name a run's folder by every override of its command, which a few long ones (a weight per domain, a
#: data path) pass.
MAX_FOLDER_NAME = 200
#: An override longer than this (bytes) is shortened first when a folder name does not fit: its value's start
#: and a digest of the whole, so every other override stays readable (and a sweep can still tell them apart).
MAX_OVERRIDE = 48


def split_overrides(overrides: str) -> list[str]:
    """Hydra's ``job.override_dirname`` back into its ``key=value`` items. They are joined with commas, which a value
    may hold too (``{a: 0.5, b: 0.5}``): an item starts at a comma followed by a key and ``=``."""
    return re.split(r",(?=[\w.+~-]+=)", overrides) if overrides else []


def _fits(name: str) -> bool:
    return all(len(part.encode()) <= MAX_FOLDER_NAME for part in name.split("/"))


def _cut(text: str, size: int) -> str:
    """The first ``size`` bytes of ``text``, cut at a character."""
    return text.encode()[:size].decode(errors="ignore")


def folder_name(overrides: str) -> str:
    """``overrides`` (Hydra's ``job.override_dirname``) as the path of a run's folder below its ``seed<k>``.

    Unchanged when every ``/``-separated part fits in :data:`MAX_FOLDER_NAME` bytes. Else each override longer than
    :data:`MAX_OVERRIDE` keeps its key and its value's start and ends in ``~`` and a digest of it
    (``policy.weights={code: 0.3, trivia: 0.1,~39b164b8``); if that still does not fit, one folder is named by
    the start of the overrides (``/`` as ``_``) and a 16-digit digest of all of them. Either way each command keeps
    a folder of its own and the name still says what the run is. (Hydra itself fails on a name too long for the
    file system.)
    """
    if _fits(overrides):
        return overrides
    items = []
    for item in split_overrides(overrides):
        if len(item.encode()) > MAX_OVERRIDE:
            item = f"{_cut(item, MAX_OVERRIDE - 9)}~{hashlib.sha256(item.encode()).hexdigest()[:8]}"
        items.append(item)
    shortened = ",".join(items)
    if _fits(shortened):
        return shortened
    digest = hashlib.sha256(overrides.encode()).hexdigest()[:16]
    return f"{_cut(overrides.replace('/', '_'), MAX_FOLDER_NAME - len(digest) - 1)}~{digest}"


def config_settings(cfg: Any, ignore: Iterable[str] = ()) -> dict[str, Any]:
    """The resolved Hydra config as plain JSON values, without the top-level keys in ``ignore`` (settings that
    do not change the run's result: checkpoint cadence, logging, cache folders)."""
    from omegaconf import OmegaConf

    settings = OmegaConf.to_container(cfg, resolve=True)
    return {k: v for k, v in settings.items() if k not in set(ignore)}


RECIPE_HINT = (
    "give this command its own folder (hydra.run.dir=... or a sweep, whose folders are named by their overrides)"
)


def claim_run_folder(folder: str | Path, settings: Mapping[str, Any], hint: str = RECIPE_HINT) -> None:
    """Record ``settings`` in ``folder`` on its first run; refuse a run whose settings differ from those recorded
    (``hint``: what the caller should do instead, in the error). Non-finite numbers are recorded as the strings
    "NaN", "Infinity" (strict JSON has none; the recipe's own checks name a bad one)."""
    folder = Path(folder)
    settings = json.loads(json.dumps(dict(settings), sort_keys=True, default=str), parse_constant=str)
    path = folder / RUN_SETTINGS
    if path.is_file():
        differences = describe_differences(read_json(path), settings)
        if differences and holds_a_run(folder):
            raise ValueError(
                f"{folder} holds a run made with other settings ({differences}), and a run continues from its "
                f"folder's checkpoints: {hint}, or delete {folder} to start over"
            )
        if not differences:
            return
    folder.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, settings, digest=True)


def holds_a_run(folder: Path) -> bool:
    """Whether ``folder`` holds anything a rerun would continue from or report: anything but the settings record,
    Hydra's copy of the config (``.hydra/``) and log files."""
    return any(p.name not in (RUN_SETTINGS, ".hydra") and p.suffix != ".log" for p in folder.iterdir())


def describe_differences(old: Any, new: Any) -> str:
    """``"key: old there, new now; ..."`` for every (dotted) key whose JSON value differs."""
    return "; ".join(f"{key}: {a!r} there, {b!r} now" for key, a, b in _differences(old, new))


def _differences(old: Any, new: Any, prefix: str = "") -> list[tuple[str, Any, Any]]:
    """Dotted keys whose values differ between two JSON values (a missing key reads as None)."""
    if isinstance(old, dict) and isinstance(new, dict):
        found = []
        for key in sorted(set(old) | set(new)):
            found += _differences(old.get(key), new.get(key), f"{prefix}{key}.")
        return found
    same = old == new or (isinstance(old, float) and isinstance(new, float) and math.isnan(old) and math.isnan(new))
    return [] if same else [(prefix.rstrip(".") or "(settings)", old, new)]


def constructor_settings(obj: Any, nested: bool = False, max_chars: int | None = None) -> dict[str, Any]:
    """The arguments ``obj`` was built with, read back from its attributes of the same name: a policy's, selector's
    or objective's knobs, as JSON. Only constructor arguments, not every attribute, so that state a run changes
    (an update counter, EMAs) does not make the same object look like another run's. With ``nested``, a knob that
    is itself a dataflex object (a decider's policy) is given as its class and its own knobs, one level down.
    With ``max_chars``, a knob whose JSON is longer (an influence selector's target examples) is given as its
    length and sha256."""
    params = inspect.signature(type(obj).__init__).parameters
    named = [n for n, p in params.items() if n != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    settings = {}
    for name in (n for n in named if hasattr(obj, n)):
        value = getattr(obj, name)
        if nested and type(value).__module__.split(".")[0] == "dataflex" and not inspect.isroutine(value):
            settings[name] = {"class": type(value).__qualname__, **constructor_settings(value, max_chars=max_chars)}
            continue
        settings[name] = plain_setting(value)
        text = None if max_chars is None else json.dumps(settings[name], sort_keys=True)
        if text is not None and len(text) > max_chars:
            settings[name] = {"json_chars": len(text), "sha256": hashlib.sha256(text.encode()).hexdigest()}
    return settings


def plain_setting(value: Any) -> Any:
    """A setting as JSON (weights given as arrays, tuples or mappings included); anything else by its type."""
    if isinstance(value, (bool, int, float, str)) or value is None:
        return value
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, Mapping):
        return {str(k): plain_setting(v) for k, v in value.items()}
    if isinstance(value, np.ndarray) and value.size > 64:  # per-example arrays: their digest, not their values
        return {"shape": list(value.shape), "sha256": hashlib.sha256(np.ascontiguousarray(value).tobytes()).hexdigest()}
    if isinstance(value, (list, tuple, np.ndarray)):
        return [plain_setting(v) for v in value]
    return type(value).__qualname__


def settings_digest(settings: Mapping[str, Any]) -> str:
    """A short stable digest of JSON-able settings (to name a folder by them)."""
    return hashlib.sha1(json.dumps(dict(settings), sort_keys=True, default=str).encode()).hexdigest()[:10]


def weights_summary(model: Any) -> str:
    """The sum and the sum of squares of every parameter, in float64: which weights (initial or trained) a
    cached result was computed from, cheaply — another checkpoint or initialisation changes both."""
    import torch

    with torch.no_grad():
        parts = [(float(p.double().sum()), float(p.double().square().sum())) for p in model.parameters()]
    return f"{sum(a for a, _ in parts):.8e}/{sum(b for _, b in parts):.8e}"
