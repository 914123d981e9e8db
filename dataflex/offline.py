"""Offline selection: score a pool once, choose a subset, write it to disk.

The online selectors (:mod:`dataflex.selectors`) re-score candidates while training runs. Offline mode
is the LESS workflow (arXiv 2402.04333): take a warmed-up model, score every pool example once, keep
the best ``fraction`` and train a fresh model on it. Pool scoring is long, so :func:`score_pool`

* batches examples of similar length together (padding is wasted compute: on the 12-task instruction
  pool, lengths range from ~100 to 2,000 bytes);
* saves finished batches to ``cache`` every ``save_every`` batches (atomically), and a rerun after a
  crash scores only what is missing;
* shows a progress bar.

The chosen subset is written as JSON with the method, fraction, scores and a fingerprint of the pool,
and :func:`read_subset` refuses a subset written for another pool.
"""

from __future__ import annotations

import json
import os
import zipfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dataflex.batching import model_inputs
from dataflex.losses import check_causal_lm, padding_free_segments, per_example_token_loss
from dataflex.modes import eval_mode
from dataflex.ranking import rank_ids
from dataflex.run_folder import describe_differences
from dataflex.state import DatasetFingerprint, read_json, token_digest, write_atomic, write_json_atomic

__all__ = ["SUBSET_FORMAT", "read_subset", "score_pool", "target_direction", "token_mean_losses", "write_subset"]

SUBSET_FORMAT = "dataflex.subset/1"


def score_pool(
    score_batch: Callable[[dict[str, torch.Tensor]], torch.Tensor | np.ndarray],
    dataset: Any,
    collate: Callable[[list[dict[str, Any]]], dict[str, torch.Tensor]],
    *,
    batch_size: int = 32,
    cache: str | os.PathLike[str] | None = None,
    save_every: int = 20,
    desc: str = "scoring pool",
    progress: bool = True,
    settings: Mapping[str, Any] | None = None,
) -> np.ndarray:
    """``score_batch`` applied to every example of ``dataset``: ``(n,)`` or ``(n, dim)`` in dataset order.

    ``score_batch`` receives a collated batch and returns one score (or one feature row) per example.
    With ``cache`` (an ``.npz`` path) partial results survive a crash and finished work is not redone.
    ``settings`` (what the scores depend on: the model's weights, the method, ...) is stored with the cache,
    together with a digest of the pool's tokens, and a cache holding scores made with other settings or for
    another pool is refused, naming the difference — reused, it would hand back another model's (or another
    example's) scores as these.
    """
    from tqdm.auto import tqdm

    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive; got {batch_size}")
    n = len(dataset)
    if n == 0:
        raise ValueError("the pool is empty: nothing to score")
    cache_path = Path(cache) if cache is not None else None
    values: np.ndarray | None = None
    done = np.zeros(n, dtype=bool)
    # The pool's tokens are always part of what the scores depend on: another pool of the same size (other files,
    # another max_len) through the same cache path would otherwise get this one's scores, example by example.
    keyed = {**dict(settings or {}), "pool tokens": token_digest(dataset) if cache_path is not None else None}
    wanted = json.dumps(keyed, sort_keys=True, default=str)
    if cache_path is not None and cache_path.is_file():
        try:
            with np.load(cache_path) as saved:
                values, done = saved["values"], saved["done"]
                stored = str(saved["settings"]) if "settings" in saved.files else None
        except (OSError, ValueError, KeyError, zipfile.BadZipFile) as err:
            raise ValueError(f"{cache_path} is not a readable score cache ({err}); delete it to score anew") from err
        if done.shape[0] != n:
            raise ValueError(f"{cache_path} holds scores for {done.shape[0]} examples but the pool has {n}")
        if stored != wanted:
            recorded = (
                "(none recorded)" if stored is None else describe_differences(json.loads(stored), json.loads(wanted))
            )
            raise ValueError(
                f"{cache_path} holds scores made with other settings {recorded}: give this run another cache "
                "path, or delete that file to score anew"
            )
    # longest first: batches of similar length, and the peak memory comes first
    order = rank_ids([len(dataset[i]["input_ids"]) for i in range(n)], descending=True)
    todo = order[~done[order]]
    batches = [todo[i : i + batch_size] for i in range(0, len(todo), batch_size)]
    bar = tqdm(total=n, initial=int(done.sum()), desc=desc, disable=not progress, unit="ex")
    for k, ids in enumerate(batches, start=1):
        out = score_batch(collate([dataset[int(i)] for i in ids]))
        out = out.detach().float().cpu().numpy() if isinstance(out, torch.Tensor) else np.asarray(out, np.float32)
        if values is None:
            values = np.full((n, *out.shape[1:]), np.nan, dtype=np.float32)
        values[ids], done[ids] = out, True
        bar.update(len(ids))
        if cache_path is not None and (k % save_every == 0 or k == len(batches)):
            _save_npz(cache_path, values=values, done=done, settings=np.array(wanted))
    bar.close()
    assert values is not None and done.all()
    return values


