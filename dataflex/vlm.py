"""Vision-language models (LLaVA-style, arXiv 2304.08485): image inputs checks and image embeddings.

A LLaVA-style model replaces each image-token position of ``input_ids`` with one projected patch
feature of ``pixel_values``. Two things go wrong silently or cryptically with a stock model:

* a batch with image tokens but no ``pixel_values`` trains on the image token's *text* embedding
  (no error at all), and a batch with too few images fails deep inside the model with a token/feature
  count. :func:`check_image_batch` catches both before the forward and names the examples;
* the image features are not returned by the forward. :func:`image_feature_tap` hooks the
  multi-modal projector's output, so the training forward yields per-example image embeddings (mean
  over patches) for the cluster sampler at no extra cost; :func:`image_feature_embedder` does the same
  for a pool offline (through :func:`dataflex.offline.score_pool`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from dataflex.modes import eval_mode
from dataflex.taps import Tap

__all__ = [
    "check_image_batch",
    "image_feature_embedder",
    "image_feature_tap",
    "image_shape",
    "image_token_id",
    "projector",
]


def image_token_id(model: torch.nn.Module) -> int | None:
    """The id marking image positions in ``input_ids`` (None for a text-only model)."""
    config = getattr(model, "config", None)
    for name in ("image_token_id", "image_token_index"):
        value = getattr(config, name, None)
        if value is not None:
            return int(value)
    return None


def image_shape(model: torch.nn.Module) -> tuple[int, int, int] | None:
    """``(channels, height, width)`` the vision tower expects, when its config says so."""
    vision = getattr(getattr(model, "config", None), "vision_config", None)
    size = getattr(vision, "image_size", None)
    if vision is None or size is None:
        return None
    height, width = (size, size) if isinstance(size, int) else tuple(size)
    return int(getattr(vision, "num_channels", 3)), int(height), int(width)


def projector(model: torch.nn.Module) -> torch.nn.Module:
    """The multi-modal projector (vision features -> text width) of a LLaVA-style model."""
    for candidate in (model, getattr(model, "model", None), getattr(getattr(model, "base_model", None), "model", None)):
        found = getattr(candidate, "multi_modal_projector", None)
        if isinstance(found, torch.nn.Module):
            return found
    for name, module in model.named_modules():  # wrapped models (peft, DDP): search by name
        if name.endswith("multi_modal_projector"):
            return module
    raise ValueError(f"{type(model).__name__} has no multi_modal_projector; image embeddings need a LLaVA-style model")


def check_image_batch(model: torch.nn.Module, inputs: dict[str, Any], example_ids: Sequence[int] | None = None) -> None:
    """Raise ``ValueError`` if ``inputs`` cannot be a correct VLM batch for ``model``.

    Checks: every row holding image tokens has an image; ``pixel_values`` is ``(images, C, H, W)`` with
    the vision tower's ``C, H, W``, one image per row with image tokens, finite. ``example_ids`` (the
    dataset ids of the rows) make the message name the offending examples.
    """
    token = image_token_id(model)
    input_ids = inputs.get("input_ids")
    if token is None or input_ids is None:
        return
    rows_with_images = (input_ids == token).any(dim=1)
    names = list(example_ids) if example_ids is not None else list(range(input_ids.shape[0]))
    kind = "example ids" if example_ids is not None else "batch rows"
    pixels = inputs.get("pixel_values")
    if pixels is None:
        if bool(rows_with_images.any()):
            missing = [int(names[i]) for i in torch.nonzero(rows_with_images).flatten().tolist()]
            raise ValueError(
                f"{kind} {missing[:10]} hold image tokens (id {token}) but the batch has no pixel_values: the model "
                "would train on the image token's text embedding. Keep 'pixel_values' in the dataset and collator "
                "(and in the model's forward signature if remove_unused_columns=True)"
            )
        return
    if not isinstance(pixels, torch.Tensor) or pixels.dim() != 4:
        shape = tuple(pixels.shape) if isinstance(pixels, torch.Tensor) else type(pixels).__name__
        raise ValueError(f"pixel_values must be a (images, channels, height, width) tensor; got {shape}")
    expected = image_shape(model)
    if expected is not None and tuple(pixels.shape[1:]) != expected:
        raise ValueError(
            f"pixel_values have images of shape {tuple(pixels.shape[1:])}; the vision tower takes {expected} "
            "(channels, height, width)"
        )
    wanted = int(rows_with_images.sum())
    if pixels.shape[0] != wanted:
        without = [int(names[i]) for i in torch.nonzero(~rows_with_images).flatten().tolist()]
        raise ValueError(
            f"the batch has {pixels.shape[0]} images but {wanted} rows with image tokens (one image per row); "
            f"{kind} without image tokens: {without[:10]}"
        )
    bad = ~torch.isfinite(pixels.flatten(1)).all(dim=1)
    if bool(bad.any()):
        image_rows = torch.nonzero(rows_with_images).flatten()
        offenders = [int(names[int(image_rows[i])]) for i in torch.nonzero(bad).flatten().tolist()]
        raise ValueError(f"{kind} {offenders[:10]} have non-finite pixel values (NaN or inf)")


def image_feature_tap(model: torch.nn.Module) -> Tap:
    """A :class:`~dataflex.taps.Tap` on the projector's output: each image's projected features, mean over patches.

    Shape ``(images, text_width)``: what the language model receives for each image, pooled.
    """
    return Tap(projector(model), "output", lambda out: out.detach().float().mean(dim=1))


def image_feature_embedder(model: torch.nn.Module) -> Callable[[dict[str, torch.Tensor]], torch.Tensor]:
    """``score_batch`` for :func:`dataflex.offline.score_pool`: each example's pooled projected image features.

    Runs only the vision tower and projector (``model.get_image_features``), in eval mode, no grad.
    """

    @torch.no_grad()
    def embed(batch: dict[str, torch.Tensor]) -> torch.Tensor:
        pixels = batch.get("pixel_values")
        if pixels is None:
            raise ValueError(f"image embeddings need 'pixel_values' in the batch; it has {sorted(batch)}")
        device = next(model.parameters()).device
        with eval_mode(model), image_feature_tap(model) as tap:
            model.get_image_features(pixel_values=pixels.to(device))
            features = tap.pop()
        if features.shape[0] != pixels.shape[0]:
            raise RuntimeError(f"expected one feature row per image; got {features.shape[0]} for {pixels.shape[0]}")
        return features

    return embed
