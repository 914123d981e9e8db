"""Embeddings, faiss k-means, cluster-balanced sampling and SemDeDup."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from conftest import assert_resumes_exactly
from hf_helpers import StepRecorder, make_trainer, small_dataset, tiny_model

from dataflex import DataFlexCallback, DataFlexSelectCallback
from dataflex.clustering import cluster_names, gpu_available, kmeans
from dataflex.dedup import semdedup
from dataflex.embeddings import EmbeddingCache, hidden_state_embedder, mean_pool
from dataflex.offline import score_pool
from dataflex.policies import Uniform
from dataflex.samplers import DomainMixtureSampler
from dataflex.schedule import WeightSchedule
from dataflex.selectors import FixedSubset
from dataflex.testbeds.tiny import collate_causal


def blobs(n_per: int = 50, k: int = 4, d: int = 8, seed: int = 0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(k, d)) * 10
    x = np.concatenate([c + rng.normal(size=(n_per, d)) for c in centres]).astype(np.float32)
    return x, np.repeat(np.arange(k), n_per)


def test_kmeans_recovers_separated_blobs_and_is_seeded():
    x, truth = blobs()
    a, b = kmeans(x, 4, seed=1), kmeans(x, 4, seed=1)
    np.testing.assert_array_equal(a.labels, b.labels)
    # each true blob maps to exactly one cluster
    assert all(len(set(a.labels[truth == t])) == 1 for t in range(4)) and len(set(a.labels)) == 4
    assert a.inertia == pytest.approx(((x - a.centroids[a.labels]) ** 2).sum(), rel=1e-4)
    assert not a.on_gpu and not gpu_available()  # this machine has no GPU: the CPU path ran
    warm = kmeans(x, 4, niter=0, init_centroids=a.centroids)  # starting from a result stays there
    np.testing.assert_array_equal(warm.labels, a.labels)
    with pytest.raises(ValueError, match=r"init_centroids must have shape \(4, 8\); got \(3, 8\)"):
        kmeans(x, 4, init_centroids=a.centroids[:3])
    with pytest.raises(RuntimeError, match="gpu=True but no GPU"):
        kmeans(x, 4, gpu=True)
    with pytest.raises(ValueError, match=r"k must lie in \[1, n=200\]; got 500"):
        kmeans(x, 500)
    bad = x.copy()
    bad[3, 0] = np.nan
    with pytest.raises(ValueError, match=r"non-finite values in rows \[3\]"):
        kmeans(bad, 4)
    assert cluster_names(np.array([0, 12, 3])) == ["c00", "c12", "c03"]


def test_semdedup_removes_exactly_the_planted_duplicates():
    rng = np.random.default_rng(0)
    originals = rng.normal(size=(60, 32)).astype(np.float32)
    copies_of = rng.choice(60, size=25)  # some originals get several near-copies
    copies = originals[copies_of] + 1e-3 * rng.normal(size=(25, 32)).astype(np.float32)
    x = np.concatenate([originals, copies])
    labels = kmeans(x / np.linalg.norm(x, axis=1, keepdims=True), 5, seed=0, spherical=True).labels
    keep = semdedup(x, labels, eps=0.01, order="index")  # originals come first: they are kept
    assert keep[:60].all() and not keep[60:].any()
    keep_far = semdedup(x, labels, eps=0.01, order="far")  # paper order: one per duplicate group survives
    assert keep_far.sum() == 60
    groups = {i: [i] + [60 + j for j in np.flatnonzero(copies_of == i)] for i in range(60)}
    assert all(keep_far[g].sum() == 1 for g in groups.values())
    assert semdedup(x, labels, eps=0.0).sum() == 85  # nothing is that similar
    with pytest.raises(ValueError, match="eps must lie in"):
        semdedup(x, labels, eps=1.5)


def test_stratified_mixture_meets_cluster_quotas_over_an_epoch():
    labels = np.repeat(np.arange(5), [100, 40, 30, 20, 10])  # 200 examples, unbalanced clusters
    names = cluster_names(labels)
    k = 5

    def build(stratified):
        return DomainMixtureSampler(
            labels, WeightSchedule(sorted(set(names)), np.full(k, 0.2)), seed=4, stratified=stratified
        )

    counts = np.bincount(labels[build(True).epoch_order(0)], minlength=k)
    assert np.abs(counts - 40).max() <= 1  # every cluster gets its quota of 200 / 5
    loose = np.bincount(labels[build(False).epoch_order(0)], minlength=k)
    assert np.abs(loose - 40).max() > 1  # independent draws are only right on average
    assert_resumes_exactly(lambda: build(True), [0, 1, 5, 17])


@pytest.mark.parametrize("arch", ["gpt2", "fused_llama"])
def test_hidden_state_embeddings_offline_and_from_the_training_forward(tmp_path, arch):
    """fused_llama's training forward never calls its LM head (fused linear cross-entropy): the embeddings still
    come from the batch's last hidden state, not from dataflex's own LM-head pass over the counted positions."""
    ds = small_dataset(per_domain=8)
    cache = EmbeddingCache(len(ds))
    cb = DataFlexCallback(Uniform(), domains=ds["domain"], update_every=2, embeddings=cache, stratified=True)
    rec = StepRecorder(cb)
    trainer = make_trainer(ds, cb, tmp_path, max_steps=3, save_steps=3, extra=[rec], arch=arch)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "the training forward returned no logits")
        trainer.train()
    seen = sorted({i for ids in rec.ids.values() for i in ids})
    assert cache.filled[seen].all() and cache.filled.sum() == len(seen)
    assert (tmp_path / "checkpoint-3" / "dataflex" / "dataflex_embeddings.npz").is_file()
    # an example's cached embedding equals the offline embedding with the weights of the step it was taken at
    model = tiny_model(arch, seed=0)  # make_trainer's initial weights
    first = rec.ids[1][0]
    assert cache.step[first] == 0
    offline = score_pool(hidden_state_embedder(model), ds.select([first]), collate_causal, progress=False)
    np.testing.assert_allclose(cache.values[first], offline[0], atol=1e-4)
    with pytest.raises(ValueError, match=r"embeddings of shape \(1, 4\) for 3 ids"):
        EmbeddingCache(5).update(np.array([0, 1, 2]), np.ones((1, 4)), step=0)  # not broadcast over the ids
    h = torch.ones(2, 3, 4)
    h[0, 2] = 100.0
    assert mean_pool(h, torch.tensor([[1, 1, 0], [1, 1, 1]]))[0].tolist() == [1.0] * 4


def test_semdedup_as_a_sampler_filter_on_a_stock_trainer(tmp_path):
    ds = small_dataset(per_domain=8)
    kept = np.arange(0, len(ds), 3)
    cb = DataFlexSelectCallback(FixedSubset(kept), update_every=100)
    rec = StepRecorder(cb)
    make_trainer(ds, cb, tmp_path, max_steps=5, save_steps=100, extra=[rec]).train()
    assert {i for ids in rec.ids.values() for i in ids} <= set(kept.tolist())
    with pytest.raises(ValueError, match="FixedSubset needs at least one"):
        FixedSubset([])
