"""Checkpoint arrays come back bit for bit from every compact form, and the forms are in fact smaller."""

import json
import re

import numpy as np
import pytest
import torch
from conftest import unsigned

from dataflex.array_codec import decode, encode
from dataflex.checkpoint import load_state, save_state, verify_state

rng = np.random.default_rng(0)
CASES = {
    "subset ids": (np.sort(rng.choice(100_000, 30_000, replace=False)), "id_set"),
    "subset ids int32": (np.arange(0, 50_000, 3, dtype=np.int32), "id_set"),
    "sparse ids stay a list": (np.array([5, 90_000_000]), "narrowed"),
    "unsorted ids": (rng.permutation(10_000), "narrowed"),
    "repeated ids": (np.repeat(np.arange(5000), 2), "narrowed"),
    "steps with -1": (np.where(rng.random(5000) < 0.5, -1, 1200), "narrowed"),
    "large ints": (np.array([0, 2**40, -(2**35)]), "raw"),
    "float32 losses with NaN": (
        np.where(rng.random(5000) < 0.1, np.nan, rng.random(5000).astype(np.float32)).astype(np.float64),
        "raw",
    ),
    "float64 scores": (rng.random(5000), "raw"),
    "2-d pending records": (np.array([[3, 0.5, 1], [7, np.nan, 0]]), "raw"),
    "2-d step table": (np.array([[3, 5], [-1, 200]]), "narrowed"),
    "empty": (np.zeros((0, 3)), "raw"),
    "bools": (rng.random(100) < 0.5, "raw"),
    "signed zero and inf": (np.array([-0.0, np.inf, -np.inf, 1.5]), "raw"),
}


@pytest.mark.parametrize("name", list(CASES))
def test_every_form_round_trips_bit_for_bit(name):
    array, form = CASES[name]
    stored = encode(array)
    assert stored["form"] == form
    back = decode(stored)
    assert back.dtype == array.dtype and back.shape == array.shape
    assert np.array_equal(back.view(np.uint8), np.ascontiguousarray(array).view(np.uint8))  # bits, NaN and -0.0
    if form != "raw":
        assert stored["data"].numel() * stored["data"].element_size() <= array.nbytes // 2


def test_checkpoint_state_with_arrays_round_trips_and_older_files_still_load(tmp_path):
    ids = np.arange(0, 10_000, 2)
    state = {"subset": {"events": [[0, ids]]}, "score": rng.random(10_000), "steps": np.full(10_000, 7)}
    save_state(tmp_path, "s", state, None)
    loaded, _ = load_state(tmp_path, "s")
    assert np.array_equal(loaded["subset"]["events"][0][1], ids) and loaded["steps"].dtype == np.int64
    assert np.array_equal(loaded["score"], state["score"])
    # a binary file of an older version holds bare tensors (and its JSON no digests)
    saved = torch.load(tmp_path / "s.pt", weights_only=False)
    saved["arrays"] = {k: torch.from_numpy(decode(v)) for k, v in saved["arrays"].items()}
    torch.save(saved, tmp_path / "s.pt")
    (tmp_path / "s.json").write_text(json.dumps(unsigned(json.loads((tmp_path / "s.json").read_text()))))
    assert np.array_equal(load_state(tmp_path, "s")[0]["steps"], state["steps"])


def test_a_damaged_tensor_file_is_refused_naming_it(tmp_path):
    save_state(tmp_path, "s", {"steps": np.arange(10_000)}, None)
    data = (tmp_path / "s.pt").read_bytes()
    (tmp_path / "s.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"s\.pt is damaged: its bytes do not match the sha256 recorded in s\.json"):
        load_state(tmp_path, "s")
    # without a digest (a state from before them) torch's own failure is still named
    (tmp_path / "s.json").write_text(json.dumps(unsigned(json.loads((tmp_path / "s.json").read_text()))))
    with pytest.raises(ValueError, match=r"s\.pt cannot be read \(.*\); the file is damaged"):
        load_state(tmp_path, "s")
    with pytest.raises(ValueError, match=r"s\.pt cannot be read"):  # no digest to vouch for it: loaded to check
        verify_state(tmp_path, "s")


def test_any_changed_byte_of_a_saved_state_is_refused_before_it_is_used(tmp_path):
    """Bit rot or an edit that still parses would steer the rest of the run silently: every single-bit flip
    of either file (JSON and tensors) at sampled positions is refused, naming the file; the intact pair loads."""
    import random

    state = {"t": 3, "rewards": [0.8345803171396253, 0.25], "steps": np.arange(1000)}
    save_state(tmp_path, "s", state, {"w": torch.ones(4)})
    pristine = {name: (tmp_path / name).read_bytes() for name in ("s.json", "s.pt")}
    flips = random.Random(0)
    for name, data in pristine.items():
        for position in flips.sample(range(len(data)), 60):
            damaged = bytearray(data)
            damaged[position] ^= 1 << flips.randrange(8)
            (tmp_path / name).write_bytes(bytes(damaged))
            with pytest.raises(ValueError, match=re.escape(name)):
                load_state(tmp_path, "s")
            with pytest.raises(ValueError, match=re.escape(name)):
                verify_state(tmp_path, "s")  # what last_complete_checkpoint checks, without loading tensors
        (tmp_path / name).write_bytes(data)
    loaded, tensors = load_state(tmp_path, "s")
    assert loaded["rewards"] == state["rewards"] and np.array_equal(loaded["steps"], state["steps"])
    assert torch.equal(tensors["w"], torch.ones(4))


def test_damaged_stored_arrays_are_refused():
    stored = encode(np.arange(0, 1000, 2))
    with pytest.raises(ValueError, match="form 'zip'; known forms are"):
        decode({**stored, "form": "zip"})
    with pytest.raises(ValueError, match="over 999 ids holds only 2 bytes"):
        decode({**stored, "data": stored["data"][:2]})
    with pytest.raises(ValueError, match="no tensor data"):
        decode({"form": "raw", "data": [1, 2]})


@pytest.mark.parametrize("break_at", [None, 0, 4, 5, 6, 18])
def test_the_order_check_runs_in_chunks_and_sees_a_break_on_any_chunk_edge(monkeypatch, break_at):
    """The id-set test reads long arrays in pieces; an out-of-order pair across two pieces is still seen."""
    import dataflex.array_codec as codec

    monkeypatch.setattr(codec, "_CHUNK", 5)
    ids = np.arange(0, 400, 20)  # 20 ids over a bound of 381: an id set saves bytes
    if break_at is not None:
        ids[break_at], ids[break_at + 1] = ids[break_at + 1], ids[break_at]
    stored = encode(ids)
    assert stored["form"] == ("id_set" if break_at is None else "narrowed")
    assert np.array_equal(decode(stored), ids)
