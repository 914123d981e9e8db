"""TensorBoard and wandb (offline) receive dataflex's metrics and the Trainer's own loss at every logging step."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from hf_helpers import make_trainer, small_dataset

from dataflex import DataFlexCallback
from dataflex.policies import ODM


@pytest.fixture(scope="module")
def ds():
    return small_dataset(per_domain=8)


def logged_run(ds, out: Path, report_to: str):
    dfx = DataFlexCallback(ODM(), update_every=2)
    trainer = make_trainer(ds, dfx, out, max_steps=6, save_steps=100, logging_steps=2, report_to=[report_to])
    trainer.train()
    return trainer


def wandb_records(raw: bytes):
    """The records of a wandb run file (LevelDB log format: 32 KiB blocks of checksum, length, type, data)."""
    assert raw[:4] == b":W&B", "not a wandb run file"
    block, offset, pending = 32768, 7, b""
    while offset + 7 <= len(raw):
        left = block - offset % block
        if left < 7:  # block trailer padding
            offset += left
            continue
        length = int.from_bytes(raw[offset + 4 : offset + 6], "little")
        kind = raw[offset + 6]
        data = raw[offset + 7 : offset + 7 + length]
        offset += 7 + length
        if kind == 0 and length == 0:
            continue
        pending = data if kind in (1, 2) else pending + data  # FULL/FIRST start, MIDDLE/LAST continue
        if kind in (1, 4):  # FULL or LAST: a whole record
            yield pending
            pending = b""


def test_tensorboard_gets_dataflex_metrics_and_the_trainer_loss(ds, tmp_path, monkeypatch):
    pytest.importorskip("tensorboard")
    monkeypatch.setenv("TENSORBOARD_LOGGING_DIR", str(tmp_path / "tb"))
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logged_run(ds, tmp_path, "tensorboard")
    events = EventAccumulator(str(next((tmp_path / "tb").rglob("events.out.tfevents.*")).parent))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train/dataflex/entropy", "train/dataflex/weight/code", "train/loss", "train/grad_norm"} <= tags
    assert [e.step for e in events.Scalars("train/loss")] == [2, 4, 6]
    assert [e.step for e in events.Scalars("train/dataflex/entropy")] == [2, 4, 6]


def test_wandb_offline_gets_dataflex_metrics_and_the_trainer_loss(ds, tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    logged_run(ds, tmp_path, "wandb")
    import wandb

    wandb.finish()
    from wandb.proto import wandb_internal_pb2

    want = {"train/loss": [2, 4, 6], "train/dataflex/entropy": [2, 4, 6]}
    # wandb's service process writes the run file on its own schedule: on a loaded machine the history may
    # land a moment after finish() returns, so read until it is there (or 60 s have passed).
    deadline = time.monotonic() + 60
    while True:
        steps: dict[str, list[int]] = {key: [] for key in want}
        for run_file in sorted(tmp_path.rglob("run-*.wandb")):
            for data in wandb_records(run_file.read_bytes()):
                record = wandb_internal_pb2.Record()
                record.ParseFromString(data)
                if record.WhichOneof("record_type") != "history":
                    continue
                items = {item.key or "/".join(item.nested_key): item.value_json for item in record.history.item}
                for key in steps:
                    if key in items:
                        steps[key].append(int(json.loads(items["train/global_step"])))
        if steps == want or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert steps == {"train/loss": [2, 4, 6], "train/dataflex/entropy": [2, 4, 6]}


def renamed_domains(ds, names: dict[str, str]):
    return ds.map(lambda row: {"domain": names[row["domain"]]})


class MLflowRecorder:
    """Stands in for the ``mlflow`` module inside transformers' real MLflowCallback (mlflow is not a dependency):
    keeps the metric names the callback passes on."""

    def __init__(self) -> None:
        self.names: list[set[str]] = []

    def log_metrics(self, metrics, step, **kwargs):
        self.names.append(set(metrics))


def mlflow_callback_recording():
    from transformers.integrations import MLflowCallback

    callback = object.__new__(MLflowCallback)  # its __init__ only checks that mlflow is importable
    callback._initialized, callback._async_log, callback._ml_flow = True, False, MLflowRecorder()
    callback._auto_end_run = callback._log_artifacts = False
    return callback


def test_domains_mlflow_would_log_as_one_metric_are_refused_naming_them(ds, tmp_path):
    from transformers import TrainerControl, TrainerState

    from dataflex.hf.metric_names import mlflow_metric_name

    # The control, through transformers' own MLflowCallback.on_log: two domains' weights become one metric.
    callback = mlflow_callback_recording()
    names = ["生物", "数学", "q&a", "q?a", "code", "a b:c/d.e-f_g", "café"]
    callback.on_log(None, TrainerState(), TrainerControl(), logs={f"dataflex/weight/{n}": 0.1 for n in names})
    assert callback._ml_flow.names == [{f"dataflex/weight/{mlflow_metric_name(n)}" for n in names}]
    assert len(callback._ml_flow.names[0]) == len(names) - 2  # 生物/数学 -> "__", q&a/q?a -> "q_a"

    cjk = renamed_domains(ds, {"code": "生物", "literature": "数学", "trivia": "trivia"})
    trainer = make_trainer(cjk, DataFlexCallback(ODM(), update_every=2), tmp_path / "cjk", max_steps=4, save_steps=100,
                           logging_steps=2, extra=[mlflow_callback_recording()])  # fmt: skip
    with pytest.raises(ValueError, match=r"'数学', '生物' -> '__'.*leave mlflow out of report_to"):
        trainer.train()
    # Without MLflow the same names log as they are; with MLflow, names it only alters run with a warning.
    trainer = make_trainer(cjk, DataFlexCallback(ODM(), update_every=2), tmp_path / "plain", max_steps=4,
                           save_steps=100, logging_steps=2)  # fmt: skip
    trainer.train()
    assert {"dataflex/weight/生物", "dataflex/weight/数学"} <= set(trainer.state.log_history[0])
    distinct = renamed_domains(ds, {"code": "生物", "literature": "literature", "trivia": "q&a"})
    recorder = mlflow_callback_recording()
    trainer = make_trainer(distinct, DataFlexCallback(ODM(), update_every=2), tmp_path / "distinct", max_steps=4,
                           save_steps=100, logging_steps=2, extra=[recorder])  # fmt: skip
    with pytest.warns(UserWarning, match=r"'q&a' as 'q_a', '生物' as '__'"):
        trainer.train()
    weights = {n for n in recorder._ml_flow.names[0] if n.startswith("dataflex/weight/")}
    assert weights == {"dataflex/weight/__", "dataflex/weight/literature", "dataflex/weight/q_a"}


def test_mlflow_gets_one_metric_per_domain_and_merging_names_are_refused(ds, tmp_path, monkeypatch):
    mlflow = pytest.importorskip("mlflow")  # not a dependency: runs where mlflow is installed
    monkeypatch.setenv("MLFLOW_TRACKING_URI", (tmp_path / "mlruns").as_uri())
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    with pytest.warns(UserWarning, match="'q&a' as 'q_a'"):
        logged_run(
            renamed_domains(ds, {"code": "code", "literature": "q&a", "trivia": "trivia"}), tmp_path / "a", "mlflow"
        )
    client = mlflow.MlflowClient()
    (run,) = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert {"dataflex/weight/code", "dataflex/weight/q_a", "dataflex/weight/trivia", "loss"} <= set(run.data.metrics)
    assert [m.step for m in client.get_metric_history(run.info.run_id, "dataflex/weight/q_a")] == [2, 4, 6]
    merged = renamed_domains(ds, {"code": "code", "literature": "q&a", "trivia": "q?a"})
    try:
        with pytest.raises(ValueError, match=r"'q&a', 'q\?a' -> 'q_a'"):
            logged_run(merged, tmp_path / "b", "mlflow")
    finally:
        mlflow.end_run()  # the refusal comes after MLflow's callback opened its run


def test_trackio_gets_every_domains_metric_with_the_trainers_global_step(ds, tmp_path, monkeypatch):
    """transformers' TrackioCallback logs each Trainer.log call as a trackio step of its own (not at global_step):
    dataflex's entries and the Trainer's loss of one step are two trackio steps, each with train/global_step."""
    monkeypatch.setenv("TRACKIO_DIR", str(tmp_path / "trackio"))  # (read when trackio is first imported)
    trackio = pytest.importorskip("trackio")  # not a dependency: runs where trackio is installed
    import sqlite3

    project = f"dataflex-test-{tmp_path.name}"  # one database per project, wherever trackio keeps them
    names = {"code": "Math Problems", "literature": "poésie", "trivia": "a.b"}
    dfx = DataFlexCallback(ODM(), update_every=2)
    trainer = make_trainer(renamed_domains(ds, names), dfx, tmp_path / "run", max_steps=6, save_steps=100,
                           logging_steps=2, report_to=["trackio"], project=project)  # fmt: skip
    trainer.train()
    with sqlite3.connect(Path(trackio.utils.TRACKIO_DIR) / f"{project}.db") as connection:
        logs = [json.loads(row[0]) for row in connection.execute("SELECT metrics FROM metrics ORDER BY step")]
    keys = ["train/loss", *(f"train/dataflex/weight/{name}" for name in names.values())]
    steps = {key: [log["train/global_step"] for log in logs if key in log] for key in keys}
    assert all(found == [2, 4, 6] for found in steps.values()), steps


def test_dvclive_counts_log_calls_so_dataflex_entries_interleave_with_the_loss(ds, tmp_path, monkeypatch):
    """transformers' DVCLiveCallback writes each Trainer.log call as the next DVCLive step and records no training
    step: at a step where dataflex decides and the Trainer logs, dataflex's entry comes first (on_step_end), so
    the loss of training steps 2, 4, 6 lands at DVCLive steps 1, 3, 5 and dataflex's metrics at 0, 2, 4."""
    pytest.importorskip("dvclive")  # not a dependency: runs where dvclive is installed
    monkeypatch.chdir(tmp_path)  # DVCLive writes into ./dvclive
    names = {"code": "Math Problems", "literature": "poésie", "trivia": "a.b"}
    trainer = make_trainer(renamed_domains(ds, names), DataFlexCallback(ODM(), update_every=2), tmp_path / "run",
                           max_steps=6, save_steps=100, logging_steps=2, report_to=["dvclive"])  # fmt: skip
    trainer.train()
    metrics = tmp_path / "dvclive" / "plots" / "metrics"

    def steps(name: str) -> list[int]:
        rows = (metrics / f"{name}.tsv").read_text(encoding="utf-8").splitlines()[1:]
        return [int(row.split("\t")[0]) for row in rows]

    assert steps("loss") == [1, 3, 5]
    assert all(steps(f"dataflex/weight/{name}") == [0, 2, 4] for name in names.values())
    assert steps("dataflex/entropy") == [0, 2, 4]


