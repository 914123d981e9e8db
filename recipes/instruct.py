"""Recipe: finetune on instructions with swapped (wrong) responses, with or without a noise detector.

    python -m dataflex.recipes.instruct detector=aum seed=1
    python -m dataflex.recipes.instruct -m detector=none,aum,cartography,loss,out_of_fold,prompt_support seed=0,1,2

A stock ``transformers.Trainer`` finetunes a byte-level GPT-2 on
:func:`dataflex.testbeds.noisy_instruct.noisy_instructions` (a share of responses replaced by another
example's of the same task; the mask is used for scoring only). The ``detector`` config group decides what
is trained on (see :data:`DETECTORS`). Checkpoints go to the Hydra run folder every ``save_steps``;
rerunning the same command resumes from the newest complete one. ``final_model.pt`` there holds the trained
weights, ``results.json`` the clean validation and test loss per task, the share of wrong examples trained on
and the detection quality (AUROC, recall at the noise rate) against the known mask, and ``suspects.md`` the 30
examples the detector finds most suspect, with their text and whether each really was swapped
(:mod:`dataflex.suspects`). ``benchmarks/noisy_instruct/run.py`` runs this
recipe for every detector and several seeds.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import Trainer

from dataflex.detectors import DETECTORS as RECORD_DETECTORS
from dataflex.detectors import DropNoisy, detection_quality, keep_priority, noise_scores, out_of_fold_scores
from dataflex.hf.callbacks import DataFlexCallback, DataFlexSelectCallback
from dataflex.hf.checkpoint import last_complete_checkpoint
from dataflex.offline import score_pool, token_mean_losses
from dataflex.policies import Uniform
from dataflex.prompt_support import prompt_support_scores
from dataflex.run_folder import weights_summary
from dataflex.selection import select_top
from dataflex.selectors import FixedSubset
from dataflex.state import token_digest, write_checked, write_text_atomic
from dataflex.suspects import suspects_table
from dataflex.testbeds.tiny import collate_causal, task_losses, tiny_gpt2
from dataflex.testbeds.vlm_runs import DetectionProbe, MeasurementRecord, NoiseCounter, training_args

__all__ = ["DETECTORS", "keep_per_task", "train_instruct"]

# Settings that do not change a run's result: left out of its folder name (configs/*.yaml, hydra exclude_keys)
# and of the settings its folder records (dataflex.run_folder); a test keeps the two lists equal.
SAME_RESULT = ("save_steps",)
SUSPECTS = 30  # examples listed in a run's suspects.md

#: detector -> what decides the training data
DETECTORS = {
    "none": "DataFlexCallback(Uniform()) over the tasks; its training-dynamics record scores every detector",
    **{
        d: f"DropNoisy({d!r}, drop, per_label=True): re-decided every update_every steps from the record"
        for d in RECORD_DETECTORS
    },
    "out_of_fold": "k proxy runs, each scoring the fold it did not train on by loss; the top drop share left out",
    "prompt_support": "prompt_support_scores of the text (no model, no training); the top drop share left out",
    "clean_oracle": "reference, not a detector: FixedSubset of the examples whose response is right (reads the mask)",
}


def make_model(base: dict[str, torch.Tensor] | None, seed: int) -> torch.nn.Module:
    """The byte GPT-2 of the instruction benchmarks (2 layers, width 128), from ``base`` weights if given."""
    model = tiny_gpt2(n_layer=2, n_embd=128, n_head=4, n_positions=256, seed=seed)
    if base is not None:
        model.load_state_dict(base)
    return model


def keep_per_task(scores: np.ndarray, tasks: np.ndarray, drop: float) -> np.ndarray:
    """Ids kept when the ``drop`` share with the highest noise score of every task is left out; examples
    without a score (NaN: no evidence) are kept first, as :class:`~dataflex.detectors.DropNoisy` keeps the
    examples it never saw."""
    kept = []
    keep_score = keep_priority(scores)
    for task in np.unique(tasks):
        ids = np.flatnonzero(tasks == task)
        kept.append(ids[select_top(keep_score[ids], 1.0 - drop)])
    return np.sort(np.concatenate(kept))


def fold_losses(
    data: dict[str, Any], base: dict | None, *, out: Path, k: int, steps: int, batch_size: int, lr: float, seed: int
) -> np.ndarray:
    """Out-of-fold noise scores: each of ``k`` proxies trains ``steps`` on the other folds and gives the
    token-mean loss of every example of its own fold (cached per fold under ``out``)."""
    train = data["train"]

    def train_and_score(train_ids: np.ndarray, held_out: np.ndarray, fold: int) -> np.ndarray:
        model = make_model(base, seed)
        folder = out / f"fold{fold}"
        args = training_args(folder, seed=seed, steps=steps, batch_size=batch_size, lr=lr)
        Trainer(model=model, args=args, train_dataset=train.select(train_ids), data_collator=collate_causal).train()
        return score_pool(token_mean_losses(model), train.select(held_out), collate_causal, progress=False)

    key = {
        "data": token_digest(train),
        "prompt_len": token_digest(train, "prompt_len"),  # (the loss counts response tokens only)
        "base": None if base is None else weights_summary(make_model(base, seed)),
        "steps": steps,
        "batch_size": batch_size,
        "lr": lr,
    }
    return out_of_fold_scores(len(train), k, train_and_score, seed=seed, cache=out / "scores", cache_key=key)


def detector_callback(
    detector: str,
    data: dict[str, Any],
    *,
    drop: float,
    update_every: int,
    warmup: int,
    offline_scores: np.ndarray | None,
) -> DataFlexCallback:
    # Labels come from the dataset's own "task" column, so dataflex checks them against what the Trainer sees.
    by_task = {"label_column": "task"}
    if detector == "none":
        return DataFlexCallback(Uniform(), domain_column="task", update_every=update_every, dynamics=True)
    selection = {"update_every": update_every, "warmup_steps": warmup, **by_task}
    if detector in RECORD_DETECTORS:
        return DataFlexSelectCallback(DropNoisy(detector, drop=drop, per_label=True), **selection)
    if detector in ("out_of_fold", "prompt_support"):
        if offline_scores is None:
            raise ValueError(f"detector={detector!r} needs its offline scores (see fold_losses, prompt_support_scores)")
        keep = keep_per_task(offline_scores, np.asarray(data["train"]["task"]), drop)
        return DataFlexSelectCallback(FixedSubset(keep), update_every=update_every, **by_task)
    if detector == "clean_oracle":
        clean = np.flatnonzero(~np.asarray(data["noisy"], dtype=bool))
        return DataFlexSelectCallback(FixedSubset(clean), update_every=update_every, **by_task)
    raise ValueError(f"unknown detector {detector!r}; valid: {list(DETECTORS)}")


def train_instruct(
    detector: str,
    data: dict[str, Any],
    *,
    out: Path,
    base: dict[str, torch.Tensor] | None = None,
    seed: int = 0,
    steps: int = 400,
    batch_size: int = 16,
    lr: float = 1e-3,
    drop: float = 0.3,
    update_every: int = 50,
    warmup: int = 100,
    folds: int = 3,
    fold_steps: int = 200,
    save_steps: int | None = None,
    evaluate_test: bool = True,
    folds_dir: Path | None = None,
    analyzer: str = "char_wb",
) -> dict[str, Any]:
    """Train one run with ``detector`` for ``steps`` (resuming from ``out`` if it holds a checkpoint) and
    measure it: clean validation (and test) loss per task, wrong share trained on, detection quality.
    ``folds_dir`` (default ``out / "folds"``) caches the out-of-fold proxies' scores; runs that differ only in
    ``drop`` can share it. ``analyzer`` is prompt_support's text similarity (``dataflex.prompt_support``)."""
    if detector not in DETECTORS:
        raise ValueError(f"unknown detector {detector!r}; valid: {list(DETECTORS)}")
    noisy = np.asarray(data["noisy"], dtype=bool)
    scores = None
    if detector == "out_of_fold":
        scores = fold_losses(
            data,
            base,
            out=folds_dir or out / "folds",
            k=folds,
            steps=fold_steps,
            batch_size=batch_size,
            lr=lr,
            seed=seed,
        )
    if detector == "prompt_support":
        text = data["train_text"]
        scores = prompt_support_scores(text["prompts"], text["responses"], text["tasks"], analyzer=analyzer, seed=seed)
    dfx = detector_callback(detector, data, drop=drop, update_every=update_every, warmup=warmup, offline_scores=scores)
    counter = NoiseCounter(dfx, noisy)
    probe = DetectionProbe(dfx, noisy, steps=(warmup,))
    record = MeasurementRecord(counter, probe)  # (after them: it keeps what they measured at a saved step)
    model = make_model(base, seed)
    args = training_args(out, seed=seed, steps=steps, batch_size=batch_size, lr=lr, save_steps=save_steps)
    args.save_total_limit = 2  # a resume needs the newest complete checkpoint only; keep one spare
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=data["train"],
        data_collator=collate_causal,
        callbacks=[dfx, counter, probe, record],
    )
    dfx.attach(trainer)
    resume = last_complete_checkpoint(out)
    if resume is not None:
        record.restore(resume)
    start = time.perf_counter()
    trainer.train(resume_from_checkpoint=resume)
    seconds = time.perf_counter() - start
    # What a later test evaluation loads: whole or not at all (a rerun of a finished run writes it again), with a
    # digest beside it, so a damaged copy is refused rather than evaluated (dataflex.state.open_checked).
    write_checked(out / "final_model.pt", lambda f: torch.save(model.state_dict(), f))
    detection: dict[str, Any] = {}
    if dfx.dynamics is not None:  # the record's detectors, at the first decision and at the end
        detection = {"at_warmup": probe.by_step.get(warmup), "at_end": probe.measure()}
    if scores is not None:
        detection = {"at_end": {detector: detection_quality(scores, noisy)}}
    if detector in RECORD_DETECTORS:  # (the record was gathered by the detection probe above)
        scores = noise_scores(dfx.dynamics, detector)
    if scores is not None:  # what the detector finds most suspect, to read (and here, the known truth beside it)
        text = data["train_text"]
        columns = {"task": text["tasks"], "prompt": text["prompts"], "response": text["responses"]}
        table = suspects_table(scores, columns, top=SUSPECTS, known_wrong=noisy)
        write_text_atomic(out / "suspects.md", f"Most suspect training examples, detector={detector}: {table}")
    validation = task_losses(model, data["validation"])
    test = task_losses(model, data["test"]) if evaluate_test else {}
    return {
        "detector": detector,
        "seed": seed,
        "validation_loss": validation,
        "mean_validation_loss": float(np.mean(list(validation.values()))),
        "test_loss": test,
        "mean_test_loss": float(np.mean(list(test.values()))) if test else None,
        "noisy_share": counter.share(),
        "noisy_share_after_warmup": counter.share(after=warmup),
        "detection": detection,
        "seconds": seconds,
        "resumed": resume is not None,
    }


