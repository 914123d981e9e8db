"""Causal-LM cross-entropy per token and per example: the one place these losses are computed.

The HF Trainer only sees the batch-mean loss. Here token-level cross-entropy is recomputed from the
logits the forward pass already produced (no second model forward), on the model's device. Labels
follow the HF causal-LM convention: position ``t`` predicts label ``t + 1``; ``-100`` is ignored.

* :func:`token_cross_entropy` — ``(batch, seq - 1)`` per-token losses, ignored tokens 0, with gradient.
* :func:`per_example_mean_loss` — token-mean loss of each example, with gradient (influence, weighting); per
  example of a padding-free row with its segments.
* :func:`per_example_token_loss` — the same under ``no_grad`` in bounded memory (counted positions only,
  in chunks), with NaN and a ``valid`` mask for examples that have no counted token or a non-finite loss.
* :func:`hidden_state_positions` — per-token losses from the last hidden states and the LM head, for a
  forward that returns no logits (fused linear cross-entropy kernels).
* :func:`per_example_loss_from_log_probs` — the same from per-token log-probabilities and their mask, as a
  fused LM head (TRL's ``SFTTrainer``) returns them instead of logits.
* :func:`check_causal_lm` / :func:`check_causal_output` — refuse a model (or a forward's output) whose labels do
  not follow that convention, which every function here would score against the wrong tokens without an error.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

__all__ = [
    "IGNORE_INDEX",
    "SCORING_CHUNK_ELEMENTS",
    "causal_lm_problem",
    "check_causal_lm",
    "check_causal_output",
    "counted_per_example",
    "log_prob_positions",
    "flattened_sequence_ids",
    "hidden_state_logits",
    "hidden_state_positions",
    "padding_free_segments",
    "per_example_loss_from_log_probs",
    "per_example_mean",
    "per_example_mean_loss",
    "scored_positions",
    "segment_columns",
    "per_example_token_loss",
    "token_cross_entropy",
]

IGNORE_INDEX = -100


_CAUSAL_CONVENTION = (
    "dataflex scores causal language models, whose logits at position t predict label t + 1 (transformers' "
    "*ForCausalLM models, LLaVA- and Qwen-VL-style *ForConditionalGeneration models)"
)


def _unwrapped(model: torch.nn.Module) -> torch.nn.Module:
    """The model under PEFT, DDP/DataParallel and torch.compile wrappers."""
    while True:
        if callable(getattr(model, "get_base_model", None)):
            inner = model.get_base_model()
        elif isinstance(model, (torch.nn.parallel.DistributedDataParallel, torch.nn.DataParallel)):
            inner = model.module
        else:
            inner = getattr(model, "_orig_mod", model)  # torch.compile's OptimizedModule
        if inner is model:
            return model
        model = inner


def causal_lm_problem(model: torch.nn.Module) -> str | None:
    """Why ``model``'s labels do not follow the causal-LM convention every loss here assumes, or None.

    An encoder-decoder model (T5, BART, Whisper) trains its decoder's logits at t on label t, and a masked-LM,
    token- or sequence-classification head scores labels of its own kind: shifted by one, each would give
    per-example losses (and a reweighted training loss) against the wrong tokens, silently. Those are
    recognised from the transformers config (``is_encoder_decoder``) and the loss transformers maps the class
    to (``loss_type``). A model that is not a transformers model is taken at its word.
    """
    owner = _unwrapped(model)
    name = type(owner).__name__
    if getattr(getattr(owner, "config", None), "is_encoder_decoder", False):
        return (
            f"{_CAUSAL_CONVENTION}; {name} is an encoder-decoder model, whose decoder logits at t predict label t, "
            "so each example would be scored against the next label instead of its own. Use a decoder-only model"
        )
    loss_type = getattr(owner, "loss_type", None)
    if loss_type is not None:
        from transformers.loss.loss_utils import LOSS_MAPPING, ForCausalLMLoss

        if loss_type in LOSS_MAPPING and LOSS_MAPPING[loss_type] is not ForCausalLMLoss:
            return (
                f"{_CAUSAL_CONVENTION}; {name} has a {loss_type} head, whose labels are not next tokens, so each "
                "example's loss would be computed against the wrong targets. Use a causal language model"
            )
    return None


def check_causal_lm(model: torch.nn.Module) -> None:
    """Raise ``ValueError`` with :func:`causal_lm_problem`'s reason when there is one."""
    problem = causal_lm_problem(model)
    if problem is not None:
        raise ValueError(problem)


