"""FSDP1 and FSDP2 through TrainingArguments(fsdp=...) in 2 processes (gloo on CPU).

accelerate runs a requested FSDP as DDP on CPU ranks; ``hf_helpers.FSDPOnCPUTrainer`` lifts that one gate, so the
model really is sharded by accelerate and torch (each worker reads the stack back from its Trainer). FSDP2 (the
Trainer's default version) is held to what DeepSpeed is: identical ranks, exact resume, and the decisions of the
same run under DDP. FSDP1, deprecated by transformers, trains differently from DDP on CPU ranks by itself (each rank
clips its own shard of the gradient, and its resume is not exact, also without dataflex); dataflex's decisions are
identical on its ranks and its scoring passes select what DDP selects.

Slow (each test starts 2-process runs): ``python -m pytest -m slow tests/test_fsdp.py``; ``.ci/run`` runs it.
"""

import json

import numpy as np
import pytest
from stack_worker import check_identical_ranks_and_exact_resume
from test_distributed import run_one_process, run_two_processes

from dataflex.hf.checkpoint import last_complete_checkpoint

pytestmark = pytest.mark.slow


def results(out, stack: str, mode: str) -> tuple[dict, dict]:
    """Both ranks' results of stack_worker.py's ``mode`` run on ``stack``, written under ``out``."""
    folder = out / f"{stack}_{mode}"
    folder.mkdir()
    run_two_processes("stack_worker.py", folder, stack, mode)
    return tuple(json.loads((folder / f"rank{r}.json").read_text()) for r in (0, 1))


@pytest.fixture(scope="module")
def ddp(tmp_path_factory) -> dict[str, dict]:
    """The reference, by mode: the same run under DDP (nothing sharded), rank 0's results."""
    out = tmp_path_factory.mktemp("ddp")
    return {mode: results(out, "ddp", mode)[0] for mode in ("selection", "influence", "curriculum", "vlm")}


@pytest.mark.parametrize("stack", ["fsdp1", "fsdp2"])
def test_fsdp_two_processes_identical_ranks_and_exact_resume(tmp_path, stack):
    """ODM with the embedding cache, crashed after the step-4 checkpoint and resumed: FSDP2 resumes exactly; FSDP1's
    own resume is not exact on CPU ranks (the stock Trainer's losses differ after it without dataflex), so there
    only identical ranks and the finished run's resume are asked. last_complete_checkpoint finds the sharded
    checkpoints."""
    run_two_processes("stack_worker.py", tmp_path, stack)
    check_identical_ranks_and_exact_resume(tmp_path, stack, exact_resume=stack == "fsdp2")
    # FSDP's sharded checkpoints count as complete (no transformers weight file: every one was skipped, and a resume
    # through last_complete_checkpoint started the run over) unless their shards' .metadata is missing
    for run in ("full", "crash"):
        assert last_complete_checkpoint(tmp_path / run) == str(tmp_path / run / "checkpoint-8")
    (tmp_path / "full" / "checkpoint-8" / "pytorch_model_fsdp_0" / ".metadata").unlink()
    assert last_complete_checkpoint(tmp_path / "full", verify_trainer_files=False) == str(
        tmp_path / "full" / "checkpoint-4"
    )


@pytest.mark.parametrize("stack", ["fsdp1", "fsdp2"])
def test_the_stock_trainers_own_resume_under_fsdp(tmp_path, stack):
    """Why exact resume is asked of FSDP2 only: without dataflex, the stock Trainer's crashed and resumed run logs
    the uninterrupted run's losses under FSDP2, and other losses after the resume under FSDP1 (on CPU ranks). If
    this starts failing for FSDP1, its resume has become exact: ask it of dataflex there too."""
    for r in results(tmp_path, stack, "stock"):
        assert r["stack"] == stack and len(r["log"]) == len(r["resumed_log"]) == 8
        assert r["resumed_log"][:4] == r["log"][:4]
        assert (r["resumed_log"] == r["log"]) == (stack == "fsdp2")


@pytest.mark.parametrize("stack", ["fsdp1", "fsdp2"])
def test_scoring_passes_under_fsdp_select_what_ddp_selects(tmp_path, ddp, stack):
    """Loss-focused selection scores candidates between steps with the model FSDP has sharded (through FSDP1's
    wrapper, whose forward gathers the current weights; FSDP2 shards the model in place), 33 and 32 candidates on
    the two ranks evened out for the collective forwards: both ranks select what the DDP run selects."""
    r0, r1 = results(tmp_path, stack, "selection")
    assert r0["stack"] == r1["stack"] == stack
    assert r0["selected"] == r1["selected"] == ddp["selection"]["selected"]
    assert [len(ids) for ids in r0["selected"]] == [65, 32, 32]


@pytest.mark.parametrize("stack", ["fsdp1", "fsdp2"])
def test_a_curriculum_rescored_under_fsdp(tmp_path, ddp, stack):
    """A curriculum re-scored by each example's loss under the current model, every rank scoring the whole dataset
    with the sharded model: the orders are identical on both ranks, and under FSDP2 they are the DDP run's (under
    FSDP1, which does not train bit for bit as DDP on CPU ranks, one re-scored order had two pairs swapped)."""
    r0, r1 = results(tmp_path, stack, "curriculum")
    assert r0["stack"] == r1["stack"] == stack
    assert r0["orders"] == r1["orders"] and len(r0["orders"]) == 4  # the start, then re-scored at steps 2, 4, 6
    assert r0["ids"].keys() == r1["ids"].keys() == {str(step) for step in range(1, 7)}
    if stack == "fsdp2":
        assert r0["orders"] == ddp["curriculum"]["orders"] and r0["ids"] == ddp["curriculum"]["ids"]


