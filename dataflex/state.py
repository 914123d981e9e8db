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
import io
import json
import os
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
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
    "JSON_DIGEST",
    "json_digest",
    "open_checked",
    "read_json_checked",
    "read_json",
    "token_digest",
    "unwrap_state",
    "write_atomic",
    "write_text_atomic",
    "wrap_state",
    "write_checked",
    "write_json_atomic",
    "write_json_checked",
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


class HashingWriter:
    """A binary file wrapper that feeds every byte written through it to a sha256 (no second pass)."""

    def __init__(self, file: Any) -> None:
        self.file, self.sha256 = file, hashlib.sha256()

    def write(self, data: bytes) -> int:
        self.sha256.update(data)
        return self.file.write(data)

    def flush(self) -> None:
        self.file.flush()


def write_atomic(
    path: str | os.PathLike[str], write: Callable[[BinaryIO], Any], *, digest_file: str | os.PathLike[str] | None = None
) -> None:
    """Write a file so that a crash mid-write leaves either the old file or the new one, never half: ``write(f)``
    fills a temporary file beside ``path`` (opened binary), which is flushed to disk and renamed over it. With
    ``digest_file``, the sha256 of the bytes written goes there (atomically) before the rename."""
    path = os.fspath(path)
    directory = os.path.dirname(path) or "."
    # A unique name opened exclusively, with the permissions the umask gives any new file (mkstemp's 0600 made
    # every results and state file unreadable to the other users of a shared run folder).
    tmp = os.path.join(directory, f".dataflex-{uuid.uuid4().hex}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            sink = HashingWriter(f) if digest_file is not None else None
            write(f if sink is None else sink)  # type: ignore[arg-type]
            f.flush()
            os.fsync(f.fileno())
        if sink is not None:
            write_text_atomic(digest_file, sink.sha256.hexdigest() + "\n")
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_text_atomic(path: str | os.PathLike[str], text: str) -> None:
    """:func:`write_atomic` for a UTF-8 text (a results table, a JSON report that may hold NaN)."""
    write_atomic(path, lambda f: f.write(text.encode("utf-8")))


def _digest_file(path: str | os.PathLike[str]) -> str:
    return os.fspath(path) + ".sha256"


def write_checked(path: str | os.PathLike[str], write: Callable[[BinaryIO], Any]) -> None:
    """:func:`write_atomic` for a binary cache that is read back instead of recomputed (a model's weights, an
    array of scores), with the sha256 of its bytes in ``<path>.sha256``: ``torch.load`` and ``np.load`` of a
    ``.npy`` read a changed byte as a changed number, so the cache would pass it on as a result. The digest is
    written first: a kill in between leaves no cache (recomputed) beside a digest the rerun overwrites."""
    write_atomic(path, write, digest_file=_digest_file(path))


def open_checked(path: str | os.PathLike[str]) -> io.BytesIO:
    """The bytes of a file written by :func:`write_checked`, as a stream for ``torch.load`` / ``np.load``;
    refused (``ValueError`` naming it) when they do not match its digest. A file without a digest beside it (an
    older cache) is returned as it is."""
    data = Path(path).read_bytes()
    digest = Path(_digest_file(path))
    if digest.is_file() and hashlib.sha256(data).hexdigest() != digest.read_text().strip():
        raise ValueError(
            f"{os.fspath(path)} is damaged: its bytes do not match the sha256 in {digest.name} (a changed byte); "
            "delete both files to compute it anew"
        )
    return io.BytesIO(data)


def write_json_checked(path: str | os.PathLike[str], obj: Any) -> None:
    """:func:`write_checked` for any JSON value, NaN included (a measured result may hold one, which
    :func:`write_json_atomic`'s strict JSON refuses): its sha256 goes in ``<path>.sha256``."""
    write_checked(path, lambda f: f.write(json.dumps(obj, indent=1).encode("utf-8")))


def read_json_checked(path: str | os.PathLike[str]) -> Any:
    """A value :func:`write_json_checked` wrote, refused (``ValueError`` naming the file) when its bytes do not
    match their digest; a file without a digest beside it (written before there was one) is read as it is."""
    return json.loads(open_checked(path).read())


JSON_DIGEST = "sha256"  # the field a digested JSON object carries its own digest in


def json_digest(content: Mapping[str, Any]) -> str:
    """sha256 of the canonical JSON text of ``content`` (sorted keys, no spaces)."""
    text = json.dumps(content, sort_keys=True, separators=(",", ":"), allow_nan=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def write_json_atomic(path: str | os.PathLike[str], obj: Any, *, digest: bool = False) -> None:
    """Strict JSON (no NaN) through :func:`write_atomic`. With ``digest`` (an object only), the sha256 of its
    content is written into it (field :data:`JSON_DIGEST`), so that :func:`read_json` refuses the file once a
    byte of it changed: a cache that is read back instead of recomputed (a swarm run, a fold's scores, a subset)
    would otherwise pass a flipped digit on as a result while still parsing."""
    if digest:
        if not isinstance(obj, Mapping) or JSON_DIGEST in obj:
            raise TypeError(f"only an object without a {JSON_DIGEST!r} field can carry a digest; got {type(obj)}")
        # The digest is of the object as it reads back (JSON turns tuples into lists, keys into text).
        content = json.loads(json.dumps(obj, allow_nan=False))
        obj = {**content, JSON_DIGEST: json_digest(content)}
    write_text_atomic(path, json.dumps(obj, allow_nan=False))


def read_json(path: str | os.PathLike[str]) -> Any:
    """Parse a JSON file; a corrupted file raises ``ValueError`` naming the file. An object written with a
    digest (:func:`write_json_atomic`) is checked against it and returned without it; files without one (written
    before digests existed, or by hand) are read as they are."""
    with open(path, encoding="utf-8") as f:
        try:
            data = json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as err:  # a flipped bit can make invalid UTF-8 too
            raise ValueError(f"{os.fspath(path)} is not valid JSON ({err}); the file is damaged") from err
    if isinstance(data, dict) and JSON_DIGEST in data:
        expected = data.pop(JSON_DIGEST)
        if expected != json_digest(data):
            raise ValueError(
                f"{os.fspath(path)} is damaged: its content does not match the sha256 written with it (a changed "
                "byte or an edit)"
            )
    return data


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
