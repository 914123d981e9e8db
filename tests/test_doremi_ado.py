"""DoReMi and ADO: update-rule properties, proxy-stage resume, tiny end-to-end runs."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from conftest import changed_digit, through_checkpoint
from hf_helpers import small_dataset

from dataflex.domains import encode_domains
from dataflex.policies import ADO, doremi_update
from dataflex.policies.ado import fit_power_law
from dataflex.proxies.doremi import (
    REFERENCE_LOSSES,
    DoReMiOffline,
    DoReMiOnline,
    GroupDROObjective,
    PreparedDoReMiOnline,
    reference_token_losses,
    run_doremi_offline,
    train_proxy,
)
from dataflex.proxies.loop import train_mixture
from dataflex.store import DomainStats
from dataflex.testbeds.tiny import collate_causal, tiny_gpt2

LOOP = dict(collate=collate_causal, batch_size=4, lr=3e-3, seed=0, update_every=2, progress=False)


def make_model():
    return tiny_gpt2(n_layer=1, n_embd=32, n_head=2, seed=0)


@pytest.fixture(scope="module")
def data():
    ds = small_dataset(per_domain=16, max_len=40)
    ids, names = encode_domains(ds["domain"])
    return ds, ids, names


@pytest.mark.parametrize("seed", range(5))
def test_doremi_update_properties(seed):
    rng = np.random.default_rng(seed)
    k = int(rng.integers(2, 9))
    w = rng.dirichlet(np.ones(k))
    excess = rng.exponential(1.0, k)
    c = 1e-3
    new = doremi_update(w, excess, eta=1.0, smoothing=c)
    assert np.isfinite(new).all() and abs(new.sum() - 1) < 1e-12 and new.min() >= c / k - 1e-15
    perm = rng.permutation(k)  # relabelling domains permutes the result
    assert np.allclose(doremi_update(w[perm], excess[perm], 1.0, c), new[perm])
    bumped = excess.copy()
    bumped[0] += 1.0  # more excess for domain 0 -> more weight for domain 0
    assert doremi_update(w, bumped, 1.0, c)[0] > new[0]
    huge = doremi_update(w, np.where(np.arange(k) == 1, 1e6, np.nan), 1.0, c)  # NaN counts as 0
    assert np.isfinite(huge).all() and huge.min() >= c / k - 1e-15 and huge.argmax() == 1


def test_doremi_update_rejects_bad_arguments():
    with pytest.raises(ValueError, match="same length"):
        doremi_update(np.ones(3) / 3, np.ones(2))
    with pytest.raises(ValueError, match="smoothing must lie in"):
        doremi_update(np.ones(2) / 2, np.ones(2), smoothing=2.0)
    with pytest.raises(ValueError, match="eta must be"):
        doremi_update(np.ones(2) / 2, np.ones(2), eta=float("nan"))


def test_group_dro_credits_each_domain_with_its_own_tokens():
    obj = GroupDROObjective(np.zeros((4, 5), dtype=np.float32), num_domains=2)
    torch.manual_seed(0)
    proxy_tok = torch.zeros(4, 5)
    proxy_tok[2:] = 3.0  # domain 1's rows are far worse than the (zero) reference
    from dataflex.policies.doremi import group_dro_step

    alpha, loss = group_dro_step(
        proxy_tok, torch.zeros(4, 5), torch.ones(4, 5), torch.tensor([0, 0, 1, 1]), obj.alpha, 1.0, 1e-3
    )
    assert alpha[1] > 0.9 and float(loss) > 0


def test_proxy_stage_resumes_exactly(data, tmp_path):
    ds, ids, names = data
    ref_losses = reference_token_losses(make_model(), ds, collate_causal)
    assert ref_losses.shape[0] == len(ds) and np.isnan(ref_losses).any()
    full = train_proxy(make_model, ds, ids, names, ref_losses, tmp_path / "full", steps=16, **LOOP)
    part = train_proxy(make_model, ds, ids, names, ref_losses, tmp_path / "cut", steps=16, stop_after=7, **LOOP)
    assert part == {} and not (tmp_path / "cut" / "doremi_weights.json").exists()
    resumed = train_proxy(make_model, ds, ids, names, ref_losses, tmp_path / "cut", steps=16, **LOOP)
    assert resumed["weights"] == full["weights"]
    assert resumed["trajectory"] == full["trajectory"]
    w = np.array(full["weights"])
    assert abs(w.sum() - 1) < 1e-9 and not np.allclose(w, 1 / len(names))


def test_offline_pipeline_end_to_end_and_stage_reuse(data, tmp_path):
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    ds, ids, names = data
    ref, export = run_doremi_offline(make_model, ds, ids, names, tmp_path, steps=10, **LOOP)
    saved = json.loads((tmp_path / "proxy" / "doremi_weights.json").read_text())
    assert saved["weights"] == export["weights"] and saved["domain_names"] == names
    assert (tmp_path / "reference" / "model.pt").is_file() and (tmp_path / "reference" / REFERENCE_LOSSES).is_file()
    mtime = (tmp_path / "reference" / "model.pt").stat().st_mtime
    policy = DoReMiOffline()
    policy.prepare(make_model, ds, ids, names, tmp_path, dict(steps=10, **LOOP))  # reuses every stage
    assert (tmp_path / "reference" / "model.pt").stat().st_mtime == mtime
    result = train_mixture(make_model(), ds, ids, names, policy, steps=6, **LOOP)
    assert np.allclose(result.history[-1]["weights"], export["weights"])
    from_file = DoReMiOffline(weights_path=str(tmp_path / "proxy" / "doremi_weights.json"))
    from_file.bind(names, np.bincount(ids))
    assert np.allclose(from_file.initial_weights(), export["weights"])
    # A changed byte in a stage that is reused is refused, naming the file, rather than trained on: torch.load
    # and np.load of a .npy read it as another weight or loss, and a flipped digit of the weights still parses.
    for stage, name in (("reference", "model.pt"), ("reference", REFERENCE_LOSSES), ("proxy", "doremi_weights.json")):
        path = tmp_path / stage / name
        intact = path.read_bytes()
        if name.endswith(".json"):
            path.write_text(changed_digit(intact.decode(), '"weights": ['))
        else:  # a byte of the stored numbers (most of either file)
            path.write_bytes(
                intact[: len(intact) // 2] + bytes([intact[len(intact) // 2] ^ 1]) + intact[len(intact) // 2 + 1 :]
            )
        with pytest.raises(ValueError, match=rf"{name} is damaged"):
            DoReMiOffline().prepare(make_model, ds, ids, names, tmp_path, dict(steps=10, **LOOP))
        path.write_bytes(intact)
    # The same work_dir with other settings would hand back these stages as theirs: refused, each named.
    with pytest.raises(ValueError, match=r"proxy holds a run made with other settings \(eta: 1.0 there, 4.0 now\)"):
        DoReMiOffline(eta=4.0).prepare(make_model, ds, ids, names, tmp_path, dict(steps=10, **LOOP))
    with pytest.raises(ValueError, match=r"reference holds a run .*loop.steps: 10 there, 12 now.*another work_dir"):
        DoReMiOffline().prepare(make_model, ds, ids, names, tmp_path, dict(steps=12, **LOOP))
    AcceleratorState._reset_state(reset_partial_state=True)  # as a process launched with bf16 would start
    bf16 = dict(steps=10, **LOOP, accelerator=Accelerator(cpu=True, mixed_precision="bf16"))
    with pytest.raises(ValueError, match=r"reference holds a run .*\(loop.mixed_precision: None there, 'bf16' now"):
        DoReMiOffline().prepare(make_model, ds, ids, names, tmp_path, bf16)
    AcceleratorState._reset_state(reset_partial_state=True)
    with pytest.raises(ValueError, match=r"reference holds a run .*\(data\.labels: .*data\.tokens: "):
        DoReMiOffline().prepare(
            make_model, ds.select(range(len(ds) - 1)), ids[:-1], names, tmp_path, dict(steps=10, **LOOP)
        )
    # Deleting the stage folders, as the refusal says, starts over: the reference retrained with the new settings
    # is never paired with the old one's token losses (they live in its folder and went with it).
    old_losses = np.load(tmp_path / "reference" / REFERENCE_LOSSES)
    for stage in ("reference", "proxy"):
        shutil.rmtree(tmp_path / stage)
    ref12, _ = run_doremi_offline(make_model, ds, ids, names, tmp_path, steps=12, **LOOP)
    new_losses = np.load(tmp_path / "reference" / REFERENCE_LOSSES)
    assert np.array_equal(new_losses, reference_token_losses(ref12, ds, LOOP["collate"]), equal_nan=True)
    assert not np.array_equal(new_losses, old_losses, equal_nan=True)


def test_online_doremi_end_to_end_and_exact_resume(data, tmp_path):
    ds, ids, names = data

    def run(ckpt, stop=None):
        policy = PreparedDoReMiOnline(lr=3e-3, use_average=False)
        policy.prepare(make_model, ds, ids, names, tmp_path / "work", dict(steps=8, **LOOP))
        result = train_mixture(
            make_model(), ds, ids, names, policy, steps=12, ckpt_dir=ckpt, ckpt_every=4, stop_after=stop, **LOOP
        )
        return policy, result

    full_policy, full = run(tmp_path / "a")
    assert full_policy.proxy_seconds > 0 and full_policy.steps == 12
    assert not np.allclose(full.history[-1]["weights"], full.history[0]["weights"])
    run(tmp_path / "b", stop=6)
    resumed_policy, resumed = run(tmp_path / "b")
    assert resumed.history == full.history
    for a, b in zip(full_policy.proxy.parameters(), resumed_policy.proxy.parameters()):
        assert torch.equal(a, b)
    with pytest.raises(RuntimeError, match="needs a proxy and a reference"):
        DoReMiOnline(None, None).bind(names, np.bincount(ids))


def test_power_law_fit_recovers_parameters():
    n = np.linspace(100, 5000, 40)
    eps, beta, alpha = fit_power_law(n, 1.2 + 4.0 * n**-0.35)
    assert abs(eps - 1.2) < 0.02 and abs(alpha - 0.35) < 0.02 and abs(beta - 4.0) < 0.3
    with pytest.raises(ValueError, match="at least 3"):
        fit_power_law(np.array([1.0, 2.0]), np.array([1.0, np.nan]))


def test_ado_prefers_the_domain_still_learning_and_stays_valid():
    ado = ADO(prior="uniform", warmup_updates=3)
    ado.bind(["fast", "flat"], np.array([100.0, 100.0]))
    w = ado.initial_weights()
    for t in range(1, 30):
        n = 40.0 * t
        loss = np.array([1.0 + 5.0 * n**-0.5, 2.0 + 0.01 * n**-0.05])  # "fast" still falls, "flat" barely
        stats = DomainStats(loss * 20, np.array([20, 20]), 0, 0)
        w = ado.update(stats, w)
        assert np.isfinite(w).all() and abs(w.sum() - 1) < 1e-9 and w.min() >= 0.01 - 1e-12
    assert w[0] > w[1]
    clone = ADO(prior="uniform", warmup_updates=3)
    clone.bind(["fast", "flat"], np.array([100.0, 100.0]))
    clone.load_state_dict(through_checkpoint(ado.state_dict()))
    stats = DomainStats(np.array([30.0, 40.0]), np.array([20, 20]), 0, 0)
    assert np.array_equal(clone.update(stats, w), ado.update(stats, w))
    with pytest.raises(ValueError, match="prior='zipf'"):
        ADO(prior="zipf")
