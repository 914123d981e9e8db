"""The headline Hydra recipe: stock Trainer + DataFlexCallback on text, resumable by rerunning it."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from dataflex.policies import ODM
from dataflex.recipes.trainer import train_with_callback
from dataflex.testbeds.tiny import default_data_dir, tiny_gpt2

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def settings(out: Path, **over):
    kw = dict(
        policy=ODM(),
        model=tiny_gpt2(n_layer=1, n_embd=32, n_head=2, seed=0),
        data_root=default_data_dir() / "textmix",
        out_dir=out,
        seed=0,
        steps=8,
        batch_size=4,
        gradient_accumulation_steps=1,
        lr=2e-3,
        update_every=2,
        warmup_steps=0,
        save_steps=4,
        logging_steps=2,
        max_len=48,
        report_to=[],
        train_per_domain=6,
        val_per_domain=2,
    )
    return {**kw, **over}


@pytest.mark.parametrize("save_steps,resumed_at", [(4, 4), (3, 3)])
def test_rerunning_the_recipe_resumes_from_its_newest_checkpoint(tmp_path, save_steps, resumed_at):
    """(3, 3): a checkpoint between two logs (every 2 steps); the step since the last log was in no log and
    stayed out of the resumed run's training loss and its next log."""
    first = train_with_callback(**settings(tmp_path, save_steps=save_steps))
    assert len(first["history"]) == 5 and any("loss" in h for h in first["log_history"])
    for later in [c for c in tmp_path.glob("checkpoint-*") if int(c.name.split("-")[1]) > resumed_at]:
        shutil.rmtree(later)  # as if killed after the checkpoint at step `resumed_at`
    again = train_with_callback(**settings(tmp_path, save_steps=save_steps))
    assert again["history"] == first["history"]
    assert again["validation_loss"] == first["validation_loss"]
    # The Trainer's summary averages only the resumed call's steps (0.0 with none left: a kill after the last
    # checkpoint, before the results file); the results hold the whole run's mean training loss.
    assert untimed(again["log_history"]) == untimed(first["log_history"])
    assert again["log_history"][-1]["train_loss"] == pytest.approx(first["log_history"][-1]["train_loss"], rel=1e-12)
    after_the_last = train_with_callback(**settings(tmp_path, save_steps=save_steps))
    assert after_the_last["validation_loss"] == first["validation_loss"]
    assert after_the_last["log_history"][-1]["train_loss"] == pytest.approx(first["log_history"][-1]["train_loss"])


def untimed(log_history: list[dict]) -> list[dict]:
    """Log entries without wall-clock timings, and the summary's train_loss (compared to rounding)."""
    drop = ("train_runtime", "train_samples_per_second", "train_steps_per_second", "train_loss")
    return [{k: v for k, v in entry.items() if k not in drop} for entry in log_history]


@pytest.mark.parametrize("key,value", [("steps", -5), ("update_every", 0), ("batch_size", 0), ("lr", "abc")])
def test_bad_settings_name_the_key(tmp_path, key, value):
    with pytest.raises(ValueError, match=f"{key} must be a positive"):
        train_with_callback(**settings(tmp_path, **{key: value}))


def test_policies_that_train_proxies_first_name_the_recipe_that_does(tmp_path):
    """DoReMi's reference and proxy stages run in the mixture recipe; here they were a RuntimeError telling a
    command-line user to "call prepare()"."""
    from dataflex.proxies.doremi import DoReMiOffline, PreparedDoReMiOnline

    with pytest.raises(ValueError, match=r"DoReMiOffline trains its reference .* mixture recipe .*weights_path="):
        train_with_callback(**settings(tmp_path, policy=DoReMiOffline()))
    with pytest.raises(ValueError, match=r"PreparedDoReMiOnline trains its reference .* dataflex.recipes.mixture"):
        train_with_callback(**settings(tmp_path, policy=PreparedDoReMiOnline()))


def test_the_trainer_config_composes():
    with initialize_config_dir(config_dir=str(CONFIGS), version_base=None):
        cfg = compose(config_name="trainer", overrides=["policy=uniform", "steps=5"])
    assert cfg.steps == 5 and cfg.policy._target_.endswith("Uniform") and list(cfg.report_to) == []


