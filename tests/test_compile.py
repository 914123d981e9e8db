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


@pytest.mark.slow  # four compiled runs (aot_eager): .ci/run runs it
def test_compiled_model_run_resumes_exactly(tmp_path):
    """torch_compile=True: killed after step 8 and resumed, the example ids of every step, the decisions, the log
    and the parameters equal the uninterrupted compiled run's (and without dataflex's state the resume is refused)."""
    from hf_helpers import assert_trainer_resumes_exactly

    def check_compiled(*callbacks) -> None:
        for callback in callbacks:
            assert type(callback._trainer.model_wrapped).__name__ == "OptimizedModule"  # really compiled

    full, _ = assert_trainer_resumes_exactly(
        lambda allow: DataFlexCallback(ODM(), update_every=2, allow_missing_state=allow),
        small_dataset(per_domain=12),
        tmp_path,
        compare=check_compiled,
        torch_compile=True,
        torch_compile_backend="aot_eager",
    )
    assert full.history[0]["weights"] != full.history[-1]["weights"]
