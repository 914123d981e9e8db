"""Adapters for Hugging Face ``transformers`` (needs the ``transformers`` package).

Parts: :mod:`~dataflex.hf.callbacks` (the public callbacks), :mod:`~dataflex.hf.adapter` (Trainer events),
:mod:`~dataflex.hf.deciders` (mixing, selection, curriculum), :mod:`~dataflex.hf.tracking` (batch positions),
:mod:`~dataflex.hf.capture` (per-example losses), :mod:`~dataflex.hf.labels` (labels that follow the
Trainer's dataset), :mod:`~dataflex.hf.checkpoint` (files in the Trainer's checkpoints),
:mod:`~dataflex.hf.trainer_files` (the record that tells a changed Trainer checkpoint file),
:mod:`~dataflex.hf.metric_names` (per-domain metric names a reporter would merge).
"""

from dataflex.hf.callbacks import DataFlexCallback, DataFlexCurriculumCallback, DataFlexSelectCallback
from dataflex.hf.checkpoint import STATE_FILENAME, RecordTrainerFiles, last_complete_checkpoint

__all__ = [
    "STATE_FILENAME",
    "DataFlexCallback",
    "DataFlexCurriculumCallback",
    "DataFlexSelectCallback",
    "RecordTrainerFiles",
    "last_complete_checkpoint",
]