def test_comet_offline_gets_every_domains_metric_at_the_trainers_global_step(ds, tmp_path, monkeypatch):
    """transformers' CometCallback logs each entry at the Trainer's global step: dataflex's metrics land at the
    steps of the Trainer's loss, domain names with spaces, accents and dots as they are."""
    comet_ml = pytest.importorskip("comet_ml")  # not a dependency: runs where comet_ml is installed
    import zipfile

    monkeypatch.setenv("COMET_START_ONLINE", "false")
    monkeypatch.setenv("COMET_MODE", "create")
    monkeypatch.setenv("COMET_OFFLINE_DIRECTORY", str(tmp_path / "comet"))
    names = {"code": "Math Problems", "literature": "poésie", "trivia": "a.b"}
    trainer = make_trainer(renamed_domains(ds, names), DataFlexCallback(ODM(), update_every=2), tmp_path / "run",
                           max_steps=6, save_steps=100, logging_steps=2, report_to=["comet_ml"])  # fmt: skip
    trainer.train()
    comet_ml.end()  # writes the offline archive
    (archive,) = (tmp_path / "comet").glob("*.zip")
    with zipfile.ZipFile(archive) as z:
        messages = [json.loads(line) for line in z.read("messages.json").decode().splitlines()]
    metrics = [m["payload"]["metric"] for m in messages if m.get("type") == "metric_msg"]
    keys = ["train/loss", "train/dataflex/entropy", *(f"train/dataflex/weight/{name}" for name in names.values())]
    steps = {key: [m["step"] for m in metrics if m["metricName"] == key] for key in keys}
    assert all(found == [2, 4, 6] for found in steps.values()), steps
