"""Resumable state: the ``Stateful`` protocol, the dataset fingerprint and the versioned envelope.

Every piece of dataflex that changes during training (samplers, schedules, policies, score stores)
exposes ``state_dict() -> dict`` and ``load_state_dict(dict)``, with the same shape as torchdata's
``Stateful``. The dicts hold only JSON types (no tensors, no NaN), so a checkpoint is one readable
JSON file that survives a round-trip through any tool.

The envelope adds a format version and a fingerprint of the dataset (example count, domain names and
a hash of the per-example domain labels). Loading a state written for another dataset would silently
replay the wrong examples, so it is refused with an error that shows both fingerprints.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any, BinaryIO, Protocol, runtime_checkable

import numpy as np

__all__ = [
    "saved_count",
    "saved_vector",
    "DatasetFingerprint",
    "STATE_FORMAT",
    "STATE_VERSION",
    "Stateful",
    "TensorStateful",
    "floats_from_json",
    "floats_to_json",
    "read_json",
    "token_digest",
    "unwrap_state",
    "write_atomic",
    "write_text_atomic",
    "wrap_state",
    "write_json_atomic",
]

STATE_FORMAT = "dataflex.state"
STATE_VERSION = 2  # 2: the decider's state under 'decider', with the policy class recorded


@runtime_checkable
class Stateful(Protocol):
    """An object whose progress can be saved to and restored from a JSON-safe dict."""

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


@runtime_checkable
class TensorStateful(Protocol):
    """An object with state that is not JSON: tensors such as a proxy model and its optimizer.

    Saved by :func:`dataflex.checkpoint.save_state` beside the JSON state, with ``torch.save``.
    """

    def tensor_state_dict(self) -> dict[str, Any]: ...

    def load_tensor_state_dict(self, state: dict[str, Any]) -> None: ...


@dataclass(frozen=True)
class DatasetFingerprint:
    """Identity of a training set as seen by dataflex: ids 0..n-1 and one domain label each."""

    num_examples: int
    domain_names: tuple[str, ...]
    labels_sha256: str

    @classmethod
    def from_labels(cls, domain_ids: np.ndarray, domain_names: Sequence[str]) -> DatasetFingerprint:
        ids = np.ascontiguousarray(np.asarray(domain_ids, dtype=np.int64))
        digest = hashlib.sha256()
        digest.update("\x1f".join(domain_names).encode())
        digest.update(ids.tobytes())
        return cls(int(ids.shape[0]), tuple(domain_names), digest.hexdigest())

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["domain_names"] = list(self.domain_names)
        return d

    def check_matches(
        self,
        saved: dict[str, Any],
        refusal: str = "dataflex state was saved for a different dataset, refusing to resume on this one "
        "(the example order would not be reproduced)",
    ) -> None:
        """Raise ``ValueError`` (``refusal`` and the differing fields) if a saved fingerprint describes a
        different dataset."""
        mine = self.to_json()
        if saved != mine:
            diffs = [f"{k}: saved={saved.get(k)!r} vs this run={mine[k]!r}" for k in mine if saved.get(k) != mine[k]]
            raise ValueError(f"{refusal}. Differences: " + "; ".join(diffs))


def token_digest(dataset: Any, column: str = "input_ids") -> str | None:
    """A digest of every example's token ids, in order: which text a cached or checkpointed result was made from
    (a :class:`DatasetFingerprint` sees only the labels, and the text can change under them — another
    ``max_len``, tokenizer or file). A ``datasets.Dataset`` is read in chunks, not as one Python list. None
    for a dataset whose examples have no ``column`` (its text cannot be told apart this way)."""
    digest = hashlib.sha1()
    first = dataset[0] if len(dataset) else {}
    if not (isinstance(first, Mapping) and column in first):
        return None
    if hasattr(dataset, "iter"):
        rows = (row for chunk in dataset.iter(batch_size=1024) for row in chunk[column])
    else:
        rows = (dataset[i][column] for i in range(len(dataset)))
    for row in rows:
        ids = np.asarray(row, dtype=np.int64).ravel()
        digest.update(np.int64(ids.size).tobytes())  # the length first: [1, 2] + [3] must differ from [1] + [2, 3]
        digest.update(ids.tobytes())
    return digest.hexdigest()[:16]


def wrap_state(fingerprint: DatasetFingerprint, payload: dict[str, Any]) -> dict[str, Any]:
    return {
        "format": STATE_FORMAT,
        "version": STATE_VERSION,
        "fingerprint": fingerprint.to_json(),
        **payload,
    }


def unwrap_state(state: dict[str, Any], fingerprint: DatasetFingerprint) -> dict[str, Any]:
    """Check format, version and fingerprint; return the payload keys."""
    if state.get("format") != STATE_FORMAT:
        raise ValueError(f"not a dataflex state (format={state.get('format')!r}, expected {STATE_FORMAT!r})")
    if state.get("version") != STATE_VERSION:
        raise ValueError(
            f"dataflex state version {state.get('version')!r} is not supported by this release "
            f"(supports version {STATE_VERSION})"
        )
    fingerprint.check_matches(state["fingerprint"])
    return {k: v for k, v in state.items() if k not in ("format", "version", "fingerprint")}


def write_atomic(path: str | os.PathLike[str], write: Callable[[BinaryIO], Any]) -> None:
    """Write a file so that a crash mid-write leaves either the old file or the new one, never half: ``write(f)``
    fills a temporary file beside ``path`` (opened binary), which is flushed to disk and renamed over it."""
    path = os.fspath(path)
    directory = os.path.dirname(path) or "."
    fd, tmp = tempfile.mkstemp(prefix=".dataflex-", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_text_atomic(path: str | os.PathLike[str], text: str) -> None:
    """:func:`write_atomic` for a UTF-8 text (a results table, a JSON report that may hold NaN)."""
    write_atomic(path, lambda f: f.write(text.encode("utf-8")))


def write_json_atomic(path: str | os.PathLike[str], obj: Any) -> None:
    """Strict JSON (no NaN) through :func:`write_atomic`."""
    write_text_atomic(path, json.dumps(obj, allow_nan=False))


def read_json(path: str | os.PathLike[str]) -> Any:
    """Parse a JSON file; a corrupted file raises ``ValueError`` naming the file."""
    with open(path, encoding="utf-8") as f:
        try:
            return json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as err:  # a flipped bit can make invalid UTF-8 too
            raise ValueError(f"{os.fspath(path)} is not valid JSON ({err}); the file is damaged") from err


def saved_count(state: dict[str, Any], key: str, owner: str) -> int:
    """``state[key]`` as an integer >= 0, or ``ValueError`` naming ``owner`` and ``key``."""
    value = state[key]
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
        raise ValueError(f"{owner} state {key!r} must be an integer >= 0; got {value!r}")
    return int(value)


def saved_vector(
    state: dict[str, Any], key: str, owner: str, length: int | None = None, *, nonnegative: bool = False
) -> np.ndarray:
    """``state[key]`` as a finite float64 vector (of ``length`` entries, >= 0 if asked), or ``ValueError``
    naming ``owner``, ``key`` and what is wrong: a corrupted state must not resume and fail steps later."""
    try:
        vec = np.asarray(state[key], dtype=np.float64)
    except (TypeError, ValueError):
        raise ValueError(f"{owner} state {key!r} must be a list of numbers; got {state[key]!r:.80}") from None
    if vec.ndim != 1 or (length is not None and vec.shape[0] != length):
        raise ValueError(f"{owner} state {key!r} must hold {length or 'a list of'} numbers; got shape {vec.shape}")
    if not np.isfinite(vec).all():
        raise ValueError(f"{owner} state {key!r} holds non-finite values at {np.flatnonzero(~np.isfinite(vec))[:5]}")
    if nonnegative and (vec < 0).any():
        raise ValueError(f"{owner} state {key!r} holds negative values at {np.flatnonzero(vec < 0)[:5]}")
    return vec


def floats_to_json(values: np.ndarray) -> list[float | None]:
    """JSON has no NaN: store missing values as ``null``."""
    return [float(v) if np.isfinite(v) else None for v in np.asarray(values, dtype=np.float64).tolist()]


def floats_from_json(values: Sequence[float | None]) -> np.ndarray:
    return np.array([np.nan if v is None else v for v in values], dtype=np.float64)
