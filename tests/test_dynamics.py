"""Training dynamics: per-visit statistics equal a direct computation, the record folds visits like a per-visit
loop whatever the gathering, lives in checkpoints, and the Trainer fills it from the training forward."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import through_checkpoint
from hf_helpers import assert_trainer_resumes_exactly, make_trainer, single_example_loss, small_dataset

from dataflex import DataFlexCallback
from dataflex.dynamics import TrainingDynamics, visit_statistics
from dataflex.dynamics import _grid_statistics as _grid
from dataflex.policies import ODM
from dataflex.testbeds.tiny import collate_causal


def direct_statistics(logits: torch.Tensor, labels: torch.Tensor) -> dict[str, list[float]]:
    """Loop over examples and counted tokens: the quantities as defined, no vectorisation."""
    out = {"loss": [], "margin": [], "confidence": [], "accuracy": []}
    for b in range(labels.shape[0]):
        losses, margins, probs, right = [], [], [], []
        for t in range(labels.shape[1] - 1):
            y = int(labels[b, t + 1])
            if y == -100:
                continue
            z = logits[b, t].double()
            losses.append(float(torch.logsumexp(z, 0) - z[y]))
            others = torch.cat([z[:y], z[y + 1 :]])
            margins.append(float(z[y] - others.max()))
            probs.append(float(torch.softmax(z, 0)[y]))
            right.append(float(int(z.argmax()) == y))
        for key, values in zip(out, (losses, margins, probs, right)):
            out[key].append(float(np.mean(values)) if values else float("nan"))
    return out


def test_visit_statistics_equal_a_direct_computation():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 7, 11, generator=g) * 3
    labels = torch.randint(0, 11, (4, 7), generator=g)
    labels[0, :4] = -100  # a prompt
    labels[2, 1:] = -100  # no counted token
    labels[3, 1:] = logits[3, :-1].argmax(-1)  # every token right: accuracy 1, margins > 0
    got = visit_statistics(lambda r, t: logits[r, t], labels, vocab=11, chunk_elements=22)  # 2 positions a chunk
    want = direct_statistics(logits, labels)
    for key in want:
        np.testing.assert_allclose(got[key].numpy(), want[key], rtol=1e-5, atol=1e-6, equal_nan=True)
    assert got["accuracy"][3] == 1.0 and (got["margin"][3] > 0)
    assert np.isnan(got["loss"][2].item())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_statistics_on_the_whole_grid_equal_the_per_position_path(dtype, monkeypatch):
    """With the step's own token losses and most positions counted, the statistics are taken on the whole grid
    (margins from one max over the logits as they are, a masked max only where the target reaches it): the
    same numbers as the chunked copies of the counted positions, up to float32 summation order."""
    g = torch.Generator().manual_seed(1)
    logits = (torch.randn(6, 9, 13, generator=g) * 3).to(dtype)
    labels = torch.randint(0, 13, (6, 9), generator=g)
    labels[0, :2] = -100
    labels[4, 1:] = logits[4, :-1].float().argmax(-1)  # every target the argmax: the masked path
    logits[5, 2, :] = logits[5, 2, 0]  # a row of ties
    labels[2, 1:] = -100  # an example without counted tokens: NaN
    token_losses = torch.rand(6, 8, generator=g)
    kwargs = dict(vocab=13, token_losses=token_losses, chunk_elements=26)
    copied = visit_statistics(lambda r, t: logits[r, t], labels, **kwargs)
    import dataflex.dynamics as dynamics

    calls = []
    monkeypatch.setattr(dynamics, "_grid_statistics", lambda *a: calls.append(1) or _grid(*a))
    dense = visit_statistics(lambda r, t: logits[r, t], labels, logits=logits, **kwargs)
    assert calls == [1]
    assert np.isnan(dense["loss"][2].item()) and np.isnan(dense["margin"][2].item())
    # Chunks of two positions above; chunks of two whole rows and one chunk of everything give the same.
    for chunk_elements in (2 * 8 * 13, 2**24):
        again = visit_statistics(None, labels, logits=logits, **{**kwargs, "chunk_elements": chunk_elements})
        for key in dense:
            torch.testing.assert_close(again[key], dense[key], rtol=0, atol=0, equal_nan=True)
    for key in copied:
        torch.testing.assert_close(copied[key], dense[key], rtol=1e-6, atol=1e-6, equal_nan=True)
    want = direct_statistics(logits.float(), labels)
    np.testing.assert_allclose(dense["margin"].numpy(), want["margin"], rtol=1e-5, atol=1e-5)
    # A padding-free row holding three sequences: the grid's statistics are averaged per sequence.
    flat_logits, flat_labels = logits[:3].reshape(1, 27, 13), labels[:3].reshape(1, 27)
    segments = torch.arange(3).repeat_interleave(9)[None]
    flat = dict(vocab=13, token_losses=torch.rand(1, 26, generator=g), segments=segments, chunk_elements=26)
    copied = visit_statistics(lambda r, t: flat_logits[r, t], flat_labels, **flat)
    dense = visit_statistics(lambda r, t: flat_logits[r, t], flat_labels, logits=flat_logits, **flat)
    assert calls == [1, 1, 1, 1] and dense["loss"].shape == (3,)
    for key in copied:
        torch.testing.assert_close(copied[key], dense[key], rtol=1e-6, atol=1e-6, equal_nan=True)


def test_sequences_of_one_token_have_no_statistics():
    """A row of length 1 has no shifted position: every statistic is NaN, on both paths, not an error."""
    logits, labels = torch.randn(3, 1, 5), torch.randint(0, 5, (3, 1))
    for kwargs in (dict(token_losses=torch.zeros(3, 0), logits=logits), {}):
        got = visit_statistics(lambda r, t: logits[r, t], labels, vocab=5, **kwargs)
        assert all(v.shape == (3,) and torch.isnan(v).all() for v in got.values())


def test_visit_statistics_from_log_probs_have_no_margin():
    log_probs = torch.log(torch.tensor([[0.5, 0.25, 0.9], [0.1, 0.2, 0.3]]))
    mask = torch.tensor([[1, 1, 0], [0, 0, 1]])
    got = visit_statistics(None, torch.zeros(2, 4, dtype=torch.long), vocab=0, log_probs=(log_probs, mask))
    np.testing.assert_allclose(got["confidence"].numpy(), [0.375, 0.3], rtol=1e-6)
    np.testing.assert_allclose(got["loss"].numpy(), [-(np.log(0.5) + np.log(0.25)) / 2, -np.log(0.3)], rtol=1e-6)
    assert torch.isnan(got["margin"]).all() and torch.isnan(got["accuracy"]).all()


def random_visits(seed: int, n: int = 6, steps: int = 8, per_step: int = 5):
    """(step, ids, stats) with repeated ids inside a step (sampling with replacement) and a NaN (no tokens)."""
    rng = np.random.default_rng(seed)
    out = []
    for step in range(steps):
        ids = rng.integers(0, n, per_step)
        stats = {
            "loss": torch.tensor(rng.random(per_step) * 3),
            "margin": torch.tensor(rng.normal(size=per_step)),
            "confidence": torch.tensor(rng.random(per_step)),
            "accuracy": torch.tensor(rng.integers(0, 2, per_step).astype(float)),
        }
        if step == 3:
            stats["loss"][0] = float("nan")
        out.append((step, ids, stats))
    return out


def per_visit_loop(visits, n: int, ema: float = 0.9) -> dict[str, np.ndarray]:
    """The record's quantities, visit by visit in (step, id, loss) order, with plain Python lists."""
    flat = [
        (step, int(i), {k: float(v[j]) for k, v in stats.items()})
        for step, ids, stats in visits
        for j, i in enumerate(ids)
        if np.isfinite(float(stats["loss"][j]))
    ]
    flat.sort(key=lambda v: (v[0], v[1], v[2]["loss"]))
    seen: dict[int, list] = {i: [] for i in range(n)}
    for _, i, s in flat:
        seen[i].append(s)
    out = {"visits": [], "loss_mean": [], "loss_var": [], "loss_ema": [], "aum": [], "variability": []}
    out |= {"forgetting": [], "correctness": []}
    for i in range(n):
        v = seen[i]
        losses = [s["loss"] for s in v]
        conf = [s["confidence"] for s in v]
        right = [s["accuracy"] == 1.0 for s in v]
        e = float("nan")
        for k, x in enumerate(losses):
            e = x if k == 0 else ema * e + (1 - ema) * x
        out["visits"].append(len(v))
        out["loss_mean"].append(np.mean(losses) if v else np.nan)
        out["loss_var"].append(np.var(losses) if v else np.nan)
        out["loss_ema"].append(e)
        out["aum"].append(np.mean([s["margin"] for s in v]) if v else np.nan)
        out["variability"].append(np.std(conf) if v else np.nan)
        out["forgetting"].append(sum(a and not b for a, b in zip(right, right[1:])))
        out["correctness"].append(np.mean(right) if v else np.nan)
    return {k: np.asarray(v, dtype=float) for k, v in out.items()}


