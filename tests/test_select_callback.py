"""DataFlexSelectCallback on a stock Trainer: selections are honoured, scored in batches, resumable."""

from __future__ import annotations

import numpy as np
import pytest
from hf_helpers import StepRecorder, make_trainer, small_dataset

from dataflex import DataFlexSelectCallback
from dataflex.selectors import Influence, LossFocus, RandomSelection, RhoLoss


@pytest.fixture(scope="module")
def ds():
    return small_dataset(per_domain=12)  # 36 examples


def test_loss_focus_trains_on_the_hardest_scored_examples(ds, tmp_path):
    cb = DataFlexSelectCallback(LossFocus(0.25, "hard"), labels=ds["domain"], update_every=3, warmup_steps=2)
    rec = StepRecorder(cb)
    trainer = make_trainer(ds, cb, tmp_path, max_steps=12, save_steps=100, extra=[rec])
    trainer.train()
    first = cb.history[1]
    chosen = np.array(first["ids"])
    assert first["step"] == 3 and len(chosen) == 9
    assert (cb.store.score_step >= 3).all()  # the whole pool was scored (candidates=1.0) in batches
    # from the sample the selection takes effect at until the next one does, only chosen examples train
    start, stop = first["effective_at"], cb.history[2]["effective_at"]
    later = [i for s, ids in rec.ids.items() for j, i in enumerate(ids) if start <= (s - 1) * 4 + j < stop]
    assert len(later) == stop - start and set(later) <= set(chosen.tolist())
    logged = [h for h in trainer.state.log_history if "dataflex/selected" in h]
    assert logged and logged[0]["dataflex/score_mean_selected"] >= logged[0]["dataflex/score_mean_pool"]


def test_rho_loss_and_random_run_and_differ(ds, tmp_path):
    irreducible = np.linspace(0, 3, len(ds))  # late examples look "noisy": high irreducible loss
    rho = DataFlexSelectCallback(RhoLoss(0.25, irreducible), update_every=4)
    make_trainer(ds, rho, tmp_path / "rho", max_steps=8, save_steps=100).train()
    rnd = DataFlexSelectCallback(RandomSelection(0.25), update_every=4)
    make_trainer(ds, rnd, tmp_path / "rnd", max_steps=8, save_steps=100).train()
    rho_ids = np.array(rho.history[1]["ids"])
    assert rho_ids.mean() < len(ds) / 2  # low irreducible loss (early ids) is preferred
    assert rho.history[1]["ids"] != rnd.history[1]["ids"]
    with pytest.raises(ValueError, match="irreducible losses for a pool"):
        bad = DataFlexSelectCallback(RhoLoss(0.25, np.zeros(5)), update_every=2)
        make_trainer(ds, bad, tmp_path / "bad", max_steps=2, save_steps=100).train()


def test_influence_selector_with_lora(ds, tmp_path):
    pytest.importorskip("peft")
    from peft import LoraConfig, get_peft_model
    from transformers import Trainer

    from dataflex.testbeds.tiny import collate_causal

    trainer = make_trainer(ds, DataFlexSelectCallback(RandomSelection(0.5)), tmp_path, max_steps=1, save_steps=100)
    model = get_peft_model(trainer.model, LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn"], lora_dropout=0.0))
    target = [ds[i] for i in range(len(ds)) if ds[i]["domain"] == "code"][:4]
    cb = DataFlexSelectCallback(Influence(0.25, target, mode="less", dim=128), labels=ds["domain"], update_every=3)
    trainer = Trainer(model=model, args=trainer.args, train_dataset=ds, data_collator=collate_causal, callbacks=[cb])
    cb.attach(trainer)
    trainer.args.max_steps = 6
    trainer.train()
    chosen = np.array(cb.history[-1]["ids"])  # the store holds the scores of the latest selection
    assert len(chosen) == 9 and np.isfinite(cb.store.score).all()
    assert cb.store.score[chosen].min() >= np.delete(cb.store.score, chosen).max() - 1e-9


def test_irreducible_losses_from_a_holdout_model(tmp_path):
    from dataflex.proxies.irreducible import irreducible_losses
    from dataflex.testbeds.tiny import collate_causal, tiny_gpt2

    holdout, pool = small_dataset(per_domain=8), small_dataset(per_domain=12)
    make = lambda: tiny_gpt2(n_layer=1, n_embd=32, n_head=2, seed=0)  # noqa: E731
    kw = dict(collate=collate_causal, steps=6, batch_size=4, lr=3e-3, seed=0, progress=False)
    losses = irreducible_losses(make, holdout, pool, tmp_path, label_column="domain", **kw)
    assert losses.shape == (len(pool),) and np.isfinite(losses).all()
    again = irreducible_losses(make, holdout, pool, tmp_path, label_column="domain", **kw)  # cached
    np.testing.assert_array_equal(again, losses)
    # the cached value is the holdout model's own token-mean loss on the example
    import torch

    model = make()
    from dataflex.domains import encode_domains
    from dataflex.policies import Uniform
    from dataflex.proxies.loop import train_mixture  # retrain identically to check one value

    ids, names = encode_domains(holdout["domain"])
    train_mixture(model, holdout, ids, names, Uniform(), **kw)
    with torch.no_grad():
        ref = float(model(**collate_causal([pool[5]])).loss)
    assert abs(ref - losses[5]) < 1e-4
    # a cache made for another pool, of the same size or not, or with another training knob is refused by name
    with pytest.raises(ValueError, match=r"other settings \(pool examples: 36 there, 12 now; pool tokens: "):
        irreducible_losses(make, holdout, small_dataset(per_domain=4), tmp_path, label_column="domain", **kw)
    shorter = small_dataset(per_domain=12, max_len=40)  # another max_len: the same 36 examples, other tokens
    with pytest.raises(ValueError, match=r"other settings \(pool tokens: '[0-9a-f]{16}' there, '[0-9a-f]{16}' now\)"):
        irreducible_losses(make, holdout, shorter, tmp_path, label_column="domain", **kw)
    with pytest.raises(
        ValueError, match=r"other settings \(training.lr: 0.003 there, 0.01 now\).*give this run another out_dir"
    ):
        irreducible_losses(make, holdout, pool, tmp_path, label_column="domain", **{**kw, "lr": 1e-2})


@pytest.mark.parametrize("update_every,warmup,warns", [(10, 0, True), (2, 6, True), (2, 0, False)])
def test_a_run_with_no_selection_decision_warns_that_it_trains_on_the_whole_pool(
    ds, tmp_path, update_every, warmup, warns
):
    import warnings

    from dataflex.selectors import FixedSubset

    dfx = DataFlexSelectCallback(LossFocus(0.5), update_every=update_every, warmup_steps=warmup)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        make_trainer(ds, dfx, tmp_path / "a", max_steps=6, save_steps=100).train()
    said = [str(w.message) for w in caught if "falls inside this run" in str(w.message)]
    assert len(said) == int(warns)
    if warns:
        assert (
            f"no LossFocus selection falls inside this run (update_every={update_every}, warmup_steps={warmup}"
            in said[0]
        )
        assert "it trains on the whole pool throughout" in said[0]
    assert (len(dfx.history) > 1) == (not warns)  # the warning says exactly when no selection happened
    fixed = DataFlexSelectCallback(FixedSubset(list(range(8))), update_every=10)  # its first choice is final
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="no .* falls inside this run")
        make_trainer(ds, fixed, tmp_path / "b", max_steps=6, save_steps=100).train()
