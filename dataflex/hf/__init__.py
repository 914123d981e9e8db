"""Adapters for Hugging Face ``transformers`` (needs the ``transformers`` package)."""

from dataflex.hf.callback import DataFlexCallback
from dataflex.hf.curriculum_callback import DataFlexCurriculumCallback
from dataflex.hf.select_callback import DataFlexSelectCallback

__all__ = ["DataFlexCallback", "DataFlexCurriculumCallback", "DataFlexSelectCallback"]
