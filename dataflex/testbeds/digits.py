"""Visual question answering on real handwritten digits, with known answer noise (the VLM testbed).

The images are scikit-learn's copy of the UCI handwritten digits (1,797 scans, 8 x 8 pixels, 16 grey
levels; ``sklearn.datasets.load_digits``, bundled with scikit-learn, nothing is downloaded), upsampled
bilinearly to ``image_size`` and scaled to [-1, 1]. Every image gets one question of each type below;
the question type is the example's ``domain``. Answers are written from the digit label. A fraction
``noise`` of the *training* answers is replaced by a wrong answer of the same type (as with noisy web
captions), and the column ``noisy`` records which — validation answers can be noisy too (they stand in
for a holdout set drawn like the training data), test answers never are.

Splits are by image (an image and all its questions sit in one split), drawn from ``seed``.

Sequence layout, one byte per text token (see :mod:`dataflex.testbeds.tiny`)::

    [image] x num_image_tokens  "what digit? "  "7"  <end>
    `------------- prompt: label -100 ---------'  `- answer: learnt and scored -'
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from dataflex.losses import IGNORE_INDEX
from dataflex.modes import eval_mode
from dataflex.testbeds.tiny import PAD_ID, collate_causal

__all__ = [
    "DIGIT_WORDS",
    "IMAGE_TOKEN_ID",
    "QUESTIONS",
    "SPLITS",
    "VLM_VOCAB_SIZE",
    "answer_metrics",
    "collate_vlm",
    "digit_images",
    "digits_vqa",
    "encode_vqa",
    "split_images",
]

IMAGE_TOKEN_ID = 257  # one past the byte vocabulary's pad/end id
VLM_VOCAB_SIZE = 258

DIGIT_WORDS = [str(d) for d in range(10)]


def _answer(kind: str, digit: int) -> str:
    if kind == "digit":
        return str(digit)
    if kind == "parity":
        return "even" if digit % 2 == 0 else "odd"
    if kind == "big":
        return "yes" if digit > 4 else "no"
    if kind == "next":
        return str((digit + 1) % 10)
    raise KeyError(kind)


#: question type -> (question text, every possible answer)
QUESTIONS: dict[str, tuple[str, list[str]]] = {
    "digit": ("what digit? ", DIGIT_WORDS),
    "parity": ("even or odd? ", ["even", "odd"]),
    "big": ("more than four? ", ["yes", "no"]),
    "next": ("which digit comes next? ", DIGIT_WORDS),
}
SPLITS = ("train", "validation", "test")


def digit_images(image_size: int = 16) -> tuple[torch.Tensor, np.ndarray]:
    """All 1,797 digit scans as ``(n, 1, image_size, image_size)`` floats in [-1, 1], and their labels."""
    from sklearn.datasets import load_digits

    if image_size < 8:
        raise ValueError(f"image_size must be >= 8 (the scans are 8 x 8); got {image_size}")
    digits = load_digits()
    raw = torch.as_tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    images = torch.nn.functional.interpolate(raw, size=(image_size, image_size), mode="bilinear", align_corners=False)
    return images * 2.0 - 1.0, np.asarray(digits.target, dtype=np.int64)


def split_images(n: int, fractions: Sequence[float], seed: int) -> dict[str, np.ndarray]:
    """Disjoint, seeded image indices per split (train / validation / test)."""
    if len(fractions) != 3 or any(f <= 0 for f in fractions) or abs(sum(fractions) - 1) > 1e-9:
        raise ValueError(f"fractions must be three positive numbers summing to 1; got {list(fractions)}")
    order = np.random.default_rng(np.random.SeedSequence([seed, 11])).permutation(n)
    cut1 = int(round(fractions[0] * n))
    cut2 = cut1 + int(round(fractions[1] * n))
    return {"train": np.sort(order[:cut1]), "validation": np.sort(order[cut1:cut2]), "test": np.sort(order[cut2:])}


def encode_vqa(question: str, answer: str, num_image_tokens: int) -> tuple[list[int], int]:
    """Token ids of ``[image]*k question answer <end>`` and the prompt length (image + question)."""
    prompt = [IMAGE_TOKEN_ID] * num_image_tokens + list(question.encode("utf-8"))
    return prompt + list(answer.encode("utf-8")) + [PAD_ID], len(prompt)


def digits_vqa(
    noise: float = 0.3,
    *,
    seed: int = 0,
    image_size: int = 16,
    num_image_tokens: int = 16,
    fractions: Sequence[float] = (0.6, 0.2, 0.2),
    num_images: int | None = None,
    question_types: Sequence[str] | None = None,
    noisy_splits: Sequence[str] = ("train", "validation"),
) -> dict[str, Any]:
    """The three splits as ``datasets.Dataset`` objects.

    Columns: ``input_ids``, ``labels`` (-100 on the image and the question, so the mask survives the
    Trainer's ``remove_unused_columns``), ``prompt_len``, ``pixel_values`` (``1 x image_size x image_size``),
    ``domain`` (question type), ``digit``, ``image`` (index into the scans), ``answer`` (as trained
    on), ``true_answer`` and ``noisy`` (1 when ``answer`` is wrong on purpose). ``num_images`` keeps
    only the first scans (a small problem for tests and smoke runs).
    """
    from datasets import Dataset

    if not 0.0 <= noise < 1.0:
        raise ValueError(f"noise must be in [0, 1); got {noise!r}")
    kinds = list(QUESTIONS) if question_types is None else list(question_types)
    unknown = [k for k in kinds if k not in QUESTIONS]
    if unknown or not kinds:
        raise ValueError(f"unknown question types {unknown or kinds}; valid: {list(QUESTIONS)}")
    bad_splits = [s for s in noisy_splits if s not in SPLITS]
    if bad_splits:
        raise ValueError(f"noisy_splits {bad_splits} are not splits; valid: {list(SPLITS)}")
    images, digit_labels = digit_images(image_size)
    if num_images is not None:  # a smaller problem for tests and smoke runs: the first scans
        if not 3 <= num_images <= len(digit_labels):
            raise ValueError(f"num_images must be between 3 and {len(digit_labels)}; got {num_images}")
        images, digit_labels = images[:num_images], digit_labels[:num_images]
    out: dict[str, Any] = {}
    for split, image_ids in split_images(len(digit_labels), fractions, seed).items():
        rng = np.random.default_rng(np.random.SeedSequence([seed, SPLITS.index(split), 23]))
        rows: dict[str, list] = {
            k: []
            for k in (
                "input_ids",
                "labels",
                "prompt_len",
                "pixel_values",
                "domain",
                "digit",
                "image",
                "answer",
                "true_answer",
                "noisy",
            )
        }
        for i in image_ids.tolist():
            digit = int(digit_labels[i])
            pixels = images[i].tolist()
            for kind in kinds:
                question, choices = QUESTIONS[kind]
                truth = _answer(kind, digit)
                noisy = split in noisy_splits and rng.random() < noise
                answer = str(rng.choice([c for c in choices if c != truth])) if noisy else truth
                ids, prompt_len = encode_vqa(question, answer, num_image_tokens)
                target = [IGNORE_INDEX] * prompt_len + ids[prompt_len:]
                example = {
                    "input_ids": ids,
                    "labels": target,
                    "prompt_len": prompt_len,
                    "pixel_values": pixels,
                    "domain": kind,
                    "digit": digit,
                    "image": i,
                    "answer": answer,
                    "true_answer": truth,
                    "noisy": int(noisy),
                }
                for key, value in example.items():
                    rows[key].append(value)
        out[split] = Dataset.from_dict(rows)
    return out


def collate_vlm(features: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """:func:`~dataflex.testbeds.tiny.collate_causal` plus stacked ``pixel_values``; image tokens never get a label.

    Raises ``ValueError`` naming the position in the batch when an example has no image, an image of
    another shape than the first, or non-finite pixels.
    """
    pixels = []
    for position, f in enumerate(features):
        value = f.get("pixel_values")
        if value is None:
            raise ValueError(f"example {position} of this batch has no 'pixel_values' (keys: {sorted(f)})")
        tensor = torch.as_tensor(value, dtype=torch.float32)
        if pixels and tensor.shape != pixels[0].shape:
            raise ValueError(
                f"example {position} of this batch has an image of shape {tuple(tensor.shape)}; the batch's first "
                f"image has shape {tuple(pixels[0].shape)} (expected channels x height x width, all alike)"
            )
        if tensor.dim() != 3:
            shape = tuple(tensor.shape)
            raise ValueError(f"example {position}: pixel_values must be channels x height x width; got {shape}")
        if not torch.isfinite(tensor).all():
            raise ValueError(f"example {position} of this batch has non-finite pixel values")
        pixels.append(tensor)
    batch = collate_causal(features)
    batch["labels"] = batch["labels"].masked_fill(batch["input_ids"] == IMAGE_TOKEN_ID, IGNORE_INDEX)
    batch["pixel_values"] = torch.stack(pixels)
    return batch


@torch.no_grad()
def answer_metrics(model: torch.nn.Module, dataset: Any, batch_size: int = 128) -> dict[str, Any]:
    """Per-example answer loss (token mean) and exact-match accuracy (argmax of every answer token), eval mode.

    Returns arrays ``loss`` and ``correct`` in dataset order plus their means ``mean_loss`` and ``accuracy``.
    """
    from dataflex.batching import model_inputs
    from dataflex.losses import per_example_token_loss

    device = next(model.parameters()).device
    losses, correct = [], []
    with eval_mode(model):
        for start in range(0, len(dataset), batch_size):
            batch = collate_vlm([dataset[i] for i in range(start, min(start + batch_size, len(dataset)))])
            labels = batch["labels"].to(device)
            logits = model(**model_inputs(batch, device)).logits
            loss, _ = per_example_token_loss(logits, labels)
            target, guess = labels[:, 1:], logits[:, :-1].argmax(-1)
            scored = target != IGNORE_INDEX
            correct.append(((guess == target) | ~scored).all(1).cpu().numpy())
            losses.append(loss.float().cpu().numpy())
    loss_arr, correct_arr = np.concatenate(losses), np.concatenate(correct)
    return {
        "loss": loss_arr,
        "correct": correct_arr,
        "mean_loss": float(loss_arr.mean()),
        "accuracy": float(correct_arr.mean()),
    }
