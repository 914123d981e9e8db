"""Recipe: finetune a tiny LLaVA-style VLM on digits VQA with noisy answers, under a dataflex data policy.

    python -m dataflex.recipes.vlm method=rho noise=0.3 seed=1
    python -m dataflex.recipes.vlm clean_with=last_loss hydra.run.dir=stage1       # two-stage cleaning:
    python -m dataflex.recipes.vlm method=subset subset_file=stage1/kept_ids.json  # train on what it kept
    python -m dataflex.recipes.vlm -m method=uniform,loss_easy,rho,reweight,clusters seed=0,1,2

A stock ``transformers.Trainer`` trains :func:`dataflex.testbeds.tiny.tiny_llava` (CLIP vision tower ->
projector -> Llama over bytes, built from config) on :func:`dataflex.testbeds.digits.digits_vqa`; the method
decides what it trains on (see :data:`METHODS`). Checkpoints go to the Hydra run folder every
``save_steps``; rerunning the same command resumes from the last one (model, optimizer, sampler and
selection state). ``results.json`` there holds clean test accuracy/loss and the share of noisy
examples trained on. ``benchmarks/vlm/run.py`` runs this recipe for several methods and seeds.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np
from transformers import Trainer

from dataflex.detectors import DropNoisy, noise_scores
from dataflex.domains import encode_domains
from dataflex.hf.callbacks import DataFlexCallback, DataFlexSelectCallback
from dataflex.hf.checkpoint import last_complete_checkpoint
from dataflex.offline import read_subset, write_subset
from dataflex.policies import Uniform
from dataflex.selectors import FixedSubset, LossFocus, RhoLoss
from dataflex.state import DatasetFingerprint, write_text_atomic
from dataflex.suspects import suspects_table
from dataflex.testbeds.vlm_runs import (
    DetectionProbe,
    MeasurementRecord,
    NoiseCounter,
    holdout_signals,
    training_args,
)
from dataflex.weighting import ExampleWeightedLoss

#: method -> what decides the training data
METHODS = {
    "uniform": "DataFlexCallback(Uniform()) over the question types",
    "loss_hard": "DataFlexSelectCallback(LossFocus(fraction, 'hard')): highest current loss",
    "loss_easy": "DataFlexSelectCallback(LossFocus(fraction, 'easy')): lowest current loss",
    "loss_easy_mean": "LossFocus(fraction, 'easy', history='mean'): lowest loss averaged over the re-selections",
    "rho": "RHO-LOSS (arXiv 2206.07137): current minus irreducible loss (holdout-trained model)",
    "reweight": "ExampleWeightedLoss(direction='easy'): weights ∝ exp(-z / T) in backprop",
    "clusters": "cluster-balanced over faiss k-means of projected image features (holdout model)",
    "aum": "DropNoisy('aum', drop=1 - fraction): leave out the lowest area-under-margin share (arXiv 2001.10528)",
    "cartography": "DropNoisy('cartography', drop=1 - fraction): lowest mean confidence out (arXiv 2009.10795)",
    "last_loss": "DropNoisy('last_loss', drop=1 - fraction): highest loss at the latest visit out (arXiv 1804.06872)",
    "clean_oracle": "reference, not a method: FixedSubset of the examples whose answer is right (reads the noise mask)",
    "subset": "FixedSubset(signals['subset']): given ids, e.g. those a cleaning run kept (two-stage cleaning)",
}


# Settings that do not change a run's result: left out of its folder name (configs/*.yaml, hydra exclude_keys)
# and of the settings its folder records (dataflex.run_folder); a test keeps the two lists equal.
SAME_RESULT = ("save_steps", "work_dir")
SUSPECTS = 30  # examples listed in a cleaning run's suspects.md


def method_callback(
    method: str,
    train: Any,
    signals: dict[str, Any],
    *,
    fraction: float,
    update_every: int,
    warmup: int,
    temperature: float,
    per_label: bool = True,
    label_by: str = "question",
    class_conditional: bool = True,
) -> tuple[DataFlexCallback, ExampleWeightedLoss | None]:
    """The dataflex callback (and loss weighting, for ``reweight``) that implements ``method``.

    Selection arms group the pool by ``label_by`` for ``per_label``: ``"question"`` (question type) or
    ``"question_answer"`` (question type and given answer). The second stops a loss ranking from
    preferring the answer the model currently predicts most often (a model that cannot yet read parity
    from the image gives every "even" the same loss), so within a group the loss reflects the image.
    ``class_conditional`` makes the detector arms (``aum``, ``cartography``, ``last_loss``) compare each
    noise score within its question type and given answer (:func:`dataflex.detectors.standardised_within`).
    """
    if label_by not in ("question", "question_answer"):
        raise ValueError(f"label_by={label_by!r}; valid values are 'question', 'question_answer'")
    domains = train["domain"]
    groups = domains if label_by == "question" else answer_classes(train).tolist()
    selection = {"update_every": update_every, "warmup_steps": warmup}
    if method == "uniform":  # its training-dynamics record measures every detector after plain training
        return DataFlexCallback(Uniform(), domains=domains, update_every=update_every, dynamics=True), None
    if method in ("aum", "cartography", "last_loss"):
        classes = answer_classes(train) if class_conditional else None
        rule = DropNoisy(method, drop=1.0 - fraction, per_label=per_label, classes=classes)
        return DataFlexSelectCallback(rule, groups, **selection), None
    if method in ("loss_hard", "loss_easy", "loss_easy_mean"):
        history = "mean" if method.endswith("_mean") else "last"
        rule = LossFocus(fraction, method.split("_")[1], per_label=per_label, history=history)
        return DataFlexSelectCallback(rule, groups, **selection), None
    if method == "rho":
        rule = RhoLoss(fraction, signals["irreducible"], per_label=per_label)
        return DataFlexSelectCallback(rule, groups, **selection), None
    if method == "reweight":
        return (
            DataFlexCallback(Uniform(), domains=domains, update_every=update_every),
            ExampleWeightedLoss(temperature=temperature, direction="easy"),
        )
    if method == "clusters":
        clusters = signals["clusters"]
        return (
            DataFlexCallback(
                Uniform(), domains=clusters, domain_column=None, update_every=update_every, stratified=True
            ),
            None,
        )
    if method == "subset":
        return DataFlexSelectCallback(FixedSubset(np.asarray(signals["subset"])), domains, **selection), None
    if method == "clean_oracle":  # what perfect noise filtering would give at this budget (an upper reference)
        clean = np.flatnonzero(~np.asarray(train["noisy"], dtype=bool))
        return DataFlexSelectCallback(FixedSubset(clean), domains, **selection), None
    raise ValueError(f"unknown method {method!r}; valid: {list(METHODS)}")


def pool_fingerprint(train: Any) -> DatasetFingerprint:
    """The training pool's identity for subset files: every example's question type and given answer, in
    order (another data seed, noise rate or image count gives another fingerprint)."""
    codes, names = encode_domains(answer_classes(train).tolist())
    return DatasetFingerprint.from_labels(codes, names)


def answer_classes(train: Any) -> np.ndarray:
    """Each example's given label for class-conditional noise scores: its question type and given answer."""
    return np.array([f"{d}:{a}" for d, a in zip(train["domain"], train["answer"])])


