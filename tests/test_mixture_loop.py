"""The plain PyTorch mixture loop: exact resume for every policy, and a real 2-process accelerate run."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hf_helpers import small_dataset

from dataflex.domains import encode_domains
from dataflex.policies import ADO, ODM, LawCorrected, Temperature, Uniform
from dataflex.proxies.loop import train_mixture
from dataflex.testbeds.tiny import collate_causal, tiny_gpt2

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def data():
    ds = small_dataset(per_domain=20, max_len=40)  # 60 examples, batch 8: 7 steps an epoch
    ids, names = encode_domains(ds["domain"])
    return ds, ids, names


def law_corrected():
    return LawCorrected(
        {"code": 0.5, "literature": 0.3, "trivia": 0.2}, {"code": 3.0, "literature": 3.0, "trivia": 3.0}, radius=0.3
    )


@pytest.mark.parametrize(
    "make_policy", [ODM, lambda: ADO(warmup_updates=3), Uniform, lambda: Temperature(3.0), law_corrected]
)
def test_loop_resumes_exactly_across_an_epoch(data, tmp_path, make_policy):
    ds, ids, names = data

    def run(ckpt, stop=None):
        model = tiny_gpt2(n_layer=1, n_embd=32, n_head=2, seed=0)
        res = train_mixture(
            model,
            ds,
            ids,
            names,
            make_policy(),
            collate=collate_causal,
            steps=16,
            batch_size=8,
            lr=3e-3,
            seed=0,
            update_every=2,
            ckpt_dir=ckpt,
            ckpt_every=5,
            stop_after=stop,
            progress=False,
        )
        return model, res

    full_model, full = run(tmp_path / "full")
    run(tmp_path / "cut", stop=10)  # pre-empted mid-epoch 2, after a checkpoint at 10
    model, resumed = run(tmp_path / "cut")
    assert resumed.history == full.history
    for a, b in zip(full_model.state_dict().values(), model.state_dict().values()):
        assert torch.equal(a, b)


def test_loop_resume_reads_its_checkpoint_negative_control(data, tmp_path):
    """A loop that ignored its checkpoint and retrained from step 0 would end bit-equal too (it is
    deterministic), so check on the same resume path that it really continues from the checkpoint:
    the resumed call trains only the remaining steps, a perturbed checkpoint changes the result, and a
    checkpoint whose two files come from different saves is refused."""
    from dataflex.checkpoint import load_state, save_state
    from dataflex.proxies.loop import LOOP_STATE

    ds, ids, names = data
    kw = dict(collate=collate_causal, steps=12, batch_size=8, lr=3e-3, seed=0, update_every=2, progress=False)

    def run(ckpt, stop=None):
        model = tiny_gpt2(n_layer=1, n_embd=32, n_head=2, seed=0)
        forwards = []
        model.register_forward_hook(lambda m, a, o: forwards.append(1) if m.training else None)
        train_mixture(model, ds, ids, names, ODM(), ckpt_dir=ckpt, ckpt_every=4, stop_after=stop, **kw)
        return model, len(forwards)

    full, _ = run(tmp_path / "full")
    run(tmp_path / "cut", stop=8)
    step8 = tmp_path / "cut" / "step-8"
    state, tensors = load_state(step8, LOOP_STATE)
    resumed, forwards = run(tmp_path / "cut")
    assert forwards == 4  # steps 9..12 only
    assert all(torch.equal(a, b) for a, b in zip(full.state_dict().values(), resumed.state_dict().values()))

    tensors["model"] = {k: v + 1e-3 if v.is_floating_point() else v for k, v in tensors["model"].items()}
    shutil.rmtree(tmp_path / "cut" / "step-12")
    save_state(step8, LOOP_STATE, state, tensors)  # the step-8 checkpoint, perturbed
    perturbed, _ = run(tmp_path / "cut")
    assert not all(torch.equal(a, b) for a, b in zip(full.state_dict().values(), perturbed.state_dict().values()))

    shutil.rmtree(tmp_path / "cut" / "step-12")
    torch.save({"commit": "another save", "tensors": tensors}, step8 / f"{LOOP_STATE}.pt")
    with pytest.raises(ValueError, match="come from different saves"):
        run(tmp_path / "cut")


@pytest.mark.slow  # (seconds; .ci/run runs it)
def test_recipe_under_accelerate_two_processes(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        str(ROOT / "tests" / "mixture_dist_worker.py"),
        str(tmp_path),
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    r0 = json.loads((tmp_path / "rank0.json").read_text())
    r1 = json.loads((tmp_path / "rank1.json").read_text())
    assert r0["world"] == 2
    assert r0["history"] == r1["history"] and len(r0["history"]) > 2
    assert not np.allclose(r0["history"][-1]["weights"], r0["history"][0]["weights"])
    assert r0["proxy_params"] == r1["proxy_params"]  # the online proxy stays identical on both ranks


@pytest.mark.slow  # (seconds; .ci/run runs it)
def test_hydra_sweep_runs_and_summarizes(tmp_path):
    cmd = [
        sys.executable,
        "-m",
        "dataflex.recipes.mixture",
        "-m",
        "policy=uniform,ado",
        "seed=0",
        "steps=6",
        "eval_every=3",
        "batch_size=4",
        "data.train_per_domain=12",
        "data.val_per_domain=4",
        "model.n_layer=1",
        "model.n_embd=32",
        "model.n_head=2",
        f"hydra.sweep.dir={tmp_path / 'sweep'}",
        f"work_dir={tmp_path / 'work'}",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    files = sorted((tmp_path / "sweep").glob("**/results.json"))
    # <policy>/seed<k>/<the other overrides>: a sweep over any setting gets one folder per combination
    overrides = "batch_size=4,data.train_per_domain=12,data.val_per_domain=4,eval_every=3,model.n_embd=32,"
    overrides += "model.n_head=2,model.n_layer=1,steps=6"  # (not work_dir: a cache folder, not a setting)
    assert [f.parent.relative_to(tmp_path / "sweep").parts[:2] for f in files] == [
        ("ado", "seed0"),
        ("uniform", "seed0"),
    ]
    assert [f.parent.name for f in files] == [overrides, overrides]
    # the recipe's Hydra callback (dataflex.recipes.sweep_summary.SweepSummary) tabulates the sweep when it ends
    table = (tmp_path / "sweep" / "sweep_summary.md").read_text()
    assert table in proc.stdout and f"### {overrides}" in table
    assert "| uniform | 0 |" in table and re.search(r"\| ado \| 0 \|.* [01] of 1 \|", table)


def short_loop(data, policy, steps: int, update_every: int):
    """A few steps of the plain loop on ``data`` with the tests' small model."""
    ds, ids, names = data
    model = tiny_gpt2(n_layer=1, n_embd=32, n_head=2, seed=0)
    settings = dict(collate=collate_causal, batch_size=8, lr=3e-3, seed=0, progress=False)
    return train_mixture(model, ds, ids, names, policy, steps=steps, update_every=update_every, **settings)