def test_static_weights_for_names_hydra_cannot_key_are_given_as_a_list_in_name_order():
    """Hydra's grammar takes no quoted dictionary keys, so `Code / Python` cannot key policy.weights on a command
    line; the README's way round it, a list in the sorted order of the names, reaches Static as meant."""
    import numpy as np
    from hydra.errors import OverrideParseException
    from hydra.utils import instantiate

    with initialize_config_dir(config_dir=str(CONFIGS), version_base=None):
        with pytest.raises(OverrideParseException):
            compose(config_name="trainer", overrides=["policy=static", "policy.weights={'Code / Python':1.0}"])
        cfg = compose(config_name="trainer", overrides=["policy=static", "policy.weights=[0.5,0.2,0.3]"])
    policy = instantiate(cfg.policy)
    policy.bind(["Code / Python", "prose.en", "日本語"], np.array([10, 10, 10]))
    np.testing.assert_allclose(policy.initial_weights(), [0.5, 0.2, 0.3])


def test_report_to_may_be_one_name_as_the_trainer_takes_it(tmp_path, monkeypatch):
    """``report_to=tensorboard`` (one name, as the Trainer accepts it) stopped the recipe with "Input cfg is not an
    OmegaConf config object"; and with ``all`` the Trainer adds wandb itself, which then ran without the recipe's
    offline setting (wanting a key). Every form reaches the Trainer; wandb logs offline into the job's folder."""
    from dataflex.recipes.trainer import reporters

    def given(override: str):
        with initialize_config_dir(config_dir=str(CONFIGS), version_base=None):
            return reporters(compose(config_name="trainer", overrides=[override]).report_to)

    assert given("report_to=tensorboard") == "tensorboard"
    assert given("report_to=[tensorboard,wandb]") == ["tensorboard", "wandb"]
    assert given("report_to=null") == "none" and given("report_to=none") == "none"
    with pytest.raises(ValueError, match=r"report_to must be a reporter name.*got \[3\]"):
        given("report_to=[3]")
    wandb = pytest.importorskip("wandb")
    wandb.teardown()  # wandb reads its settings once per process: an earlier test's run would keep its folder
    for name in ("WANDB_MODE", "WANDB_DIR", "WANDB_API_KEY"):
        monkeypatch.setenv(name, "")
        monkeypatch.delenv(name)
    monkeypatch.setenv("WANDB_SILENT", "true")
    train_with_callback(**settings(tmp_path, steps=2, save_steps=2, logging_steps=1, report_to="all"))
    assert len(list((tmp_path / "wandb").glob("offline-run-*/run-*.wandb"))) == 1


