"""Irreducible losses for RHO-LOSS (Mindermann et al., arXiv 2206.07137).

RHO-LOSS trains on the examples with the highest *reducible* loss: current loss minus the loss a model
trained on a separate holdout split reaches on them. That holdout ("irreducible loss") model is trained
once with the plain loop and its per-example token-mean losses on the training pool are cached to a
``.npy`` file that :class:`dataflex.selectors.RhoLoss` reads; an existing cache is reused.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dataflex.domains import encode_domains
from dataflex.offline import score_pool, token_mean_losses
from dataflex.policies.static import Uniform
from dataflex.proxies.loop import train_mixture
from dataflex.state import open_checked, write_checked

__all__ = ["irreducible_losses", "pool_losses"]


def pool_losses(
    model: torch.nn.Module,
    pool_ds: Any,
    collate: Callable[[list[dict[str, Any]]], dict[str, Any]],
    *,
    cache: str | os.PathLike[str] | None = None,
    batch_size: int = 64,
    desc: str = "irreducible losses",
    progress: bool = True,
) -> np.ndarray:
    """The holdout model's token-mean loss on every pool example (NaN without counted tokens): RHO-LOSS's
    irreducible loss, however the holdout model was trained. ``cache`` (``.npz``) makes it crash-resumable."""
    losses = score_pool(
        token_mean_losses(model), pool_ds, collate, batch_size=batch_size, cache=cache, desc=desc, progress=progress
    )
    return np.asarray(losses, dtype=np.float64)


def irreducible_losses(
    make_model: Callable[[], torch.nn.Module],
    holdout_ds: Any,
    pool_ds: Any,
    out_dir: str | os.PathLike[str],
    *,
    label_column: str | None = None,
    **loop_kwargs: Any,
) -> np.ndarray:
    """Train (or reuse) the holdout model with the plain loop and return :func:`pool_losses` on ``pool_ds``.

    ``label_column`` (e.g. the task) balances the holdout batches across labels; without it the holdout
    set is sampled uniformly over examples. ``loop_kwargs`` go to :func:`~dataflex.proxies.loop.train_mixture`
    (``collate`` is required).
    """
    out = Path(out_dir)
    cache = out / "irreducible_losses.npy"
    if cache.is_file():
        losses = np.load(open_checked(cache))
        if losses.shape[0] != len(pool_ds):
            raise ValueError(f"{cache} holds {losses.shape[0]} losses but the pool has {len(pool_ds)} examples")
        return losses
    labels = holdout_ds[label_column] if label_column else ["holdout"] * len(holdout_ds)
    domain_ids, names = encode_domains(labels)
    model = make_model()
    train_mixture(model, holdout_ds, domain_ids, names, Uniform(), ckpt_dir=out / "ckpt", desc="holdout", **loop_kwargs)
    losses = pool_losses(model, pool_ds, loop_kwargs["collate"], progress=loop_kwargs.get("progress", True))
    out.mkdir(parents=True, exist_ok=True)
    write_checked(cache, lambda f: np.save(f, losses))
    return losses
