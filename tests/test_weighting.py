"""Per-example loss weights: finite, normalised over the global batch, identical across ranks; Trainer hook-up."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from transformers import Trainer, TrainingArguments

import dataflex.weighting as weighting
from dataflex.testbeds.tiny import collate_causal, default_data_dir, encode_bytes, load_jsonl_dir, tiny_gpt2
from dataflex.weighting import ExampleWeightedLoss, loss_weights


def test_weights_are_finite_normalised_and_ordered():
    losses = torch.tensor([1.0, 2.0, 3.0, float("nan"), 10.0])
    w = loss_weights(losses, temperature=1.0, direction="hard", max_weight=100)
    assert torch.isfinite(w).all() and w[3] == 0
    assert abs(float(w[[0, 1, 2, 4]].mean()) - 1) < 1e-5
    assert (w[[0, 1, 2, 4]].diff() > 0).all()
    easy = loss_weights(losses, temperature=1.0, direction="easy", max_weight=100)
    assert (easy[[0, 1, 2, 4]].diff() < 0).all()
    assert torch.equal(loss_weights(losses, temperature=float("inf")), torch.tensor([1.0, 1, 1, 0, 1]))
    assert float(loss_weights(losses, temperature=0.01, max_weight=3.0).max()) == 3.0
    with pytest.raises(ValueError, match="temperature must be > 0"):
        loss_weights(losses, temperature=0.0)


def test_normalisation_is_global_and_equal_across_ranks(monkeypatch):
    rank_losses = [np.array([1.0, 4.0, 2.0]), np.array([0.5, 8.0, 3.0])]
    together = loss_weights(torch.tensor(np.concatenate(rank_losses), dtype=torch.float32), max_weight=100)
    per_rank = []
    for r in range(2):  # each rank sees the same gathered list, in rank order
        monkeypatch.setattr(
            weighting.dist, "all_gather_objects", lambda obj: [x.astype(np.float32) for x in rank_losses]
        )
        per_rank.append(loss_weights(torch.tensor(rank_losses[r], dtype=torch.float32), max_weight=100))
    torch.testing.assert_close(torch.cat(per_rank), together)
    assert abs(float(torch.cat(per_rank).mean()) - 1) < 1e-5


def fixed_length_dataset(n=48, length=32):
    from datasets import Dataset

    texts = [
        r["text"]
        for r in load_jsonl_dir(default_data_dir() / "textmix" / "train", max_per_file=40)
        if len(r["text"].encode()) >= length
    ][:n]
    return Dataset.from_dict({"input_ids": [encode_bytes(t, length) for t in texts]})


def train(ds, tmp_path, loss_func, accum=2):
    args = TrainingArguments(
        output_dir=str(tmp_path),
        per_device_train_batch_size=4,
        gradient_accumulation_steps=accum,
        max_steps=5,
        learning_rate=3e-3,
        report_to=[],
        use_cpu=True,
        seed=0,
        save_strategy="no",
        disable_tqdm=True,
        logging_steps=100,
    )
    model = tiny_gpt2(n_layer=1, n_embd=32, n_head=2, seed=0)
    Trainer(model=model, args=args, train_dataset=ds, data_collator=collate_causal, compute_loss_func=loss_func).train()
    return model


def test_uniform_weights_reproduce_stock_training_and_weighting_changes_it(tmp_path):
    ds = fixed_length_dataset()  # equal lengths: mean of per-example means == token mean
    stock = train(ds, tmp_path / "a", None)
    uniform = train(ds, tmp_path / "b", ExampleWeightedLoss(temperature=float("inf"), gradient_accumulation_steps=2))
    for a, b in zip(stock.parameters(), uniform.parameters()):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    func = ExampleWeightedLoss(temperature=0.5, gradient_accumulation_steps=2)
    weighted = train(ds, tmp_path / "c", func)
    assert func.last_weights is not None and abs(float(func.last_weights.mean()) - 1) < 1e-4
    assert not all(torch.allclose(a, b, atol=1e-5) for a, b in zip(stock.parameters(), weighted.parameters()))


@pytest.mark.parametrize(
    "settings,message",
    [
        ({"max_weight": 0}, r"max_weight must be >= 1 .*got 0"),  # before: every weight 0, a loss of 0, no learning
        ({"max_weight": 0.5}, r"max_weight must be >= 1"),
        ({"temperature": "1"}, r"temperature must be a number; got '1'"),
        ({"temperature": float("nan")}, r"temperature must be > 0"),
        ({"direction": "sideways"}, r"direction='sideways'; valid values are 'hard', 'easy'"),
        ({"gradient_accumulation_steps": 2.5}, r"gradient_accumulation_steps must be an integer; got 2.5"),
    ],
)
def test_weighting_settings_that_would_change_what_is_learnt_are_refused_when_made(settings, message):
    with pytest.raises(ValueError, match=message):
        ExampleWeightedLoss(**settings)
    if "gradient_accumulation_steps" not in settings:
        with pytest.raises(ValueError, match=message):
            loss_weights(torch.tensor([1.0, 2.0]), **settings)


def test_a_loss_accumulating_other_micro_batches_than_the_trainer_is_refused(tmp_path):
    """ExampleWeightedLoss divides by its own accumulation count (the Trainer leaves a custom loss undivided):
    given 1 while the Trainer accumulates 2, every gradient would be doubled without a word."""
    from hf_helpers import make_trainer, small_dataset

    from dataflex import DataFlexCallback
    from dataflex.policies import Uniform

    dfx = DataFlexCallback(Uniform())
    loss = dfx.wrap_loss(ExampleWeightedLoss())
    trainer = make_trainer(small_dataset(per_domain=8), dfx, tmp_path, accum=2, max_steps=2, compute_loss_func=loss)
    with pytest.raises(
        ValueError,
        match=r"ExampleWeightedLoss\(gradient_accumulation_steps=1\) but the Trainer "
        r"accumulates 2 micro-batches per step: every gradient would be scaled by 2",
    ):
        trainer.train()
    # Without the callback, the loss finds the Trainer calling it and refuses before any step.
    ds = fixed_length_dataset(n=16)
    for given, times in ((1, "2"), (4, "0.5")):
        with pytest.raises(ValueError, match=rf"\(gradient_accumulation_steps={given}\) .* the Trainer accumulates 2 "
                           rf"micro-batches per step: every gradient would be {times} times"):  # fmt: skip
            train(ds, tmp_path / str(given), ExampleWeightedLoss(gradient_accumulation_steps=given), accum=2)


def test_without_the_callback_the_loss_divides_a_short_last_step_by_its_own_micro_batches(tmp_path):
    """24 examples in micro-batches of 4 with 4 accumulated: each epoch's second step has 2 micro-batches. Divided
    by the configured 4, that step's gradient was half the stock loss's without a word; the loss now reads each
    step's count from the Trainer calling it, as the callback makes it do — the Trainer running now, also when
    the same loss object trains a second one (20 examples: short steps of 1)."""
    from dataflex.losses import per_example_mean_loss

    divisors = []

    class Recorded(ExampleWeightedLoss):
        def __call__(self, outputs, labels, num_items_in_batch=None, **kw):
            loss = super().__call__(outputs, labels, num_items_in_batch, **kw)
            if torch.is_grad_enabled():  # every weight 1: the loss is the mean example loss over the divisor
                divisors.append(round(float(per_example_mean_loss(outputs.logits, labels).mean() / loss)))
            return loss

    loss = Recorded(temperature=float("inf"), gradient_accumulation_steps=4)
    train(fixed_length_dataset(n=24), tmp_path / "a", loss, accum=4)
    assert divisors == [4, 4, 4, 4, 2, 2] * 2 + [4, 4, 4, 4]  # 5 steps: 2 epochs of (4 + 2), then 4
    divisors.clear()
    train(fixed_length_dataset(n=20), tmp_path / "b", loss, accum=4)
    assert divisors == [4, 4, 4, 4, 1] * 2 + [4, 4, 4, 4]


def test_the_first_steps_micro_batches_are_read_from_the_trainers_token_count():
    """The step ends where the running token count (shifted or not, as the model counts) reaches the Trainer's
    total; a total that changes first is a restarted loop (the retry after an out-of-memory error): counted afresh."""
    from dataflex.weighting import FirstStepCount

    labels = torch.zeros(2, 4, dtype=torch.long)  # 6 counted tokens shifted, 8 unshifted
    restarted = FirstStepCount()
    assert restarted.add(labels, 36) is None  # an attempt cut short
    assert [restarted.add(labels, 18) for _ in range(3)] == [None, None, 3]  # the retry: 3 micro-batches, shifted
    unshifted = FirstStepCount()
    assert [unshifted.add(labels, 16), unshifted.add(labels, 16), unshifted.add(labels, 20)] == [None, None, 2]


@pytest.mark.parametrize("kind", ["example", "token"])
def test_label_smoothing_the_trainer_would_drop_under_a_dataflex_loss_is_refused(tmp_path, kind):
    """With a compute_loss_func the Trainer skips its label smoother, so label_smoothing_factor=0.1 would
    silently train without smoothing; a user's own loss (which may smooth) is left alone."""
    from hf_helpers import make_trainer, small_dataset

    from dataflex import DataFlexCallback
    from dataflex.policies import Uniform
    from dataflex.token_weighting import TokenWeightedLoss

    dfx = DataFlexCallback(Uniform())
    loss = ExampleWeightedLoss() if kind == "example" else TokenWeightedLoss(lambda t, c, ids: c.to(t.dtype), dfx)
    ds = small_dataset(per_domain=8)
    trainer = make_trainer(
        ds, dfx, tmp_path, max_steps=1, compute_loss_func=dfx.wrap_loss(loss), label_smoothing_factor=0.1
    )
    name = type(loss).__name__
    with pytest.raises(ValueError, match=rf"label_smoothing_factor=0.1 would not be applied: .* {name} does not"):
        trainer.train()
    own = DataFlexCallback(Uniform())

    def my_loss(outputs, labels, num_items_in_batch=None):
        return outputs.logits.float().mean() * 0

    make_trainer(
        ds, own, tmp_path / "own", max_steps=1, compute_loss_func=own.wrap_loss(my_loss), label_smoothing_factor=0.1
    ).train()


