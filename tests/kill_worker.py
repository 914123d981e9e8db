"""A Trainer run with DataFlexCallback that SIGKILLs itself at a chosen phase of a chosen checkpoint save.

    python tests/kill_worker.py OUT [--phase PHASE --kill-step N] [--save-total-limit L]
    torchrun --nproc_per_node 2 tests/kill_worker.py OUT ...     (2 processes: files per rank)

Every start resumes from ``dataflex.hf.last_complete_checkpoint(OUT)`` (fresh when there is none). Each
optimizer step's example ids are appended to ``OUT/steps.jsonl`` as they happen (a later, resumed run
rewrites the steps it repeats); a run that finishes writes ``OUT/result.json``. The kill is armed only
on the first start (``OUT/armed`` marks it), so rerunning the same command after the kill completes the run.

With ``--loop`` the run is the plain loop (``dataflex.proxies.loop.train_mixture`` with ``ckpt_dir=OUT``,
rerun to continue) and the phases are ``loop_between_files`` (the tensor file of step N is written, the
JSON not) and ``loop_after_save`` (step N's checkpoint is complete).

``--decider`` picks what decides the data in a Trainer run: ``mix`` (ODM, the default), ``select``, ``curriculum``,
``dynamics`` (ODM keeping the training-dynamics record) or ``reweight`` (ODM with ``ExampleWeightedLoss``).

``--kill-after S`` instead dies S seconds after training starts (imports and data built), whatever it is
doing then: random-instant kills that land inside training rather than in the interpreter's start-up. Under
torchrun only ``--kill-rank`` arms it; torchrun then tears the other rank down.

Phases of the Trainer run (where inside the save of step N the process dies):
  model_save      the Trainer has written the weights, not the optimizer
  rank_rng_state  the last rank has written half of its rng_state file (the others go on; 2 processes)
  trainer_state   half of trainer_state.json (the Trainer's last file) is written
  after_rotation  the Trainer finished and deleted older checkpoints; dataflex has not yet moved its state in
  dataflex_write  half of dataflex's JSON is written (in its staging folder)
  commit          dataflex's state is staged, the Trainer's checkpoint complete, the move not yet done
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import transformers.trainer as hf_trainer  # noqa: E402
from hf_helpers import comparable_log, finish_distributed, make_trainer, small_dataset  # noqa: E402
from transformers import TrainerCallback  # noqa: E402
from transformers.trainer_callback import TrainerState  # noqa: E402

import dataflex.checkpoint as df_checkpoint  # noqa: E402
import dataflex.hf.checkpoint as hf_checkpoint  # noqa: E402
import dataflex.proxies.loop as loop_module  # noqa: E402
from dataflex import DataFlexCallback  # noqa: E402
from dataflex.hf import last_complete_checkpoint  # noqa: E402
from dataflex.policies import ODM  # noqa: E402

PHASES = ("model_save", "rank_rng_state", "trainer_state", "after_rotation", "dataflex_write", "commit")
LOOP_PHASES = ("loop_between_files", "loop_after_save")


def die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


TIMERS: list[threading.Timer] = []


def arm_timer(seconds: float) -> None:
    timer = threading.Timer(seconds, die)
    timer.daemon = True
    timer.start()
    TIMERS.append(timer)


def die_if_timer_pending() -> None:
    """A kill timed past the end of training (this run went faster than the reference the time was drawn from)
    lands at its end, before the result is written: an armed run always dies, whatever the machine's load."""
    if any(timer.is_alive() for timer in TIMERS):
        die()


def arm_loop(phase: str, step: int) -> None:
    """Patch the plain loop's checkpoint writer so the process dies in ``phase`` of the step-``step`` save."""
    original_write, original_save = df_checkpoint.write_json_atomic, df_checkpoint.save_step

    def write(path, obj, **kwargs):
        if phase == "loop_between_files" and obj.get("step") == step:
            die()
        return original_write(path, obj, **kwargs)

    def save(root, at, *args, **kwargs):
        folder = original_save(root, at, *args, **kwargs)
        if phase == "loop_after_save" and at == step:
            die()
        return folder

    df_checkpoint.write_json_atomic = write
    loop_module.save_step = save


