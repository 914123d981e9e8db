"""DeepSpeed ZeRO-2 and ZeRO-3 through TrainingArguments(deepspeed=...) in 2 processes (gloo on CPU).

Slow (DeepSpeed's start-up dominates): run with ``python -m pytest -m slow tests/test_deepspeed.py``;
``.ci/run`` installs deepspeed (``DS_BUILD_OPS=0``) and runs it after the default suite.
"""

import json

import pytest
from stack_worker import check_identical_ranks_and_exact_resume
from test_distributed import run_one_process, run_two_processes

from dataflex.hf import last_complete_checkpoint

pytest.importorskip("deepspeed")


@pytest.mark.slow
@pytest.mark.parametrize("stage", [2, 3])
def test_zero_two_processes_identical_ranks_and_exact_resume(tmp_path, stage):
    run_two_processes("stack_worker.py", tmp_path, str(stage))
    check_identical_ranks_and_exact_resume(tmp_path, str(stage))
    # The resume the README gives after a crash takes DeepSpeed's checkpoints (weights and every rank's optimizer
    # shard in global_step<n>, their sums recorded) and skips one whose rank-1 shard changed on disk.
    for run in ("full", "crash"):
        assert last_complete_checkpoint(tmp_path / run) == str(tmp_path / run / "checkpoint-8")
    (shard,) = (tmp_path / "crash" / "checkpoint-8").glob("global_step8/zero_pp_rank_1_*optim_states.pt")
    shard.write_bytes(shard.read_bytes()[:-1])
    with pytest.warns(UserWarning, match="skipping .*checkpoint-8"):
        assert last_complete_checkpoint(tmp_path / "crash") == str(tmp_path / "crash" / "checkpoint-4")


@pytest.mark.slow
@pytest.mark.parametrize("stage", [2, 3])
def test_example_weighted_loss_under_zero_gives_the_one_process_step(tmp_path, stage):
    """DeepSpeed averages gradients across ranks like DDP, after the Trainer's multiplication by the process
    count: ExampleWeightedLoss divides it back out there too (tests/loss_scale_worker.py)."""
    (tmp_path / "one").mkdir()
    (tmp_path / "zero").mkdir()
    run_one_process("loss_scale_worker.py", tmp_path / "one", "wrapped")
    run_two_processes("loss_scale_worker.py", tmp_path / "zero", "wrapped", str(stage))
    single = json.loads((tmp_path / "one" / "rank0.json").read_text())
    for rank in (0, 1):
        result = json.loads((tmp_path / "zero" / f"rank{rank}.json").read_text())
        assert result["trainer_scale"] == 2 and result["change"] == pytest.approx(single["change"], rel=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("stage", [2, 3])
def test_less_is_refused_and_tracin_selects_under_zero(tmp_path, stage):
    """ZeRO's optimizer holds flattened fp32 copies, not the LoRA weights, so LESS has no Adam moments to read:
    it failed with a bare StopIteration; it is refused, naming the optimizer, and TracIn selects (under ZeRO-3 too,
    its per-example gradients being taken from activations, not from the partitioned weights)."""
    run_two_processes("stack_worker.py", tmp_path, str(stage), "influence")
    for rank in (0, 1):
        outcome = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert "DeepSpeedOptimizerWrapper does not hold the weight of" in outcome["less"]["refused"]
        assert outcome["tracin"]["selections"] == 2 and outcome["tracin"]["stack"] == str(stage)
        assert outcome["params_per_example"] == 4 * 32 + 96 * 4  # lora_A (r x in) and lora_B (out x r) of c_attn


@pytest.mark.slow
def test_scoring_passes_under_zero_three_run_the_same_batches_on_every_rank(tmp_path):
    """Selection scores candidates between steps, each rank a share of them. Under ZeRO-3 (weights released after
    use) every forward gathers weights collectively, so 33 candidates on one rank and 32 on the other made one rank
    run a second batch alone: gloo stopped on the mismatched collective ("Received data size doesn't match"), NCCL
    can hang. The ranks now score equal shares; both make the same selection, every time."""
    run_two_processes("stack_worker.py", tmp_path, "3", "selection")
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert r0["selected"] == r1["selected"] and len(r0["selected"]) == 3  # the whole pool, then two selections
    assert [len(ids) for ids in r0["selected"]] == [65, 32, 32]  # half of the 65 candidates, each time
    assert r0["ids"].keys() == r1["ids"].keys() == {"1", "2", "3", "4"}


@pytest.mark.slow
def test_a_model_returning_only_its_loss_is_scored_under_zero_three(tmp_path):
    """A fused linear cross-entropy model (Liger's, Cut Cross-Entropy) returns no logits, so dataflex scores it from
    the last hidden state through the LM head, whose weight ZeRO-3 has partitioned again after the forward: it is
    gathered for the scoring (it was refused). Its losses and decisions equal those of the same Llama returning
    logits, on both ranks."""
    run_two_processes("stack_worker.py", tmp_path, "3", "fused")
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    for r in (r0, r1):
        stock, fused = r["llama"], r["fused_llama"]
        assert fused["ids"] == stock["ids"] and len(fused["history"]) == len(stock["history"]) == 5
        assert fused["visits"] == stock["visits"] and sum(fused["visits"]) == 4 * 8  # every example trained on
        # one gather of the head per training forward (4 per rank), shared by the record and the loss; none when
        # the forward returns logits
        assert fused["head_gathers"] == 4 and stock["head_gathers"] == 0
        assert max(abs(a - b) for a, b in zip(fused["loss_mean"], stock["loss_mean"])) < 1e-4
        for a, b in zip(fused["history"], stock["history"]):
            assert max(abs(x - y) for x, y in zip(a["weights"], b["weights"])) < 1e-5
    assert r0["fused_llama"]["history"] == r1["fused_llama"]["history"]
