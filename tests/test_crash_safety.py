"""kill -9 during checkpoint saves: resuming through ``last_complete_checkpoint`` ends bit-exact, nothing lost.

Each case runs ``tests/kill_worker.py`` in a subprocess that SIGKILLs itself at one phase of one save, then
resumes the run from ``dataflex.hf.last_complete_checkpoint`` (in this process in the default suite, by
rerunning the same command in the slow matrix) and compares example ids per step, decisions, every logged
entry and the final parameters with an uninterrupted run of the same code. Subprocesses get this process's
thread count, so float results do not depend on where a run happened. The full matrix
(every phase, ``save_total_limit`` 1 and 2, random-time kills) is marked slow.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import unsigned
from kill_worker import DECIDERS, build_trainer, run_loop, run_trainer

from dataflex.checkpoint import latest_step
from dataflex.hf import last_complete_checkpoint
from dataflex.proxies.loop import LOOP_STATE

HERE = Path(__file__).resolve().parent
SAVE_STEPS = 2  # kill_worker's default
# Killed once the step's checkpoint (Trainer files and dataflex state) is complete: resume at that step.
RESUMES_AT_THE_KILLED_STEP = {"after_rotation", "commit", "loop_after_save"}
WORKER = HERE / "kill_worker.py"


def start(out: Path, *args: str) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads()), "CUDA_VISIBLE_DEVICES": ""}
    return subprocess.Popen(
        [sys.executable, str(WORKER), str(out), *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )


def finish(proc: subprocess.Popen) -> int:
    _, err = proc.communicate(timeout=600)
    if proc.returncode not in (0, -signal.SIGKILL):
        raise AssertionError(err.decode()[-4000:])
    return proc.returncode


def start_two_processes(out: Path, *args: str) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(WORKER)]
    return subprocess.Popen([*cmd, str(out), *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def outcome(out: Path, suffix: str = "") -> dict:
    steps: dict[int, list[int]] = {}
    path = out / f"steps{suffix}.jsonl"
    lines = path.read_text().splitlines() if path.exists() else []
    for line in lines:
        record = json.loads(line)
        steps[record["step"]] = record["ids"]  # a resumed run rewrites the steps it repeats
    return {**json.loads((out / f"result{suffix}.json").read_text()), "steps": steps}


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("reference")
    run_trainer(*build_trainer(out), out)
    return outcome(out)


@pytest.fixture(scope="module")
def loop_reference(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("loop_reference")
    # In a process of its own like the runs it is compared with: trained in pytest's process after the other slow
    # tests (TRL's KTOTrainer, compiled models) it ended elsewhere than every fresh process did.
    assert finish(start(out, "--loop")) == 0
    return outcome(out)


def kill_and_resume(
    out: Path, phase: str, step: int, limit: int | None, loop: bool = False, in_process: bool = False
) -> dict:
    """Kill a run at ``phase`` of step ``step``'s save, then resume it (here, or by rerunning the command)."""
    extra = [] if limit is None else ["--save-total-limit", str(limit)]
    extra += ["--loop"] if loop else []
    assert finish(start(out, "--phase", phase, "--kill-step", str(step), *extra)) == -signal.SIGKILL
    assert not (out / "result.json").exists()
    # A deterministic run restarted from scratch would also end equal: check it resumes where it should.
    expected = step if phase in RESUMES_AT_THE_KILLED_STEP else step - SAVE_STEPS
    found = latest_step(out, LOOP_STATE) if loop else last_complete_checkpoint(out)
    want = f"step-{expected}" if loop else f"checkpoint-{expected}"
    assert found is not None and Path(found).name == want, f"resumes from {found}, expected {want}"
    if not in_process:
        assert finish(start(out, *extra)) == 0
    elif loop:
        run_loop(out)
    else:
        run_trainer(*build_trainer(out, save_total_limit=limit), out)
    return outcome(out)


