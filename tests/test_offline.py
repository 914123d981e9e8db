"""Offline selection: pool scoring survives a crash, subsets are tied to their pool, instruction data."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dataflex.offline import read_subset, score_pool, target_direction, token_mean_losses, write_subset
from dataflex.state import DatasetFingerprint
from dataflex.testbeds.tiny import collate_causal, encode_instruction, instruct_dataset, tiny_gpt2


def pool(n: int = 23) -> list[dict]:
    rng = np.random.default_rng(0)
    return [
        {"input_ids": rng.integers(0, 256, size=int(rng.integers(3, 40))).tolist(), "prompt_len": 2} for _ in range(n)
    ]


def row_sums(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """A score that depends on the example only (not on its batch-mates or padding)."""
    return (batch["input_ids"] * batch["attention_mask"]).sum(1).float()


def test_ranking_breaks_ties_by_id_and_puts_nan_last():
    from dataflex.ranking import rank_ids

    assert rank_ids([3, 5, 3, 9], descending=True).tolist() == [3, 1, 0, 2]
    assert rank_ids([3, np.nan, 3, 1]).tolist() == [3, 0, 2, 1]
    assert rank_ids([3, np.nan, 3, 1], descending=True).tolist() == [0, 2, 3, 1]


def test_score_pool_resumes_after_a_crash_and_matches_an_uninterrupted_run(tmp_path):
    data = pool()
    expected = np.array([sum(d["input_ids"]) for d in data], dtype=np.float32)
    full = score_pool(row_sums, data, collate_causal, batch_size=4, progress=False)
    np.testing.assert_array_equal(full, expected)

    calls = {"n": 0}

    def crashing(batch):
        calls["n"] += 1
        if calls["n"] == 4:
            raise RuntimeError("pre-empted")
        return row_sums(batch)

    cache = tmp_path / "scores.npz"
    with pytest.raises(RuntimeError, match="pre-empted"):
        score_pool(crashing, data, collate_causal, batch_size=4, cache=cache, save_every=1, progress=False)
    with np.load(cache) as saved:
        assert saved["done"].sum() == 12  # three batches of four were kept
    seen = []

    def counting(batch):
        seen.append(batch["input_ids"].shape[0])
        return row_sums(batch)

    resumed = score_pool(counting, data, collate_causal, batch_size=4, cache=cache, save_every=1, progress=False)
    np.testing.assert_array_equal(resumed, expected)
    assert sum(seen) == len(data) - 12  # only the missing examples were scored again
    with pytest.raises(ValueError, match="holds scores for 23 examples but the pool has 5"):
        score_pool(row_sums, data[:5], collate_causal, cache=cache, progress=False)


def test_a_score_cache_made_with_other_settings_is_refused_by_name(tmp_path):
    """A cache is keyed by what the scores depend on: another checkpoint or method through the same path would
    hand back the old scores as the new ones."""
    data, cache = pool(), tmp_path / "scores.npz"
    first = {"method": "loss_hard", "weights": "1.0/2.0"}
    score_pool(row_sums, data, collate_causal, batch_size=4, cache=cache, progress=False, settings=first)
    calls = []
    again = score_pool(
        lambda b: calls.append(1) or row_sums(b), data, collate_causal, cache=cache, progress=False, settings=first
    )
    assert not calls and again.shape == (len(data),)  # the same settings: every score reused
    with pytest.raises(ValueError, match=r"other settings weights: '1.0/2.0' there, '3.0/4.0' now: give this run"):
        score_pool(
            row_sums, data, collate_causal, cache=cache, progress=False, settings={**first, "weights": "3.0/4.0"}
        )


def test_a_score_cache_made_for_another_pool_of_the_same_size_is_refused(tmp_path):
    """Another pool (other files, another max_len) of the same length through the same cache path got the first
    pool's scores example by example, and the written subset named the new pool: a silently wrong selection."""
    cache = tmp_path / "scores.npz"
    settings = {"method": "loss_hard", "weights": "1.0/2.0"}
    first, other = pool(), [{**d, "input_ids": d["input_ids"][:-1] + [7]} for d in pool()]
    score_pool(row_sums, first, collate_causal, cache=cache, progress=False, settings=settings)
    with pytest.raises(ValueError, match=r"other settings pool tokens: '[0-9a-f]{16}' there, '[0-9a-f]{16}' now"):
        score_pool(row_sums, other, collate_causal, cache=cache, progress=False, settings=settings)
    again = score_pool(row_sums, first, collate_causal, cache=cache, progress=False, settings=settings)
    np.testing.assert_array_equal(again, [sum(d["input_ids"]) for d in first])  # the same pool: reused
    cache.write_bytes(b"not a zip file")
    with pytest.raises(ValueError, match=r"scores.npz is not a readable score cache .*delete it to score anew"):
        score_pool(row_sums, first, collate_causal, cache=cache, progress=False)


