"""VLM path: digits VQA data, tiny LLaVA on a stock Trainer with the callbacks, image checks, image embeddings."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from hf_helpers import CrashAt, StepRecorder
from transformers import Trainer, TrainerCallback, TrainingArguments

from dataflex import DataFlexCallback
from dataflex.embeddings import EmbeddingCache
from dataflex.offline import score_pool
from dataflex.policies import ODM, Uniform
from dataflex.testbeds.digits import IMAGE_TOKEN_ID, QUESTIONS, answer_metrics, collate_vlm, digits_vqa
from dataflex.testbeds.tiny import tiny_gpt2, tiny_llava
from dataflex.vlm import check_image_batch, image_feature_embedder
from dataflex.weighting import ExampleWeightedLoss


@pytest.fixture(scope="module")
def vqa():
    return digits_vqa(0.3, seed=0, fractions=(0.2, 0.1, 0.7))  # small train split keeps the runs short


def test_digits_vqa_noise_mask_and_splits(vqa):
    train, test = vqa["train"], vqa["test"]
    noisy = np.asarray(train["noisy"], dtype=bool)
    n = len(noisy)
    assert abs(noisy.mean() - 0.3) < 4 * np.sqrt(0.3 * 0.7 / n)  # binomial: well inside 4 sigma
    answers, truth = np.asarray(train["answer"]), np.asarray(train["true_answer"])
    assert (answers[noisy] != truth[noisy]).all() and (answers[~noisy] == truth[~noisy]).all()
    assert sum(test["noisy"]) == 0 and list(test["answer"]) == list(test["true_answer"])
    images = {s: set(vqa[s]["image"]) for s in vqa}
    assert not images["train"] & images["test"] and not images["train"] & images["validation"]
    assert set(train["domain"]) == set(QUESTIONS)
    # every answer is one of its question type's choices, and the wrong ones are spread over them
    for kind, (_, choices) in QUESTIONS.items():
        mine = [a for a, d in zip(answers, train["domain"]) if d == kind]
        assert set(mine) <= set(choices)
    # the same seed gives the same data; another seed another split
    assert digits_vqa(0.3, seed=0, fractions=(0.2, 0.1, 0.7))["train"]["noisy"] == train["noisy"]
    assert digits_vqa(0.3, seed=1, fractions=(0.2, 0.1, 0.7))["train"]["image"] != train["image"]


def test_digits_vqa_rejects_bad_arguments():
    with pytest.raises(ValueError, match="noise must be in"):
        digits_vqa(1.5)
    with pytest.raises(ValueError, match="unknown question types \\['colour'\\]"):
        digits_vqa(0.1, question_types=["colour"])
    with pytest.raises(ValueError, match="fractions"):
        digits_vqa(0.1, fractions=(0.5, 0.5))


def test_collate_masks_image_tokens_and_rejects_broken_images(vqa):
    rows = [vqa["train"][i] for i in range(3)]
    batch = collate_vlm(rows)
    assert batch["pixel_values"].shape == (3, 1, 16, 16)
    assert (batch["labels"][batch["input_ids"] == IMAGE_TOKEN_ID] == -100).all()
    scored = batch["labels"] != -100
    assert scored.sum(1).tolist() == [len(r["answer"]) + 1 for r in rows]  # answer bytes + end token
    with pytest.raises(ValueError, match="example 1 of this batch has no 'pixel_values'"):
        collate_vlm([rows[0], {k: v for k, v in rows[1].items() if k != "pixel_values"}])
    small = dict(rows[2], pixel_values=[[[0.0] * 8] * 8])
    with pytest.raises(ValueError, match="example 1 of this batch has an image of shape \\(1, 8, 8\\)"):
        collate_vlm([rows[0], small])
    nan = dict(rows[2], pixel_values=(torch.full((1, 16, 16), float("nan"))).tolist())
    with pytest.raises(ValueError, match="example 1 of this batch has non-finite"):
        collate_vlm([rows[0], nan])


def test_check_image_batch_names_the_examples():
    model = tiny_llava(seed=0)
    ids = torch.full((2, 20), 65)
    ids[:, :16] = IMAGE_TOKEN_ID
    good = torch.zeros(2, 1, 16, 16)
    check_image_batch(model, {"input_ids": ids, "pixel_values": good})
    with pytest.raises(ValueError, match=r"example ids \[11, 42\] hold image tokens .* no pixel_values"):
        check_image_batch(model, {"input_ids": ids}, [11, 42])
    with pytest.raises(ValueError, match=r"vision tower takes \(1, 16, 16\)"):
        check_image_batch(model, {"input_ids": ids, "pixel_values": torch.zeros(2, 3, 16, 16)})
    with pytest.raises(ValueError, match=r"1 images for 32 image tokens: .* batch rows that do not: \[0, 1\]"):
        check_image_batch(model, {"input_ids": ids, "pixel_values": good[:1]})
    text_only = torch.full((2, 20), 65)
    check_image_batch(model, {"input_ids": text_only, "pixel_values": torch.zeros(0, 1, 16, 16)})
    with pytest.raises(ValueError, match=r"2 images for 0 image tokens"):
        check_image_batch(model, {"input_ids": text_only, "pixel_values": good})
    with pytest.raises(ValueError, match=r"leading images \(or patches\) dimension; got a 0-d tensor"):
        check_image_batch(model, {"input_ids": ids, "pixel_values": torch.tensor(1.0)})
    multi = torch.full((3, 40), 65)
    multi[0, :32] = multi[2, :16] = IMAGE_TOKEN_ID  # example 7: two images; 8: none; 9: one
    three = torch.zeros(3, 1, 16, 16)
    check_image_batch(model, {"input_ids": multi, "pixel_values": three}, [7, 8, 9])
    for image, example in ((1, 7), (2, 9)):
        broken = three.clone()
        broken[image, 0, 0, 0] = float("nan")
        with pytest.raises(ValueError, match=rf"example ids \[{example}\] have non-finite"):
            check_image_batch(model, {"input_ids": multi, "pixel_values": broken}, [7, 8, 9])
    with pytest.raises(ValueError, match=r"2 images for 48 image tokens: .* example ids that do not: \[7, 9\]"):
        check_image_batch(model, {"input_ids": multi, "pixel_values": three[:2]}, [7, 8, 9])
    bad = good.clone()
    bad[1, 0, 3, 3] = float("inf")
    with pytest.raises(ValueError, match=r"example ids \[42\] have non-finite"):
        check_image_batch(model, {"input_ids": ids, "pixel_values": bad}, [11, 42])


class Snapshot(TrainerCallback):
    """The model's weights at the start of the last step (what that step's forward ran with)."""

    def __init__(self, last_step: int) -> None:
        self.last_step, self.state = last_step, None

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        if state.global_step == self.last_step - 1:
            self.state = copy.deepcopy(model.state_dict())


def vlm_trainer(
    ds,
    callbacks,
    out,
    *,
    steps=8,
    save_steps=100,
    seed=0,
    label_smoothing_factor=0.0,
    trainer_cls=Trainer,
    settings=None,
    **extra,
):
    """The tiny LLaVA's Trainer (or ``trainer_cls``): ``settings`` go to TrainingArguments, ``extra`` to the
    Trainer."""
    args = TrainingArguments(
        label_smoothing_factor=label_smoothing_factor,
        output_dir=str(out),
        per_device_train_batch_size=8,
        max_steps=steps,
        save_steps=save_steps,
        learning_rate=2e-3,
        report_to=[],
        use_cpu=True,
        seed=seed,
        disable_tqdm=True,
        logging_steps=100,
        **(settings or {}),
    )
    extra.setdefault("data_collator", collate_vlm)
    trainer = trainer_cls(model=tiny_llava(seed=seed), args=args, train_dataset=ds, callbacks=callbacks, **extra)
    for cb in callbacks:
        if hasattr(cb, "attach"):
            cb.attach(trainer)
    return trainer


def test_callback_on_vlm_scores_with_the_image_and_moves_weights(vqa, tmp_path):
    ds = vqa["train"]
    cache = EmbeddingCache(len(ds))
    dfx = DataFlexCallback(ODM(), domains=ds["domain"], update_every=1, embeddings=cache, embeddings_from="image")
    steps = 8
    rec, snap = StepRecorder(dfx), Snapshot(steps)
    trainer = vlm_trainer(ds, [dfx, rec, snap], tmp_path, steps=steps)
    trainer.train()
    ids, losses, valid = dfx.last_step_records()
    assert valid.all() and len(ids) == 8
    model = tiny_llava(seed=0)
    model.load_state_dict(snap.state)
    model.train()  # the recorded losses come from the training forward (no dropout in this model)
    batch = collate_vlm([ds[int(i)] for i in ids])
    from dataflex.losses import per_example_token_loss

    with torch.no_grad():
        again, _ = per_example_token_loss(
            model(**{k: v for k, v in batch.items() if k != "labels"}).logits, batch["labels"]
        )
        blind, _ = per_example_token_loss(
            model(
                input_ids=batch["input_ids"],
                attention_mask=batch["attention_mask"],
                pixel_values=torch.zeros_like(batch["pixel_values"]),
            ).logits,
            batch["labels"],
        )
    np.testing.assert_allclose(losses, again.numpy(), rtol=1e-5, atol=1e-6)
    assert np.abs(losses - blind.numpy()).max() > 1e-3  # the image changes the recorded loss
    # ODM moved the domain weights away from uniform
    assert np.abs(np.asarray(dfx.history[-1]["weights"]) - 0.25).max() > 1e-3
    # image embeddings of the last step equal the offline embedder on the same weights
    offline = score_pool(image_feature_embedder(model), ds.select(ids.tolist()), collate_vlm, batch_size=8)
    np.testing.assert_allclose(cache.values[ids], np.asarray(offline), rtol=1e-4, atol=1e-5)
    assert (cache.step[ids] == steps - 1).all()


def test_vlm_resume_is_exact(vqa, tmp_path):
    ds = vqa["train"]

    def run(out, crash):
        dfx = DataFlexCallback(ODM(), domains=ds["domain"], update_every=1)
        rec = StepRecorder(dfx)
        extra = [CrashAt(crash)] if crash else []
        trainer = vlm_trainer(ds, [dfx, rec, *extra], out, steps=8, save_steps=4)
        try:
            trainer.train()
        except KeyboardInterrupt:
            dfx2 = DataFlexCallback(ODM(), domains=ds["domain"], update_every=1)
            rec2 = StepRecorder(dfx2)
            trainer = vlm_trainer(ds, [dfx2, rec2], out, steps=8, save_steps=4)
            trainer.train(resume_from_checkpoint=str(out / "checkpoint-4"))
            rec.ids.update(rec2.ids)
            dfx = dfx2
        return rec.ids, dfx.history[-1]["weights"], trainer.model.state_dict()

    ids_a, w_a, params_a = run(tmp_path / "straight", None)
    ids_b, w_b, params_b = run(tmp_path / "crashed", 6)
    assert ids_a == ids_b
    for name in params_a:
        torch.testing.assert_close(params_a[name], params_b[name], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(w_a, w_b, rtol=1e-9)


def test_trainer_run_without_images_fails_with_the_example_ids(vqa, tmp_path):
    ds = vqa["train"]

    def drop_images(features):
        batch = collate_vlm(features)
        del batch["pixel_values"]
        return batch

    dfx = DataFlexCallback(Uniform(), domains=ds["domain"], update_every=2)
    trainer = vlm_trainer(ds, [dfx], tmp_path, steps=2, data_collator=drop_images)
    with pytest.raises(ValueError, match=r"example ids \[\d+, .*hold image tokens .* no pixel_values"):
        trainer.train()


def test_label_smoothing_that_the_trainer_would_not_shift_is_refused(vqa, tmp_path):
    """The Trainer's label smoother shifts the labels only for class names in transformers' causal-LM mapping,
    which LlavaForConditionalGeneration is not in: the stock Trainer would train each position on its own input
    token. dataflex sees the smoother's call and refuses it before the first optimizer step."""
    ds = vqa["train"]
    dfx = DataFlexCallback(Uniform(), domains=ds["domain"], update_every=2)
    trainer = vlm_trainer(ds, [dfx], tmp_path, steps=2, label_smoothing_factor=0.1)
    with pytest.raises(ValueError, match="label smoother was called without shift_labels"):
        trainer.train()
    assert trainer.state.global_step == 0