def run_loop(out: Path, steps: int = 12, save_steps: int = 2, kill_after: float | None = None) -> None:
    from dataflex.domains import encode_domains
    from dataflex.testbeds.tiny import collate_causal, tiny_gpt2

    ds = small_dataset(per_domain=12)
    ids, names = encode_domains(ds["domain"])
    model = tiny_gpt2(n_layer=1, n_embd=32, n_head=2, seed=0)
    if kill_after is not None:
        arm_timer(kill_after)
    started = time.perf_counter()
    result = loop_module.train_mixture(
        model,
        ds,
        ids,
        names,
        ODM(),
        collate=collate_causal,
        steps=steps,
        batch_size=8,
        lr=3e-3,
        seed=0,
        update_every=2,
        progress=False,
        ckpt_dir=out,
        ckpt_every=save_steps,
    )
    die_if_timer_pending()
    (out / "result.json").write_text(
        json.dumps(
            {
                "history": result.history,
                "params": params_summary(model),
                "log": [],
                "steps": {},
                "seconds": time.perf_counter() - started,
            }
        )
    )


def params_summary(model) -> dict[str, list[float]]:
    """Per tensor: the sum and the L2 norm (float64) — comparable up to float32 rounding, unlike a hash."""
    out = {}
    for name, value in sorted(model.state_dict().items()):
        v = value.detach().cpu().double()
        out[name] = [float(v.sum()), float(v.norm())]
    return out


