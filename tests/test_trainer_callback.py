"""A stock transformers.Trainer with DataFlexCallback: losses, weights, logging, crash-and-resume."""

from __future__ import annotations

import numpy as np
import pytest
from hf_helpers import StepRecorder, make_trainer, single_example_loss, small_dataset, tiny_model, trainer_settings
from transformers import Trainer, TrainerCallback, TrainingArguments
from transformers.trainer_pt_utils import LabelSmoother

import dataflex.hf.capture as capture_module
from dataflex import DataFlexCallback
from dataflex.policies import ODM, Static, Uniform
from dataflex.testbeds.tiny import collate_causal


@pytest.fixture(scope="module")
def ds():
    return small_dataset()


class VerifyLosses(TrainerCallback):
    """Before each optimizer step (parameters as in the forward), recompute each example alone."""

    def __init__(self, dfx, ds):
        self.dfx, self.ds, self.checked, self.max_err = dfx, ds, 0, 0.0

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        ids, losses, valid = self.dfx.last_step_records()
        was_training = model.training
        model.eval()  # dropout is 0, eval only avoids the hook recording these forwards
        for i, loss in zip(ids, losses):
            ref = single_example_loss(model, self.ds[int(i)])
            self.max_err = max(self.max_err, abs(ref - float(loss)))
            self.checked += 1
        model.train(was_training)


@pytest.mark.parametrize("arch,accum,workers", [("gpt2", 1, 0), ("gpt2", 2, 2), ("llama", 2, 0)])
def test_losses_equal_recomputation_and_weights_change(ds, tmp_path, arch, accum, workers):
    dfx = DataFlexCallback(ODM(), domains=ds["domain"], update_every=1)
    verify = VerifyLosses(dfx, ds)
    trainer = make_trainer(
        ds, dfx, tmp_path, max_steps=10, accum=accum, workers=workers, save_steps=100, extra=[verify], arch=arch
    )
    trainer.train()
    assert verify.checked == 10 * 4 * accum
    assert verify.max_err < 1e-4, verify.max_err
    first, last = np.array(dfx.history[0]["weights"]), np.array(dfx.history[-1]["weights"])
    assert not np.allclose(first, last), "ODM weights never moved"
    logged = [h for h in trainer.state.log_history if "dataflex/entropy" in h]
    assert len(logged) == 10 - 0 and {f"dataflex/weight/{d}" for d in dfx.domain_names} <= set(logged[-1])
    assert logged[-1]["dataflex/weight/code"] == pytest.approx(last[dfx.domain_names.index("code")])


class SmoothedLossChecked(Trainer):
    """Compares each training loss with transformers' own label smoother on the same forward and labels."""

    max_diff = 0.0

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        labels = inputs["labels"]  # the Trainer pops them before the forward
        loss, outputs = super().compute_loss(model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch)
        if model.training:
            smoother = LabelSmoother(epsilon=self.args.label_smoothing_factor)
            stock = smoother(outputs, labels, shift_labels=True, num_items_in_batch=num_items_in_batch)
            self.max_diff = max(self.max_diff, abs(float(loss) - float(stock)))
        return (loss, outputs) if return_outputs else loss


def test_label_smoothing_is_scored_and_the_trainer_still_smooths(ds, tmp_path):
    """With label_smoothing_factor > 0 the Trainer pops the labels before the forward and smooths the loss itself:
    dataflex saw no labels, scored nothing, and ODM kept its initial mixture all run behind one warning. It now
    scores each forward's (unsmoothed) per-example loss where the Trainer calls its smoother, whose loss is
    unchanged; the smoother is handed back when training ends."""
    dfx = DataFlexCallback(ODM(), domains=ds["domain"], update_every=1)
    verify = VerifyLosses(dfx, ds)
    args = TrainingArguments(
        **trainer_settings(tmp_path, accum=2, max_steps=6, save_steps=100, logging_steps=100, workers=0, seed=0),
        label_smoothing_factor=0.1,
        report_to=[],
    )
    trainer = SmoothedLossChecked(
        model=tiny_model("gpt2"), args=args, train_dataset=ds, data_collator=collate_causal, callbacks=[verify]
    )
    dfx.attach(trainer)
    trainer.train()
    assert verify.checked == 6 * 2 * 4 and verify.max_err < 1e-4, (verify.checked, verify.max_err)
    assert trainer.max_diff < 1e-6, trainer.max_diff
    assert not np.allclose(dfx.history[0]["weights"], dfx.history[-1]["weights"]), "ODM decided on no signal"
    assert type(trainer.label_smoother) is LabelSmoother