def check_causal_output(outputs: object) -> None:
    """Refuse a forward's output that comes from an encoder-decoder model (it holds the encoder's last hidden
    state): for a loss function that never sees the model (``compute_loss_func``)."""
    keys = outputs.keys() if callable(getattr(outputs, "keys", None)) else ()
    if "encoder_last_hidden_state" in keys or getattr(outputs, "encoder_last_hidden_state", None) is not None:
        raise ValueError(
            f"{_CAUSAL_CONVENTION}; this output holds an encoder's last hidden state (an encoder-decoder model, "
            "whose decoder logits at t predict label t), so each example would be scored against the wrong tokens. "
            "Use a decoder-only model"
        )


def _check_shapes(logits: torch.Tensor, labels: torch.Tensor) -> None:
    if logits.dim() != 3 or labels.dim() != 2 or logits.shape[:2] != labels.shape:
        raise ValueError(
            f"expected logits (batch, seq, vocab) and labels (batch, seq) with matching batch/seq; got "
            f"logits {tuple(logits.shape)} and labels {tuple(labels.shape)}"
        )


def token_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-token loss ``(batch, seq - 1)`` with the causal shift, in float32; ignored tokens get 0."""
    _check_shapes(logits, labels)
    shifted = labels[:, 1:].to(logits.device)
    vocab = logits.shape[-1]
    return F.cross_entropy(
        logits[:, :-1].reshape(-1, vocab).float(), shifted.reshape(-1), ignore_index=IGNORE_INDEX, reduction="none"
    ).view(shifted.shape)


def per_example_mean_loss(
    logits: torch.Tensor, labels: torch.Tensor, segments: torch.Tensor | None = None
) -> torch.Tensor:
    """Token-mean cross-entropy of each example *with* gradient; an example with no counted token gives 0.
    Per row, or with ``segments`` (:func:`padding_free_segments`) per example of a padding-free row."""
    token_loss = token_cross_entropy(logits, labels)
    count = counted_per_example(labels, segments).to(logits.device)
    if segments is None:
        return token_loss.sum(1) / count.clamp(min=1)
    owner = segments[0, 1:].to(logits.device)  # shifted position t predicts token t + 1
    keep = owner >= 0  # trailing padding belongs to no example
    sums = token_loss.new_zeros(count.numel()).index_add(0, owner[keep], token_loss[0, keep])
    return sums / count.clamp(min=1)


def counted_per_example(labels: torch.Tensor, segments: torch.Tensor | None = None) -> torch.Tensor:
    """Counted target tokens of each example: per row, or per example of a padding-free row."""
    counted = labels[:, 1:] != IGNORE_INDEX
    if segments is None:
        return counted.sum(1)
    owner = segments[0, 1:].to(labels.device)
    keep = owner >= 0
    n = int(segments.max()) + 1
    return torch.zeros(n, dtype=torch.long, device=labels.device).index_add(0, owner[keep], counted[0, keep].long())


def segment_columns(segments: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int, int]:
    """Where each shifted position ``t`` of a padding-free row sits in its own example's shifted row:
    ``(owner, column, examples, width)``. ``column`` is ``t`` minus the example's first position, so the
    example's row is what it would be in a padded batch; it is -1 at the position that predicts an example's
    first token from the previous example (never counted: collators mask it) and for trailing padding
    (owner -1). ``width`` is the longest example's length minus one."""
    seg = segments[0]
    owner = seg[1:]
    n = int(seg.max()) + 1
    lengths = torch.bincount(seg[seg >= 0], minlength=n)
    starts = torch.cumsum(lengths, 0) - lengths
    t = torch.arange(owner.numel(), device=seg.device)
    column = torch.where(owner >= 0, t - starts[owner.clamp(min=0)], torch.full_like(t, -1))
    return owner, column, n, max(int(lengths.max()) - 1, 0)