def test_the_loop_warns_when_odm_cannot_leave_uniform_in_the_run(data):
    """3 domains: the 4th update is ODM's first off uniform; 6 steps at update_every=2 make 2 (steps 2, 4)."""
    with pytest.warns(UserWarning, match=r"until its update 4, but this run makes 2 updates \(update_every=2\)"):
        res = short_loop(data, ODM(), steps=6, update_every=2)
    assert all(np.allclose(h["weights"], 1 / 3) for h in res.history)


def test_the_loop_refuses_a_piecewise_schedule_counted_in_other_updates(data):
    from dataflex.policies import Piecewise

    policy = Piecewise([(0, [0.8, 0.1, 0.1]), (4, [0.1, 0.1, 0.8])], update_every=2)
    with pytest.raises(ValueError, match=r"Piecewise\(update_every=2\) is driven by updates every 4 steps"):
        short_loop(data, policy, steps=8, update_every=4)


def test_the_loop_warns_when_no_update_falls_inside_the_run(data):
    """The loop binds its policy through the same start as the Trainer: an adaptive policy with no update warns."""
    with pytest.warns(
        UserWarning, match=r"no LawCorrected update falls inside this run \(update_every=8, .*max_steps=6\)"
    ):
        res = short_loop(data, law_corrected(), steps=6, update_every=8)
    assert len(res.history) == 1


@pytest.mark.parametrize(
    "earlier, named",
    [
        (dict(mixed_precision="bf16"), "mixed_precision='bf16'"),
        (dict(dynamo_backend="eager"), "dynamo_backend='eager'"),
    ],
)
def test_loop_refuses_settings_an_earlier_accelerator_left_in_the_process(data, earlier, named, monkeypatch):
    """A Trainer with bf16 (TRL's default) or torch_compile earlier in the process fixes accelerate's state; the
    loop's own Accelerator would silently train with it (other numbers than in a fresh process). Refused, naming
    it; an Accelerator passed explicitly (or the same settings launched, as accelerate launch passes them) runs."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    ds, ids, names = data

    def run(**kw) -> torch.Tensor:
        model = tiny_gpt2(n_layer=1, n_embd=32, n_head=2, seed=0)
        train_mixture(
            model, ds, ids, names, Uniform(), collate=collate_causal, steps=2, batch_size=8, lr=3e-3, seed=0,
            progress=False, **kw,
        )  # fmt: skip
        return model.lm_head.weight.detach().clone()

    fresh = run()
    AcceleratorState._reset_state(reset_partial_state=True)  # what a new process starts from
    Accelerator(cpu=True, **earlier)
    with pytest.raises(RuntimeError, match=named):
        run()
    inherited = run(accelerator=Accelerator(cpu=True))
    if "mixed_precision" in earlier:  # what the refusal protects: bf16 autocast trains another model
        assert not torch.equal(fresh, inherited)
    launched = {"mixed_precision": "ACCELERATE_MIXED_PRECISION", "dynamo_backend": "ACCELERATE_DYNAMO_BACKEND"}
    for key, value in earlier.items():
        monkeypatch.setenv(launched[key], value.upper() if key == "dynamo_backend" else value)
    run()  # launched with these settings (as accelerate launch passes them), a fresh process takes them too
    monkeypatch.undo()
    AcceleratorState._reset_state(reset_partial_state=True)  # the other way out the refusal names
    assert torch.equal(run(), fresh)