def test_sampler_follows_the_policy_weights(ds, tmp_path):
    dfx = DataFlexCallback(Static({"code": 1.0}), domains=ds["domain"])
    rec = StepRecorder(dfx)
    make_trainer(ds, dfx, tmp_path, max_steps=4, save_steps=100, extra=[rec]).train()
    seen = {ds[i]["domain"] for ids in rec.ids.values() for i in ids}
    assert seen == {"code"}


# Crash-and-resume of every policy: tests/test_hf_adapter.py::test_every_decider_resumes_exactly_through_the_trainer


def test_state_for_another_dataset_is_refused(ds, tmp_path):
    dfx = DataFlexCallback(Uniform(), domains=ds["domain"])
    make_trainer(ds, dfx, tmp_path, max_steps=4, save_steps=4).train()
    other = small_dataset(per_domain=20)
    dfx2 = DataFlexCallback(Uniform(), domains=other["domain"])
    with pytest.raises(ValueError, match="different dataset"):
        make_trainer(other, dfx2, tmp_path, max_steps=6).train(resume_from_checkpoint=str(tmp_path / "checkpoint-4"))


def test_nan_losses_are_masked_counted_and_weights_stay_valid(ds, tmp_path, monkeypatch):
    real = capture_module.per_example_loss_from_token_losses  # the stock causal-LM loss path

    def poisoned(*args, **kwargs):
        loss, has_tokens = real(*args, **kwargs)
        loss = loss.clone()
        loss[0] = float("nan")
        loss[1] = float("inf")
        return loss, has_tokens

    monkeypatch.setattr(capture_module, "per_example_loss_from_token_losses", poisoned)
    dfx = DataFlexCallback(ODM(floor=0.01), domains=ds["domain"], update_every=1)
    trainer = make_trainer(ds, dfx, tmp_path, max_steps=6, save_steps=100)
    trainer.train()
    assert dfx.store.total_non_finite == 12
    for h in dfx.history:
        w = np.array(h["weights"])
        assert np.isfinite(w).all() and abs(w.sum() - 1) < 1e-9 and w.min() >= 0.01 - 1e-12
    logged = [h["dataflex/non_finite"] for h in trainer.state.log_history if "dataflex/non_finite" in h]
    assert logged and all(v == 2 for v in logged)


def test_all_masked_examples_are_counted(ds, tmp_path, monkeypatch):
    import dataflex.testbeds.tiny as tiny

    def collate_masking_first(features):
        batch = tiny.collate_causal(features)
        batch["labels"][0, :] = -100
        return batch

    dfx = DataFlexCallback(ODM(), domains=ds["domain"], update_every=1)
    trainer = make_trainer(ds, dfx, tmp_path, max_steps=3, save_steps=100)
    trainer.data_collator = collate_masking_first
    trainer.train()
    assert dfx.store.total_masked == 3
    assert all(np.isfinite(h["weights"]).all() for h in dfx.history)


def test_bad_inputs_give_clear_errors(ds, tmp_path):
    with pytest.raises(ValueError, match="no column 'domain'"):
        make_trainer(ds.remove_columns("domain"), DataFlexCallback(Uniform()), tmp_path, max_steps=2).train()
    with pytest.raises(ValueError, match="got 3 domain labels for a training set of"):
        make_trainer(ds, DataFlexCallback(Uniform(), domains=["a", "b", "c"]), tmp_path, max_steps=2).train()
    with pytest.raises(ValueError, match=r"unknown domain name\(s\) \['poetry'\]"):
        dfx = DataFlexCallback(Static({"code": 0.5, "poetry": 0.5}), domains=ds["domain"])
        make_trainer(ds, dfx, tmp_path, max_steps=2).train()
    with pytest.raises(ValueError, match="update_every must be a positive integer; got 0"):
        DataFlexCallback(Uniform(), update_every=0)
    with pytest.raises(TypeError, match="has no bind"):
        DataFlexCallback(object())


def test_domain_column_is_read_when_columns_are_kept(ds, tmp_path):
    dfx = DataFlexCallback(Uniform(), update_every=1)
    trainer = make_trainer(ds, dfx, tmp_path, max_steps=2, save_steps=100)
    trainer.args.remove_unused_columns = False

    def collate_dropping_domain(features):
        from dataflex.testbeds.tiny import collate_causal

        return collate_causal([{"input_ids": f["input_ids"]} for f in features])

    trainer.data_collator = collate_dropping_domain
    trainer.train()
    assert dfx.domain_names == sorted(set(ds["domain"]))


