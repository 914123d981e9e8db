"""Measurement helpers for the digits-VQA testbed runs (the VLM recipe and benchmark).

* :class:`NoiseCounter` — the share of what a run trained on that had a wrong answer (the testbed knows
  its noise mask);
* :func:`holdout_signals` — a holdout model trained on the validation split, cached by its settings and
  data: its per-example losses on the pool (RHO-LOSS's irreducible losses) and image clusters;
* :func:`training_args` — the Trainer settings these runs share.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import Trainer, TrainerCallback, TrainingArguments

from dataflex.state import open_checked, write_checked
from dataflex.weighting import ExampleWeightedLoss

__all__ = ["NoiseCounter", "holdout_signals", "training_args"]


class NoiseCounter(TrainerCallback):
    """Per step, how much of what was trained on had a wrong answer (weighted by loss weight if given)."""

    def __init__(self, dfx: Any, noisy: np.ndarray, weighted: ExampleWeightedLoss | None = None) -> None:
        self.dfx, self.noisy, self.weighted = dfx, noisy, weighted
        self.per_step: list[tuple[int, float, float]] = []  # step, noisy mass, total mass

    def on_step_end(self, args, state, control, **kwargs):
        ids, _, _ = self.dfx.last_step_records()
        w = np.ones(len(ids)) if self.weighted is None else self.weighted.last_weights.detach().cpu().numpy()
        self.per_step.append((state.global_step, float(w[self.noisy[ids]].sum()), float(w.sum())))

    def share(self, after: int = 0) -> float:
        rows = [r for r in self.per_step if r[0] > after]
        return sum(r[1] for r in rows) / max(sum(r[2] for r in rows), 1e-12)


class DetectionProbe(TrainerCallback):
    """Detection quality of every detector on the run's training-dynamics record at chosen steps (after
    dataflex's own on_step_end has gathered the record at its update steps)."""

    def __init__(self, dfx: Any, noisy: np.ndarray, steps: tuple[int, ...], classes: np.ndarray | None = None) -> None:
        self.dfx, self.noisy, self.steps, self.classes = dfx, noisy, steps, classes
        self.by_step: dict[int, dict[str, dict[str, float]]] = {}

    def measure(self) -> dict[str, dict[str, float]]:
        """Every detector's quality; with ``classes``, also its class-conditional form
        (key ``"<name> (class-conditional)"``)."""
        from dataflex.detectors import DETECTORS, detection_quality, noise_scores

        self.dfx.dynamics.gather()  # collective, like dataflex's own gathers; every rank runs this callback
        out = {d: detection_quality(noise_scores(self.dfx.dynamics, d), self.noisy) for d in DETECTORS}
        if self.classes is not None:
            for d in DETECTORS:
                out[f"{d} (class-conditional)"] = detection_quality(
                    noise_scores(self.dfx.dynamics, d, self.classes), self.noisy
                )
        return out

    def on_step_end(self, args, state, control, **kwargs):
        if self.dfx.dynamics is not None and state.global_step in self.steps:
            self.by_step[state.global_step] = self.measure()


def training_args(
    out: Path, *, seed: int, steps: int, batch_size: int, lr: float, save_steps: int | None = None
) -> TrainingArguments:
    return TrainingArguments(
        output_dir=str(out),
        per_device_train_batch_size=batch_size,
        max_steps=steps,
        learning_rate=lr,
        warmup_steps=max(1, steps // 50),
        lr_scheduler_type="cosine",
        logging_steps=10**6,
        report_to=[],
        use_cpu=True,
        seed=seed,
        disable_tqdm=True,
        save_strategy="steps" if save_steps else "no",
        save_steps=save_steps or 500,
    )


def holdout_signals(
    data: dict[str, Any], work: Path, *, steps: int, batch_size: int, lr: float, clusters: int, seed: int = 0
) -> dict[str, Any]:
    """Irreducible losses and image clusters of the training pool from a model trained on the validation split.

    The holdout model (RHO-LOSS's irreducible-loss model) is trained once and cached under ``work`` in a
    folder named by its training settings (so a changed setting never reuses a stale model), as are its
    pool scores (crash-resumable).
    """
    from dataflex.clustering import kmeans
    from dataflex.offline import score_pool
    from dataflex.proxies.irreducible import pool_losses
    from dataflex.testbeds.digits import collate_vlm
    from dataflex.testbeds.tiny import tiny_llava
    from dataflex.vlm import image_feature_embedder

    data_key = json.dumps(
        [list(data["validation"]["image"]), list(data["validation"]["answer"]), list(data["train"]["image"])]
    )
    data_key = hashlib.sha1(data_key.encode()).hexdigest()[:8]  # split and noise of the data it saw / scores
    folder = work / f"holdout_{steps}x{batch_size}_lr{lr:g}_{data_key}"
    path = folder / "model.pt"
    model = tiny_llava(seed=1000)
    if path.is_file():
        model.load_state_dict(torch.load(open_checked(path), weights_only=True))
    else:
        args = training_args(folder, seed=1000, steps=steps, batch_size=batch_size, lr=lr)
        Trainer(model=model, args=args, train_dataset=data["validation"], data_collator=collate_vlm).train()
        path.parent.mkdir(parents=True, exist_ok=True)
        write_checked(path, lambda f: torch.save(model.state_dict(), f))  # a kill mid-save leaves no half model
    train = data["train"]
    irreducible = pool_losses(model, train, collate_vlm, batch_size=128, cache=folder / "irreducible.npz")
    features = score_pool(
        image_feature_embedder(model),
        train,
        collate_vlm,
        batch_size=128,
        cache=folder / "image_features.npz",
        desc="image features",
    )
    fit = kmeans(np.asarray(features, dtype=np.float32), clusters, seed=seed)
    digits = np.asarray(train["digit"])
    purity = sum(np.bincount(digits[fit.labels == c]).max() for c in np.unique(fit.labels)) / len(digits)
    return {
        "irreducible": np.asarray(irreducible),
        "clusters": [f"c{c}" for c in fit.labels.tolist()],
        "cluster_digit_purity": float(purity),
    }