#: Most logits elements converted to float32 at once when scoring without gradient (64 MB): the extra
#: memory of per-example scoring stays this small whatever the vocabulary and sequence length.
SCORING_CHUNK_ELEMENTS = 2**24


def flattened_sequence_ids(position_ids: torch.Tensor) -> torch.Tensor:
    """Which sequence each position of a padding-free row belongs to: ``(1, seq)`` ids 0..n-1, and -1 for
    trailing padding.

    Padding-free batches (TRL ``padding_free=True``, transformers' ``DataCollatorWithFlattening``) put
    every example of the batch in one row; ``position_ids`` restart at 0 where a new example begins. Padding
    appended to the row (TRL's ``pad_to_multiple_of``) has position 0 at every token, so it would read as
    one-token examples: the positions after the last one with a non-zero position are padding. (An example
    of a single token at the end of the row is taken for padding too; it has no counted target anyway, and
    the example count check then names the mismatch.)
    """
    if position_ids.dim() != 2 or position_ids.shape[0] != 1:
        raise ValueError(f"a padding-free batch has position_ids of shape (1, seq); got {tuple(position_ids.shape)}")
    ids = torch.cumsum(position_ids == 0, dim=1) - 1
    inside = (position_ids[0] > 0).nonzero()
    if inside.numel():
        ids[0, int(inside[-1]) + 1 :] = -1
    return ids


def padding_free_segments(rows: int, position_ids: torch.Tensor | None) -> torch.Tensor | None:
    """:func:`flattened_sequence_ids` when a batch of ``rows`` rows is one padding-free row holding several
    sequences (``position_ids`` restart at 0 more than once), else None."""
    if rows == 1 and position_ids is not None and int((position_ids == 0).sum()) > 1:
        return flattened_sequence_ids(position_ids)
    return None


def _owners(rows: torch.Tensor, positions: torch.Tensor, n_rows: int, segments: torch.Tensor | None):
    """The example each shifted position ``(rows, positions)`` belongs to, and the number of examples."""
    if segments is None:
        return rows, n_rows
    segments = segments.to(rows.device)  # shifted position t predicts the token at t + 1, in segment segments[0, t + 1]
    return segments[0, positions + 1], int(segments.max()) + 1


