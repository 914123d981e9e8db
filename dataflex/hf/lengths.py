"""Example lengths for ``train_sampling_strategy="group_by_length"``, read as the stock Trainer reads them.

The stock Trainer takes the ``length_column_name`` column of its ``train_dataset`` when there is one, else
the length of each example's first model input (``processing_class.model_input_names[0]``, by default
``input_ids``). dataflex reads the same values so a length-grouped mixture groups what the stock sampler would.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from dataflex.hf.labels import stored_column

__all__ = ["example_lengths"]


def example_lengths(
    *, loader_dataset: Any, trainer_dataset: Any, length_column: str | None, input_name: str
) -> np.ndarray:
    """One length per example of ``loader_dataset``, in its order; ``ValueError`` naming what is missing."""
    n = len(loader_dataset)
    for dataset in (trainer_dataset, loader_dataset):
        columns = list(getattr(dataset, "column_names", None) or [])
        if dataset is not None and length_column and length_column in columns and len(dataset) == n:
            return np.asarray(stored_column(dataset, length_column), dtype=np.int64)
    columns = list(getattr(loader_dataset, "column_names", None) or [])
    if input_name in columns:
        return np.fromiter((len(x) for x in loader_dataset[input_name]), dtype=np.int64, count=n)
    first = loader_dataset[0] if n else None
    if not isinstance(first, Mapping) or input_name not in first:
        raise ValueError(
            f"train_sampling_strategy='group_by_length' needs example lengths: the training dataset has no "
            f"{length_column!r} column and its examples no {input_name!r} field; add a {length_column!r} column"
        )
    return np.fromiter((len(loader_dataset[i][input_name]) for i in range(n)), dtype=np.int64, count=n)