@pytest.mark.parametrize("gather_every", [1, 3, 100])
def test_the_record_folds_visits_like_a_per_visit_loop_whatever_the_gathering(gather_every):
    visits = random_visits(0)
    record = TrainingDynamics(6)
    for k, (step, ids, stats) in enumerate(visits):
        record.add(ids, step, stats)
        if (k + 1) % gather_every == 0:
            record.gather()
    record.gather()
    want = per_visit_loop(visits, 6)
    got = {
        "visits": record.visits,
        "loss_mean": record.loss_mean,
        "loss_var": record.loss_variance,
        "loss_ema": record.loss_ema,
        "aum": record.aum,
        "variability": record.variability,
        "forgetting": record.forgetting,
        "correctness": record.correctness,
    }
    for key in want:
        np.testing.assert_allclose(got[key], want[key], rtol=1e-12, atol=1e-12, equal_nan=True, err_msg=key)
    assert want["forgetting"].sum() > 0 and (want["visits"] > 1).any()


def test_the_record_survives_a_checkpoint_and_refuses_bad_state():
    record = TrainingDynamics(6)
    for step, ids, stats in random_visits(1):
        record.add(ids, step, stats)
    state = through_checkpoint(record.state_dict())
    again = TrainingDynamics(6)
    again.load_state_dict(state)
    for name in ("visits", "loss_mean", "loss_m2", "loss_ema", "margin_mean", "confidence_m2", "forgetting"):
        np.testing.assert_array_equal(getattr(again, name), getattr(record, name))
    with pytest.raises(ValueError, match="has shape \\(6,\\); this run has 7 examples"):
        TrainingDynamics(7).load_state_dict(state)
    bad = dict(state, loss_mean=np.where(state["visits"] > 0, np.nan, 0.0))
    with pytest.raises(ValueError, match="'loss_mean' is not finite"):
        TrainingDynamics(6).load_state_dict(bad)
    with pytest.raises(ValueError, match="counts exceed the number of visits"):
        TrainingDynamics(6).load_state_dict(dict(state, forgetting=state["visits"] + 1))
    with pytest.raises(ValueError, match="lacks \\['ema'\\]"):
        TrainingDynamics(6).load_state_dict({k: v for k, v in state.items() if k != "ema"})


