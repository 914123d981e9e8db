"""Per-example gradients, the Rademacher projection and LESS/TracIn influence scores."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dataflex.grads import PerExampleGradients, RademacherProjector, lora_linears
from dataflex.influence import GradientFeaturizer
from dataflex.losses import per_example_mean_loss
from dataflex.offline import target_direction
from dataflex.testbeds.tiny import collate_causal, tiny_gpt2, tiny_llama

peft = pytest.importorskip("peft", reason="the peft extra provides LoRA")


def lora_model(arch: str = "gpt2"):
    from peft import LoraConfig, get_peft_model

    if arch == "gpt2":
        base, targets = tiny_gpt2(n_layer=2, n_embd=32, n_head=2, seed=0), ["c_attn", "c_proj"]
    else:
        base, targets = tiny_llama(n_layer=2, hidden=32, n_head=2, seed=0), ["q_proj", "v_proj"]
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=targets, lora_dropout=0.0))
    torch.manual_seed(1)
    for name, p in model.named_parameters():  # LoRA B starts at 0; give it values so every path is exercised
        if "lora_B" in name:
            p.data.normal_(0, 0.1)
    return model


def batch_of(texts, prompt_len=3):
    feats = [{"input_ids": list(t.encode())} for t in texts]
    batch = collate_causal(feats)
    batch["labels"][:, :prompt_len] = -100  # a prompt that does not count, as in instruction tuning
    return batch


TEXTS = ["the cat sat on the mat", "2 + 2 = 4", "def f(x): return x", "to be or not", "abc", "hello world!!"]


def loop_gradients(model, layers, batch):
    out = {name: [] for name in layers}
    for i in range(batch["input_ids"].shape[0]):
        model.zero_grad(set_to_none=True)
        row = {k: v[i : i + 1] for k, v in batch.items()}
        logits = model(input_ids=row["input_ids"], attention_mask=row["attention_mask"]).logits
        per_example_mean_loss(logits, row["labels"]).sum().backward()
        for name, layer in layers.items():
            out[name].append(layer.weight.grad.detach().clone())
    return {name: torch.stack(v) for name, v in out.items()}


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
@pytest.mark.parametrize("via", ["outputs_only", "loss.backward"])
def test_batched_per_example_gradients_equal_a_loop(arch, via):
    model = lora_model(arch).eval()
    layers = lora_linears(model)
    assert len(layers) == {"gpt2": 12, "llama": 8}[arch]  # (A, B) x targets x 2 layers
    batch = batch_of(TEXTS)
    capture = PerExampleGradients(layers)
    with capture.recording():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        loss = per_example_mean_loss(logits, batch["labels"]).sum()
        if via == "loss.backward":
            loss.backward()
    if via == "outputs_only":
        capture.backward(loss)
        assert all(layer.weight.grad is None for layer in layers.values())  # parameter grads were skipped
    batched = capture.per_example()
    looped = loop_gradients(model, layers, batch)
    for name in layers:
        assert batched[name].shape == looped[name].shape
        torch.testing.assert_close(batched[name], looped[name], atol=1e-6, rtol=1e-4)


def test_projection_is_seeded_and_nearly_preserves_inner_products():
    rng = np.random.default_rng(0)
    grads = {
        "a": torch.tensor(rng.normal(size=(20, 16, 64)), dtype=torch.float32),
        "b": torch.tensor(rng.normal(size=(20, 64, 16)), dtype=torch.float32),
    }
    p1 = RademacherProjector(1024, seed=3, chunk_rows=300).project(grads)
    p2 = RademacherProjector(1024, seed=3, chunk_rows=300, cache_bytes=0).project(grads)  # regenerated chunks
    torch.testing.assert_close(p1, p2)
    assert not torch.allclose(p1, RademacherProjector(1024, seed=4).project(grads))
    flat = torch.cat([g.reshape(20, -1) for g in grads.values()], 1)
    exact = flat @ flat.T
    approx = p1 @ p1.T
    rel = ((approx - exact).abs() / exact.diag().sqrt().outer(exact.diag().sqrt())).max()
    assert rel < 0.15, float(rel)  # JL: 1024 dims keep inner products within a few percent of the norms
    with pytest.raises(ValueError, match="dim must be positive"):
        RademacherProjector(0)


def test_less_uses_the_optimizer_state_and_matches_a_manual_computation():
    model = lora_model()
    layers = lora_linears(model)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    batch = batch_of(TEXTS)
    for _ in range(3):  # give Adam some state
        opt.zero_grad()
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        per_example_mean_loss(logits, batch["labels"]).mean().backward()
        opt.step()
    less = GradientFeaturizer(model, layers, dim=256, seed=0, mode="less", optimizer=opt)
    tracin = GradientFeaturizer(model, layers, dim=256, seed=0, mode="tracin")
    f_less, f_tracin = less.features(batch), tracin.features(batch)
    assert torch.allclose(f_less.norm(dim=1), torch.ones(len(TEXTS)))
    assert not torch.allclose(f_less, f_tracin, atol=1e-3)
    # manual LESS for example 0 from a single-example backward
    model.eval()
    g = loop_gradients(model, layers, {k: v[:1] for k, v in batch.items()})
    manual = {}
    for name, layer in layers.items():
        st = opt.state[layer.weight]
        b1, b2 = opt.param_groups[0]["betas"]
        t = float(st["step"]) + 1
        m = (b1 * st["exp_avg"] + (1 - b1) * g[name][0]) / (1 - b1**t)
        v = (b2 * st["exp_avg_sq"] + (1 - b2) * g[name][0] ** 2) / (1 - b2**t)
        manual[name] = (m / (v.sqrt() + opt.param_groups[0]["eps"])).unsqueeze(0)
    proj = less.projector.project(manual)
    torch.testing.assert_close(f_less[:1], proj / proj.norm(), atol=1e-4, rtol=1e-3)
    with pytest.raises(ValueError, match="needs the training optimizer"):
        GradientFeaturizer(model, layers, mode="less")
    both = less.feature_sets(batch, ("less", "tracin"))  # one backward serves both kinds
    torch.testing.assert_close(both["less"], f_less)
    torch.testing.assert_close(both["tracin"], f_tracin)
    with pytest.raises(ValueError, match="need the training optimizer"):
        tracin.feature_sets(batch, ("less",))
    # micro-batching and buffered projection change nothing but speed
    chunked = GradientFeaturizer(
        model, layers, dim=256, seed=0, mode="less", optimizer=opt, micro_batch=3, grad_buffer_bytes=1
    )
    for layer in layers.values():  # as if scoring happened mid gradient-accumulation
        layer.weight.grad = torch.full_like(layer.weight, 0.5)
    torch.testing.assert_close(chunked.features(batch), f_less, atol=1e-5, rtol=1e-4)
    assert all(bool((layer.weight.grad == 0.5).all()) for layer in layers.values())  # training grads untouched
    with pytest.raises(ValueError, match="micro_batch must be positive; got 0"):
        GradientFeaturizer(model, layers, micro_batch=0)


def test_less_refuses_an_optimizer_without_the_adam_moments_of_the_scored_weights():
    """Read as missing (zeros), another optimizer's state made every LESS feature the sign of its gradient, silently:
    SGD (no betas), an optimizer that does not hold the scored weights (DeepSpeed ZeRO and FSDP optimise flattened
    copies) and an Adam variant keeping other state are refused, naming the optimizer."""
    model = lora_model()
    layers = lora_linears(model)
    trainable = [p for p in model.parameters() if p.requires_grad]
    with pytest.raises(ValueError, match="needs an Adam-family optimizer.*SGD has no betas"):
        GradientFeaturizer(model, layers, mode="less", optimizer=torch.optim.SGD(trainable, lr=0.1))
    elsewhere = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(3))], lr=1e-3)
    with pytest.raises(
        ValueError, match=f"AdamW does not hold the weight of .* \\({len(layers)} of {len(layers)} scored"
    ):
        GradientFeaturizer(model, layers, mode="less", optimizer=elsewhere)
    adam = torch.optim.Adam(trainable, lr=1e-3)
    for p in trainable:
        adam.state[p] = {"step": torch.tensor(1.0), "state1": torch.zeros_like(p)}  # an 8-bit Adam's layout
    featurizer = GradientFeaturizer(model, layers, mode="less", optimizer=adam)
    with pytest.raises(ValueError, match=r"reads Adam's exp_avg and exp_avg_sq; Adam keeps \['state1', 'step'\]"):
        featurizer.features(batch_of(TEXTS))


def test_influence_ranks_examples_like_the_target_first():
    model = lora_model()
    layers = lora_linears(model)
    math_like = [f"{a} + {b} = {a + b}" for a, b in [(1, 2), (3, 4), (5, 6), (7, 8), (2, 9), (4, 4)]]
    prose = [
        "the quick brown fox",
        "once upon a time",
        "it was the best",
        "call me ishmael",
        "all happy families",
        "in a hole in the",
    ]
    featurizer = GradientFeaturizer(model, layers, dim=512, seed=0)
    train = [batch_of(math_like[:4] + prose[:4])]
    target = [batch_of(math_like[4:])]
    direction = torch.as_tensor(target_direction(torch.cat([featurizer.features(b) for b in target])))
    scores = torch.cat([featurizer.features(b) for b in train]).double() @ direction
    assert scores[:4].mean() > scores[4:].mean()
