"""A real two-process run (torchrun, gloo on CPU): identical weights on every rank, exact resume."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent


def run_two_processes(worker: str, out, *args: str) -> None:
    """``torchrun --nproc_per_node 2 tests/<worker> <out> <args>`` on CPU (gloo); fails the test on error."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        str(HERE / worker),
        str(out),
        *args,
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]


def run_one_process(worker: str, out, *args: str) -> None:
    """``python tests/<worker> <out> <args>`` in one process on CPU: the reference for a two-process run."""
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run(
        [sys.executable, str(HERE / worker), str(out), *args], env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-4000:]


@pytest.mark.parametrize(
    "model", ["gpt2", *(pytest.param(m, marks=pytest.mark.slow) for m in ("fused_llama", "qwen_vl", "compiled"))]
)
def test_two_process_gloo_run_identical_weights_and_exact_resume(tmp_path, model):
    """fused_llama: a forward returning no logits (fused linear cross-entropy); qwen_vl: a tiny Qwen2-VL whose ranks
    get patch batches of different sizes (rows of 0, 1 or 2 images); compiled: torch_compile (aot_eager). All three
    slow; .ci/run runs them."""
    run_two_processes("dist_worker.py", tmp_path, model)
    r0 = json.loads((tmp_path / "rank0.json").read_text())
    r1 = json.loads((tmp_path / "rank1.json").read_text())
    assert r0["world"] == r1["world"] == 2
    if model == "compiled":
        assert r0["wrapped_model"] == r1["wrapped_model"] == ["OptimizedModule"] * 2  # really compiled
    assert r0["history"] == r1["history"]  # bit-identical floats after JSON
    assert r0["weights"] == r1["weights"]
    assert len(r0["history"]) == 9 and r0["history"][0]["weights"] != r0["history"][-1]["weights"]
    # accelerate deals consecutive batches round-robin: rank0's batch, rank1's batch, rank0's, ...
    assert r0["global_order"] == r1["global_order"]
    merged = []
    for step in sorted(r0["ids"], key=int)[:4]:  # first epoch: 36 examples = 4 full global batches + 4
        a, b = r0["ids"][step], r1["ids"][step]
        assert len(a) == len(b) == 4
        merged += a + b
    assert merged == r0["global_order"][:32]
    # crash after the step-4 checkpoint, resume on both ranks: same ids and weights as uninterrupted
    for r in (r0, r1):
        assert r["resumed_ids"] == r["ids"]
        assert r["resumed_history"] == r["history"]
        assert r["resumed_weights"] == r["weights"]
        assert r["resumed_dynamics"] == r["dynamics"]
    # the training-dynamics record holds both ranks' visits, identically on each rank
    assert r0["dynamics"] == r1["dynamics"]
    # so does the embedding cache: every trained example's embedding, from the step it last trained at
    assert r0["embeddings"] == r1["embeddings"] and r0["resumed_embeddings"] == r0["embeddings"]
    last_step = [
        max((int(s) - 1 for r in (r0, r1) for s, ids in r["ids"].items() if i in ids), default=-1)
        for i in range(len(r0["visits"]))
    ]
    assert r0["embeddings"][0] == last_step and all(
        (row[0] is None) == (s < 0) for row, s in zip(r0["embeddings"][1], last_step)
    )
    trained = [i for r in (r0, r1) for ids in r["ids"].values() for i in ids]
    assert r0["visits"] == [trained.count(i) for i in range(len(r0["visits"]))] and sum(r0["visits"]) == 64


@pytest.mark.slow  # 15 s; .ci/run runs it
def test_two_process_influence_selection_is_identical_on_both_ranks(tmp_path):
    run_two_processes("select_dist_worker.py", tmp_path)
    r0 = json.loads((tmp_path / "select_rank0.json").read_text())
    r1 = json.loads((tmp_path / "select_rank1.json").read_text())
    assert r0["world"] == r1["world"] == 2
    # each rank scored half the candidates; after the gather both hold every score, equal to local scoring
    assert r0["gathered_scores"] == r1["gathered_scores"] and r0["chosen"] == r1["chosen"]
    assert r0["max_gather_vs_local"] < 1e-5 and r1["max_gather_vs_local"] < 1e-5
    assert len(r0["chosen"]) == 9
    # under DDP the Trainer callback makes the same selections on both ranks
    assert r0["history"] == r1["history"] and len(r0["history"]) >= 3
    assert r0["store_scores"] == r1["store_scores"]


def test_a_curriculum_scorer_that_differs_between_ranks_gives_every_rank_rank_zeros_order(tmp_path):
    """Each rank runs a re-scored curriculum's scorer, whose results can differ between ranks (GPU kernels, dropout,
    a random subsample); ranks that kept their own orders dealt batches from different sequences, silently training
    some examples twice and others never. Every rank now takes rank 0's order."""
    run_two_processes("curriculum_dist_worker.py", tmp_path)
    r0, r1 = (json.loads((tmp_path / f"curriculum_rank{r}.json").read_text()) for r in (0, 1))
    assert r0["orders"] == r1["orders"] and len(r0["orders"]) == 4  # the first order, then re-scored at 2, 4, 6
    assert len({tuple(order) for order in r0["orders"]}) == 4  # (the scorer's draws did change the order)
    assert r0["ids"].keys() == r1["ids"].keys() and len(r0["ids"]) == 6