def test_the_trainers_custom_loss_multiplier_follows_its_version_and_settings(monkeypatch):
    """dataflex.hf.loss_scale mirrors Trainer.compute_loss: x processes / tensor-parallel size under
    average_tokens_across_devices (x GPUs under DataParallel in 5.x), 1 without it, unknown before 4.50."""
    from types import SimpleNamespace

    import transformers

    from dataflex.hf.loss_scale import custom_loss_multiplier

    def trainer(average=True, n_gpu=1, processes=4, tp=None):
        t = SimpleNamespace(
            args=SimpleNamespace(average_tokens_across_devices=average, n_gpu=n_gpu),
            accelerator=SimpleNamespace(num_processes=processes),
        )
        if tp is not None:
            t.get_tp_size = lambda: tp
        return t

    monkeypatch.setattr(transformers, "__version__", "5.25.0")
    assert custom_loss_multiplier(trainer()) == 4
    assert custom_loss_multiplier(trainer(tp=2)) == 2
    assert custom_loss_multiplier(trainer(average=False)) == 1
    assert custom_loss_multiplier(trainer(n_gpu=3, processes=1)) == 3
    monkeypatch.setattr(transformers, "__version__", "4.55.0.dev0")
    assert custom_loss_multiplier(trainer(n_gpu=3, processes=1)) == 1 and custom_loss_multiplier(trainer()) == 4
    monkeypatch.setattr(transformers, "__version__", "4.49.0")
    assert custom_loss_multiplier(trainer()) is None


