"""DeepSpeed ZeRO-2 and ZeRO-3 through TrainingArguments(deepspeed=...) in 2 processes (gloo on CPU).

Slow (DeepSpeed's start-up dominates): run with ``python -m pytest -m slow tests/test_deepspeed.py``;
``.ci/run`` installs deepspeed (``DS_BUILD_OPS=0``) and runs it after the default suite.
"""

import json

import pytest
from test_distributed import run_one_process, run_two_processes

pytest.importorskip("deepspeed")


@pytest.mark.slow
@pytest.mark.parametrize("stage", [2, 3])
def test_zero_two_processes_identical_ranks_and_exact_resume(tmp_path, stage):
    run_two_processes("ds_worker.py", tmp_path, str(stage))
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert r0["world"] == r1["world"] == 2
    assert r0["deepspeed"] and r0["zero_stage"] == stage
    assert r0["history"] == r1["history"] and len(r0["history"]) == 9
    assert r0["history"][0]["weights"] != r0["history"][-1]["weights"]
    assert r0["log"] == r1["log"] and any("loss" in h for h in r0["log"])
    for r in (r0, r1):  # crash after the step-4 checkpoint and resume: ids, decisions and logged losses equal
        assert r["resumed_ids"] == r["ids"]
        assert r["resumed_history"] == r["history"]
        assert r["resumed_log"] == r["log"]
        # resumed from the final checkpoint: no batch trained, no decision added (the adapter's guard)
        assert r["final_resume_ids"] == {} and r["final_resume_history"] == r["history"]
    # the embedding cache (last hidden states of the training forward) holds both ranks' examples, identically
    # on each rank and after the resume, each from the step it last trained at
    assert r0["embeddings"] == r1["embeddings"] and r0["resumed_embeddings"] == r0["embeddings"]
    last_step = [
        max((int(s) - 1 for r in (r0, r1) for s, ids in r["ids"].items() if i in ids), default=-1)
        for i in range(len(r0["embeddings"][0]))
    ]
    assert r0["embeddings"][0] == last_step and max(last_step) == 7


@pytest.mark.slow
def test_example_weighted_loss_under_zero_two_gives_the_one_process_step(tmp_path):
    """DeepSpeed averages gradients across ranks like DDP, after the Trainer's multiplication by the process
    count: ExampleWeightedLoss divides it back out there too (tests/loss_scale_worker.py)."""
    (tmp_path / "one").mkdir()
    (tmp_path / "zero2").mkdir()
    run_one_process("loss_scale_worker.py", tmp_path / "one", "wrapped")
    run_two_processes("loss_scale_worker.py", tmp_path / "zero2", "wrapped", "2")
    single = json.loads((tmp_path / "one" / "rank0.json").read_text())
    for rank in (0, 1):
        result = json.loads((tmp_path / "zero2" / f"rank{rank}.json").read_text())
        assert result["trainer_scale"] == 2 and result["change"] == pytest.approx(single["change"], rel=1e-5)


@pytest.mark.slow
def test_less_is_refused_and_tracin_selects_under_zero_two(tmp_path):
    """ZeRO's optimizer holds flattened fp32 copies, not the LoRA weights, so LESS has no Adam moments to read:
    it failed with a bare StopIteration; it is refused, naming the optimizer, and TracIn selects."""
    run_two_processes("ds_worker.py", tmp_path, "2", "influence")
    for rank in (0, 1):
        outcome = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert "DeepSpeedOptimizerWrapper does not hold the weight of" in outcome["less"]["refused"]
        assert outcome["tracin"] == {"selections": 2}