@pytest.mark.slow  # ~40 s; .ci/run runs it
def test_example_weighted_loss_gives_the_same_step_in_one_and_two_processes(tmp_path):
    """The Trainer multiplies a custom loss by the process count (average_tokens_across_devices): the callback
    tells ExampleWeightedLoss, which divides it back out — without that the 2-process step was twice the
    1-process one. A bare ExampleWeightedLoss across processes is refused, naming the fix."""

    def one_process(mode: str) -> dict:
        out = tmp_path / f"one-{mode}"
        out.mkdir()
        run_one_process("loss_scale_worker.py", out, mode)
        return json.loads((out / "rank0.json").read_text())

    def two_processes(mode: str) -> list[dict]:
        out = tmp_path / f"two-{mode}"
        out.mkdir()
        run_two_processes("loss_scale_worker.py", out, mode)
        return [json.loads((out / f"rank{rank}.json").read_text()) for rank in (0, 1)]

    single = one_process("wrapped")
    assert single["trainer_scale"] == 1 and single["change"] > 0
    for result in two_processes("wrapped"):
        assert result["world"] == 2 and result["trainer_scale"] == 2
        assert result["change"] == pytest.approx(single["change"], rel=1e-5)
    # TokenWeightedLoss normalises by the Trainer's token count, which the multiplication assumes: with every
    # weight 1 it is the stock step in one process and in two.
    stock = one_process("stock")["change"]
    assert one_process("token")["change"] == pytest.approx(stock, rel=1e-5)
    assert all(r["change"] == pytest.approx(stock, rel=1e-5) for r in two_processes("token"))
    bare = tmp_path / "bare"
    bare.mkdir()
    run_two_processes("loss_scale_worker.py", bare, "bare")
    message = json.loads((bare / "rank0.json").read_text())["error"]
    assert "2-process run must be passed through a dataflex callback" in message


@pytest.mark.slow
def test_dispatched_batches_across_processes_are_refused_by_name(tmp_path):
    """accelerate's dispatch_batches=True: the main process reads every rank's batches, so dataflex's positions
    would credit examples to the wrong rank (its id check then blamed the sampler or the collator, and with
    check_ids=False the run went on mislabelled). Refused at train begin on every rank, naming the setting."""
    run_two_processes("dispatch_worker.py", tmp_path)
    for rank in (0, 1):
        error = json.loads((tmp_path / f"rank{rank}.json").read_text())["error"]
        assert "dispatch_batches=True across 2 processes is not supported" in error, error


@pytest.mark.slow  # 2 processes, three tiny LLaVA runs each; .ci/run runs it
def test_two_process_vlm_run_identical_ranks_and_exact_resume(tmp_path):
    """The tiny LLaVA on the digits VQA under torchrun: both ranks hold the same decisions, training-dynamics
    record and image-embedding cache, train disjoint examples, and a crash + resume ends where the uninterrupted
    run did."""
    run_two_processes("dist_worker.py", tmp_path, "vlm")
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert r0["world"] == r1["world"] == 2
    assert r0["history"] == r1["history"] and r0["weights"] == r1["weights"]
    assert r0["history"][0]["weights"] != r0["history"][-1]["weights"]
    assert r0["dynamics"] == r1["dynamics"] and r0["embeddings"] == r1["embeddings"]
    for step in r0["ids"]:
        a, b = r0["ids"][step], r1["ids"][step]
        assert len(a) == len(b) == 8 and not set(a) & set(b)
    for r in (r0, r1):
        assert r["resumed_ids"] == r["ids"] and r["resumed_history"] == r["history"]
        assert r["resumed_dynamics"] == r["dynamics"] and r["resumed_embeddings"] == r["embeddings"]
    trained = [i for r in (r0, r1) for ids in r["ids"].values() for i in ids]
    assert r0["visits"] == [trained.count(i) for i in range(len(r0["visits"]))] and sum(r0["visits"]) == 128
    taken = [i for i, row in enumerate(r0["embeddings"][1]) if row[0] is not None]
    assert taken == sorted(set(trained))  # an image embedding for every trained example, from both ranks


@pytest.mark.slow  # 2 processes, three runs each; .ci/run runs it
def test_out_of_memory_retry_in_two_processes_is_a_fresh_run_at_the_smaller_batch(tmp_path):
    """auto_find_batch_size under torchrun: both ranks hit the (simulated) out-of-memory error after a decision;
    the Trainer retries at a smaller per-device batch. Each rank then trains what a fresh 2-process run at that
    batch trains, with the same decision points and identical decisions on both ranks, and the retried run's
    checkpoint resumes to the same ids and decisions."""
    run_two_processes("oom_retry_worker.py", tmp_path)
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert r0["world"] == 2 and r0["smaller"] == r1["smaller"] < 4
    assert r0["retried_history"] == r1["retried_history"] and len(r0["retried_points"]) > 1
    for r in (r0, r1):
        assert r["retried_ids"] == r["fresh_ids"] and r["retried_points"] == r["fresh_points"]
        assert r["resumed_history"] == r["retried_history"]
        assert r["resumed_ids"] == {s: ids for s, ids in r["retried_ids"].items() if int(s) > 4}
    for step, ids in r0["retried_ids"].items():
        assert len(ids) == r0["smaller"] and not set(ids) & set(r1["retried_ids"][step])