@pytest.mark.parametrize("stack", ["fsdp1", "fsdp2"])
def test_influence_selection_under_fsdp(tmp_path, ddp, stack):
    """LoRA influence selection. TracIn's per-example gradients come from activations, whole under both versions:
    it selects what DDP selects. LESS reads the optimizer's Adam moments: under FSDP2 each rank holds a shard of
    them (a DTensor), gathered whole, and LESS selects what DDP selects (it failed on mixing a DTensor with a
    tensor); under FSDP1 the optimizer holds flat shards, refused by name (read as whole weights they would have
    mixed up the moments' entries)."""
    reference = ddp["influence"]
    for outcome in results(tmp_path, stack, "influence"):
        assert outcome["tracin"]["stack"] == stack
        assert outcome["tracin"]["selected"] == reference["tracin"]["selected"]
        if stack == "fsdp2":
            assert outcome["less"]["selected"] == reference["less"]["selected"]
        else:
            assert "needs the Adam moments of each whole scored weight (4, 32)" in outcome["less"]["refused"]
        # the gradient buffer is sized by the layers' shapes, not by their weights (FSDP1 leaves a shard)
        assert outcome["params_per_example"] == reference["params_per_example"] == 4 * 32 + 96 * 4


@pytest.mark.parametrize("stack", ["fsdp1", "fsdp2"])
def test_a_model_returning_only_its_loss_under_fsdp(tmp_path, stack):
    """A fused linear cross-entropy model is scored from hidden states through the LM head. FSDP2 keeps the root
    module's weights whole through the forward: losses, record and decisions equal the same Llama's returning logits.
    FSDP1 has left each rank a flat shard of the head by then (empty on one rank, the whole head flattened on the
    other, which failed with a shape error): refused by name on both ranks."""
    for r in results(tmp_path, stack, "fused"):
        stock, fused = r["llama"], r["fused_llama"]
        assert stock["stack"] == stack and stock["head_gathers"] == 0
        if stack == "fsdp1":
            assert "the LM head's weight is sharded when dataflex scores the forward" in fused["refused"]
            continue
        assert fused["ids"] == stock["ids"] and fused["visits"] == stock["visits"] and sum(fused["visits"]) == 32
        assert max(abs(a - b) for a, b in zip(fused["loss_mean"], stock["loss_mean"])) < 1e-4
        for a, b in zip(fused["history"], stock["history"]):
            assert max(abs(x - y) for x, y in zip(a["weights"], b["weights"])) < 1e-5


@pytest.mark.parametrize("mode", ["wrapped", "token"])
def test_weighted_losses_under_fsdp2_give_the_one_process_step(tmp_path, mode):
    """The Trainer multiplies a custom loss by the process count before FSDP2 averages the gradients across ranks, as
    under DDP: ExampleWeightedLoss divides it back out (tests/loss_scale_worker.py), and one SGD step changes the
    weights as in one process; TokenWeightedLoss with every weight 1 gives the stock one-process step."""
    (tmp_path / "one").mkdir()
    (tmp_path / "fsdp2").mkdir()
    run_one_process("loss_scale_worker.py", tmp_path / "one", "wrapped" if mode == "wrapped" else "stock")
    run_two_processes("loss_scale_worker.py", tmp_path / "fsdp2", mode, "fsdp2")
    single = json.loads((tmp_path / "one" / "rank0.json").read_text())
    for rank in (0, 1):
        result = json.loads((tmp_path / "fsdp2" / f"rank{rank}.json").read_text())
        assert result["stack"] == "fsdp2" and single["stack"] == "ddp"
        assert result["change"] == pytest.approx(single["change"], rel=1e-5)
        if mode == "wrapped":
            assert result["trainer_scale"] == 2


def test_a_vlm_under_fsdp2_decides_as_under_ddp(tmp_path, ddp):
    """The tiny LLaVA (decoder and vision-encoder layers sharded) with the training-dynamics record and image
    embeddings: identical on both ranks, and the DDP run's ids, its decisions to 1e-8, its record and embeddings to
    1e-6 (FSDP2's reduce-scatter sums the gradients in another order). Resume is not tested: the stock Trainer's
    FSDP2 resume of this LLaVA failed here without dataflex (transformers 5.25, accelerate 1.16: "Missing key in
    checkpoint state_dict: optimizer.state.model.vision_tower.post_layernorm.weight.step", a weight the LLaVA
    forward never uses, so it has no optimizer state)."""
    r0, r1 = results(tmp_path, "fsdp2", "vlm")
    reference = ddp["vlm"]
    assert {k: v for k, v in r0.items() if k != "ids"} == {k: v for k, v in r1.items() if k != "ids"}
    assert r0["stack"] == "fsdp2" and reference["stack"] == "ddp"
    assert r0["ids"] == reference["ids"] and len(r0["history"]) == len(reference["history"]) == 9
    for a, b in zip(r0["history"], reference["history"]):
        assert max(abs(x - y) for x, y in zip(a["weights"], b["weights"])) < 1e-8
    for a, b in zip(r0["dynamics"], reference["dynamics"]):
        assert np.allclose(np.array(a, dtype=float), np.array(b, dtype=float), atol=1e-6, equal_nan=True)
    assert r0["embeddings"][0] == reference["embeddings"][0]  # each taken at the same step
    values = [np.array(e[1], dtype=float) for e in (r0["embeddings"], reference["embeddings"])]
    assert np.allclose(*values, atol=2e-6, equal_nan=True)