def assert_same_run(result: dict, reference: dict) -> None:
    """The same examples at every step, exactly; the same decisions, logged entries and final parameters up
    to float32 rounding. Nearly always these are bit-equal too, but once in some hundreds of subprocess runs
    on the 2-core CI machine a run *never interrupted before its first checkpoint* (a fresh run, nothing
    resumed) differed from the in-process reference by float32 rounding in one step's gradient (grad norm
    4e-7 relative), and that difference carried through. A resume bug (state, RNG, optimizer or sampler
    restored wrong) moves these values by orders of magnitude more, or changes the ids."""
    assert result["steps"] == reference["steps"], "example ids per step differ"
    for key, what in (("history", "decisions"), ("log", "logged entries"), ("params", "final parameters")):
        mismatch = first_difference(result[key], reference[key])
        assert mismatch is None, f"{what} differ at {mismatch}"


def first_difference(a, b, where: str = "", rel: float = 1e-5) -> str | None:
    """Where two JSON trees first differ (floats compared to ``rel``), or None."""
    if isinstance(a, float) or isinstance(b, float):
        ok = (
            isinstance(a, (int, float))
            and isinstance(b, (int, float))
            and math.isclose(a, b, rel_tol=rel, abs_tol=1e-9)
        )
        return None if ok else f"{where}: {a!r} vs {b!r}"
    if isinstance(a, dict) and isinstance(b, dict):
        if a.keys() != b.keys():
            return f"{where}: keys {sorted(a)} vs {sorted(b)}"
        return next((d for k in a if (d := first_difference(a[k], b[k], f"{where}.{k}", rel))), None)
    if isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            return f"{where}: length {len(a)} vs {len(b)}"
        return next(
            (d for i, (x, y) in enumerate(zip(a, b)) if (d := first_difference(x, y, f"{where}[{i}]", rel))), None
        )
    return None if a == b else f"{where}: {a!r} vs {b!r}"


@pytest.fixture(scope="module")
def short_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("short")
    run_trainer(*build_trainer(out, steps=4), out)
    return out


@pytest.mark.parametrize(
    "damage",
    ["trainer_state_cut", "weights_missing", "rng_state_cut", "rng_state_of_a_rank_missing", "dataflex_state_missing"],
)
def test_last_complete_checkpoint_skips_a_damaged_checkpoint(short_run, tmp_path, damage):
    out = tmp_path / "out"
    shutil.copytree(short_run, out)
    newest = out / "checkpoint-4"
    assert Path(last_complete_checkpoint(out)) == newest
    if damage == "trainer_state_cut":
        cut(newest / "trainer_state.json")
    elif damage == "weights_missing":
        (newest / "model.safetensors").unlink()
    elif damage == "rng_state_cut":
        cut(newest / "rng_state.pth")
    elif damage == "rng_state_of_a_rank_missing":  # the state says 2 processes; their RNG files are not there
        state = json.loads((newest / "dataflex" / "dataflex_state.json").read_text())
        state["batching"]["world_size"] = 2
        (newest / "dataflex" / "dataflex_state.json").write_text(json.dumps(unsigned(state)))
    else:
        shutil.rmtree(newest / "dataflex")
    assert Path(last_complete_checkpoint(out)) == out / "checkpoint-2"
    if damage == "dataflex_state_missing":
        assert Path(last_complete_checkpoint(out, require_dataflex=False)) == newest


