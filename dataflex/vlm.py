"""Vision-language models (LLaVA-style, arXiv 2304.08485; Qwen2-VL-style patch sequences, arXiv 2409.12191):
image input checks and image embeddings.

A LLaVA-style model replaces each image-token position of ``input_ids`` with one projected patch
feature of ``pixel_values``. Two things go wrong silently or cryptically with a stock model:

* a batch with image tokens but no ``pixel_values`` trains on the image token's *text* embedding
  (no error at all), and a batch with too few images fails deep inside the model with a token/feature
  count. :func:`check_image_batch` catches both before the forward and names the examples;
* the image features are not returned by the forward. :func:`image_feature_tap` hooks the
  multi-modal projector's (or Qwen2-VL's patch merger's) output, so the training forward yields
  per-example image embeddings (mean over image tokens, :func:`pool_image_features`) for the cluster
  sampler at no extra cost; :func:`image_feature_embedder` does the same
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
    "pool_image_features",
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
    """The module that maps vision features to the text width: LLaVA's ``multi_modal_projector``, or the
    patch merger (``visual.merger``) of Qwen2-VL-style models."""
    for candidate in (model, getattr(model, "model", None), getattr(getattr(model, "base_model", None), "model", None)):
        found = getattr(candidate, "multi_modal_projector", None)
        if isinstance(found, torch.nn.Module):
            return found
    for suffix in ("multi_modal_projector", "visual.merger"):  # wrapped models (peft, DDP): search by name
        for name, module in model.named_modules():
            if name.endswith(suffix):
                return module
    raise ValueError(
        f"{type(model).__name__} has no multi_modal_projector or visual.merger; image embeddings need a LLaVA-style "
        "or Qwen2-VL-style model"
    )


def spatial_merge(model: torch.nn.Module) -> int:
    """Patches merged per side into one image token (Qwen2-VL's ``spatial_merge_size``; 1 when absent)."""
    config = getattr(getattr(model, "module", model), "config", None)  # DDP keeps the model in .module
    return int(getattr(getattr(config, "vision_config", None), "spatial_merge_size", 1) or 1)


def _tokens_per_image(model: torch.nn.Module, grid: Any) -> torch.Tensor:
    """Image tokens of each image an ``image_grid_thw`` describes: its ``t*h*w`` patches over ``merge**2``."""
    return torch.as_tensor(grid).long().prod(dim=1) // spatial_merge(model) ** 2


def pool_image_features(model: torch.nn.Module, features: torch.Tensor, inputs: dict[str, Any]) -> torch.Tensor:
    """``(images, width)``: each image's projected features, mean over its tokens.

    LLaVA's projector gives ``(images, tokens, width)``; a Qwen2-VL merger gives the tokens of all images in
    one ``(tokens, width)`` sequence, cut per image by ``image_grid_thw`` (``t*h*w / merge**2`` tokens each).
    """
    if features.dim() == 3:
        return features.mean(dim=1)
    grid = inputs.get("image_grid_thw")
    if features.dim() != 2 or grid is None:
        raise ValueError(
            f"image features of shape {tuple(features.shape)} need (images, tokens, width), or (tokens, width) with "
            "the batch's image_grid_thw"
        )
    sizes = _tokens_per_image(model, grid).tolist()
    if sum(sizes) != features.shape[0]:
        raise ValueError(f"image_grid_thw describes {sum(sizes)} image tokens; the merger gave {features.shape[0]}")
    return torch.stack([part.mean(dim=0) for part in torch.split(features, sizes)])


def check_image_batch(model: torch.nn.Module, inputs: dict[str, Any], example_ids: Sequence[int] | None = None) -> None:
    """Raise ``ValueError`` if ``inputs`` cannot be a correct VLM batch for ``model``.

    Every row holding image tokens needs ``pixel_values``. Then, by layout:

    * LLaVA-style ``(images, C, H, W)``: the vision tower's ``C, H, W``; every image fills the same number of
      image tokens, so each row holds a whole number of images' tokens;
    * patch sequences with ``image_grid_thw`` (Qwen2-VL and its successors: ``(patches, patch_dim)``, image
      ``i`` made of ``t*h*w`` patches and ``t*h*w / merge**2`` image tokens): the patch count the grid
      describes, and image tokens that end each row exactly at an image boundary;
    * any other layout (tiles, several crops per image): left to the model, which checks its own shapes.

    In every layout pixel values must be finite; the message names the examples whose images are not (all
    rows with images when the layout does not say which image belongs to which row). ``example_ids`` (the
    dataset ids of the rows) make the messages name examples instead of batch rows.
    """
    token = image_token_id(model)
    input_ids = inputs.get("input_ids")
    if token is None or input_ids is None:
        return
    tokens_per_row = (input_ids == token).sum(dim=1)
    rows_with_images = tokens_per_row > 0
    names = list(example_ids) if example_ids is not None else list(range(input_ids.shape[0]))
    kind = "example ids" if example_ids is not None else "batch rows"

    def named(rows: torch.Tensor) -> list[int]:
        return [int(names[int(i)]) for i in rows.flatten().tolist()][:10]

    pixels = inputs.get("pixel_values")
    if pixels is None:
        if bool(rows_with_images.any()):
            raise ValueError(
                f"{kind} {named(torch.nonzero(rows_with_images))} hold image tokens (id {token}) but the batch has "
                "no pixel_values: the model would train on the image token's text embedding. Keep 'pixel_values' "
                "in the dataset and collator (and in the model's forward signature if remove_unused_columns=True)"
            )
        return
    if not isinstance(pixels, torch.Tensor) or pixels.dim() == 0:
        what = "a 0-d tensor" if isinstance(pixels, torch.Tensor) else type(pixels).__name__
        raise ValueError(f"pixel_values must be a tensor with a leading images (or patches) dimension; got {what}")
    grid = inputs.get("image_grid_thw")
    if grid is not None:
        image_rows = _grid_image_rows(model, pixels, grid, tokens_per_row, named, kind)
    elif pixels.dim() == 4:
        image_rows = _llava_image_rows(model, pixels, tokens_per_row, named, kind)
    else:
        image_rows = None
    bad = ~torch.isfinite(pixels.flatten(1) if pixels.dim() > 1 else pixels[:, None]).all(dim=1)
    if not bool(bad.any()):
        return
    if image_rows is None:  # which image belongs to which row is the model's business: name every candidate
        raise ValueError(
            f"the batch has non-finite pixel values (NaN or inf) in an image of {kind} "
            f"{named(torch.nonzero(rows_with_images))}"
        )
    if grid is not None:  # patches -> images
        patches = grid.long().prod(dim=1).tolist()
        bad = torch.stack([part.any() for part in torch.split(bad, patches)])
    offenders = torch.unique(image_rows[bad.to(image_rows.device)])
    raise ValueError(f"{kind} {named(offenders)} have non-finite pixel values (NaN or inf)")


def _llava_image_rows(model, pixels, tokens_per_row, named, kind) -> torch.Tensor:
    """``(images, C, H, W)``: images of one size, so each fills the same number of image tokens and a row holds
    a whole number of images (several per row are fine: multi-image examples, crops); the row of each image."""
    expected = image_shape(model)
    if expected is not None and tuple(pixels.shape[1:]) != expected:
        raise ValueError(
            f"pixel_values have images of shape {tuple(pixels.shape[1:])}; the vision tower takes {expected} "
            "(channels, height, width)"
        )
    images, tokens = pixels.shape[0], int(tokens_per_row.sum())
    if images == tokens == 0:  # a text-only batch with an empty image tensor
        return torch.zeros(0, dtype=torch.long, device=tokens_per_row.device)
    per_image = tokens // images if images and tokens % images == 0 else 0
    if per_image == 0 or bool((tokens_per_row % per_image).any()):
        odd = tokens_per_row % per_image != 0 if per_image else tokens_per_row > 0
        raise ValueError(
            f"the batch has {images} images for {tokens} image tokens: every image fills the same number of image "
            f"tokens, so each row must hold a whole number of images' tokens; {kind} that do not: "
            f"{named(torch.nonzero(odd)) or named(torch.nonzero(tokens_per_row == 0))}"
        )
    rows = torch.arange(tokens_per_row.numel(), device=tokens_per_row.device)
    return torch.repeat_interleave(rows, tokens_per_row // per_image)


def _grid_image_rows(model, pixels, grid, tokens_per_row, named, kind) -> torch.Tensor:
    """Patch sequences described by ``image_grid_thw``: check the counts, return the row of each image."""
    grid = torch.as_tensor(grid)
    if grid.dim() != 2 or grid.shape[1] != 3:
        raise ValueError(f"image_grid_thw must be (images, 3): (t, h, w) per image; got {tuple(grid.shape)}")
    patches = grid.long().prod(dim=1)
    if pixels.dim() != 2 or pixels.shape[0] != int(patches.sum()):
        raise ValueError(
            f"pixel_values of shape {tuple(pixels.shape)} do not hold the {int(patches.sum())} patches that "
            f"image_grid_thw describes ({grid.shape[0]} images; expected (patches, patch_dim))"
        )
    image_ends = torch.cumsum(_tokens_per_image(model, grid), 0).to(tokens_per_row.device)
    row_ends = torch.cumsum(tokens_per_row, 0)
    # A row's image tokens must end exactly where one of the batch's images ends (images fill rows in order).
    misaligned = (tokens_per_row > 0) & ~torch.isin(row_ends, image_ends) & (image_ends.numel() > 0)
    image_tokens = int(image_ends[-1]) if image_ends.numel() else 0
    if bool(misaligned.any()) or int(row_ends[-1]) != image_tokens:
        which = (
            f"{kind} whose image tokens end inside an image: {named(torch.nonzero(misaligned))}"
            if bool(misaligned.any())  # else the grid does not say which row lacks (or has extra) tokens
            else f"{kind} with image tokens: {named(torch.nonzero(tokens_per_row > 0))}"
        )
        raise ValueError(
            f"the batch has {int(row_ends[-1])} image tokens but its {grid.shape[0]} images (image_grid_thw, "
            f"spatial_merge_size {spatial_merge(model)}) make {image_tokens}; {which}"
        )
    return torch.searchsorted(row_ends, image_ends)


def image_feature_tap(model: torch.nn.Module) -> Tap:
    """A :class:`~dataflex.taps.Tap` on the projector's output (what the language model receives for the
    images); :func:`pool_image_features` turns it into one row per image."""
    return Tap(projector(model), "output", lambda out: out.detach().float())


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
        grid = {"image_grid_thw": batch["image_grid_thw"].to(device)} if "image_grid_thw" in batch else {}
        with eval_mode(model), image_feature_tap(model) as tap:
            model.get_image_features(pixel_values=pixels.to(device), **grid)
            features = pool_image_features(model, tap.pop(), grid)
        rows = batch["input_ids"].shape[0] if "input_ids" in batch else features.shape[0]
        if features.shape[0] != rows:
            raise ValueError(f"image embeddings need one image per example; got {features.shape[0]} for {rows}")
        return features

    return embed