def _hydra_main() -> None:
    import hydra
    from hydra.core.hydra_config import HydraConfig
    from hydra.utils import to_absolute_path
    from omegaconf import DictConfig

    from dataflex.recipes.settings import check_instruct_settings, register_folder_resolver
    from dataflex.run_folder import claim_run_folder, config_settings
    from dataflex.testbeds.noisy_instruct import noisy_instructions
    from dataflex.testbeds.tiny import default_data_dir

    register_folder_resolver()  # the config names the run's folder through it

    @hydra.main(config_path="../configs", config_name="instruct", version_base=None)
    def main(cfg: DictConfig) -> None:
        check_instruct_settings(cfg, DETECTORS, resolve=to_absolute_path)
        out = Path(HydraConfig.get().runtime.output_dir)
        claim_run_folder(out, config_settings(cfg, ignore=SAME_RESULT))
        data = noisy_instructions(
            to_absolute_path(cfg.data_dir) if cfg.data_dir else default_data_dir(),
            tasks=tuple(cfg.tasks),
            per_task=cfg.per_task,
            noise=cfg.noise,
            seed=cfg.data_seed,
        )
        base = torch.load(to_absolute_path(cfg.base)) if cfg.base else None
        d = cfg.detector
        result = train_instruct(
            d.name,
            data,
            out=out,
            base=base,
            seed=cfg.seed,
            steps=cfg.steps,
            batch_size=cfg.batch_size,
            lr=cfg.lr,
            drop=d.get("drop", 0.3),
            update_every=cfg.update_every,
            warmup=d.get("warmup", 0),
            folds=d.get("folds", 3),
            fold_steps=d.get("fold_steps", 200),
            save_steps=cfg.save_steps,
            analyzer=d.get("analyzer", "char_wb"),
        )
        write_text_atomic(out / "results.json", json.dumps(result, indent=1))
        print(
            f"{d.name} seed {cfg.seed}: mean clean test loss {result['mean_test_loss']:.4f}, wrong share trained on "
            f"{result['noisy_share']:.3f} -> {out / 'results.json'}"
        )

    main()


if __name__ == "__main__":
    _hydra_main()
