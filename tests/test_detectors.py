"""Noise detectors on the training-dynamics record: planted wrong answers are ranked first, threshold examples
are seeded, and DropNoisy leaves the flagged examples out of training online."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hf_helpers import make_trainer
from sklearn.metrics import roc_auc_score

from dataflex import DataFlexCallback, DataFlexSelectCallback
from dataflex.detectors import (
    DropNoisy,
    aum_threshold,
    cartography_regions,
    class_codes,
    noise_scores,
    plant_threshold_examples,
    standardised_within,
)
from dataflex.dynamics import TrainingDynamics
from dataflex.policies import Uniform
from dataflex.state import token_digest
from dataflex.testbeds.tiny import instruct_dataset, tiny_gpt2

CLASSES = "ABCD"


def planted_noise_set(n: int = 160, noise: float = 0.2, seed: int = 0):
    """Class c's prompts are 10 letters from its own 6-letter alphabet and its answer is CLASSES[c]; a seeded
    ``noise`` share of answers is replaced by another class's. Returns (records, planted mask)."""
    rng = np.random.default_rng(seed)
    letters = "abcdefghijklmnopqrstuvwx"
    records = []
    for i in range(n):
        c = i % 4
        prompt = "".join(rng.choice(list(letters[6 * c : 6 * c + 6]), 10))
        records.append({"instruction": prompt, "response": CLASSES[c], "task": "toy"})
    planted = np.zeros(n, dtype=bool)
    for i in rng.choice(n, int(noise * n), replace=False).tolist():
        c = CLASSES.index(records[i]["response"])
        records[i]["response"] = CLASSES[(c + 1 + int(rng.integers(3))) % 4]
        planted[i] = True
    return records, planted


def train(records, callback, out, steps: int = 200):
    ds = instruct_dataset(records, 32).add_column("domain", [r["task"] for r in records])
    model = tiny_gpt2(n_layer=2, n_embd=64, n_head=2, seed=0)
    settings = {"max_steps": steps, "save_steps": 10_000, "learning_rate": 5e-3, "per_device_train_batch_size": 16}
    trainer = make_trainer(ds, callback, out, model=model, **settings)
    trainer.train()
    return trainer


@pytest.fixture(scope="module")
def planted_run(tmp_path_factory):
    records, planted = planted_noise_set()
    cb = DataFlexCallback(Uniform(), update_every=20, dynamics=True)
    train(records, cb, tmp_path_factory.mktemp("planted"))
    return cb.dynamics, planted


def test_a_finished_runs_record_gives_a_subset_file(planted_run, tmp_path):
    from dataflex.offline import read_subset, write_subset
    from dataflex.state import DatasetFingerprint

    record, planted = planted_run
    keep = DropNoisy("aum", drop=0.2).keep_ids(record)
    pool = DatasetFingerprint.from_labels(np.zeros(record.num_examples, dtype=np.int64), ["toy"])
    write_subset(tmp_path / "clean.json", keep, pool=pool, method="aum", fraction=0.8)
    ids = read_subset(tmp_path / "clean.json", pool)
    assert ids.size == 128 and planted[ids].mean() < 0.25 * planted.mean()


@pytest.mark.parametrize("detector,least", [("aum", 0.95), ("cartography", 0.95), ("loss", 0.8), ("last_loss", 0.8)])
def test_detectors_rank_planted_wrong_answers_first(planted_run, detector, least):
    record, planted = planted_run
    assert (record.visits == record.visits[0]).all() and record.visits[0] >= 10  # every example, many times
    auroc = roc_auc_score(planted, noise_scores(record, detector))
    assert auroc >= least, f"{detector}: AUROC {auroc:.3f}"
    regions = cartography_regions(record)
    assert (regions[planted] == "hard").mean() > 0.5 > (regions[~planted] == "hard").mean()


def test_threshold_examples_are_seeded_wrong_and_within_their_group():
    answers = [f"{g}{k}" for g in "xy" for k in range(10)]
    groups = [a[0] for a in answers]
    new, planted = plant_threshold_examples(answers, 0.25, seed=3, groups=groups)
    again, planted_again = plant_threshold_examples(answers, 0.25, seed=3, groups=groups)
    assert new == again and np.array_equal(planted, planted_again) and planted.size == 5
    assert not np.array_equal(planted, plant_threshold_examples(answers, 0.25, seed=4, groups=groups)[1])
    for i in range(len(answers)):
        assert (new[i] != answers[i]) == (i in planted)
        assert new[i][0] == groups[i]  # the donor is from the same group
    with pytest.raises(ValueError, match="share must be in \\(0, 1\\); got 1.5"):
        plant_threshold_examples(answers, 1.5, seed=0)