@pytest.mark.parametrize("image_labels", [False, True])
def test_weighted_loss_on_vlm_is_still_scored(vqa, tmp_path, image_labels):
    """With compute_loss_func the Trainer hides the labels from the forward; wrap_loss gives them back. With a
    collator that leaves the image tokens in the labels (as TRL's does) the weights still come from the text's
    loss, the one dataflex scores: equal to the weights of the step's recorded losses."""
    from dataflex.testbeds.digits import IMAGE_TOKEN_ID
    from dataflex.weighting import loss_weights

    def keep_image_labels(features):
        batch = collate_vlm(features)
        batch["labels"] = torch.where(batch["input_ids"] == IMAGE_TOKEN_ID, batch["input_ids"], batch["labels"])
        return batch

    ds = vqa["train"]
    dfx = DataFlexCallback(Uniform(), domains=ds["domain"], update_every=2)
    weighted = ExampleWeightedLoss(temperature=1.0, direction="easy")
    extra = {"data_collator": keep_image_labels} if image_labels else {}
    trainer = vlm_trainer(ds, [dfx], tmp_path, steps=3, compute_loss_func=dfx.wrap_loss(weighted), **extra)
    trainer.train()
    ids, losses, valid = dfx.last_step_records()
    assert len(ids) == 8 and valid.all() and dfx.missing_labels == 0
    w = weighted.last_weights.numpy()
    assert abs(w.mean() - 1) < 1e-5 and np.corrcoef(w, losses)[0, 1] < 0  # easy: high loss, low weight
    assert weighted.ignored_label == IMAGE_TOKEN_ID
    expected = loss_weights(torch.as_tensor(losses), temperature=1.0, direction="easy").numpy()
    assert np.allclose(w, expected, atol=1e-4)