def test_online_doremi_through_the_callback(ds, tmp_path):
    from dataflex.proxies.doremi import DoReMiOnline
    from dataflex.testbeds.tiny import tiny_gpt2

    policy = DoReMiOnline(
        tiny_gpt2(n_layer=1, n_embd=32, n_head=2, seed=1),
        tiny_gpt2(n_layer=1, n_embd=32, n_head=2, seed=2),
        use_average=False,
    )
    dfx = DataFlexCallback(policy, domains=ds["domain"], update_every=2)
    make_trainer(ds, dfx, tmp_path, max_steps=6, accum=2, save_steps=100).train()
    assert policy.steps == 12 and policy.proxy_seconds > 0  # one proxy step per micro-batch
    assert not np.allclose(dfx.history[-1]["weights"], dfx.history[0]["weights"])


@pytest.mark.parametrize("max_steps,warns", [(6, True), (12, False)])
def test_odm_warns_when_the_trainer_run_is_too_short_for_it_to_leave_uniform(tmp_path, max_steps, warns):
    """3 domains: uniform for floor(3 ln 3) = 3 updates, so the 4th is the first that can move; at
    update_every=2, 6 steps make 2 updates that count (the one at the last step changes nothing), 12 make 5."""
    import warnings

    dfx = DataFlexCallback(ODM(), update_every=2)
    trainer = make_trainer(small_dataset(per_domain=8), dfx, tmp_path, max_steps=max_steps, save_steps=100)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.train()
    said = [str(w.message) for w in caught if "keeps its initial mixture" in str(w.message)]
    assert len(said) == int(warns), said
    if warns:
        assert "until its update 4, but this run makes 2 updates (update_every=2)" in said[0]
    moved = any(abs(w - 1 / 3) > 1e-6 for h in dfx.history for w in h["weights"])
    assert moved == (not warns)  # the warning says exactly when the mixture never moves


def test_a_piecewise_schedule_switches_at_its_stage_step_on_the_trainer(tmp_path):
    """The stage from step 4 is in force from the decision at step 4; a callback whose cadence differs from the
    schedule's (which counts updates) or whose warmup shifts its updates is refused, not run stages late."""
    from dataflex.policies import Piecewise

    def schedule():
        return Piecewise([(0, [0.8, 0.1, 0.1]), (4, [0.1, 0.1, 0.8])], update_every=2)

    dfx = DataFlexCallback(schedule(), update_every=2)
    make_trainer(small_dataset(per_domain=8), dfx, tmp_path / "ok", max_steps=8, save_steps=100).train()
    assert {h["step"]: h["weights"][0] for h in dfx.history} == pytest.approx({0: 0.8, 2: 0.8, 4: 0.1, 6: 0.1, 8: 0.1})
    for kwargs, message in [
        ({"update_every": 4}, r"Piecewise\(update_every=2\) is driven by updates every 4 steps"),
        ({"update_every": 2, "warmup_steps": 3}, r"warmup_steps=3 delays the first update past step 2"),
    ]:
        late = DataFlexCallback(schedule(), **kwargs)
        trainer = make_trainer(small_dataset(per_domain=8), late, tmp_path / "late", max_steps=8, save_steps=100)
        with pytest.raises(ValueError, match=message):
            trainer.train()


def test_a_mixing_run_with_no_update_warns_once_and_a_fixed_mixture_does_not(tmp_path):
    import warnings

    from dataflex.policies import Natural

    for policy, expected in [(ODM(), 1), (Natural(), 0)]:
        dfx = DataFlexCallback(policy, update_every=10)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            make_trainer(small_dataset(per_domain=8), dfx, tmp_path, max_steps=6, save_steps=100).train()
        said = [
            str(w.message) for w in caught if "falls inside" in str(w.message) or "initial mixture" in str(w.message)
        ]
        assert len(said) == expected, said  # one warning, not also the exploration-phase one
        if expected:
            assert said[0].startswith(
                "no ODM update falls inside this run (update_every=10, warmup_steps=0, max_steps=6)"
            )


def test_the_data_order_follows_data_seed_as_the_stock_sampler_does(ds, tmp_path):
    """TrainingArguments.data_seed seeds the stock Trainer's sampler (seed when unset); dataflex's sampler takes
    it the same way, so a sweep over data_seed sees other data orders (before, dataflex read seed alone: one
    order for every data_seed), the model seed leaves the order alone, and the callback's own seed wins."""

    def order(folder, callback_seed=None, **args):
        dfx = DataFlexCallback(Uniform(), update_every=2, seed=callback_seed)
        rec = StepRecorder(dfx)
        make_trainer(ds, dfx, tmp_path / folder, max_steps=3, extra=[rec], **args).train()
        return [i for step in sorted(rec.ids) for i in rec.ids[step]]

    base = order("a", seed=0)
    assert order("b", seed=0, data_seed=0) == base
    assert order("c", seed=0, data_seed=1) != base
    assert order("d", seed=5, data_seed=0) == base  # another model seed, the same data order
    assert order("e", seed=0, data_seed=1, callback_seed=0) == base