@pytest.mark.slow  # (seconds; .ci/run runs it)
def test_a_seed_override_that_is_not_a_number_is_named_from_the_command_line(tmp_path):
    """The model is built from ``seed`` before the other settings are checked, so it is checked first."""
    import subprocess
    import sys

    run = subprocess.run(
        [sys.executable, "-m", "dataflex.recipes.trainer", "seed=abc", f"hydra.run.dir={tmp_path}"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode != 0 and "seed must be an integer in [0, 2**32); got 'abc'" in run.stderr


def test_wandb_logs_offline_into_each_jobs_folder_unless_told_otherwise(tmp_path, monkeypatch):
    """report_to=[wandb] without a key stopped the recipe asking for one (wandb's UsageError); it logs offline.
    The jobs of a Hydra multirun run one after another in one process, and the Trainer's wandb reporter joins a
    run already open: the second job logged into the first job's run and folder. One run per job, in its folder."""
    wandb = pytest.importorskip("wandb")
    from test_loggers import wandb_records
    from wandb.proto import wandb_internal_pb2

    wandb.teardown()  # wandb reads its settings once per process: an earlier test's run would keep its folder
    for name in ("WANDB_MODE", "WANDB_DIR", "WANDB_API_KEY"):
        monkeypatch.setenv(name, "")  # (recorded, so nothing set here outlives the test)
        monkeypatch.delenv(name)
    monkeypatch.setenv("WANDB_SILENT", "true")
    for job, steps in (("first", 2), ("second", 3)):  # what `-m policy=odm,uniform` does, in one process
        train_with_callback(**settings(tmp_path / job, steps=steps, save_steps=steps, logging_steps=1,
                                       report_to=["wandb"]))  # fmt: skip
        left_set = [name for name in ("WANDB_DIR", "WANDB_MODE") if name in os.environ]
    for job, steps in (("first", [1, 2]), ("second", [1, 2, 3])):
        runs = list((tmp_path / job / "wandb").glob("offline-run-*/run-*.wandb"))
        assert len(runs) == 1
        logged = []
        for data in wandb_records(runs[0].read_bytes()):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(data)
            if record.WhichOneof("record_type") == "history":
                items = {item.key or "/".join(item.nested_key): item.value_json for item in record.history.item}
                if "train/loss" in items:
                    logged.append(int(json.loads(items["train/global_step"])))
        assert logged == steps  # this job's steps only
    assert left_set == []  # the variables the recipe set are gone with its job


@pytest.mark.slow  # (a minute; .ci/run runs it)
def test_a_sweep_ends_with_its_summary_beside_uniform(tmp_path):
    """``-m policy=uniform,odm seed=0,1``: when the multirun ends, the recipe's Hydra callback prints every policy's
    median [min, max] over seeds beside uniform and writes sweep_summary.md and .png into the sweep folder."""
    import subprocess
    import sys

    from dataflex.sweep import collect_runs

    sweep = tmp_path / "sweep"
    small = ["steps=4", "batch_size=4", "save_steps=4", "update_every=2", "data.train_per_domain=6",
             "data.val_per_domain=2", "data.max_len=48", "model.n_layer=1", "model.n_embd=32",
             "model.n_head=2"]  # fmt: skip
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "dataflex.recipes.trainer",
            "-m",
            "policy=uniform,odm",
            "seed=0,1",
            *small,
            f"hydra.sweep.dir={sweep}",
        ],  # fmt: skip
        capture_output=True,
        text=True,
        timeout=900,
        cwd=tmp_path,
    )
    assert run.returncode == 0, run.stderr[-4000:]
    runs = collect_runs(sweep)
    assert sorted((r.policy, r.seed) for r in runs) == [("odm", 0), ("odm", 1), ("uniform", 0), ("uniform", 1)]
    summary = (sweep / "sweep_summary.md").read_text()
    assert summary in run.stdout and (sweep / "sweep_summary.png").is_file()
    settings_row = next(line for line in summary.splitlines() if line.startswith("### "))
    assert settings_row == "### " + runs[0].settings  # the other overrides name the table
    assert "| uniform | 0,1 |" in summary and "| odm | 0,1 |" in summary and " of 2 |" in summary


@pytest.mark.slow  # (three short recipe runs; .ci/run runs it)
def test_a_static_mixture_from_the_command_line_gets_a_folder_the_file_system_takes(tmp_path):
    """``policy=static policy.weights={...}`` with a weight per domain: the run's folder, named by its overrides,
    would pass 255 bytes (Hydra failed with "File name too long"); it is shortened, the run trains on those weights,
    and the same command again resumes in the same folder. Without the weights the command is refused naming them."""
    import json
    import subprocess
    import sys

    from dataflex.run_folder import MAX_FOLDER_NAME

    small = ["steps=4", "batch_size=4", "save_steps=4", "update_every=2", "data.train_per_domain=6",
             "data.val_per_domain=2", "data.max_len=48", "model.n_layer=1", "model.n_embd=32",
             "model.n_head=2"]  # fmt: skip
    domains = [
        "biomedical",
        "code",
        "competition_math",
        "encyclopedia",
        "fiction",
        "grade_math",
        "literature",
        "trivia",
    ]
    weights = {d: 0.3 if d == "code" else 0.1 for d in domains}
    cmd = [sys.executable, "-m", "dataflex.recipes.trainer", "policy=static", *small]
    override = "policy.weights={" + ", ".join(f"{d}: {w}" for d, w in weights.items()) + "}"
    for _ in range(2):
        run = subprocess.run([*cmd, override], capture_output=True, text=True, timeout=600, cwd=tmp_path)
        assert run.returncode == 0, run.stderr[-3000:]
    (folder,) = (tmp_path / "outputs" / "trainer" / "static" / "seed0").iterdir()
    assert len(folder.name.encode()) <= MAX_FOLDER_NAME and "~" in folder.name
    assert "already finished" in run.stdout + run.stderr  # the rerun found the first run's folder
    result = json.loads((folder / "results.json").read_text())
    assert result["policy"] == "Static"
    logged = json.loads((folder / "checkpoint-4" / "trainer_state.json").read_text())["log_history"]
    assert {
        k[len("dataflex/weight/") :]: v for k, v in logged[0].items() if k.startswith("dataflex/weight/")
    } == weights
    missing = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert missing.returncode != 0 and "Missing mandatory value: policy.weights" in missing.stderr