def cut(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def test_a_file_written_atomically_is_old_or_new_after_a_kill(tmp_path):
    """write_atomic (results, the VLM holdout model, every JSON record): a process SIGKILLed half-way through
    writing leaves the previous file whole; the next write replaces it whole."""
    import subprocess
    import sys

    from dataflex.state import write_text_atomic

    target = tmp_path / "results.json"
    write_text_atomic(target, '{"old": 1}')
    script = (
        "import os, signal, sys\n"
        "from dataflex.state import write_atomic\n"
        "def half(f):\n"
        "    f.write(b'{\"new\": ')\n"
        "    f.flush()\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n"
        "write_atomic(sys.argv[1], half)\n"
    )
    killed = subprocess.run([sys.executable, "-c", script, str(target)], capture_output=True)
    assert killed.returncode == -9, killed.stderr
    assert target.read_text() == '{"old": 1}'
    write_text_atomic(target, '{"new": 2}')
    assert target.read_text() == '{"new": 2}'


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_a_file_written_atomically_has_the_permissions_of_any_new_file(tmp_path, umask):
    """Written through a mkstemp file, every results, settings and state file was 0600 whatever the umask: the
    other users of a shared run folder could not read a run's results.json."""
    import os

    from dataflex.state import write_json_atomic

    previous = os.umask(umask)
    try:
        write_json_atomic(tmp_path / "results.json", {"loss": 1.5}, digest=True)
        (tmp_path / "plain.json").write_text("{}")  # what open() gives under this umask
    finally:
        os.umask(previous)
    assert (tmp_path / "results.json").stat().st_mode & 0o777 == (tmp_path / "plain.json").stat().st_mode & 0o777
    assert (tmp_path / "results.json").stat().st_mode & 0o777 == 0o666 & ~umask
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plain.json", "results.json"]  # no temporary left


@pytest.mark.slow  # (seconds; .ci/run runs it)
def test_kill_after_the_trainers_rotation_resumes_exactly(reference, tmp_path):
    """The window that lost runs before: the Trainer had saved and, with save_total_limit=1, deleted the
    previous checkpoint, but dataflex's state was not yet in the new one."""
    assert_same_run(kill_and_resume(tmp_path, "after_rotation", 6, 1, in_process=True), reference)


def test_a_run_resumed_from_its_final_checkpoint_trains_nothing_more(reference, tmp_path):
    """Killed after the last save but before the script's end, the rerun resumes at max_steps: the Trainer alone
    would train one more step (transformers 5.25) — an extra batch, optimizer step and decision."""
    run_trainer(*build_trainer(tmp_path), tmp_path)
    (tmp_path / "result.json").unlink()
    assert Path(last_complete_checkpoint(tmp_path)).name == "checkpoint-12"
    run_trainer(*build_trainer(tmp_path), tmp_path)
    assert max(outcome_steps(tmp_path, "")) == 12
    assert_same_run(outcome(tmp_path), reference)


@pytest.mark.slow  # (seconds of training; .ci/run runs it)
def test_plain_loop_killed_between_its_files_resumes_exactly(loop_reference, tmp_path):
    """Before: a kill between the loop's two files combined step-N tensors with an older JSON state."""
    assert_same_run(
        kill_and_resume(tmp_path, "loop_between_files", 6, None, loop=True, in_process=True), loop_reference
    )


@pytest.mark.slow
@pytest.mark.parametrize("phase", ["loop_between_files", "loop_after_save"])
@pytest.mark.parametrize("step", [4, 10])
def test_plain_loop_killed_while_checkpointing_resumes_exactly(loop_reference, tmp_path, phase, step):
    assert_same_run(kill_and_resume(tmp_path, phase, step, None, loop=True), loop_reference)


@pytest.mark.slow
@pytest.mark.parametrize("limit", [1, 2])
@pytest.mark.parametrize(
    "phase", ["model_save", "rank_rng_state", "trainer_state", "after_rotation", "dataflex_write", "commit"]
)
@pytest.mark.parametrize("step", [4, 10])
def test_kill_at_every_phase_resumes_exactly(reference, tmp_path, phase, limit, step):
    assert_same_run(kill_and_resume(tmp_path, phase, step, limit), reference)


@pytest.mark.slow
@pytest.mark.parametrize("trial", range(20))
def test_kill_at_a_random_instant_resumes_exactly(reference, tmp_path, trial):
    """SIGKILL at a random instant of training (inside a step, a save, a decision: wherever it lands), then
    rerun the command until it finishes; at most save_steps of progress may be lost."""
    limit = ["--save-total-limit", str(1 + trial % 2)]
    kill_after(tmp_path, random.Random(trial).uniform(0.0, 0.9) * reference["seconds"], *limit)
    assert_lost_at_most_one_interval(tmp_path, "")
    while not (tmp_path / "result.json").exists():
        assert finish(start(tmp_path, *limit)) == 0
    assert_same_run(outcome(tmp_path), reference)


@pytest.fixture(scope="module")
def decider_references(tmp_path_factory) -> dict[str, dict]:
    """Uninterrupted runs of every other decider, each in a process of its own like the runs it is compared with."""
    references = {}
    for decider in DECIDERS[1:]:
        out = tmp_path_factory.mktemp(f"reference_{decider}")
        assert finish(start(out, "--decider", decider)) == 0
        references[decider] = outcome(out)
    return references


@pytest.mark.slow
@pytest.mark.parametrize("kill", ["dataflex_write", "commit", "random"])
@pytest.mark.parametrize("decider", DECIDERS[1:])
def test_every_decider_killed_while_saving_or_at_a_random_instant_resumes_exactly(
    decider_references, tmp_path, decider, kill
):
    """Selection (its current subset), a rescored curriculum (its order), the training-dynamics record (its
    per-example arrays, in the binary state file) and per-example reweighting each keep other state than ODM's
    mixture: killed inside a save or at a random instant, every one resumes to the uninterrupted run."""
    reference = decider_references[decider]
    args = ["--decider", decider, "--save-total-limit", "1"]
    if kill == "random":
        seconds = random.Random(decider).uniform(0.0, 0.9) * reference["seconds"]
        kill_after(tmp_path, seconds, *args)
    else:
        assert finish(start(tmp_path, "--phase", kill, "--kill-step", "6", *args)) == -signal.SIGKILL
    assert_lost_at_most_one_interval(tmp_path, "")
    while not (tmp_path / "result.json").exists():
        assert finish(start(tmp_path, *args)) == 0
    result = outcome(tmp_path)
    assert_same_run(result, reference)
    mismatch = first_difference(result["dynamics"], reference["dynamics"])
    assert mismatch is None, f"training-dynamics record differs at {mismatch}"
    assert (result["dynamics"] is None) == (decider != "dynamics")


def kill_after(out: Path, seconds: float, *args: str) -> None:
    """Run with a SIGKILL timer ``seconds`` into training. A run faster than the reference the delay was drawn
    from (a machine less loaded than when it was timed) dies at its end instead (``kill_worker``)."""
    code = finish(start(out, "--kill-after", f"{seconds:.4f}", *args))
    assert code == -signal.SIGKILL, f"exit code {code}"


def assert_lost_at_most_one_interval(out: Path, suffix: str) -> None:
    """The steps a killed run had finished (its step log) minus the step it resumes from."""
    done = max(outcome_steps(out, suffix), default=0)
    found = last_complete_checkpoint(out)
    resumed = int(Path(found).name.split("-")[1]) if found else 0
    assert 0 <= done - resumed <= SAVE_STEPS, f"finished step {done}, resumes from {found}"


def outcome_steps(out: Path, suffix: str) -> list[int]:
    path = out / f"steps{suffix}.jsonl"
    return [json.loads(line)["step"] for line in path.read_text().splitlines()] if path.exists() else []


@pytest.mark.slow
@pytest.mark.parametrize("trial", range(16))
def test_plain_loop_killed_at_a_random_instant_resumes_exactly(loop_reference, tmp_path, trial):
    kill_after(tmp_path, random.Random(100 + trial).uniform(0.0, 0.8) * loop_reference["seconds"], "--loop")
    while not (tmp_path / "result.json").exists():
        assert finish(start(tmp_path, "--loop")) == 0
    assert_same_run(outcome(tmp_path), loop_reference)


@pytest.fixture(scope="module")
def two_process_references(tmp_path_factory) -> dict[int, Path]:
    """One uninterrupted 2-process run per save_total_limit."""
    folders = {}
    for limit in (1, 2):
        folders[limit] = tmp_path_factory.mktemp(f"two_process_reference_{limit}")
        assert finish_job(start_two_processes(folders[limit], "--save-total-limit", str(limit))) == 0
    return folders


def finish_job(proc: subprocess.Popen) -> int:
    _, err = proc.communicate(timeout=900)
    proc.stderr_text = err.decode()[-3000:]
    return proc.returncode


def resume_two_processes_and_compare(run: Path, reference: Path, limit: int) -> None:
    again = start_two_processes(run, "--save-total-limit", str(limit))
    assert finish_job(again) == 0, again.stderr_text
    for rank in (0, 1):
        assert_same_run(outcome(run, f"-rank{rank}"), outcome(reference, f"-rank{rank}"))


@pytest.mark.slow
@pytest.mark.parametrize("limit", [1, 2])
@pytest.mark.parametrize(
    "phase", ["model_save", "rank_rng_state", "trainer_state", "after_rotation", "dataflex_write", "commit"]
)
def test_two_process_run_killed_while_saving_resumes_exactly(two_process_references, tmp_path, phase, limit):
    """torchrun, 2 processes (gloo): the ranks die inside a save (rank_rng_state: rank 1 alone, while rank 0
    goes on — before the barrier dataflex adds, rank 0 then declared the checkpoint complete and deleted the
    previous one), torchrun tears the job down; rerunning the command resumes both ranks from the last complete
    checkpoint and each ends as an uninterrupted run."""
    extra = ["--save-total-limit", str(limit)]
    killed = start_two_processes(tmp_path, "--phase", phase, "--kill-step", "6", *extra)
    assert finish_job(killed) != 0 and not (tmp_path / "result-rank0.json").exists()
    expected = 6 if phase in RESUMES_AT_THE_KILLED_STEP else 6 - SAVE_STEPS
    assert Path(last_complete_checkpoint(tmp_path)).name == f"checkpoint-{expected}"
    resume_two_processes_and_compare(tmp_path, two_process_references[limit], limit)


@pytest.mark.slow
@pytest.mark.parametrize("trial", range(10))
def test_two_process_run_killed_at_a_random_instant_resumes_exactly(two_process_references, tmp_path, trial):
    """One rank (alternating) SIGKILLed at a random instant of training; the other is torn down by torchrun."""
    limit = 1 + trial % 2
    seconds = outcome(two_process_references[limit], "-rank0")["seconds"]
    after = random.Random(200 + trial).uniform(0.0, 0.9) * seconds
    args = ["--kill-after", f"{after:.4f}", "--kill-rank", str(trial % 2), "--save-total-limit", str(limit)]
    assert finish_job(start_two_processes(tmp_path, *args)) != 0
    assert not (tmp_path / "result-rank0.json").exists() or not (tmp_path / "result-rank1.json").exists()
    assert_lost_at_most_one_interval(tmp_path, "-rank0")
    resume_two_processes_and_compare(tmp_path, two_process_references[limit], limit)


@pytest.mark.slow
def test_two_process_run_resumed_from_its_final_checkpoint_trains_nothing_more(two_process_references, tmp_path):
    """Both ranks killed after the final save, before the script's end: the rerun resumes at max_steps on each
    rank and ends as the uninterrupted run, with no step past the last (each rank installs the same guard)."""
    run = tmp_path / "run"
    shutil.copytree(two_process_references[2], run)
    for rank in (0, 1):
        (run / f"result-rank{rank}.json").unlink()
    assert Path(last_complete_checkpoint(run)).name == "checkpoint-12"
    resume_two_processes_and_compare(run, two_process_references[2], 2)
    for rank in (0, 1):
        assert max(outcome_steps(run, f"-rank{rank}")) == 12
