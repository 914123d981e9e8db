"""Measurement helpers for the digits-VQA testbed runs (the VLM recipe and benchmark).

* :class:`NoiseCounter` — the share of what a run trained on that had a wrong answer (the testbed knows
  its noise mask);
* :func:`holdout_signals` — a holdout model trained on the validation split, cached by its settings and
  data: its per-example losses on the pool (RHO-LOSS's irreducible losses) and image clusters;
* :class:`MeasurementRecord` — keeps what those callbacks measured beside each checkpoint, so a resumed run
  reports the whole run's figures;
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

from dataflex.state import open_checked, read_json_checked, write_checked, write_json_checked
from dataflex.weighting import ExampleWeightedLoss

__all__ = ["DetectionProbe", "MeasurementRecord", "NoiseCounter", "holdout_signals", "training_args"]


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


class MeasurementRecord(TrainerCallback):
    """Keeps a :class:`NoiseCounter`'s and a :class:`DetectionProbe`'s measurements with every checkpoint.

    Both live in memory: a run resumed from a checkpoint reported only the steps after it (a noisy share of 0.0
    when the checkpoint was the run's last, and no detection at the warm-up step). The record is written, atomically,
    at the end of each step the Trainer is about to checkpoint (``control.should_save``), before the checkpoint
    itself exists, so every checkpoint a resume can use has its record (``<output_dir>/measurements/step-<n>.json``).
    Place it after the counter and the probe, which then have measured that step.
    """

    def __init__(self, counter: NoiseCounter, probe: DetectionProbe) -> None:
        self.counter, self.probe = counter, probe

    @staticmethod
    def path(output_dir: str | Path, step: int) -> Path:
        return Path(output_dir) / "measurements" / f"step-{step}.json"

    def on_step_end(self, args, state, control, **kwargs):
        if control.should_save and state.is_world_process_zero:
            record = {"per_step": self.counter.per_step, "by_step": self.probe.by_step}
            path = self.path(args.output_dir, state.global_step)
            path.parent.mkdir(parents=True, exist_ok=True)
            # (with a digest beside it: a changed digit would still parse and be reported as the run's share)
            write_json_checked(path, record)

    def restore(self, checkpoint: str | Path) -> None:
        """Take the measurements up to ``checkpoint`` (a ``checkpoint-<step>`` folder) before resuming from it."""
        checkpoint = Path(checkpoint)
        path = self.path(checkpoint.parent, int(checkpoint.name.split("-")[-1]))
        if not path.is_file():
            raise ValueError(
                f"{checkpoint} has no measurement record ({path}): the resumed run could report only the steps after "
                "it. Delete the run folder to run it afresh"
            )
        try:
            record = read_json_checked(path)
        except ValueError as err:
            raise ValueError(f"{path} is damaged ({err}); delete the run folder to run it afresh") from err
        self.counter.per_step = [tuple(row) for row in record["per_step"]]
        self.probe.by_step = {int(step): found for step, found in record["by_step"].items()}


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