def synthetic_record(aum: np.ndarray) -> TrainingDynamics:
    record = TrainingDynamics(aum.size)
    stats = {
        "loss": torch.tensor(-aum),
        "margin": torch.tensor(aum),
        "confidence": torch.tensor(1 / (1 + np.exp(-aum))),
        "accuracy": torch.tensor((aum > 0).astype(float)),
    }
    record.add(np.arange(aum.size), 0, stats)
    record.gather()
    return record


def test_margin_detectors_refuse_a_record_without_margins():
    """Log-probability outputs (TRL's fused head) give losses but no margins: AUM must not silently keep all."""
    record = TrainingDynamics(3)
    nan = torch.full((3,), float("nan"))
    record.add(np.arange(3), 0, {"loss": torch.ones(3), "margin": nan, "confidence": torch.ones(3), "accuracy": nan})
    record.gather()
    for detector in ("aum", "forgetting"):
        with pytest.raises(ValueError, match=f"detector='{detector}' needs margins"):
            noise_scores(record, detector)
    assert np.isfinite(noise_scores(record, "loss")).all() and np.isfinite(noise_scores(record, "cartography")).all()


def test_drop_noisy_threshold_mode_cuts_at_the_threshold_examples_percentile():
    aum = np.array([3.0, 2.0, -1.0, 0.5, -2.0, -3.0, 1.0, np.nan])  # 7 is never visited
    record = synthetic_record(np.nan_to_num(aum))
    record.visits[7] = 0
    record.margin_mean[7] = np.nan
    selector = DropNoisy("aum", threshold_ids=[4, 5], percentile=100)
    assert aum_threshold(record, np.array([4, 5]), 100) == -2.0

    class Context:
        dynamics, dataset, seed, step, labels = record, range(8), 0, 0, np.array([0, 0, 0, 0, 1, 1, 1, 1])

    kept = selector.select(Context())
    # AUM > -2 kept, threshold examples 4, 5 out, the unvisited 7 kept
    assert kept.tolist() == [0, 1, 2, 3, 6, 7] and selector.threshold == -2.0
    drop_share = DropNoisy("aum", drop=0.25)
    assert drop_share.select(Context()).tolist() == [0, 1, 2, 3, 6, 7]  # the 2 lowest AUM of 8 out
    ids, recorded = drop_share.last_scores  # the noise scores (what the score store keeps), NaN when unvisited
    assert ids.tolist() == list(range(8)) and np.array_equal(recorded, -aum, equal_nan=True)
    by_label = DropNoisy("aum", drop=0.25, per_label=True).select(Context())
    assert by_label.tolist() == [0, 1, 3, 4, 6, 7]  # the lowest of each label out: 2 (of 0..3), 5 (of 4..7)
    with pytest.raises(ValueError, match="exactly one of drop"):
        DropNoisy("aum")
    with pytest.raises(ValueError, match="detector='margin'; valid detectors are aum, cartography"):
        DropNoisy("margin", drop=0.1)
    with pytest.raises(ValueError, match="do not apply to detector='loss'"):
        DropNoisy("loss", threshold_ids=[1])


def test_drop_noisy_online_leaves_planted_noise_out(tmp_path):
    """Threshold examples planted on top of the noisy set; DropNoisy re-decides every 30 steps from step 150."""
    records, planted = planted_noise_set()
    answers, threshold_ids = plant_threshold_examples([r["response"] for r in records], 0.05, seed=0)
    records = [dict(r, response=a) for r, a in zip(records, answers)]
    wrong = planted.copy()
    wrong[threshold_ids] = True
    cb = DataFlexSelectCallback(DropNoisy("aum", threshold_ids=threshold_ids), update_every=30, warmup_steps=140)
    train(records, cb, tmp_path)
    kept = cb.selected
    assert not np.isin(threshold_ids, kept).any()
    assert wrong[kept].mean() < 0.25 * wrong.mean(), (wrong[kept].mean(), wrong.mean())
    # The paper's 99th percentile trades clean examples for purity (measured here: none wrong, 63 % of the clean
    # kept); what must hold is that most clean examples stay.
    assert (~wrong[kept]).sum() >= 0.5 * (~wrong).sum()
    assert cb.history[-1]["size"] == kept.size and len(cb.history) >= 3