def test_saves_of_one_cache_by_two_runs_at_once_each_leave_a_whole_file(tmp_path, monkeypatch):
    """Two runs of a parallel sweep sharing a score cache (or an embedding cache) save it at the same time. With
    one fixed temporary name the second save truncated and renamed the first's file mid-write, so the first run
    died renaming a file that was gone. Here the second save happens while the first is between its write and its
    rename: both complete and the cache holds one save whole."""
    from dataflex.embeddings import EmbeddingCache

    real_savez, nested = np.savez, []

    def savez_with_another_save_inside(file, **arrays):
        real_savez(file, **arrays)
        if not nested:  # the other run's save, before this one renames its file into place
            nested.append(1)
            save_other()

    monkeypatch.setattr(np, "savez", savez_with_another_save_inside)
    data, cache = pool(), tmp_path / "scores.npz"
    save_other = lambda: score_pool(row_sums, data, collate_causal, cache=cache, progress=False)  # noqa: E731
    scores = score_pool(row_sums, data, collate_causal, cache=cache, progress=False)
    nested.clear()
    np.testing.assert_array_equal(scores, score_pool(row_sums, data, collate_causal, cache=cache, progress=False))
    path, kept = tmp_path / "embeddings.npz", EmbeddingCache(3)
    kept.update(np.array([0, 2]), torch.ones(2, 4), step=1)
    save_other = lambda: kept.save(path)  # noqa: E731
    kept.save(path)
    restored = EmbeddingCache(3)
    restored.load(path)
    assert restored.filled.tolist() == [True, False, True]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["embeddings.npz", "scores.npz"]  # no temporary left


def test_token_mean_losses_equal_one_example_at_a_time():
    model = tiny_gpt2(n_layer=1, n_embd=32, seed=0)
    data = pool(9)
    batched = score_pool(token_mean_losses(model), data, collate_causal, batch_size=4, progress=False)
    for i, row in enumerate(data):
        single = token_mean_losses(model)(collate_causal([row]))
        assert abs(float(single[0]) - batched[i]) < 1e-5


def test_subset_round_trip_and_refusal_for_another_pool(tmp_path):
    fp = DatasetFingerprint.from_labels(np.array([0, 1, 1, 0]), ["a", "b"])
    write_subset(
        tmp_path / "s.json",
        np.array([3, 1]),
        pool=fp,
        method="less",
        fraction=0.5,
        scores=np.array([0.1, np.nan, 0.2, 0.9]),
    )
    assert read_subset(tmp_path / "s.json", fp).tolist() == [1, 3]
    other = DatasetFingerprint.from_labels(np.array([0, 1, 0, 0]), ["a", "b"])
    with pytest.raises(ValueError, match="different dataset"):
        read_subset(tmp_path / "s.json", other)
    # Labels alone cannot tell a pool of one label from another of the same size: the text's digest can.
    one = DatasetFingerprint.from_labels(np.zeros(4, dtype=np.int64), ["pool"])
    write_subset(tmp_path / "t.json", np.array([0, 2]), pool=one, method="less", fraction=0.5, tokens="abc123")
    assert read_subset(tmp_path / "t.json", one, tokens="abc123").tolist() == [0, 2]
    assert read_subset(tmp_path / "t.json", one).tolist() == [0, 2]  # no digest given: labels checked only
    with pytest.raises(ValueError, match=r"other text \(token digest abc123 there, def456 here"):
        read_subset(tmp_path / "t.json", one, tokens="def456")
    assert read_subset(tmp_path / "s.json", fp, tokens="def456").tolist() == [1, 3]  # none recorded: not checked
    with pytest.raises(ValueError, match=r"subset ids must lie in \[0, 4\); got 1..7"):
        write_subset(tmp_path / "bad.json", np.array([7, 1]), pool=fp, method="x", fraction=0.5)