def _save_npz(path: Path, **arrays: np.ndarray) -> None:
    # write_atomic's temporary file has a name of its own: two runs sharing a cache (a parallel sweep) each
    # write whole files instead of into one fixed temporary name at once.
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, lambda f: np.savez(f, **arrays))


def token_mean_losses(model: torch.nn.Module) -> Callable[[dict[str, torch.Tensor]], torch.Tensor]:
    """A ``score_batch`` for :func:`score_pool`: each example's token-mean loss (NaN if no label).

    A padding-free batch (one row, ``position_ids`` restarting per example) gives one loss per example.
    """
    check_causal_lm(model)

    @torch.no_grad()
    def score(batch: dict[str, torch.Tensor]) -> torch.Tensor:
        device = next(model.parameters()).device
        labels = batch["labels"].to(device)
        segments = padding_free_segments(labels.shape[0], batch.get("position_ids"))
        inputs = model_inputs(batch, device)
        if segments is not None:
            # transformers masks attention at position_ids restarts only without a KV cache; eval mode would make one
            inputs["use_cache"] = False
        with eval_mode(model):
            logits = model(**inputs).logits
            loss, valid = per_example_token_loss(logits, labels, segments=segments)
        return torch.where(valid, loss, torch.full_like(loss, float("nan")))

    return score


def target_direction(features: np.ndarray | torch.Tensor) -> np.ndarray:
    """Unit mean of unit-norm target features: cosine with it ranks like the mean cosine (LESS)."""
    f = np.asarray(features, dtype=np.float64)
    if f.ndim != 2 or f.shape[0] == 0:
        raise ValueError(f"target features must be a non-empty (n, dim) array; got shape {f.shape}")
    mean = f.mean(0)
    norm = np.linalg.norm(mean)
    if not np.isfinite(norm) or norm == 0:
        raise ValueError("the target features average to zero (or are not finite): no direction to score against")
    return mean / norm


def write_subset(
    path: str | os.PathLike[str],
    ids: np.ndarray,
    *,
    pool: DatasetFingerprint,
    method: str,
    fraction: float,
    scores: np.ndarray | None = None,
    extra: dict[str, Any] | None = None,
    tokens: str | None = None,
) -> None:
    """Write the chosen ids (sorted) with what produced them; scores of the whole pool if given. ``tokens``: the
    pool's :func:`dataflex.state.token_digest`, so that :func:`read_subset` can tell a pool whose labels match but
    whose text differs (a pool of one label is only its example count to the fingerprint)."""
    ids = np.sort(np.asarray(ids, dtype=np.int64))
    if ids.size and (ids[0] < 0 or ids[-1] >= pool.num_examples):
        raise ValueError(f"subset ids must lie in [0, {pool.num_examples}); got {ids[0]}..{ids[-1]}")
    payload = {
        "format": SUBSET_FORMAT,
        "method": method,
        "fraction": float(fraction),
        "pool": pool.to_json(),
        "ids": ids.tolist(),
        "tokens": tokens,
        "scores": None if scores is None else [None if not np.isfinite(s) else float(s) for s in scores],
        **(extra or {}),
    }
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(Path(path), payload, digest=True)


def read_subset(
    path: str | os.PathLike[str], pool: DatasetFingerprint | None = None, tokens: str | None = None
) -> np.ndarray:
    """The ids of a subset written by :func:`write_subset`; with ``pool``, refuse another pool's subset, and with
    ``tokens`` (the pool's :func:`dataflex.state.token_digest`) one written for other text, when it recorded its
    own."""
    payload = read_json(Path(path))
    if payload.get("format") != SUBSET_FORMAT:
        raise ValueError(f"{path} is not a dataflex subset (format {payload.get('format')!r}, want {SUBSET_FORMAT})")
    if pool is not None:
        pool.check_matches(
            payload["pool"], f"{path} was written for a different dataset; its ids would pick other examples here"
        )
    saved = payload.get("tokens")
    if tokens is not None and saved is not None and saved != tokens:
        raise ValueError(
            f"{path} was written for a pool with other text (token digest {saved} there, {tokens} here: another "
            "tokenizer, max_len or data file under the same labels); its ids would pick other examples here"
        )
    return np.asarray(payload["ids"], dtype=np.int64)
