"""Labels that follow the dataset the Trainer actually trains on.

Domain labels taken from a dataset go stale when the trainer reorders or filters that dataset later
(TRL's ``SFTConfig(shuffle_dataset=True)`` shuffles it, TRL drops over-long or fully masked
examples): dataflex would then attribute examples to the wrong domains and train on the wrong mixture
while logging the intended one. The Trainer's ``train_dataset`` keeps every column even when
``remove_unused_columns=True`` drops them from the DataLoader's copy (same rows, same order), so the
label column is read from it; labels passed explicitly are checked against that column.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

from dataflex.domains import label_texts

__all__ = ["class_names", "resolve_labels", "stored_column"]


def _columns(dataset: Any) -> list[str]:
    return list(getattr(dataset, "column_names", None) or [])


def stored_column(dataset: Any, column: str) -> Any:
    """The column's values as stored. A ``datasets.Dataset`` with a format transform (``set_transform``,
    ``with_transform``: tokenising on the fly) applies it to a column read too, and a transform that returns
    only the model's inputs has no label column to give; the stored column is read without the format."""
    if callable(getattr(dataset, "with_format", None)):
        return dataset.with_format(None)[column]
    return dataset[column]


def _class_label(dataset: Any, column: str) -> Any:
    """The column's ``datasets.ClassLabel`` feature, or None."""
    feature = (getattr(dataset, "features", None) or {}).get(column)
    return feature if type(feature).__name__ == "ClassLabel" and hasattr(feature, "int2str") else None


def _label_source(loader_dataset: Any, trainer_dataset: Any, column: str | None) -> Any:
    """The dataset whose ``column`` holds the labels: the Trainer's ``train_dataset``, else the DataLoader's."""
    if not column:
        return None
    return next((d for d in (trainer_dataset, loader_dataset) if d is not None and column in _columns(d)), None)


def class_names(*, loader_dataset: Any, trainer_dataset: Any, column: str | None) -> list[str] | None:
    """The class names of a ``datasets.ClassLabel`` label column in class-id order, or None for other columns.

    That is the order the data declares its domains in, which a list of weights is easily written in."""
    source = _label_source(loader_dataset, trainer_dataset, column)
    class_label = None if source is None else _class_label(source, column)
    return None if class_label is None else label_texts(class_label.names, f"the {column!r} class names")


def resolve_labels(
    *,
    loader_dataset: Any,
    trainer_dataset: Any,
    given: Sequence[Any] | None,
    column: str | None,
    required: bool,
) -> list[str]:
    """One label per example of ``loader_dataset``, in its order.

    Source, in order: the ``column`` of the Trainer's ``train_dataset`` (or of the DataLoader's dataset);
    ``given`` (then it must equal the column where one exists); ``"pool"`` for every example when
    labels are optional. ``required`` labels without a source raise ``ValueError``.
    """
    n = len(loader_dataset)
    column_labels: list[str] | None = None
    class_ids: list[Any] | None = None  # a ClassLabel column's ids, as stored
    source = _label_source(loader_dataset, trainer_dataset, column)
    if source is not None:
        if len(source) != n:
            raise ValueError(
                f"the Trainer's train_dataset has {len(source)} rows but its DataLoader serves {n}: dataflex cannot "
                f"tell which {column!r} label belongs to which training example"
            )
        values = stored_column(source, column)
        class_label = _class_label(source, column)
        if class_label is not None:  # by class name ("code", not 0): domain names and Static keys read as the data's
            class_ids, values = list(values), class_label.int2str(list(values))
        column_labels = label_texts(values, f"the {column!r} labels")
    if given is None:
        if column_labels is not None:
            return column_labels
        if required:
            seen = _columns(trainer_dataset) or _columns(loader_dataset)
            raise ValueError(
                f"the training dataset has no column {column!r} (columns: {seen}); keep a {column!r} column in the "
                "dataset you give the Trainer, or pass the labels explicitly (domains=...)"
            )
        return ["pool"] * n
    labels = label_texts(given, "the labels given to dataflex")
    if len(labels) != n:
        raise ValueError(
            f"got {len(labels)} domain labels for a training set of {n} examples; give one label per example, in "
            "the order of the dataset the Trainer trains on (a trainer that filters its dataset, such as TRL "
            "dropping over-long examples, changes that count: keep a label column instead)"
        )
    if class_ids is not None and labels == [str(x) for x in class_ids]:
        return column_labels  # ds["domain"] of a ClassLabel column gives its ids: the same labels, named
    if column_labels is not None:
        wrong = [i for i, (a, b) in enumerate(zip(labels, column_labels)) if a != b]
        if wrong:
            i = wrong[0]
            raise ValueError(
                f"the labels given to dataflex disagree with the {column!r} column of the dataset the Trainer trains "
                f"on at {len(wrong)} of {n} examples (first at row {i}: {labels[i]!r} vs {column_labels[i]!r}): the "
                "dataset was reordered or filtered after the labels were taken (e.g. SFTConfig(shuffle_dataset=True)). "
                f"Omit the labels to use the column, or take them from trainer.train_dataset[{column!r}]"
            )
    elif column:
        warnings.warn(
            f"the Trainer's dataset has no {column!r} column, so dataflex cannot check that the labels it was given "
            "follow the order of the examples the Trainer trains on (a trainer that shuffles or filters its dataset "
            "would make them wrong); keep the column in the dataset, or set the column argument (domain_column=, "
            "label_column=) to None to state there is none",
            stacklevel=4,
        )
    return labels