@pytest.mark.slow  # three 200-step proxy runs (~40 s); .ci/run runs it
def test_out_of_fold_scores_find_planted_noise_and_resume_from_their_cache(tmp_path):
    """3 tiny proxies, each trained on two folds of the planted-noise set and scoring the third by loss."""
    from dataflex.detectors import out_of_fold_scores
    from dataflex.losses import per_example_token_loss
    from dataflex.testbeds.tiny import collate_causal

    records, planted = planted_noise_set()
    ds = instruct_dataset(records, 32)

    def train_and_score(train_ids, held_out, fold):
        torch.manual_seed(fold)
        model = tiny_gpt2(n_layer=2, n_embd=64, n_head=2, seed=fold)
        opt = torch.optim.AdamW(model.parameters(), lr=5e-3)
        rng = np.random.default_rng(fold)
        for _ in range(200):
            batch = collate_causal([ds[int(i)] for i in rng.choice(train_ids, 16)])
            model(**batch).loss.backward()
            opt.step()
            opt.zero_grad()
        with torch.no_grad():
            batch = collate_causal([ds[int(i)] for i in held_out])
            labels = batch.pop("labels")
            loss, _ = per_example_token_loss(model(**batch).logits, labels)
        return loss.numpy()

    key = {"data": token_digest(ds)}
    scores = out_of_fold_scores(len(ds), 3, train_and_score, seed=0, cache=tmp_path / "oof", cache_key=key)
    assert np.isfinite(scores).all()
    assert roc_auc_score(planted, scores) >= 0.9

    def must_not_run(*args):
        raise AssertionError("a cached fold was recomputed")

    again = out_of_fold_scores(len(ds), 3, must_not_run, seed=0, cache=tmp_path / "oof", cache_key=key)
    np.testing.assert_allclose(again, scores, rtol=1e-6)
    with pytest.raises(ValueError, match=r"other settings \(seed: 0 there, 1 now\)"):
        out_of_fold_scores(len(ds), 3, must_not_run, seed=1, cache=tmp_path / "oof", cache_key=key)


def test_an_out_of_fold_cache_made_from_other_data_of_the_same_size_is_refused(tmp_path):
    """The fold cache cannot see what ``train_and_score`` trains on: its key (required with a cache) says it. Keyed
    by n, k and seed only, scores cached for one data set were returned for another of the same size."""
    from dataflex.detectors import out_of_fold_scores

    def scorer(values):
        return lambda train_ids, held_out, fold: values[held_out]

    first, second = np.arange(12.0), np.arange(12.0)[::-1].copy()
    with pytest.raises(ValueError, match="needs cache_key"):
        out_of_fold_scores(12, 3, scorer(first), cache=tmp_path / "oof")
    scores = out_of_fold_scores(12, 3, scorer(first), cache=tmp_path / "oof", cache_key={"data": "first"})
    np.testing.assert_array_equal(scores, first)
    with pytest.raises(ValueError, match=r"fold-0-of-3\.json was written for other settings \(data: 'first' there, "):
        out_of_fold_scores(12, 3, scorer(second), cache=tmp_path / "oof", cache_key={"data": "second"})
    again = out_of_fold_scores(12, 3, scorer(second), cache=tmp_path / "other", cache_key={"data": "second"})
    np.testing.assert_array_equal(again, second)


def test_standardised_within_is_the_z_score_of_each_class_and_leaves_unvisited_examples_out():
    score = np.array([1.0, 3.0, np.nan, 10.0, 30.0, 20.0, 7.0, 5.0, 5.0])
    classes = np.array(["a", "a", "a", "b", "b", "b", "c", "d", "d"])
    z = standardised_within(score, classes)
    for c in "ab":
        finite = (classes == c) & np.isfinite(score)
        expected = (score[finite] - score[finite].mean()) / score[finite].std()
        assert np.allclose(z[finite], expected)
    assert np.isnan(z[2]) and z[6] == 0.0 and (z[7:] == 0.0).all()  # one score / equal scores: no evidence
    with pytest.raises(ValueError, match="one label per example \\(9\\); got shape \\(3,\\)"):
        standardised_within(score, classes[:3])


