"""Example embeddings from the model's own hidden states: the input of its output layer, mean-pooled.

The last hidden state is whatever enters ``model.get_output_embeddings()`` (the LM head), which is
the same place for GPT-2, Llama and LLaVA-style models, so a forward pre-hook there captures it
without ``output_hidden_states`` (which would keep every layer's activations). Pooling averages the
positions the attention mask marks as real. Everything stays on the model's device until the
(small) pooled vectors are copied out.

* :func:`hidden_state_embedder` — a ``score_batch`` for :func:`dataflex.offline.score_pool`: embed a pool.
* :class:`EmbeddingCache` — per-example embeddings with the step they were taken at; the training
  callback can fill it from the training forward for free (``DataFlexCallback(..., embeddings=cache)``).
"""

from __future__ import annotations

import os
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dataflex.batching import model_inputs
from dataflex.modes import eval_mode
from dataflex.state import write_atomic
from dataflex.taps import Tap

__all__ = [
    "EmbeddingCache",
    "decoder_of",
    "hidden_state_embedder",
    "last_hidden_state",
    "last_hidden_tap",
    "mean_pool",
    "output_layer",
]


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """``(batch, dim)`` mean of ``hidden`` over real positions (all positions without a mask)."""
    if attention_mask is None:
        return hidden.mean(1)
    mask = attention_mask.to(hidden.dtype).unsqueeze(-1)
    return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)


def output_layer(model: torch.nn.Module) -> torch.nn.Module:
    """The module whose input is the last hidden state (the LM head)."""
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    if head is None:
        raise ValueError(f"{type(model).__name__} has no output embeddings (LM head); pass your own encoder instead")
    return head


def last_hidden_tap(model: torch.nn.Module) -> Tap:
    """A :class:`~dataflex.taps.Tap` on the last hidden state of each forward: the output of the model's decoder
    (``get_decoder()``), else the input of its LM head.

    The decoder's output where there is one, because a forward with a fused linear cross-entropy reads the head's
    weight and never calls the head, and dataflex, scoring such a forward, calls it on the counted positions only:
    a tap on the head saw no forward, or a (positions, hidden) block instead of the batch's hidden states.
    """
    decoder = decoder_of(model)
    if decoder is not None:
        return Tap(decoder, "output", transform=last_hidden_state)
    return Tap(output_layer(model), "input")


def decoder_of(model: torch.nn.Module) -> torch.nn.Module | None:
    """The module whose output is the last hidden state (``get_decoder()``, through a peft wrapper), or None."""
    owner = model.get_base_model() if callable(getattr(model, "get_base_model", None)) else model
    get_decoder = getattr(owner, "get_decoder", None)
    decoder = get_decoder() if callable(get_decoder) else None
    return decoder if isinstance(decoder, torch.nn.Module) and decoder is not owner else None


def last_hidden_state(decoder_output: Any) -> torch.Tensor:
    """The last hidden state in a decoder's output (a tensor, a tuple or a ``ModelOutput``)."""
    return decoder_output if torch.is_tensor(decoder_output) else decoder_output[0]


def hidden_state_embedder(model: torch.nn.Module) -> Callable[[dict[str, torch.Tensor]], torch.Tensor]:
    """``score_batch`` returning mean-pooled last hidden states (eval mode, no grad)."""

    @torch.no_grad()
    def embed(batch: dict[str, torch.Tensor]) -> torch.Tensor:
        device = next(model.parameters()).device
        mask = batch.get("attention_mask")
        mask = None if mask is None else mask.to(device)
        with eval_mode(model), last_hidden_tap(model) as tap:
            model(**model_inputs(batch, device))
            hidden = tap.pop()
        return mean_pool(hidden.float(), mask)

    return embed


class EmbeddingCache:
    """Per-example embeddings (NaN until taken) and the optimizer step each was taken at (-1: never)."""

    def __init__(self, num_examples: int) -> None:
        if num_examples <= 0:
            raise ValueError(f"num_examples must be positive; got {num_examples}")
        self.num_examples = int(num_examples)
        self.values: np.ndarray | None = None
        self.step = np.full(self.num_examples, -1, dtype=np.int64)

    def update(self, ids: np.ndarray, embeddings: torch.Tensor | np.ndarray, step: int) -> None:
        emb = embeddings.detach().float().cpu().numpy() if isinstance(embeddings, torch.Tensor) else embeddings
        emb = np.asarray(emb, dtype=np.float32)
        ids = np.asarray(ids)
        if emb.ndim != 2 or emb.shape[0] != ids.shape[0]:  # (numpy would broadcast one row over every id)
            raise ValueError(f"embeddings of shape {emb.shape} for {ids.shape[0]} ids; one row per id is needed")
        if self.values is None:
            self.values = np.full((self.num_examples, emb.shape[1]), np.nan, dtype=np.float32)
        elif emb.shape[1] != self.values.shape[1]:
            raise ValueError(f"embedding width {emb.shape[1]} differs from the cache's {self.values.shape[1]}")
        self.values[ids] = emb
        self.step[ids] = int(step)

    def reset(self) -> None:
        """Back to empty: no embedding taken."""
        self.values = None
        self.step = np.full(self.num_examples, -1, dtype=np.int64)

    @property
    def filled(self) -> np.ndarray:
        return self.step >= 0

    def save(self, path: str | os.PathLike[str]) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        values = self.values if self.values is not None else np.zeros((self.num_examples, 0), np.float32)
        write_atomic(path, lambda f: np.savez(f, values=values, step=self.step))

    def load(self, path: str | os.PathLike[str]) -> None:
        """Restore a cache :meth:`save` wrote; a file that does not fit this cache is refused, naming it."""
        try:
            with np.load(path) as saved:
                step, values = saved["step"].copy(), saved["values"].copy()
        except (OSError, ValueError, KeyError, zipfile.BadZipFile) as error:  # a damaged byte fails the zip CRC
            raise ValueError(f"{path} is not a readable embedding cache: {error}") from None
        if step.shape != (self.num_examples,) or values.ndim != 2 or values.shape[0] != self.num_examples:
            raise ValueError(
                f"{path} holds steps {step.shape} and embeddings {values.shape}, but this cache has "
                f"{self.num_examples} examples"
            )
        if not np.issubdtype(step.dtype, np.integer) or (step < -1).any():
            raise ValueError(f"{path}: the step of each embedding must be an integer >= -1 (-1: never taken)")
        taken = step >= 0
        if values.shape[1] and not np.isfinite(values[taken]).all():
            raise ValueError(f"{path}: embeddings marked as taken hold NaN or Inf")
        self.step = step
        self.values = values if values.shape[1] else None