def arm(phase: str, step: int, trainer) -> None:
    """Patch the function the phase names so the process dies there at global step ``step``."""
    at_step = lambda: trainer.state.global_step == step  # noqa: E731
    if phase == "model_save":
        original = trainer._save_optimizer_and_scheduler
        trainer._save_optimizer_and_scheduler = lambda out: die() if at_step() else original(out)
    elif phase == "rank_rng_state":
        original_rng = trainer._save_rng_state
        last_rank = int(os.environ.get("WORLD_SIZE", "1")) - 1

        def half_rng(output_dir):
            if not at_step() or int(os.environ.get("RANK", "0")) != last_rank:
                return original_rng(output_dir)
            original_rng(output_dir)
            name = "rng_state.pth" if last_rank == 0 else f"rng_state_{last_rank}.pth"
            path = Path(output_dir) / name
            path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
            die()

        trainer._save_rng_state = half_rng
    elif phase == "trainer_state":
        original_save = TrainerState.save_to_json

        def half_json(self, path):
            if not at_step():
                return original_save(self, path)
            text = json.dumps(self.__dict__, default=str)
            Path(path).write_text(text[: len(text) // 2])
            die()

        TrainerState.save_to_json = half_json
    elif phase == "after_rotation":
        original_rotate = hf_trainer.rotate_checkpoints

        def rotate_then_die(*args, **kwargs):
            original_rotate(*args, **kwargs)
            if at_step():
                die()

        hf_trainer.rotate_checkpoints = rotate_then_die
    elif phase == "dataflex_write":
        original_write = df_checkpoint.write_json_atomic

        def half_write(path, obj, **kwargs):
            if not at_step():
                return original_write(path, obj, **kwargs)
            text = json.dumps(obj)
            Path(str(path) + ".tmp").write_text(text[: len(text) // 2])
            die()

        df_checkpoint.write_json_atomic = half_write
    elif phase == "commit":
        original_commit = hf_checkpoint.commit
        hf_checkpoint.commit = lambda folder, **kw: die() if at_step() else original_commit(folder, **kw)
    else:
        raise ValueError(f"phase={phase!r}; valid: {PHASES}")


class StepLog(TrainerCallback):
    def __init__(self, dfx, path: Path) -> None:
        self.dfx, self.path = dfx, path

    def on_step_end(self, args, state, control, **kwargs):
        ids, _, _ = self.dfx.last_step_records()
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps({"step": state.global_step, "ids": ids.tolist()}) + "\n")


def rank_suffix() -> str:
    """``""`` in one process, ``"-rank<r>"`` under torchrun, so ranks never share a record file."""
    return f"-rank{os.environ['RANK']}" if int(os.environ.get("WORLD_SIZE", "1")) > 1 else ""


#: What decides the data: every callback kind, the dynamics record and per-example reweighting share one
#: checkpoint path, and each keeps other state in it (a selection, a rescored order, per-example arrays).
DECIDERS = ("mix", "select", "curriculum", "dynamics", "reweight")


def make_callback(decider: str):
    """A fresh dataflex callback of kind ``decider`` and its ``compute_loss_func`` maker (or None)."""
    from dataflex import DataFlexCurriculumCallback, DataFlexSelectCallback
    from dataflex.curriculum import Curriculum, loss_difficulty
    from dataflex.selectors import LossFocus
    from dataflex.weighting import ExampleWeightedLoss

    if decider == "mix":
        return DataFlexCallback(ODM(), update_every=1), None
    if decider == "select":
        return DataFlexSelectCallback(LossFocus(0.5, "hard"), update_every=3, label_column="domain"), None
    if decider == "curriculum":
        return DataFlexCurriculumCallback(Curriculum(scorer=loss_difficulty(), pacing="root"), rescore_every=3), None
    if decider == "dynamics":
        return DataFlexCallback(ODM(), update_every=2, dynamics=True), None
    if decider == "reweight":
        dfx = DataFlexCallback(ODM(), update_every=2)
        return dfx, lambda: dfx.wrap_loss(ExampleWeightedLoss(temperature=1.0, direction="hard"))
    raise ValueError(f"decider={decider!r}; valid: {DECIDERS}")


def build_trainer(
    out: Path, steps: int = 12, save_steps: int = 2, save_total_limit: int | None = None, decider: str = "mix"
):
    out.mkdir(parents=True, exist_ok=True)
    dfx, make_loss = make_callback(decider)
    trainer = make_trainer(
        small_dataset(per_domain=12),
        dfx,
        out,
        max_steps=steps,
        save_steps=save_steps,
        logging_steps=1,
        extra=[StepLog(dfx, out / f"steps{rank_suffix()}.jsonl")],
        save_total_limit=save_total_limit,
        compute_loss_func=make_loss() if make_loss else None,
    )
    return dfx, trainer


def run_trainer(dfx, trainer, out: Path) -> None:
    """Train from the newest complete checkpoint of ``out`` (or afresh) and write ``out/result.json``."""
    started = time.perf_counter()
    trainer.train(resume_from_checkpoint=last_complete_checkpoint(out))
    die_if_timer_pending()
    (out / f"result{rank_suffix()}.json").write_text(
        json.dumps(
            {
                "seconds": time.perf_counter() - started,
                "history": dfx.history,
                "params": params_summary(trainer.model),
                "log": comparable_log(trainer.state.log_history),
                "dynamics": dynamics_summary(dfx),
            }
        )
    )


def dynamics_summary(dfx) -> dict[str, list] | None:
    """The training-dynamics record's arrays as lists (NaN as None, for JSON), or None without one."""
    if dfx.dynamics is None:
        return None
    state = dfx.dynamics.state_dict()
    return {k: [None if v != v else v for v in state[k].tolist()] for k in sorted(state) if k != "ema"}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("out", type=Path)
    p.add_argument("--phase", choices=PHASES + LOOP_PHASES)
    p.add_argument("--loop", action="store_true", help="the plain loop instead of the Trainer")
    p.add_argument("--kill-step", type=int, default=0)
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--save-steps", type=int, default=2)
    p.add_argument("--save-total-limit", type=int, default=None)
    p.add_argument("--kill-after", type=float, default=None, help="seconds after training starts")
    p.add_argument("--kill-rank", type=int, default=0, help="the rank --kill-after arms under torchrun")
    p.add_argument("--decider", choices=DECIDERS, default="mix", help="what decides the data (Trainer runs)")
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    marker = args.out / f"armed{rank_suffix()}"
    timed = args.kill_after is not None and int(os.environ.get("RANK", "0")) == args.kill_rank
    armed = (args.phase is not None or timed) and not marker.exists()
    if armed:
        marker.write_text(args.phase or f"after {args.kill_after} s")
    if args.loop:
        if armed and args.phase:
            arm_loop(args.phase, args.kill_step)
        return run_loop(args.out, args.steps, args.save_steps, kill_after=args.kill_after if armed else None)
    dfx, trainer = build_trainer(args.out, args.steps, args.save_steps, args.save_total_limit, args.decider)
    if armed and args.phase:
        arm(args.phase, args.kill_step, trainer)
    if armed and timed:
        arm_timer(args.kill_after)
    run_trainer(dfx, trainer, args.out)
    finish_distributed()


if __name__ == "__main__":
    main()
