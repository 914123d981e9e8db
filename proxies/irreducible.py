"""Irreducible losses for RHO-LOSS (Mindermann et al., arXiv 2206.07137).

RHO-LOSS trains on the examples with the highest *reducible* loss: current loss minus the loss a model
trained on a separate holdout split reaches on them. That holdout ("irreducible loss") model is trained
once with the plain loop and its per-example token-mean losses on the training pool are cached to a
``.npy`` file for :class:`dataflex.selectors.RhoLoss` to read, in a folder that records what they depend on (the
holdout split, the pool's tokens, the model, the training knobs): a rerun with other settings is refused, naming
them.
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
from dataflex.run_folder import claim_run_folder, weights_summary
from dataflex.state import DatasetFingerprint, open_checked, token_digest, write_checked

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
    labels = holdout_ds[label_column] if label_column else ["holdout"] * len(holdout_ds)
    domain_ids, names = encode_domains(labels)
    model = make_model()
    # What the losses depend on, recorded in out_dir: a cache made from another holdout split, pool, model or
    # training knob is refused (reused, another pool's losses of the same length would pass as this pool's).
    settings = {
        "holdout": {
            "tokens": token_digest(holdout_ds),
            "labels": DatasetFingerprint.from_labels(domain_ids, names).to_json(),
        },
        "pool tokens": token_digest(pool_ds),
        "pool examples": len(pool_ds),
        "initial weights": weights_summary(model),
        "training": {k: v for k, v in loop_kwargs.items() if _is_knob(k, v)},
    }
    claim_run_folder(out, settings, hint="give this run another out_dir")
    cache = out / "pool_losses.npy"  # (not the unkeyed irreducible_losses.npy of earlier versions)
    if cache.is_file():
        return np.load(open_checked(cache))
    train_mixture(model, holdout_ds, domain_ids, names, Uniform(), ckpt_dir=out / "ckpt", desc="holdout", **loop_kwargs)
    losses = pool_losses(model, pool_ds, loop_kwargs["collate"], progress=loop_kwargs.get("progress", True))
    write_checked(cache, lambda f: np.save(f, losses))
    return losses


def _is_knob(name: str, value: Any) -> bool:
    """A training setting the holdout model's losses depend on (not the progress bar or checkpoint cadence)."""
    scalar = value is None or isinstance(value, (bool, int, float, str))
    return scalar and name not in ("progress", "ckpt_every", "eval_every")