@pytest.mark.parametrize("detector", ["aum", "cartography", "loss", "last_loss"])
def test_class_conditional_scores_find_noise_that_class_difficulty_hides(detector):
    """Wrong answers cost more loss than right ones of their class, but one class is much harder than the
    other: one cut across classes flags the hard class; within each class the wrong answers stand out."""
    rng = np.random.default_rng(0)
    n = 400
    classes = np.repeat(["easy", "hard"], n // 2)
    noisy = rng.random(n) < 0.3
    margin = np.where(classes == "easy", 3.0, -1.0) - 1.5 * noisy + 0.3 * rng.standard_normal(n)
    record = synthetic_record(margin)
    raw = roc_auc_score(noisy, noise_scores(record, detector))
    conditional = roc_auc_score(noisy, noise_scores(record, detector, classes))
    assert raw < 0.75 and conditional > 0.97, (raw, conditional)
    rule = DropNoisy(detector, drop=0.3, classes=classes)
    kept = rule.keep_ids(record)
    assert noisy[kept].mean() < 0.05 and (classes[kept] == "hard").mean() > 0.4


def test_class_codes_group_like_the_labels_they_code():
    score = np.random.default_rng(1).standard_normal(8)
    labels = np.array(["x", "y", "x", "z", "y", "x", "z", "z"])
    dense = np.array([0, 1, 0, 2, 1, 0, 2, 2])  # used as they are
    sparse = np.array([7, 900, 7, -3, 900, 7, -3, -3])  # outside [0, n): recoded
    expected = standardised_within(score, labels)
    for codes in (dense, sparse, dense.astype(np.uint8)):
        assert np.allclose(standardised_within(score, codes), expected)
    assert (class_codes(dense) == dense).all() and class_codes(sparse).max() == 2


def test_drop_noisy_refuses_classes_of_the_wrong_length_before_training_and_scores_once_per_decision(monkeypatch):
    rule = DropNoisy("last_loss", drop=0.3, classes=["a", "b"] * 5)
    with pytest.raises(ValueError, match="DropNoisy classes give 10 labels but the pool has 12 examples"):
        rule.initial_subset(12)
    assert len(rule.initial_subset(10)) == 10
    record = synthetic_record(np.linspace(-1, 1, 10))
    calls = []
    import dataflex.detectors as detectors

    real = detectors.noise_scores
    monkeypatch.setattr(detectors, "noise_scores", lambda *a: calls.append(1) or real(*a))
    kept = rule.keep_ids(record)
    assert len(calls) == 1 and len(kept) == 7  # 70 % of the pool (per_label is off)
    pool, noise = rule.last_scores
    assert np.allclose(noise, real(record, "last_loss", ["a", "b"] * 5)[pool])


def test_detectors_refuse_a_record_with_visits_not_folded_in():
    """A finished run's last visits are buffered until a gather: deciding before it would silently use a
    record without them."""
    record = synthetic_record(np.linspace(-1, 1, 10))
    one = {name: torch.tensor([5.0]) for name in ("loss", "margin", "confidence", "accuracy")}
    record.add(np.array([3]), 1, one)
    rule = DropNoisy("last_loss", drop=0.3)
    for read in (
        lambda: rule.keep_ids(record),
        lambda: noise_scores(record, "aum"),
        lambda: aum_threshold(record, np.array([0, 1])),
        lambda: cartography_regions(record),
    ):
        with pytest.raises(ValueError, match="holds 1 visits not folded in yet; call record.gather"):
            read()
    record.gather()
    assert record.pending == 0 and 3 not in rule.keep_ids(record)  # its latest loss (5.0) is now the highest


def test_class_conditional_scores_do_not_mix_with_the_aum_threshold_mode():
    with pytest.raises(ValueError, match="classes .* apply to drop="):
        DropNoisy("aum", threshold_ids=[0, 1], classes=["a", "b", "a"])
    # per_label keeps a share of each label; the threshold mode has no share, so the two are not combined silently
    with pytest.raises(ValueError, match="per_label keeps the same share of every label, which applies to drop="):
        DropNoisy("aum", threshold_ids=[0, 1], per_label=True)
