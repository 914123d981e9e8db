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


@pytest.mark.slow  # a compiled run (aot_eager) and an eager one: .ci/run runs it
def test_compiled_model_records_equal_the_eager_runs(tmp_path):
    """The training-dynamics record (losses, margins) and the text embeddings come from hooks inside the compiled
    forward: they equal an eager run's on the same data and seed, to float tolerance."""
    import numpy as np

    from dataflex.embeddings import EmbeddingCache

    ds = small_dataset(per_domain=12)

    def run(folder, **compiled):
        dfx = DataFlexCallback(ODM(), update_every=1, dynamics=True, embeddings=EmbeddingCache(len(ds)))
        trainer = make_trainer(ds, dfx, folder, max_steps=6, save_steps=100, **compiled)
        trainer.train()
        dfx.dynamics.gather()
        return dfx, type(trainer.model_wrapped).__name__

    eager, _ = run(tmp_path / "eager")
    compiled, wrapped = run(tmp_path / "compiled", torch_compile=True, torch_compile_backend="aot_eager")
    assert wrapped == "OptimizedModule"
    assert [h["step"] for h in compiled.history] == [h["step"] for h in eager.history]
    weights = [[h["weights"] for h in run.history] for run in (compiled, eager)]
    np.testing.assert_allclose(*weights, rtol=1e-4)
    assert weights[1][0] != weights[1][-1]  # ODM moved the mixture: the decisions are compared, not a constant
    np.testing.assert_array_equal(compiled.dynamics.visits, eager.dynamics.visits)
    assert eager.dynamics.visits.sum() == 24
    for name in ("loss_mean", "margin_mean"):
        np.testing.assert_allclose(
            getattr(compiled.dynamics, name), getattr(eager.dynamics, name), rtol=1e-4, atol=1e-5
        )
    np.testing.assert_array_equal(compiled.embeddings.step, eager.embeddings.step)
    np.testing.assert_allclose(compiled.embeddings.values, eager.embeddings.values, rtol=1e-4, atol=1e-5)
    assert np.isfinite(eager.embeddings.values).sum() > 0