def train_vlm(
    method: str,
    data: dict[str, Any],
    *,
    out: Path,
    seed: int = 0,
    steps: int = 1500,
    batch_size: int = 32,
    lr: float = 5e-4,
    fraction: float = 0.7,
    update_every: int = 100,
    warmup: int = 200,
    temperature: float = 1.0,
    per_label: bool = True,
    label_by: str = "question",
    class_conditional: bool = True,
    signals: dict[str, Any] | None = None,
    save_steps: int | None = None,
    resume: bool = False,
    cleaning: DropNoisy | None = None,
) -> dict[str, Any]:
    """Train one tiny LLaVA with ``method`` for ``steps`` and evaluate it on the clean test split.

    ``cleaning`` (uniform runs only): a :class:`DropNoisy` rule applied to the finished run's
    training-dynamics record; the ids it keeps are returned as ``kept_ids`` — the first stage of two-stage
    cleaning (the AUM paper's protocol: train, drop the flagged examples, train afresh on the rest with
    ``method="subset"``)."""
    from dataflex.testbeds.digits import answer_metrics, collate_vlm
    from dataflex.testbeds.tiny import tiny_llava

    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; valid: {list(METHODS)}")
    if method in ("rho", "clusters") and not signals:
        raise ValueError(f"method {method!r} needs holdout signals (see holdout_signals)")
    if method == "subset" and (signals is None or "subset" not in signals):
        raise ValueError("method 'subset' needs signals={'subset': ids} (e.g. a cleaning run's kept_ids)")
    if cleaning is not None and method != "uniform":
        raise ValueError(f"cleaning reads the record of a plain (uniform) run; method={method!r} selects its own data")
    train = data["train"]
    dfx, weighted = method_callback(
        method,
        train,
        signals or {},
        fraction=fraction,
        update_every=update_every,
        warmup=warmup,
        temperature=temperature,
        per_label=per_label,
        label_by=label_by,
        class_conditional=class_conditional,
    )
    counter = NoiseCounter(dfx, np.asarray(train["noisy"], dtype=bool), weighted)
    probe = DetectionProbe(dfx, np.asarray(train["noisy"], dtype=bool), steps=(warmup,), classes=answer_classes(train))
    extra = {"compute_loss_func": dfx.wrap_loss(weighted)} if weighted is not None else {}
    model = tiny_llava(seed=seed)
    args = training_args(out, seed=seed, steps=steps, batch_size=batch_size, lr=lr, save_steps=save_steps)
    record = MeasurementRecord(counter, probe)  # (after them: it keeps what they measured at a saved step)
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=train,
        data_collator=collate_vlm,
        callbacks=[dfx, counter, probe, record],
        **extra,
    )
    dfx.attach(trainer)
    checkpoint = last_complete_checkpoint(out) if resume else None  # (not one a kill left half-written)
    if checkpoint is not None:
        record.restore(checkpoint)
    start = time.perf_counter()
    trainer.train(resume_from_checkpoint=checkpoint)
    seconds = time.perf_counter() - start
    test = answer_metrics(model, data["test"])
    validation = answer_metrics(model, data["validation"])  # against its given (partly wrong) answers
    kinds = np.asarray(data["test"]["domain"])
    kept = suspects = None
    if cleaning is not None:
        dfx.dynamics.gather()  # the last steps' visits (collective, like dataflex's own gathers)
        kept = cleaning.keep_ids(dfx.dynamics, labels=np.asarray(train["domain"])).tolist()
        # What the rule ranks as most suspect, to read beside the kept ids (the testbed knows which are wrong).
        scores = noise_scores(dfx.dynamics, cleaning.detector, cleaning.classes)
        columns = {"question": train["domain"], "image": train["image"], "given answer": train["answer"]}
        suspects = suspects_table(scores, columns, top=SUSPECTS, known_wrong=np.asarray(train["noisy"], dtype=bool))
    return {
        "method": method,
        "seed": seed,
        "accuracy": test["accuracy"],
        "loss": test["mean_loss"],
        "validation_accuracy_given_answers": validation["accuracy"],
        "accuracy_by_question": {k: float(test["correct"][kinds == k].mean()) for k in sorted(set(kinds))},
        "noisy_share": counter.share(),
        "noisy_share_after_warmup": counter.share(after=warmup),
        "seconds": seconds,
        "resumed": checkpoint is not None,
        **({"kept_ids": kept, "suspects": suspects} if kept is not None else {}),
        # Noise detection on the run's training-dynamics record (runs that keep one): at the first selection
        # (step ``warmup``) and at the end. Only the uniform arm's end-of-run figure is free of selection bias.
        "detection": {
            "at_warmup": probe.by_step.get(warmup),
            "at_end": probe.measure() if getattr(dfx, "dynamics", None) is not None else None,
        },
    }


