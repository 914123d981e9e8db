"""Reaching into a (possibly accelerate-prepared) DataLoader: where the sampler sits, which positions each rank gets.

Layout pinned by ``tests/test_sampler_sharding.py`` and the Trainer tests (transformers 5.x, accelerate 1.x):

* one process: ``DataLoaderShard.batch_sampler`` is a ``BatchSampler`` whose ``.sampler`` we replace;
* several processes: ``DataLoaderShard.batch_sampler`` is accelerate's ``BatchSamplerShard`` wrapping
  that ``BatchSampler``; ranks take consecutive batches round-robin.

We never rely on the loader to tell us which examples a batch holds. Instead the positions (within the
epoch) of every batch this rank will see are computed by running the *same* batching and sharding
classes over ``range(num_samples)``; the sampler maps positions to example ids.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from torch.utils.data import BatchSampler

__all__ = ["LoaderLayout", "inspect_loader", "model_inputs", "rank_position_batches"]


@dataclass
class LoaderLayout:
    """Where the sampler sits and how batches are dealt to ranks."""

    batch_sampler: BatchSampler  # the BatchSampler whose ``.sampler`` dataflex replaces
    shard: Any | None  # accelerate BatchSamplerShard, or None in a single process
    batch_size: int
    num_workers: int
    prefetch_factor: int

    @property
    def world_size(self) -> int:
        return int(self.shard.num_processes) if self.shard is not None else 1

    @property
    def rank(self) -> int:
        return int(self.shard.process_index) if self.shard is not None else 0


def inspect_loader(loader: Any) -> LoaderLayout:
    """Find the replaceable BatchSampler inside a (possibly accelerate-prepared) DataLoader."""
    from torch.utils.data import IterableDataset

    if isinstance(getattr(loader, "dataset", None), IterableDataset):
        raise TypeError(
            f"the training dataset is an IterableDataset ({type(loader.dataset).__name__}): it is read in its own "
            "order and cannot be re-mixed or re-selected; use a map-style dataset (e.g. datasets.Dataset)"
        )
    outer = getattr(loader, "batch_sampler", None)
    if outer is None:
        raise TypeError(
            f"the train DataLoader ({type(loader).__name__}) has no batch_sampler: dataflex needs a map-style "
            "dataset (an IterableDataset is read in its own order and cannot be re-mixed)"
        )
    if type(loader).__name__ == "DataLoaderDispatcher" and int(getattr(loader.state, "num_processes", 1)) > 1:
        # The main process reads every rank's batches and hands each its slice: the sampler's positions map to
        # ranks differently from a sharded loader's, and every example would be credited to another rank.
        raise NotImplementedError(
            f"accelerate's dispatch_batches=True across {loader.state.num_processes} processes is not supported by "
            "dataflex: set TrainingArguments(accelerator_config={'dispatch_batches': False}) so each process "
            "reads its own batches (the default for a map-style dataset)"
        )
    shard = None
    inner = outer
    if type(outer).__name__ == "BatchSamplerShard":
        shard, inner = outer, outer.batch_sampler
    if not (hasattr(inner, "sampler") and hasattr(inner, "batch_size")):
        raise TypeError(
            f"unexpected batch sampler layout {type(outer).__name__} -> {type(inner).__name__}: dataflex expects "
            "a torch BatchSampler (optionally inside accelerate's BatchSamplerShard)"
        )
    if getattr(shard, "split_batches", False):
        # With split_batches each global batch is cut across ranks; the position arithmetic below
        # would still hold, but it is untested, so refuse rather than mislabel examples.
        raise NotImplementedError("accelerate split_batches=True is not supported by dataflex yet")
    workers = int(getattr(loader, "num_workers", 0) or 0)
    prefetch = int(getattr(loader, "prefetch_factor", None) or (2 if workers > 0 else 0))
    return LoaderLayout(inner, shard, int(inner.batch_size), workers, prefetch)


def rank_position_batches(num_samples: int, layout: LoaderLayout) -> list[np.ndarray]:
    """Positions (within an epoch) of each batch this rank receives, in order."""
    base = BatchSampler(range(num_samples), layout.batch_size, bool(layout.batch_sampler.drop_last))
    if layout.shard is None:
        batches = base
    else:
        shard_cls = type(layout.shard)
        batches = shard_cls(
            base,
            num_processes=layout.shard.num_processes,
            process_index=layout.shard.process_index,
            split_batches=layout.shard.split_batches,
            even_batches=layout.shard.even_batches,
        )
    return [np.asarray(b, dtype=np.int64) for b in batches]


def model_inputs(batch: dict[str, Any], device: Any) -> dict[str, Any]:
    """The tensors of a collated batch a model forward takes, on ``device``: everything but ``labels``.

    Passing every tensor (not just ``input_ids``/``attention_mask``) keeps ``pixel_values`` and other
    modality inputs, so the same scorers work on VLMs.
    """
    import torch

    return {k: v.to(device) for k, v in batch.items() if k != "labels" and isinstance(v, torch.Tensor)}
