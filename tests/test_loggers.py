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
