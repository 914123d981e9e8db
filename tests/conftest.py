"""Shared fixtures and the resume helper used across sampler tests."""

from __future__ import annotations

import tempfile

import numpy as np
import pytest
from torch.utils.data import DataLoader, Dataset

from dataflex.samplers import DomainMixtureSampler
from dataflex.schedule import WeightSchedule

DOMAINS = ["a", "b", "c", "d"]
# Very different sizes on purpose: d is tiny and runs dry quickly under uniform weights.
SIZES = [60, 25, 12, 3]


@pytest.fixture(autouse=True)
def no_comet_logging_outside_its_test(monkeypatch, tmp_path):
    """comet_ml (not a dependency), once installed, hooks other loggers (an MLflow run became a Comet offline
    experiment) and wrote archives into the working directory: its own test sets where they go."""
    monkeypatch.setenv("COMET_DISABLE_AUTO_LOGGING", "1")
    monkeypatch.setenv("COMET_OFFLINE_DIRECTORY", str(tmp_path / "comet"))


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    """Each test starts as a fresh process would: accelerate keeps one state per process, and a Trainer with
    bf16 or torch_compile in one test would otherwise fix the settings of every later test's Accelerator."""
    yield
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)


class IndexDataset(Dataset):
    """Returns the index itself, so a DataLoader yields example ids."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> int:
        return i


def make_domain_ids(sizes=SIZES, seed: int = 0) -> np.ndarray:
    ids = np.concatenate([np.full(s, d) for d, s in enumerate(sizes)])
    return np.random.default_rng(seed).permutation(ids)


def make_sampler(domain_ids, events=(), **kwargs) -> DomainMixtureSampler:
    k = int(domain_ids.max()) + 1
    schedule = WeightSchedule(DOMAINS[:k], np.full(k, 1.0 / k))
    for at, w in events:
        schedule.add(at, w)
    kwargs.setdefault("chunk_size", 16)  # small chunks so several chunk seeds are exercised
    return DomainMixtureSampler(domain_ids, schedule, **kwargs)


def run_loader(sampler, batch_size: int, num_workers: int, num_batches: int | None = None) -> list[int]:
    loader = DataLoader(
        IndexDataset(sampler.fingerprint.num_examples), batch_size=batch_size, sampler=sampler, num_workers=num_workers
    )
    out: list[int] = []
    for i, batch in enumerate(loader):
        if num_batches is not None and i >= num_batches:
            break
        out.extend(int(x) for x in batch)
    return out


def through_checkpoint(state: dict) -> dict:
    """``state`` written and read back as a checkpoint stores it (JSON plus binary arrays)."""
    from dataflex.checkpoint import load_state, save_state

    with tempfile.TemporaryDirectory() as folder:
        save_state(folder, "state", state, None)
        return load_state(folder, "state")[0]


def assert_resumes_exactly(build, stop_batches, *, batch_size=4, num_workers=0, epochs=2):
    """Interrupt after each of ``stop_batches`` batches, save to JSON, rebuild, resume: same ids.

    ``build()`` must return a fresh sampler (fresh schedule too) each time it is called.
    """
    reference = []
    full = build()
    for epoch in range(epochs):
        full.set_epoch(epoch)
        reference.append(run_loader(full, batch_size, num_workers))
    for stop in stop_batches:
        first = build()
        first.set_epoch(0)
        head = run_loader(first, batch_size, num_workers, num_batches=stop)
        consumed = len(head)
        state = through_checkpoint(first.state_dict(consumed=consumed))
        second = build()
        second.load_state_dict(state)
        tail = run_loader(second, batch_size, num_workers)
        assert head + tail == reference[0], f"epoch 0 differs after resuming at batch {stop}"
        second.set_epoch(1)
        assert run_loader(second, batch_size, num_workers) == reference[1]
    return reference


@pytest.fixture
def domain_ids() -> np.ndarray:
    return make_domain_ids()


def unsigned(state: dict) -> dict:
    """A saved dataflex state without its digests, as written before they existed: a test that edits a state
    on purpose uses it so that the edit reaches the check it is about (a digest would refuse any edit first)."""
    state.pop("sha256", None)
    state.pop("tensors_sha256", None)
    return state


def changed_digit(text: str, marker: str) -> str:
    """``text`` with the first digit after ``marker`` changed: still valid JSON, one number different."""
    at = text.index(marker) + len(marker)
    at += next(i for i, c in enumerate(text[at:]) if c.isdigit())
    return text[:at] + str((int(text[at]) + 1) % 10) + text[at + 1 :]
