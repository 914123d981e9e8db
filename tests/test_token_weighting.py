"""Token-level weighting: weights of 1 are the stock loss, Rho-1's selected loss equals a direct computation,
reference losses are the model's own token losses, and the effective token share is logged."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hf_helpers import make_trainer, params, small_dataset, tiny_model

from dataflex import DataFlexCallback
from dataflex.policies import Uniform
from dataflex.testbeds.tiny import collate_causal
from dataflex.token_weighting import ReferenceTokenLosses, TokenWeightedLoss, reference_token_losses, rho1


@pytest.fixture(scope="module")
def ds():
    return small_dataset(per_domain=8)


def ones(token_loss, counted, ids):
    return torch.ones_like(token_loss)


def test_weights_of_one_train_exactly_like_the_stock_loss(ds, tmp_path):
    """Gradient accumulation 2, so the Trainer's num_items_in_batch spans micro-batches, as in the stock loss;
    evaluations during training take the plain loss (no training micro-batch's ids apply to them)."""
    settings = dict(max_steps=6, accum=2, logging_steps=2, eval_dataset=ds.select(range(8)))
    settings |= {"eval_strategy": "steps", "eval_steps": 3}
    stock = make_trainer(ds, DataFlexCallback(Uniform(), update_every=4), tmp_path / "stock", **settings)
    stock.train()
    cb = DataFlexCallback(Uniform(), update_every=4)
    loss = cb.wrap_loss(TokenWeightedLoss(ones, cb))
    weighted = make_trainer(ds, cb, tmp_path / "ones", compute_loss_func=loss, **settings)
    weighted.train()
    a, b = params(stock.model), params(weighted.model)
    assert all(np.allclose(a[k], b[k], rtol=0, atol=2e-6) for k in a), "weights of 1 changed training"

    def logged(trainer, key):
        return [h[key] for h in trainer.state.log_history if key in h]

    assert np.allclose(logged(weighted, "loss"), logged(stock, "loss"), rtol=1e-5)
    assert len(logged(stock, "eval_loss")) == 2
    assert np.allclose(logged(weighted, "eval_loss"), logged(stock, "eval_loss"), rtol=1e-5)
    shares = logged(weighted, "dataflex/effective_token_share")
    assert len(shares) == 3 and all(s == 1.0 for s in shares)  # every logging step, training tokens only


class FakeCallback:
    def __init__(self, ids):
        self.ids, self.metrics = None if ids is None else np.asarray(ids), []

    def current_ids(self):
        return self.ids

    def add_log_metrics(self, fn):
        self.metrics.append(fn)


def test_rho1_loss_is_the_mean_loss_of_the_selected_tokens(ds):
    model = tiny_model("gpt2", 0)
    batch = collate_causal([ds[i] for i in (3, 7, 11)])
    labels = batch.pop("labels")
    outputs = model(**batch)
    g = torch.Generator().manual_seed(0)
    counted = labels[:, 1:] != -100
    reference = ReferenceTokenLosses(
        [torch.rand(int(c.sum()), generator=g).numpy() * 5 for c in counted] + [np.zeros(0)] * 20
    )
    ids = np.array([0, 1, 2])
    cb = FakeCallback(ids)
    loss = TokenWeightedLoss(rho1(reference, keep=0.4), cb)(outputs, labels)
    # direct: every counted token's loss and excess, the top 40 % by excess, their plain mean
    token_losses, excess = [], []
    for r in range(3):
        ref = iter(reference.per_example[r].tolist())
        for t in range(labels.shape[1] - 1):
            y = int(labels[r, t + 1])
            if y == -100:
                continue
            logits = outputs.logits[r, t][None].detach().float()
            lt = float(torch.nn.functional.cross_entropy(logits, torch.tensor([y])))
            token_losses.append(lt)
            excess.append(lt - next(ref))
    k = int(np.ceil(0.4 * len(excess)))
    chosen = np.argsort(excess)[::-1][:k]
    assert loss.item() == pytest.approx(np.mean(np.asarray(token_losses)[chosen]), rel=1e-5)
    assert cb.metrics[0]()["dataflex/effective_token_share"] == pytest.approx(k / len(excess))
    loss.backward()  # the selection carries no gradient; the loss does


def test_reference_token_losses_are_the_models_own_token_losses(ds):
    model = tiny_model("gpt2", 1)
    reference = reference_token_losses(model, ds.select(range(6)), collate_causal, batch_size=4)
    assert len(reference) == 6
    for i in range(6):
        batch = collate_causal([ds[i]])
        labels = batch.pop("labels")
        with torch.no_grad():
            logits = model(**batch).logits[0, :-1]
        target = labels[0, 1:]
        want = torch.nn.functional.cross_entropy(logits[target != -100], target[target != -100], reduction="none")
        np.testing.assert_allclose(reference.per_example[i], want.numpy(), rtol=1e-4, atol=1e-5)


def test_bad_token_weights_and_missing_ids_are_refused(ds):
    model = tiny_model("gpt2", 0)
    batch = collate_causal([ds[0], ds[1]])
    labels = batch.pop("labels")
    outputs = model(**batch)
    with pytest.raises(ValueError, match="token weights must be finite, >= 0"):
        TokenWeightedLoss(lambda loss, c, i: -torch.ones_like(loss), FakeCallback([0, 1]))(outputs, labels)
    with pytest.raises(ValueError, match=r"of shape \(2, \d+\); got \(2, 1\)"):  # would broadcast if masked first
        TokenWeightedLoss(lambda loss, c, i: torch.ones(2, 1), FakeCallback([0, 1]))(outputs, labels)
    with pytest.raises(RuntimeError, match="needs the micro-batch's example ids"):
        TokenWeightedLoss(ones, FakeCallback([0]))(outputs, labels)
    with pytest.raises(RuntimeError, match="needs the micro-batch's example ids"):  # a training forward, no ids
        TokenWeightedLoss(ones, FakeCallback(None))(outputs, labels)
    with pytest.raises(ValueError, match="keep must be in \\(0, 1\\]; got 0"):
        rho1(ReferenceTokenLosses([]), keep=0)
    short = ReferenceTokenLosses([np.zeros(1), np.zeros(1)])
    with pytest.raises(ValueError, match="example 0 has .* counted tokens in this batch but its reference"):
        TokenWeightedLoss(rho1(short), FakeCallback([0, 1]))(outputs, labels)


def padded_and_padding_free(ds, ids, trailing_pad: int = 5):
    """The same examples as a padded batch and as one padding-free row (TRL's layout: positions restart at 0,
    each example's first label -100, ``pad_to_multiple_of`` padding at the end with position 0)."""
    from dataflex.testbeds.tiny import PAD_ID

    examples = [ds[i] for i in ids]
    padded = collate_causal(examples)
    rows = [torch.as_tensor(e["input_ids"]) for e in examples]
    input_ids = torch.cat([*rows, torch.full((trailing_pad,), PAD_ID)])[None]
    position_ids = torch.cat([*(torch.arange(len(r)) for r in rows), torch.zeros(trailing_pad, dtype=torch.long)])[None]
    labels = input_ids.masked_fill(position_ids == 0, -100)
    return padded, {"input_ids": input_ids, "position_ids": position_ids, "labels": labels}


@pytest.mark.parametrize("kind", ["example", "token"])
def test_a_padding_free_row_is_weighted_as_its_examples_padded(ds, kind):
    """Under TRL's padding_free=True the callback hands dataflex's losses where each example lies: the loss and
    every gradient equal those of the same examples padded (before, ExampleWeightedLoss took the row for one
    example of weight 1, training unweighted, and TokenWeightedLoss stopped). Trailing padding is no example."""
    from dataflex.losses import padding_free_segments
    from dataflex.weighting import ExampleWeightedLoss

    padded, flat = padded_and_padding_free(ds, (3, 7, 11))
    segments = padding_free_segments(1, flat["position_ids"])
    assert int(segments.max()) + 1 == 3 and int((segments == -1).sum()) == 5

    def by_id(token_loss, counted, ids):  # depends on each token's loss and on which example a row is
        return torch.where(counted, token_loss * torch.as_tensor(ids, dtype=token_loss.dtype)[:, None], 0.0)

    results = []
    for batch, seg in ((padded, None), (flat, segments)):
        model = tiny_model("llama", 0)
        labels = batch["labels"]
        # (without a cache transformers keeps a padding-free row's examples apart, as in training)
        outputs = model(**{k: v for k, v in batch.items() if k != "labels"}, use_cache=False)
        if kind == "example":
            loss_fn = ExampleWeightedLoss(temperature=0.5)
        else:
            loss_fn = TokenWeightedLoss(by_id, FakeCallback([1, 2, 3]))
        loss = loss_fn(outputs, labels, int((labels[:, 1:] != -100).sum()), segments=seg)
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results.append((loss.item(), loss_fn.last_weights, grads))
    (loss_p, w_p, g_p), (loss_f, w_f, g_f) = results
    assert loss_f == pytest.approx(loss_p, rel=1e-5)
    if kind == "example":
        torch.testing.assert_close(w_f, w_p, rtol=1e-3, atol=1e-5)  # exp(z / 0.5) magnifies float noise
        assert w_p.std() > 0.1  # the examples are weighted differently: the test would see a row taken for one
    for name, grad in g_p.items():
        assert float((g_f[name] - grad).abs().max()) <= 1e-4 * float(grad.abs().max()), name