def test_answer_metrics_counts_exact_answers(vqa):
    model = tiny_llava(seed=0)
    part = vqa["test"].select(range(12))
    m = answer_metrics(model, part, batch_size=5)
    assert m["loss"].shape == (12,) and m["correct"].dtype == bool
    assert m["mean_loss"] == pytest.approx(float(m["loss"].mean()))


def test_resumed_llava_weights_are_repaired(vqa, tmp_path):
    """transformers 5.23/5.24's Trainer resume loads no LLaVA weight (legacy key names); dataflex reloads them.

    Written so that it keeps passing once upstream loads the weights itself: the repair must then
    leave them as they are.
    """
    from dataflex.hf.checkpoint import repair_resumed_weights

    trainer = vlm_trainer(vqa["train"], [], tmp_path, steps=2, save_steps=2)
    trainer.train()
    trained = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    fresh = tiny_llava(seed=5)
    fresh_trainer = vlm_trainer(vqa["train"], [], tmp_path / "again", steps=2)
    fresh_trainer.model = fresh
    fresh_trainer._load_from_checkpoint(str(tmp_path / "checkpoint-2"), model=fresh)  # the Trainer's own resume load
    upstream_loaded = all(torch.equal(fresh.state_dict()[k], trained[k]) for k in trained)  # False up to 5.24
    repaired = repair_resumed_weights(fresh, str(tmp_path / "checkpoint-2"))
    assert repaired or upstream_loaded
    for k, v in trained.items():
        assert torch.equal(fresh.state_dict()[k], v), k
    gpt2 = tiny_gpt2(n_layer=1, n_embd=32, n_head=2)
    gpt2.save_pretrained(tmp_path / "gpt2")  # tied lm_head is not stored; the names match: nothing to repair
    assert not repair_resumed_weights(gpt2, str(tmp_path / "gpt2"))


