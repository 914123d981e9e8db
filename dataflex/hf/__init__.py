"""Adapters for Hugging Face ``transformers`` (needs the ``transformers`` package)."""

from dataflex.hf.callback import DataFlexCallback

__all__ = ["DataFlexCallback"]
