"""The benchmarks reuse finished work by folder name; another setting must never get an earlier setting's result."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import torch
from transformers import Trainer

from benchmarks.common import claim_runs, pretrained_base
from dataflex.testbeds.tiny import default_data_dir


def small_textmix(root: Path, per_domain: int) -> Path:
    """A copy of the bundled textmix training split with ``per_domain`` texts per domain."""
    folder = root / "textmix" / "train"
    folder.mkdir(parents=True)
    for path in sorted((default_data_dir() / "textmix" / "train").glob("*.jsonl")):
        lines = path.read_text().splitlines()[:per_domain]
        (folder / path.name).write_text("\n".join(lines) + "\n")
    return root


def test_a_pretrained_base_is_cached_per_setting(tmp_path):
    """The base was cached as ``work/base/model.pt`` whatever it was made with: ``--pretrain-steps 60`` of one
    benchmark's ``--quick`` mode and another's, or another ``--max-len``, got the first base without a word."""
    data = small_textmix(tmp_path / "data", per_domain=6)
    knobs = dict(max_len=32, batch_size=4, lr=2e-3)
    two = pretrained_base(data, tmp_path / "work", steps=2, **knobs)
    three = pretrained_base(data, tmp_path / "work", steps=3, **knobs)
    assert any(not torch.equal(two[k], three[k]) for k in two)  # another setting: trained anew
    again = pretrained_base(data, tmp_path / "work", steps=2, **knobs)
    assert all(torch.equal(two[k], again[k]) for k in two)  # the same setting: the cached base
    assert len(list((tmp_path / "work").glob("base-*/model.pt"))) == 2
    for path in (data / "textmix" / "train").glob("*.jsonl"):  # the same files and domains, other text
        records = [json.loads(line) for line in path.read_text().splitlines()]
        path.write_text("".join(json.dumps({**r, "text": r["text"][::-1]}) + "\n" for r in records))
    other_data = pretrained_base(data, tmp_path / "work", steps=2, **knobs)
    assert any(not torch.equal(two[k], other_data[k]) for k in two)  # other text: trained anew


def test_a_benchmarks_runs_folder_refuses_a_rerun_with_other_settings(tmp_path):
    """Finished runs are reused by arm and seed: ``--steps 50`` after a 400-step run reported the 400-step
    results as its own. More arms or seeds still reuse the finished ones."""
    runs = tmp_path / "runs"
    args = argparse.Namespace(runs=runs, out=tmp_path, work=tmp_path, seeds=[0], quick=False, steps=400, arms=["a"])
    claim_runs(args, picks=("arms",))
    (runs / "a_seed0").mkdir()
    (runs / "a_seed0" / "result.json").write_text(json.dumps({"loss": 1.0}))
    claim_runs(argparse.Namespace(**{**vars(args), "seeds": [0, 1], "arms": ["a", "b"]}), picks=("arms",))
    with pytest.raises(ValueError, match=r"holds a run made with other settings \(steps: 400 there, 50 now\).*--runs"):
        claim_runs(argparse.Namespace(**{**vars(args), "steps": 50}), picks=("arms",))


def test_a_cached_result_is_written_whole_and_refused_when_changed(tmp_path):
    """Run results were written in place: a kill mid-write left a truncated result.json, which the rerun took for a
    finished run and failed to parse; a changed digit was reported as measured."""
    from conftest import changed_digit

    from benchmarks.common import read_result, write_result

    path = tmp_path / "run" / "result.json"
    write_result(path, {"loss": 2.5, "curve": [{"step": 3, "val": 1.25}]})
    assert read_result(path) == {"loss": 2.5, "curve": [{"step": 3, "val": 1.25}]}
    assert sorted(p.name for p in path.parent.iterdir()) == ["result.json", "result.json.sha256"]  # no temporary left
    path.write_text(changed_digit(path.read_text(), '"loss": '))
    with pytest.raises(ValueError, match=r"result\.json is damaged"):
        read_result(path)


def test_the_curriculum_curve_of_a_resumed_run_is_the_uninterrupted_runs(tmp_path):
    """The curriculum benchmark's curve (validation loss every few steps, and the steps to reach a target loss read
    from it) was kept in memory: a run killed after a checkpoint and resumed reported the curve from the
    checkpoint on."""
    from hf_helpers import CrashAt, small_dataset

    from benchmarks.common import make_base, trainer_args
    from benchmarks.curriculum.run import Curve
    from dataflex import DataFlexCurriculumCallback
    from dataflex.curriculum import Curriculum
    from dataflex.hf import last_complete_checkpoint
    from dataflex.testbeds.tiny import collate_causal

    train = small_dataset(per_domain=8, max_len=32)
    val = small_dataset(per_domain=2, max_len=32)

    def run(out: Path, crash_at: int | None = None) -> list:
        cb = DataFlexCurriculumCallback(Curriculum(torch.arange(len(train)).double().numpy()), horizon_steps=4)
        curve = Curve(val, 2, out / "curve.json")
        torch.manual_seed(0)
        args = trainer_args(out, steps=8, batch_size=4, lr=2e-3, seed=0, save_steps=3)
        callbacks = [cb, curve, *([CrashAt(crash_at)] if crash_at else [])]
        trainer = Trainer(
            model=make_base(), args=args, train_dataset=train, data_collator=collate_causal, callbacks=callbacks
        )
        cb.attach(trainer)
        try:
            trainer.train(resume_from_checkpoint=last_complete_checkpoint(out))
        except KeyboardInterrupt:
            pass
        return curve.points

    full = run(tmp_path / "full")
    assert [p["step"] for p in full] == [2, 4, 6, 8]
    run(tmp_path / "crashed", crash_at=5)  # killed before step 6; its newest checkpoint is step 3
    resumed = run(tmp_path / "crashed")
    assert resumed == full
