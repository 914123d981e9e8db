"""``TrainingArguments(torch_compile=True)``: the hooks see the compiled model's training forwards."""

from __future__ import annotations

import pytest
from hf_helpers import make_trainer, small_dataset
from test_trainer_callback import VerifyLosses

from dataflex import DataFlexCallback
from dataflex.policies import ODM


@pytest.mark.slow  # compiling takes 15 s (aot_eager) to 1 min (inductor): .ci/run runs these
@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compiled_model_losses_equal_recomputation(tmp_path, backend):
    ds = small_dataset(per_domain=12)
    dfx = DataFlexCallback(ODM(), update_every=1)
    verify = VerifyLosses(dfx, ds)
    trainer = make_trainer(
        ds,
        dfx,
        tmp_path,
        max_steps=4,
        save_steps=100,
        extra=[verify],
        torch_compile=True,
        torch_compile_backend=backend,
    )
    trainer.train()
    assert type(trainer.model_wrapped).__name__ == "OptimizedModule"  # really compiled
    assert verify.checked == 16 and verify.max_err < 1e-4, verify.max_err
    assert len(dfx.history) == 5 and dfx.history[-1]["weights"] != dfx.history[0]["weights"]
