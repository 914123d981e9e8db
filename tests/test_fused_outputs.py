"""Forwards that return no logits (fused linear cross-entropy kernels): scored from the last hidden state."""

from __future__ import annotations

import pytest
import torch
from hf_helpers import assert_trainer_resumes_exactly, make_trainer, small_dataset, tiny_model
from test_trainer_callback import VerifyLosses

from dataflex import DataFlexCallback
from dataflex.hf.capture import LossCapture
from dataflex.losses import flattened_sequence_ids, per_example_token_loss
from dataflex.policies import ODM


@pytest.fixture(scope="module")
def ds():
    return small_dataset()


def test_fused_model_really_returns_no_logits_and_the_same_loss():
    fused, stock = tiny_model("fused_llama"), tiny_model("llama")
    x = torch.randint(0, 250, (3, 17))
    fused_out, stock_out = fused(input_ids=x, labels=x), stock(input_ids=x, labels=x)
    assert fused_out.logits is None
    torch.testing.assert_close(fused_out.loss, stock_out.loss)


def test_trainer_losses_from_hidden_states_equal_recomputation(ds, tmp_path):
    dfx = DataFlexCallback(ODM(), update_every=1)
    verify = VerifyLosses(dfx, ds)
    trainer = make_trainer(ds, dfx, tmp_path, max_steps=4, accum=2, save_steps=100, extra=[verify], arch="fused_llama")
    with pytest.warns(UserWarning, match="returned no logits") as caught:
        trainer.train()
    assert sum("returned no logits" in str(w.message) for w in caught) == 1  # said once, not per batch
    assert verify.checked == 4 * 4 * 2 and verify.max_err < 1e-4, verify.max_err


def test_padding_free_row_from_hidden_states_matches_logits():
    fused, stock = tiny_model("fused_llama"), tiny_model("llama")
    lengths = [7, 12, 5]
    x = torch.randint(0, 250, (1, sum(lengths)))
    position_ids = torch.cat([torch.arange(n) for n in lengths]).unsqueeze(0)
    labels = x.clone()
    labels[0, torch.cumsum(torch.tensor([0, *lengths[:-1]]), 0)] = -100  # each sequence's first token predicts nothing
    seen = []
    capture = LossCapture(lambda inputs, loss, has: seen.append((loss, has)))
    capture.attach(fused)
    capture.active = True
    with pytest.warns(UserWarning, match="returned no logits"):
        fused(input_ids=x, labels=labels, position_ids=position_ids, use_cache=False)
    with torch.no_grad():
        logits = stock(input_ids=x, position_ids=position_ids, use_cache=False).logits
    expected, valid = per_example_token_loss(logits, labels, segments=flattened_sequence_ids(position_ids))
    ((loss, has),) = seen
    assert loss.shape == (3,) and has.all() and valid.all()
    torch.testing.assert_close(loss, expected)


def test_an_output_without_logits_or_decoder_names_what_it_saw():
    class Bare(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.ones(1))

        def forward(self, input_ids=None, labels=None):
            return {"loss": self.w.sum(), "aux": self.w}

    model = Bare()
    capture = LossCapture(lambda *a: None)
    capture.attach(model)
    capture.active = True
    x = torch.zeros(2, 3, dtype=torch.long)
    with pytest.raises(ValueError, match=r"holds \['loss', 'aux'\].*get_decoder"):
        model(input_ids=x, labels=x)


def test_fused_model_run_resumes_exactly(ds, tmp_path):
    with pytest.warns(UserWarning, match="returned no logits"):
        assert_trainer_resumes_exactly(
            lambda allow: DataFlexCallback(ODM(), update_every=2, allow_missing_state=allow),
            small_dataset(per_domain=12),  # 36 examples: the 12 steps cross an epoch
            tmp_path,
            make_model=lambda: tiny_model("fused_llama"),
        )