def test_example_weighted_loss_divides_by_the_trainer_scale_only_when_the_trainer_counted_tokens():
    logits = torch.randn(3, 5, 11)
    labels = torch.randint(0, 11, (3, 5))
    outputs = {"logits": logits}
    loss = ExampleWeightedLoss(temperature=float("inf"))
    plain = loss(outputs, labels)
    assert loss.trainer_scale is None and torch.equal(loss(outputs, labels, num_items_in_batch=12), plain)
    loss.trainer_scale = 4  # set by the callback at train begin
    assert torch.allclose(loss(outputs, labels, num_items_in_batch=12), plain / 4)
    assert torch.equal(loss(outputs, labels), plain)  # no count, no multiplication to undo


def test_a_one_example_micro_batch_is_named_once_since_nothing_is_reweighted():
    """One example per micro-batch in one process (batch size 1, or a padding-free row the loss was not told how
    to split, as when it is not passed through the callback): every weight is 1, so it warns, once."""
    outputs, labels = {"logits": torch.randn(1, 9, 11, requires_grad=True)}, torch.randint(0, 11, (1, 9))
    loss = ExampleWeightedLoss()
    with pytest.warns(UserWarning, match="a micro-batch of one example: its weight is 1.*callback.wrap_loss"):
        loss(outputs, labels)
    assert loss.last_weights.tolist() == [1.0]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loss(outputs, labels)  # once
        with torch.no_grad():
            ExampleWeightedLoss()(outputs, labels)  # an evaluation forward trains nothing
        segments = torch.tensor([[0, 0, 0, 0, 1, 1, 1, 1, -1]])  # the callback's split: 2 examples, 1 padding
        assert ExampleWeightedLoss()(outputs, labels, segments=segments).requires_grad