@pytest.fixture(scope="module")
def ds():
    return small_dataset(per_domain=8)


def test_trainer_fills_the_record_from_the_training_forward(ds, tmp_path):
    """With learning rate 0 the model never changes, so every visit of an example must equal the loss (and
    margin) of that example under the final model, computed directly: the record maps rows to the right ids."""
    cb = DataFlexCallback(ODM(), update_every=2, dynamics=True)
    trainer = make_trainer(ds, cb, tmp_path, max_steps=10, learning_rate=0.0)
    trainer.train()
    record = cb.dynamics
    assert record.visits.sum() == 10 * 4  # every example of every step (batch 4), gathered at the end
    model = trainer.model.eval()
    for i in np.flatnonzero(record.visits)[:12].tolist():
        example = ds[i]
        np.testing.assert_allclose(record.loss_mean[i], single_example_loss(model, example), rtol=1e-5)
        assert record.loss_variance[i] == pytest.approx(0.0, abs=1e-10)
        batch = collate_causal([example])
        with torch.no_grad():
            logits = model(**batch).logits
        want = direct_statistics(logits, batch["labels"])
        np.testing.assert_allclose(record.aum[i], want["margin"][0], rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(record.confidence_mean[i], want["confidence"][0], rtol=1e-4, atol=1e-6)


def test_trainer_record_resumes_exactly(ds, tmp_path):
    def compare(full, resumed):
        for name in ("visits", "loss_mean", "loss_m2", "loss_ema", "margin_mean", "confidence_m2", "forgetting"):
            np.testing.assert_array_equal(getattr(full.dynamics, name), getattr(resumed.dynamics, name), err_msg=name)
        assert full.dynamics.visits.sum() > 0

    assert_trainer_resumes_exactly(
        lambda allow: DataFlexCallback(ODM(), update_every=2, dynamics=True, allow_missing_state=allow),
        ds,
        tmp_path,
        compare=compare,
    )


def test_resuming_with_another_dynamics_setting_is_refused(ds, tmp_path):
    make_trainer(ds, DataFlexCallback(ODM(), update_every=2), tmp_path, max_steps=4, save_steps=4).train()
    cb = DataFlexCallback(ODM(), update_every=2, dynamics=True)
    trainer = make_trainer(ds, cb, tmp_path, max_steps=8, save_steps=4)
    with pytest.raises(ValueError, match="has no training-dynamics record but this run keeps one"):
        trainer.train(resume_from_checkpoint=str(tmp_path / "checkpoint-4"))