def test_target_direction_rejects_empty_or_cancelling_features():
    assert np.allclose(target_direction(np.array([[1.0, 0.0], [0.0, 1.0]])), [2**-0.5, 2**-0.5])
    with pytest.raises(ValueError, match="non-empty"):
        target_direction(np.zeros((0, 3)))
    with pytest.raises(ValueError, match="average to zero"):
        target_direction(np.array([[1.0, 0.0], [-1.0, 0.0]]))


def test_instruction_examples_learn_only_the_response():
    ids, prompt_len = encode_instruction("What is 2+2?", "4", max_len=64)
    assert bytes(ids[:prompt_len]) == b"What is 2+2?\nAnswer: " and ids[prompt_len] == ord("4")
    long_ids, long_prompt = encode_instruction("q" * 300, "r" * 300, max_len=128, min_prompt=32)
    assert len(long_ids) == 128 and long_prompt == 32  # the response keeps its start, the prompt its end
    ds = instruct_dataset([{"instruction": "Why?", "response": "Because.", "task": "t"}], max_len=64)
    batch = collate_causal([ds[0]])
    counted = batch["labels"][0] != -100
    assert bytes(batch["input_ids"][0][counted][:-1].tolist()) == b"Because."  # + the end id
    with pytest.raises(ValueError, match="record 0 has no \\['task'\\]"):
        instruct_dataset([{"instruction": "a", "response": "b"}], max_len=8)


def test_token_mean_losses_split_a_padding_free_batch_per_example():
    """One flattened row with position_ids restarting per example scores like the padded batch, per example."""
    from dataflex.testbeds.tiny import collate_causal, tiny_llama

    model = tiny_llama(n_layer=1, hidden=32, n_head=2, seed=0)  # Llama masks attention at position_ids restarts
    rows = [list(range(5, 5 + n)) for n in (7, 4, 9)]
    padded = token_mean_losses(model)(collate_causal([{"input_ids": r} for r in rows]))
    flat_ids = torch.tensor([sum(rows, [])])
    labels = flat_ids.clone()
    starts = np.cumsum([0] + [len(r) for r in rows[:-1]])
    labels[0, starts] = -100  # no prediction across an example boundary
    positions = torch.tensor([sum((list(range(len(r))) for r in rows), [])])
    flat = token_mean_losses(model)({"input_ids": flat_ids, "labels": labels, "position_ids": positions})
    assert flat.shape == (3,)
    assert torch.allclose(flat, padded, atol=1e-5), (flat, padded)


def test_token_digest_tells_texts_apart_whatever_the_container():
    """The digest behind the run-folder and warm-up checks: the same rows give the same digest from a
    ``datasets.Dataset`` (read in chunks) or a list; a boundary moved between rows, or one token changed, does not."""
    from datasets import Dataset

    from dataflex.state import token_digest

    rows = [{"input_ids": [1, 2]}, {"input_ids": [3]}] * 700  # more than one 1024-row chunk
    digest = token_digest(rows)
    assert token_digest(Dataset.from_list(rows)) == digest
    assert token_digest([{"input_ids": [1]}, {"input_ids": [2, 3]}] * 700) != digest
    assert token_digest(rows[:-1] + [{"input_ids": [4]}]) != digest
    assert token_digest([{"text": "no ids"}]) is None