def _hydra_main() -> None:
    import hydra
    from hydra.core.hydra_config import HydraConfig
    from hydra.utils import to_absolute_path
    from omegaconf import DictConfig

    from dataflex.recipes.settings import check_vlm_settings, register_folder_resolver
    from dataflex.run_folder import claim_run_folder, config_settings
    from dataflex.testbeds.digits import digits_vqa

    register_folder_resolver()  # the config names the run's folder through it

    @hydra.main(config_path="../configs", config_name="vlm", version_base=None)
    def main(cfg: DictConfig) -> None:
        check_vlm_settings(cfg, METHODS, resolve=to_absolute_path)
        out = Path(HydraConfig.get().runtime.output_dir)
        claim_run_folder(out, config_settings(cfg, ignore=SAME_RESULT))
        data = digits_vqa(cfg.noise, seed=cfg.data_seed, num_images=cfg.num_images)
        signals, cleaning, pool = None, None, pool_fingerprint(data["train"])
        if cfg.clean_with is not None:
            classes = answer_classes(data["train"]) if cfg.class_conditional else None
            cleaning = DropNoisy(cfg.clean_with, drop=1.0 - cfg.fraction, per_label=cfg.per_label, classes=classes)
        if cfg.method == "subset":  # refused if the file was made on another pool (data seed, noise, images)
            signals = {"subset": read_subset(to_absolute_path(cfg.subset_file), pool)}
        if cfg.method in ("rho", "clusters"):
            signals = holdout_signals(
                data,
                Path(to_absolute_path(cfg.work_dir)),
                steps=cfg.holdout_steps,
                batch_size=cfg.batch_size,
                lr=cfg.lr,
                clusters=cfg.clusters,
                seed=cfg.data_seed,
            )
        result = train_vlm(
            cfg.method,
            data,
            out=out,
            seed=cfg.seed,
            steps=cfg.steps,
            batch_size=cfg.batch_size,
            lr=cfg.lr,
            fraction=cfg.fraction,
            update_every=cfg.update_every,
            warmup=cfg.warmup,
            temperature=cfg.temperature,
            per_label=cfg.per_label,
            label_by=cfg.label_by,
            class_conditional=cfg.class_conditional,
            signals=signals,
            save_steps=cfg.save_steps,
            resume=True,
            cleaning=cleaning,
        )
        if cleaning is not None:
            kept = result.pop("kept_ids")
            write_subset(
                out / "kept_ids.json", np.asarray(kept), pool=pool, method=cfg.clean_with, fraction=cfg.fraction
            )
            print(f"kept {len(kept)} of {len(data['train'])} examples -> {out / 'kept_ids.json'}")
            suspects = f"Most suspect training examples by {cfg.clean_with}: {result.pop('suspects')}"
            write_text_atomic(out / "suspects.md", suspects)
        write_text_atomic(out / "results.json", json.dumps(result, indent=1))
        print(
            f"{cfg.method} seed {cfg.seed}: clean test accuracy {result['accuracy']:.3f}, loss {result['loss']:.3f}, "
            f"noisy share trained on {result['noisy_share']:.3f} -> {out / 'results.json'}"
        )

    main()


if __name__ == "__main__":
    _hydra_main()