@pytest.mark.slow  # the recipe end to end from the command line (20-30 s); .ci/run runs it
def test_vlm_recipe_cli_runs_and_resumes(tmp_path):
    """The Hydra recipe end to end (RHO-LOSS with its holdout model), then the same command resumes."""
    import json
    import subprocess
    import sys

    cmd = [
        sys.executable,
        "-m",
        "dataflex.recipes.vlm",
        "method=rho",
        "steps=4",
        "save_steps=2",
        "holdout_steps=2",
        "warmup=1",
        "update_every=2",
        "batch_size=8",
        "num_images=60",
        "hydra.run.dir=run",
    ]
    first = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert first.returncode == 0, first.stderr[-3000:]
    result = json.loads((tmp_path / "run" / "results.json").read_text())
    assert result["method"] == "rho" and 0 <= result["accuracy"] <= 1 and not result["resumed"]
    assert (tmp_path / "run" / "checkpoint-4" / "dataflex" / "dataflex_state.json").is_file()
    holdouts = list((tmp_path / "outputs" / "vlm_work").glob("holdout_2x8_*/model.pt"))
    assert len(holdouts) == 1
    again = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    resumed = json.loads((tmp_path / "run" / "results.json").read_text())
    assert resumed["resumed"]
    # The noise counter lives in memory: the resumed run (nothing left to train) reported a noisy share of 0.0.
    # Its measurements are kept with each checkpoint, so the results are the uninterrupted run's.
    same = ("resumed", "seconds")
    assert {k: v for k, v in resumed.items() if k not in same} == {k: v for k, v in result.items() if k not in same}
    assert result["noisy_share"] > 0
    assert list((tmp_path / "outputs" / "vlm_work").glob("holdout_*/model.pt")) == holdouts  # reused, not retrained
    # another command in the same folder would continue this run's checkpoints as its own: refused, named
    longer = [c if c != "steps=4" else "steps=6" for c in cmd]
    other = subprocess.run(longer, capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert other.returncode != 0 and "holds a run made with other settings (steps: 4 there, 6 now)" in other.stderr
    bogus = [c if c != "method=rho" else "method=bogus" for c in cmd[:-1]] + ["hydra.run.dir=bad"]
    bad = subprocess.run(bogus, capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert bad.returncode != 0 and "method='bogus'; valid values are" in bad.stderr


@pytest.mark.slow  # four short recipe runs from the command line (~1 min); .ci/run runs it
def test_a_vlm_sweep_ends_with_its_clean_accuracy_summary_beside_uniform(tmp_path):
    """``-m method=uniform,loss_easy seed=0,1``: when the multirun ends, the recipe's Hydra callback compares the
    methods on clean test accuracy per question type (higher is better) and writes sweep_summary.md and .png."""
    import json
    import subprocess
    import sys

    from dataflex.sweep import VLM_ACCURACY, collect_runs

    sweep = tmp_path / "sweep"
    small = ["steps=4", "save_steps=100", "warmup=1", "update_every=2", "batch_size=8", "num_images=60"]
    cmd = [sys.executable, "-m", "dataflex.recipes.vlm", "-m", "method=uniform,loss_easy", "seed=0,1", *small]
    run = subprocess.run([*cmd, f"hydra.sweep.dir={sweep}"], capture_output=True, text=True, cwd=tmp_path, timeout=900)
    assert run.returncode == 0, run.stderr[-4000:]
    runs = collect_runs(sweep)
    assert sorted((r.policy, r.seed) for r in runs) == [
        ("loss_easy", 0),
        ("loss_easy", 1),
        ("uniform", 0),
        ("uniform", 1),
    ]
    assert {r.measure for r in runs} == {VLM_ACCURACY}
    summary = (sweep / "sweep_summary.md").read_text()
    assert summary in run.stdout and (sweep / "sweep_summary.png").is_file()
    assert "test mean clean accuracy" in summary and "| uniform | 0,1 |" in summary and "| loss_easy | 0,1 |" in summary
    accuracy = json.loads((sweep / "uniform" / "seed0" / runs[0].settings / "results.json").read_text())
    for question, value in accuracy["accuracy_by_question"].items():  # the per-question rows are these numbers
        assert f"| {question} | " in summary and 0.0 <= value <= 1.0


def test_a_damaged_measurement_record_is_refused_before_a_resume(tmp_path):
    """The recipes' noise share and warm-up detection after a resume come from the record kept with each
    checkpoint: a changed digit in it still parsed and was reported as the run's share; its digest refuses it."""
    from types import SimpleNamespace as Namespace

    from conftest import changed_digit

    from dataflex.testbeds.vlm_runs import MeasurementRecord

    counter = Namespace(per_step=[(1, 3.0, 8.0), (2, 2.0, 8.0)])
    probe = Namespace(by_step={1: {"loss": {"auroc": 0.75}}})
    record = MeasurementRecord(counter, probe)
    state = Namespace(global_step=2, is_world_process_zero=True)
    record.on_step_end(Namespace(output_dir=str(tmp_path)), state, Namespace(should_save=True))
    counter.per_step, probe.by_step = [], {}
    record.restore(tmp_path / "checkpoint-2")
    assert counter.per_step == [(1, 3.0, 8.0), (2, 2.0, 8.0)] and probe.by_step == {1: {"loss": {"auroc": 0.75}}}
    path = MeasurementRecord.path(tmp_path, 2)
    path.write_text(changed_digit(path.read_text(), '"per_step": ['))  # the first step 1 -> 2: still parses
    with pytest.raises(ValueError, match=r"step-2\.json is damaged"):
        record.restore(tmp_path / "checkpoint-2")


def test_clean_oracle_trains_only_on_right_answers(vqa):
    """The benchmark's reference arm keeps exactly the examples whose answer is right."""
    from dataflex.recipes.vlm import method_callback

    dfx, weighted = method_callback(
        "clean_oracle", vqa["train"], {}, fraction=0.7, update_every=5, warmup=0, temperature=1.0
    )
    clean = np.flatnonzero(~np.asarray(vqa["train"]["noisy"], dtype=bool))
    assert weighted is None and 0 < clean.size < len(vqa["train"])
    assert np.array_equal(dfx.selector.initial_subset(len(vqa["train"])), clean)


def test_selection_groups_by_question_and_given_answer(vqa):
    """label_by='question_answer' makes every (question type, given answer) pair its own selection group."""
    from dataflex.recipes.vlm import method_callback

    train = vqa["train"]
    kwargs = {"fraction": 0.7, "update_every": 5, "warmup": 0, "temperature": 1.0}
    dfx, _ = method_callback("loss_easy", train, {}, label_by="question_answer", **kwargs)
    assert dfx.labels == [f"{d}:{a}" for d, a in zip(train["domain"], train["answer"])]
    assert dfx.selector.per_label and len(set(dfx.labels)) > len(set(train["domain"]))
    assert method_callback("loss_easy", train, {}, **kwargs)[0].labels == list(train["domain"])
    with pytest.raises(ValueError, match="label_by='answer'"):
        method_callback("loss_easy", train, {}, label_by="answer", **kwargs)


@pytest.mark.parametrize("method", ["aum", "cartography", "last_loss"])
def test_detector_arms_compare_scores_within_question_and_given_answer(vqa, method):
    """The detector arms hand DropNoisy each example's question type and given answer as its class (unless
    class_conditional=False), and keep per-question-type shares."""
    from dataflex.detectors import DropNoisy, class_codes
    from dataflex.recipes.vlm import method_callback

    train = vqa["train"]
    kwargs = {"fraction": 0.7, "update_every": 5, "warmup": 0, "temperature": 1.0}
    dfx, weighted = method_callback(method, train, {}, **kwargs)
    rule = dfx.selector
    assert weighted is None and isinstance(rule, DropNoisy) and rule.detector == method
    assert rule.drop == pytest.approx(0.3) and rule.per_label and dfx.labels == list(train["domain"])
    given = [f"{d}:{a}" for d, a in zip(train["domain"], train["answer"])]
    assert (rule.classes == class_codes(given)).all()  # kept as integer codes of these labels
    assert method_callback(method, train, {}, class_conditional=False, **kwargs)[0].selector.classes is None


@pytest.mark.slow  # 9 s; .ci/run runs it (the default run is kept near 5 minutes)
def test_two_stage_cleaning_keeps_a_share_of_every_question_type_and_trains_on_it(vqa, tmp_path):
    """Stage 1 (uniform, with a cleaning rule) returns the ids the rule keeps from its finished record;
    stage 2 (method='subset') trains only on them. Misuse is refused with the reason."""
    from dataflex.detectors import DropNoisy
    from dataflex.recipes.vlm import answer_classes, method_callback, train_vlm

    train = vqa["train"]
    rule = DropNoisy("last_loss", drop=0.3, per_label=True, classes=answer_classes(train))
    common = {"steps": 6, "batch_size": 8, "update_every": 2, "warmup": 2}
    first = train_vlm("uniform", vqa, out=tmp_path / "one", cleaning=rule, **common)
    kept = np.asarray(first["kept_ids"])
    domains = np.asarray(train["domain"])
    assert np.array_equal(kept, np.unique(kept)) and 0 <= kept[0] and kept[-1] < len(train)
    for kind in np.unique(domains):  # 70 % of every question type (unvisited examples are kept first)
        assert abs(np.isin(np.flatnonzero(domains == kind), kept).sum() - 0.7 * (domains == kind).sum()) <= 1
    dfx, _ = method_callback("subset", train, {"subset": kept}, fraction=0.7, update_every=2, warmup=0, temperature=1)
    assert np.array_equal(dfx.selector.initial_subset(len(train)), kept)
    second = train_vlm("subset", vqa, out=tmp_path / "two", signals={"subset": kept}, **common)
    assert "kept_ids" not in second and 0 <= second["accuracy"] <= 1
    with pytest.raises(ValueError, match="method 'subset' needs signals=\\{'subset': ids\\}"):
        train_vlm("subset", vqa, out=tmp_path / "three", **common)
    with pytest.raises(ValueError, match="cleaning reads the record of a plain \\(uniform\\) run; method='aum'"):
        train_vlm("aum", vqa, out=tmp_path / "four", cleaning=rule, **common)


@pytest.mark.slow  # the recipe end to end from the command line (20-30 s); .ci/run runs it
def test_vlm_recipe_cli_cleans_in_two_stages(tmp_path):
    """clean_with writes the kept ids as a subset file; method=subset trains on exactly those; a subset file
    made on another pool (another noise mask) is refused."""
    import json
    import subprocess
    import sys

    from dataflex.offline import read_subset

    common = [sys.executable, "-m", "dataflex.recipes.vlm", "steps=4", "batch_size=8", "num_images=60"]
    common += ["save_steps=4", "warmup=1", "update_every=2"]
    one = subprocess.run(
        [*common, "clean_with=last_loss", "hydra.run.dir=one"], capture_output=True, text=True, cwd=tmp_path
    )
    assert one.returncode == 0, one.stderr[-3000:]
    kept = read_subset(tmp_path / "one" / "kept_ids.json")
    assert "kept_ids" not in json.loads((tmp_path / "one" / "results.json").read_text())
    suspects = (tmp_path / "one" / "suspects.md").read_text()  # what the rule found most suspect, to read
    assert suspects.startswith("Most suspect training examples by last_loss: 30 most suspect of 144 examples")
    assert "| rank | id | score | question | image | given answer | wrong |" in suspects
    two = subprocess.run(
        [*common, "method=subset", "subset_file=one/kept_ids.json", "hydra.run.dir=two"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert two.returncode == 0, two.stderr[-3000:]
    assert 0 < len(kept) < 144 and f"'dataflex/selected': '{len(kept)}'" in two.stdout  # trained on the kept ids
    other = subprocess.run(
        [*common, "method=subset", "subset_file=one/kept_ids.json", "noise=0.1", "hydra.run.dir=three"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert other.returncode != 0 and "kept_ids.json was written for a different dataset" in other.stderr


# -- Qwen2-VL-style patch sequences (pixel_values (patches, patch_dim) described by image_grid_thw) ---------------
QWEN_IMAGE, QWEN_START, QWEN_END = 290, 292, 293


def tiny_qwen2_vl(family: str = "Qwen2VL"):
    """A tiny Qwen2-VL, Qwen2.5-VL or Qwen3-VL from its config (each merges 2x2 patches into an image token)."""
    import transformers

    rope = {"type": "mrope", "mrope_section": [2, 2, 4]}
    vision = dict(depth=1, num_heads=2, patch_size=4, spatial_merge_size=2)
    if family == "Qwen2VL":
        vision |= dict(embed_dim=32, hidden_size=32)
    else:
        vision |= dict(hidden_size=32, intermediate_size=64, out_hidden_size=32)
    if family == "Qwen2_5_VL":
        vision |= dict(fullatt_block_indexes=[0], window_size=16)
    if family == "Qwen3VL":
        rope = {"rope_type": "default", "mrope_section": [2, 2, 4], "mrope_interleaved": True}
        vision |= dict(deepstack_visual_indexes=[0], num_position_embeddings=16)
    text = dict(
        vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, head_dim=16, max_position_embeddings=256, rope_scaling=rope, bos_token_id=None,
        eos_token_id=None,
    )  # fmt: skip
    config = getattr(transformers, f"{family}Config")(
        text_config=text,
        vision_config=vision,
        image_token_id=QWEN_IMAGE,
        video_token_id=291,
        vision_start_token_id=QWEN_START,
        vision_end_token_id=QWEN_END,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return getattr(transformers, f"{family}ForConditionalGeneration")(config)


def qwen_example(i: int, width: int = 2) -> dict:
    """Row ``i`` holds ``i % 3`` images of 2 x ``width`` patches (``width / 2`` image tokens each after the 2x2
    merge)."""
    images = i % 3
    g = torch.Generator().manual_seed(i)
    image = [QWEN_START] + [QWEN_IMAGE] * (width // 2) + [QWEN_END]
    ids = [1] + image * images + [5 + i % 50, 6 + i % 7, 7, 8 + i % 11]
    return {
        "input_ids": ids,
        "mm_token_type_ids": [int(t == QWEN_IMAGE) for t in ids],
        "pixel_values": torch.randn(2 * width * images, 3 * 2 * 4 * 4, generator=g).tolist(),
        "image_grid_thw": [[1, 2, width]] * images,
        "domain": ["cats", "dogs"][i % 2],
    }


def collate_qwen(features: list[dict]) -> dict:
    width = max(len(f["input_ids"]) for f in features)
    pad = [width - len(f["input_ids"]) for f in features]
    ids = torch.tensor([f["input_ids"] + [0] * p for f, p in zip(features, pad)])
    mask = torch.tensor([[1] * len(f["input_ids"]) + [0] * p for f, p in zip(features, pad)])
    batch = {
        "input_ids": ids,
        "attention_mask": mask,
        "mm_token_type_ids": torch.tensor([f["mm_token_type_ids"] + [0] * p for f, p in zip(features, pad)]),
        "labels": ids.masked_fill((mask == 0) | (ids >= QWEN_IMAGE), -100),
    }
    if any(f["image_grid_thw"] for f in features):
        batch["pixel_values"] = torch.cat([torch.tensor(f["pixel_values"]).view(-1, 96) for f in features])
        batch["image_grid_thw"] = torch.tensor([g for f in features for g in f["image_grid_thw"]])
    return batch


def test_qwen2_vl_patch_batches_are_checked_by_their_grid():
    model = tiny_qwen2_vl()
    batch = collate_qwen([qwen_example(i) for i in (1, 2, 3, 5)])  # 1, 2, 0 and 2 images
    names = [11, 12, 13, 15]
    check_image_batch(model, batch, names)
    with pytest.raises(ValueError, match=r"do not hold the 20 patches that image_grid_thw describes \(5 images"):
        check_image_batch(model, {**batch, "pixel_values": batch["pixel_values"][:-4]}, names)
    short = batch["input_ids"].clone()
    short[1, short[1].tolist().index(QWEN_IMAGE)] = 9  # row 12 keeps one image token for its two images
    # Images of one token each: the grid cannot say which row lost its token, so every row with images is named.
    with pytest.raises(ValueError, match=r"4 image tokens but its 5 images .* make 5; example ids with image tokens"):
        check_image_batch(model, {**batch, "input_ids": short}, names)
    wide = collate_qwen([qwen_example(i, width=4) for i in (1, 2, 3, 5)])  # 2 tokens per image
    check_image_batch(model, wide, names)
    wide["input_ids"][0, wide["input_ids"][0].tolist().index(QWEN_IMAGE)] = 9  # row 11 keeps 1 of its 2 tokens
    with pytest.raises(ValueError, match=r"example ids whose image tokens end inside an image: \[11, 12, 15\]"):
        check_image_batch(model, wide, names)
    bad = batch["pixel_values"].clone()
    bad[9, 0] = float("nan")  # patch 9 is in image 2 (patches 8-11), the second image of row 12
    with pytest.raises(ValueError, match=r"example ids \[12\] have non-finite"):
        check_image_batch(model, {**batch, "pixel_values": bad}, names)
    text_only = collate_qwen([qwen_example(i) for i in (3, 6)])  # no images: an empty grid is fine
    check_image_batch(model, {**text_only, "pixel_values": torch.zeros(0, 96), "image_grid_thw": torch.zeros(0, 3)})
    with pytest.raises(ValueError, match=r"5 image tokens but its 0 images .* example ids with image tokens: \[11"):
        empty = {"pixel_values": torch.zeros(0, 96), "image_grid_thw": torch.zeros(0, 3)}
        check_image_batch(model, {**batch, **empty}, names)
    with pytest.raises(ValueError, match=r"image_grid_thw must be \(images, 3\)"):
        check_image_batch(model, {**batch, "image_grid_thw": batch["image_grid_thw"][:, :2]}, names)
    with pytest.raises(ValueError, match=r"example ids \[11, 12, 15\] hold image tokens .* no pixel_values"):
        check_image_batch(model, {"input_ids": batch["input_ids"]}, names)


def test_other_image_layouts_are_left_to_the_model_but_must_be_finite():
    model = tiny_llava(seed=0)
    ids = torch.full((3, 20), 65)
    ids[[0, 2], :16] = IMAGE_TOKEN_ID
    tiles = torch.zeros(2, 3, 1, 16, 16)  # (images, tiles, C, H, W): not LLaVA's layout, not checked by shape
    check_image_batch(model, {"input_ids": ids, "pixel_values": tiles}, [4, 5, 6])
    tiles[1, 2, 0, 0, 0] = float("inf")
    with pytest.raises(ValueError, match=r"non-finite pixel values .* of example ids \[4, 6\]"):
        check_image_batch(model, {"input_ids": ids, "pixel_values": tiles}, [4, 5, 6])


@pytest.mark.parametrize("family", ["Qwen2VL", "Qwen2_5_VL", "Qwen3VL"])
def test_callback_on_qwen_vl_records_each_examples_loss(tmp_path, family):
    from datasets import Dataset

    ds = Dataset.from_list([qwen_example(i) for i in range(24)])
    args = TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=4, save_steps=100, report_to=[],
        remove_unused_columns=False, use_cpu=True, disable_tqdm=True, logging_steps=100, learning_rate=1e-2,
    )  # fmt: skip
    trainer = Trainer(model=tiny_qwen2_vl(family), args=args, train_dataset=ds, data_collator=collate_qwen)
    dfx = DataFlexCallback(ODM(), update_every=2, trainer=trainer)
    errors: list[float] = []

    class Verify(TrainerCallback):  # each recorded loss recomputed from its example alone, before the update
        def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
            ids, losses, _ = dfx.last_step_records()
            with torch.no_grad():
                for i, loss in zip(ids, losses):
                    ref = model(**collate_qwen([ds[int(i)]])).loss
                    errors.append(abs(float(ref) - float(loss)))

    trainer.add_callback(Verify())
    trainer.train()
    assert len(errors) == 16 and max(errors) < 1e-4, errors


@pytest.mark.parametrize("family", ["Qwen2VL", "Qwen2_5_VL", "Qwen3VL"])
def test_qwen_vl_image_embeddings_from_the_training_forward_equal_the_offline_embedder(tmp_path, family):
    from datasets import Dataset

    ds = Dataset.from_list([qwen_example(3 * i + 1, width=4) for i in range(12)])  # one image of 2 tokens each
    args = TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=3, save_steps=100, report_to=[],
        remove_unused_columns=False, use_cpu=True, disable_tqdm=True, logging_steps=100, learning_rate=1e-2,
    )  # fmt: skip
    model = tiny_qwen2_vl(family)
    trainer = Trainer(model=model, args=args, train_dataset=ds, data_collator=collate_qwen)
    cache = EmbeddingCache(len(ds))
    dfx = DataFlexCallback(Uniform(), update_every=1, embeddings=cache, embeddings_from="image", trainer=trainer)
    snapshot = Snapshot(3)
    trainer.add_callback(snapshot)
    trainer.train()
    ids, _, _ = dfx.last_step_records()
    model.load_state_dict(snapshot.state)  # the weights the last step's forward ran with
    offline = score_pool(image_feature_embedder(model), ds.select(ids.tolist()), collate_qwen, batch_size=4)
    np.testing.assert_allclose(cache.values[ids], np.asarray(offline), rtol=1e-4, atol=1e-5)
    assert (cache.step[ids] == 2).all() and np.abs(np.asarray(offline)).sum() > 0


def test_image_placeholders_left_in_the_labels_are_not_scored(vqa, tmp_path):
    """A collator that trains on every token, image placeholders included (TRL's vision collator on text data
    does), still gets per-example scores of the text tokens only from dataflex."""

    def collate_every_token(features):
        batch = collate_vlm(features)
        batch["labels"] = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
        return batch

    def collate_text_tokens(features):
        batch = collate_every_token(features)
        batch["labels"] = batch["labels"].masked_fill(batch["input_ids"] == IMAGE_TOKEN_ID, -100)
        return batch

    ds = vqa["train"].select(range(32))
    dfx = DataFlexCallback(Uniform(), domains=ds["domain"], update_every=2)
    snapshot = Snapshot(2)
    trainer = vlm_trainer(ds, [dfx, snapshot], tmp_path, steps=2, data_collator=collate_every_token)
    trainer.train()
    ids, losses, _ = dfx.last_step_records()
    model = trainer.model
    model.load_state_dict(snapshot.state)
    with torch.no_grad():
        for i, loss in zip(ids.tolist(), losses):
            assert float(model(**collate_text_tokens([ds[i]])).loss) == pytest.approx(float(loss), abs=1e-4)
            assert abs(float(model(**collate_every_token([ds[i]])).loss) - float(loss)) > 1e-3  # what it trains on


def qwen_trainer(family: str, ds, callbacks, out, *, steps: int, save_steps: int):
    """A stock Trainer on the tiny Qwen-VL of ``family`` (rows of 0, 1 or 2 images), the callbacks attached."""
    args = TrainingArguments(
        output_dir=str(out), per_device_train_batch_size=4, max_steps=steps, save_steps=save_steps, report_to=[],
        remove_unused_columns=False, use_cpu=True, disable_tqdm=True, logging_steps=100, learning_rate=1e-2,
    )  # fmt: skip
    trainer = Trainer(
        model=tiny_qwen2_vl(family), args=args, train_dataset=ds, data_collator=collate_qwen, callbacks=callbacks
    )
    for cb in callbacks:
        if hasattr(cb, "attach"):
            cb.attach(trainer)
    return trainer


@pytest.mark.slow  # 3 families x 3 runs (7 s); .ci/run runs it
@pytest.mark.parametrize("family", ["Qwen2VL", "Qwen2_5_VL", "Qwen3VL"])
def test_qwen_vl_resume_is_exact(tmp_path, family):
    """Patch batches whose rows hold 0, 1 or 2 images, crashed after the checkpoint at step 4 and resumed: the same
    example ids, decisions, training-dynamics record, text embeddings and model as the uninterrupted run."""
    from datasets import Dataset

    ds = Dataset.from_list([qwen_example(i) for i in range(22)])  # batch 4: step 6 ends epoch 1 with 2 rows

    def callback():
        return DataFlexCallback(
            ODM(), domains=ds["domain"], update_every=1, dynamics=True, embeddings=EmbeddingCache(len(ds))
        )

    def run(out, crash):
        dfx = callback()
        rec = StepRecorder(dfx)
        extra = [CrashAt(crash)] if crash else []
        trainer = qwen_trainer(family, ds, [dfx, rec, *extra], out, steps=8, save_steps=4)
        try:
            trainer.train()
        except KeyboardInterrupt:
            dfx = callback()
            rec2 = StepRecorder(dfx)
            trainer = qwen_trainer(family, ds, [dfx, rec2], out, steps=8, save_steps=4)
            trainer.train(resume_from_checkpoint=str(out / "checkpoint-4"))
            rec.ids.update(rec2.ids)
        dfx.dynamics.gather()
        return rec.ids, dfx, trainer.model.state_dict()

    ids_a, dfx_a, params_a = run(tmp_path / "straight", None)
    ids_b, dfx_b, params_b = run(tmp_path / "crashed", 6)
    assert ids_a == ids_b and len(ids_a) == 8
    assert dfx_a.history == dfx_b.history and dfx_a.history[0]["weights"] != dfx_a.history[-1]["weights"]
    for name in ("visits", "loss_mean", "loss_m2", "margin_mean", "forgetting"):
        np.testing.assert_array_equal(getattr(dfx_a.dynamics, name), getattr(dfx_b.dynamics, name), err_msg=name)
    assert dfx_a.dynamics.visits.sum() == sum(map(len, ids_a.values())) == 30
    np.testing.assert_array_equal(dfx_a.embeddings.step, dfx_b.embeddings.step)
    np.testing.assert_array_equal(dfx_a.embeddings.values, dfx_b.embeddings.values)
    for name in params_a:
        torch.testing.assert_close(params_a[name], params_b[name], rtol=1e-5, atol=1e-6)