def test_a_short_last_accumulation_step_and_evaluation_keep_the_stock_loss_scale(tmp_path):
    """An epoch's last optimizer step can hold fewer micro-batches than gradient_accumulation_steps; the stock loss
    keeps its scale there, and ExampleWeightedLoss divided by the configured count (half the gradient of a 2-of-4
    step). The Trainer also evaluates through the compute_loss_func: the reported eval_loss was weighted and
    divided by the accumulation (1.39 where the stock loss is 5.55, at 4 steps)."""
    from transformers import TrainerCallback

    from dataflex import DataFlexCallback
    from dataflex.policies import Uniform
    from dataflex.testbeds.tiny import tiny_llama

    ds = fixed_length_dataset(n=40)  # equal lengths: mean of per-example means == token mean
    ds = ds.add_column("domain", ["a", "b"] * 20)  # 10 micro-batches of 4 per epoch: steps of 4, 4 and 2

    class StepChanges(TrainerCallback):
        def __init__(self, model) -> None:
            self.model, self.changes = model, []
            self.before = [p.detach().clone() for p in model.parameters()]

        def on_step_end(self, args, state, control, **kwargs):
            now = [p.detach().clone() for p in self.model.parameters()]
            self.changes.append(sum(float((a - b).abs().sum()) for a, b in zip(now, self.before)))
            self.before = now

    def run(loss, name):
        dfx = DataFlexCallback(Uniform(), update_every=100)
        model = tiny_llama(n_layer=1, hidden=32, n_head=2, seed=0)  # counts shifted tokens, as its loss does
        changes = StepChanges(model)
        args = TrainingArguments(
            output_dir=str(tmp_path / name),
            per_device_train_batch_size=4,
            gradient_accumulation_steps=4,
            num_train_epochs=1,
            optim="sgd",  # the gradient's scale reaches the parameters unchanged (Adam would mostly hide it)
            learning_rate=0.5,
            lr_scheduler_type="constant",
            max_grad_norm=0.0,
            report_to=[],
            use_cpu=True,
            save_strategy="no",
            disable_tqdm=True,
        )
        trainer = Trainer(
            model=model,
            args=args,
            train_dataset=ds,
            eval_dataset=ds,
            data_collator=collate_causal,
            callbacks=[dfx, changes],
            compute_loss_func=None if loss is None else dfx.wrap_loss(loss),
        )
        dfx.attach(trainer)
        eval_loss = trainer.evaluate()["eval_loss"]
        trainer.train()
        return changes.changes, eval_loss

    stock_changes, stock_eval = run(None, "stock")
    uniform_changes, uniform_eval = run(
        ExampleWeightedLoss(temperature=float("inf"), gradient_accumulation_steps=4), "u"
    )
    assert len(stock_changes) == 3
    assert uniform_changes == pytest.approx(stock_changes, rel=1e-3)  # the short third step included
    _, weighted_eval = run(ExampleWeightedLoss(temperature=0.5, gradient_accumulation_steps=4), "w")
    assert uniform_eval == pytest.approx(stock_eval, rel=1e-6) and weighted_eval == pytest.approx(stock_eval, rel=1e-6)