def per_example_mean(
    token_loss: torch.Tensor, rows: torch.Tensor, positions: torch.Tensor, n_rows: int, segments: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(token-mean loss, counted tokens)`` per example from the losses at shifted ``(rows, positions)``:
    per row, or per sequence of a padding-free row. The loss is NaN for an example without counted tokens.
    ``token_loss`` may carry several values per token, ``(tokens, k)``: each column is averaged alike."""
    owner, n = _owners(rows, positions, n_rows, segments)
    shape = (n, *token_loss.shape[1:])
    sums = torch.zeros(shape, dtype=torch.float32, device=token_loss.device).index_add_(0, owner, token_loss.float())
    counted = torch.zeros(n, dtype=torch.long, device=token_loss.device).index_add_(0, owner, torch.ones_like(owner))
    per_row = counted.view(n, *([1] * (len(shape) - 1)))
    loss = torch.where(per_row > 0, sums / per_row.clamp(min=1), torch.full_like(sums, float("nan")))
    return loss, counted


def _chunked_positions(
    shifted: torch.Tensor, vocab: int, logits_at, chunk_elements: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Cross-entropy of the counted shifted positions, ``logits_at(rows, positions)`` giving a chunk's logits."""
    rows, positions = torch.nonzero(shifted != IGNORE_INDEX, as_tuple=True)  # one device sync per batch
    token_loss = torch.empty(rows.numel(), dtype=torch.float32, device=shifted.device)
    step = max(1, chunk_elements // vocab)
    with torch.no_grad():
        for start in range(0, rows.numel(), step):
            r, t = rows[start : start + step], positions[start : start + step]
            token_loss[start : start + step] = F.cross_entropy(logits_at(r, t).float(), shifted[r, t], reduction="none")
    return token_loss, rows, positions


def scored_positions(
    logits: torch.Tensor, labels: torch.Tensor, chunk_elements: int = SCORING_CHUNK_ELEMENTS
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(token losses, rows, positions)`` of the counted (shifted) positions, computed without gradient in
    float32 chunks of at most ``chunk_elements`` logits."""
    _check_shapes(logits, labels)
    shifted = labels[:, 1:].to(logits.device)
    return _chunked_positions(shifted, logits.shape[-1], lambda r, t: logits[r, t], chunk_elements)


def hidden_state_logits(
    hidden: torch.Tensor, head: Callable[[torch.Tensor], torch.Tensor], softcap: float | None = None
) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """``logits_at(rows, positions)``: the logits of those positions of the last hidden states ``(batch, seq,
    hidden)``, the LM head ``head`` applied to them only (the hidden states detached). ``softcap`` is the model's
    final logit soft-capping (``cap * tanh(logits / cap)``, Gemma 2), if any."""

    def logits_at(r: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        logits = head(hidden[r, t].detach())
        return logits if softcap is None else softcap * torch.tanh(logits / softcap)

    return logits_at


def hidden_state_positions(
    hidden: torch.Tensor,
    head: Callable[[torch.Tensor], torch.Tensor],
    labels: torch.Tensor,
    *,
    vocab: int,
    softcap: float | None = None,
    chunk_elements: int = SCORING_CHUNK_ELEMENTS,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The same from the last hidden states ``(batch, seq, hidden)`` and the LM head (``head``, ``vocab`` outputs),
    for a forward that returns no logits (fused linear cross-entropy kernels): the head is applied to the counted
    positions only (:func:`hidden_state_logits`), in chunks of at most ``chunk_elements`` logits."""
    if hidden.dim() != 3 or labels.dim() != 2 or hidden.shape[:2] != labels.shape:
        raise ValueError(
            f"expected hidden states (batch, seq, hidden) and labels (batch, seq); got {tuple(hidden.shape)} and "
            f"{tuple(labels.shape)}"
        )
    shifted = labels[:, 1:].to(hidden.device)
    return _chunked_positions(shifted, vocab, hidden_state_logits(hidden, head, softcap), chunk_elements)


def log_prob_positions(
    log_probs: torch.Tensor, label_mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(token losses, rows, positions)`` from already-shifted per-token log-probabilities and their mask."""
    if log_probs.shape != label_mask.shape or log_probs.dim() != 2:
        raise ValueError(
            f"expected log_probs and label_mask of the same (batch, seq) shape; got {tuple(log_probs.shape)} "
            f"and {tuple(label_mask.shape)}"
        )
    rows, positions = torch.nonzero(label_mask.bool(), as_tuple=True)
    return -log_probs.detach()[rows, positions].float(), rows, positions


def _loss_and_valid(loss: torch.Tensor, counted: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return loss, (counted > 0) & torch.isfinite(loss)


@torch.no_grad()
def per_example_token_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    segments: torch.Tensor | None = None,
    chunk_elements: int = SCORING_CHUNK_ELEMENTS,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token-mean cross-entropy of each example, without gradient, in bounded extra memory.

    Only counted positions are scored, in chunks of at most ``chunk_elements`` logits (float32), so a
    128k vocabulary never costs a float32 copy of the whole ``(batch, seq, vocab)`` logits. With
    ``segments`` (:func:`flattened_sequence_ids` of a padding-free row) the losses are per sequence of
    that row instead of per row. Returns ``(loss, valid)`` on the logits' device. ``valid`` is False for
    an example with no counted token (its loss is NaN) or a non-finite loss; the caller masks those.
    """
    token_loss, rows, positions = scored_positions(logits, labels, chunk_elements)
    return _loss_and_valid(*per_example_mean(token_loss, rows, positions, logits.shape[0], segments))


@torch.no_grad()
def per_example_loss_from_log_probs(
    log_probs: torch.Tensor, label_mask: torch.Tensor, *, segments: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The same from already-shifted per-token log-probabilities and their mask (TRL's fused LM head).

    ``log_probs`` and ``label_mask`` are ``(batch, seq - 1)``; ignored positions are masked out.
    """
    token_loss, rows, positions = log_prob_positions(log_probs, label_mask)
    return _loss_and_valid(*per_example_mean(token_loss, rows, positions, log_probs.shape[0], segments))
