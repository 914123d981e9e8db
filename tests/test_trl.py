"""TRL's SFTTrainer (trl >= 1.15: fused LM head, metric forwards, shuffling, filtering, padding-free batches)."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch
from hf_helpers import (
    StepRecorder,
    assert_trainer_resumes_exactly,
    params,
    small_dataset,
    tiny_model,
    trainer_settings,
)
from transformers import TrainerCallback

from dataflex import DataFlexCallback, DataFlexCurriculumCallback, DataFlexSelectCallback
from dataflex.curriculum import Curriculum, length_difficulty, loss_difficulty
from dataflex.policies import ODM, Static, Uniform
from dataflex.selectors import LossFocus
from dataflex.testbeds.tiny import byte_tokenizer, collate_causal
from dataflex.weighting import ExampleWeightedLoss

trl = pytest.importorskip("trl")


def sft_trainer(
    ds,
    dfx,
    out_dir,
    *,
    max_steps=12,
    accum=1,
    workers=0,
    save_steps=4,
    extra=(),
    logging_steps=100,
    model=None,
    compute_loss_func=None,
    arch="gpt2",
    peft_config=None,
    processing_class=None,
    trainer_cls=None,
    **sft,
):
    """make_trainer's twin for TRL: SFTTrainer (or ``trainer_cls``) with its default loss (the fused LM head); the
    byte tokenizer unless ``processing_class`` is given."""
    settings = trainer_settings(
        out_dir,
        accum=accum,
        max_steps=max_steps,
        save_steps=save_steps,
        logging_steps=logging_steps,
        workers=workers,
        seed=0,
    )
    args = trl.SFTConfig(**settings, report_to=[], **sft)
    model = model if model is not None else tiny_model(arch, seed=0)
    trainer = (trainer_cls or trl.SFTTrainer)(
        model=model,
        args=args,
        train_dataset=ds,
        processing_class=processing_class or byte_tokenizer(),
        callbacks=[*extra],
        compute_loss_func=compute_loss_func,
        peft_config=peft_config,
    )
    dfx.attach(trainer)
    return trainer


class VerifyLosses(TrainerCallback):
    """Before each optimizer step, recompute every recorded example alone from the Trainer's own dataset."""

    def __init__(self, dfx) -> None:
        self.dfx, self.trainer, self.checked, self.max_err, self.per_step = dfx, None, 0, 0.0, []

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        ids, losses, valid = self.dfx.last_step_records()
        self.per_step.append(len(ids))
        was_training = model.training
        model.eval()
        with torch.no_grad():
            for i, loss in zip(ids, losses):
                example = self.trainer.train_dataset[int(i)]
                batch = collate_causal([{"input_ids": example["input_ids"], "labels": example.get("labels")}])
                if "completion_mask" in example:
                    keep = torch.as_tensor(example["completion_mask"], dtype=torch.bool)
                    batch["labels"][0, : keep.numel()] = batch["labels"][0, : keep.numel()].masked_fill(~keep, -100)
                ref = float(model(**batch).loss)
                self.max_err = max(self.max_err, abs(ref - float(loss)))
                self.checked += 1
        model.train(was_training)


@pytest.fixture(scope="module")
def ds():
    return small_dataset(per_domain=12)  # 36 examples with a "domain" column


def lora_config():
    from peft import LoraConfig

    torch.manual_seed(0)  # LoRA's A matrices are drawn from the global generator when TRL wraps the model
    return LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn"], lora_dropout=0.0)


def test_sft_with_lora_scores_the_adapted_model(ds, tmp_path):
    """peft LoRA through SFTTrainer(peft_config=...): the losses are the adapted model's, not the base model's."""
    dfx = DataFlexCallback(ODM(), update_every=2)
    verify = VerifyLosses(dfx)
    trainer = sft_trainer(ds, dfx, tmp_path, max_steps=4, extra=[verify], peft_config=lora_config())
    verify.trainer = trainer
    trainer.train()
    assert type(trainer.model).__name__.startswith("Peft")
    assert verify.checked == 16 and verify.max_err < 1e-4, verify.max_err
    assert len(dfx.history) == 3


@pytest.mark.parametrize("padding_free", [False, True])
def test_sft_losses_equal_recomputation_with_shuffling(ds, tmp_path, padding_free):
    """Default loss (fused LM head: log_probs, no logits), shuffled dataset, TRL's no-grad metric forward;
    with padding_free=True every batch is one flattened row, split at the sequence starts."""
    dfx = DataFlexCallback(ODM(), update_every=2)
    verify = VerifyLosses(dfx)
    trainer = sft_trainer(
        ds,
        dfx,
        tmp_path,
        max_steps=6,
        accum=2,
        extra=[verify],
        shuffle_dataset=True,
        padding_free=padding_free,
        max_length=None if padding_free else 1024,
        arch="llama" if padding_free else "gpt2",
    )
    verify.trainer = trainer
    trainer.train()
    # one record per example (TRL's metric forward is not a micro-batch); the epoch's last step has one micro-batch
    assert verify.per_step == [8, 8, 8, 8, 4, 8]
    assert verify.checked == 44 and verify.max_err < 1e-4, verify.max_err
    assert trainer.train_dataset["domain"] != ds["domain"]  # the trainer did reorder it
    logged = [h for h in trainer.state.log_history if "dataflex/entropy" in h]
    assert len(logged) == 3 and not any("mean_token_accuracy" in h for h in logged)  # TRL's metrics stay its own


def test_sft_label_smoothing_is_scored(ds, tmp_path):
    """SFTTrainer with label smoothing forwards without labels and smooths the full logits itself (then runs a
    no-gradient fused forward for its metrics): each example is scored once, at the smoother's call."""
    from transformers.trainer_pt_utils import LabelSmoother

    dfx = DataFlexCallback(ODM(), update_every=2)
    verify = VerifyLosses(dfx)
    trainer = sft_trainer(ds, dfx, tmp_path, max_steps=4, extra=[verify], label_smoothing_factor=0.1, max_length=1024)
    verify.trainer = trainer
    trainer.train()
    assert verify.checked == 16 and verify.max_err < 1e-4, (verify.checked, verify.max_err)
    assert type(trainer.label_smoother) is LabelSmoother  # handed back at train end


def test_sft_prompt_completion_scores_only_the_completion(tmp_path):
    ds = small_dataset(per_domain=8)
    ds = ds.map(lambda ex: {"completion_mask": [0] * 10 + [1] * (len(ex["input_ids"]) - 10)})
    dfx = DataFlexCallback(Uniform(), update_every=2)
    verify = VerifyLosses(dfx)
    trainer = sft_trainer(ds, dfx, tmp_path, max_steps=4, extra=[verify], completion_only_loss=True)
    verify.trainer = trainer
    trainer.train()
    assert verify.checked == 16 and verify.max_err < 1e-4, verify.max_err


def test_sft_compute_loss_func_is_scored_once_per_micro_batch(ds, tmp_path):
    dfx = DataFlexCallback(ODM(), update_every=2)
    rec = StepRecorder(dfx)
    trainer = sft_trainer(
        ds,
        dfx,
        tmp_path,
        max_steps=4,
        accum=2,
        extra=[rec],
        compute_loss_func=dfx.wrap_loss(ExampleWeightedLoss(gradient_accumulation_steps=2)),
    )
    trainer.train()
    assert [len(v) for v in rec.ids.values()] == [8] * 4 and dfx.missing_labels == 0


@pytest.mark.parametrize("kind", ["example", "token"])
def test_sft_padding_free_batches_are_reweighted_per_example(ds, tmp_path, kind):
    """padding_free=True (with pad_to_multiple_of, whose padding reads as one-token sequences): dataflex's losses
    get each example's place from the callback, so the weights and the trained model equal the padded run's.
    Before, ExampleWeightedLoss weighed the whole row as one example (weight 1: unweighted training), the padding
    made the callback count 9 examples for 4, and TokenWeightedLoss stopped."""
    from dataflex.token_weighting import TokenWeightedLoss

    def by_id(token_loss, counted, ids):
        return torch.where(counted, token_loss * torch.as_tensor(ids % 3 + 1, dtype=token_loss.dtype)[:, None], 0.0)

    runs = []
    for padding_free in (False, True):
        dfx = DataFlexCallback(Uniform(), update_every=2)
        loss = ExampleWeightedLoss(temperature=0.5) if kind == "example" else TokenWeightedLoss(by_id, dfx)
        flat = {"padding_free": True, "pad_to_multiple_of": 64} if padding_free else {}
        trainer = sft_trainer(
            ds,
            dfx,
            tmp_path / str(padding_free),
            max_steps=3,
            arch="llama",
            max_length=None,
            compute_loss_func=dfx.wrap_loss(loss),
            optim="sgd",  # (Adam would turn float noise in near-zero gradients into whole steps)
            **flat,
        )
        trainer.train()
        runs.append((loss.last_weights, params(trainer.model), dfx.last_step_records()[0]))
    (w_padded, p_padded, ids_padded), (w_flat, p_flat, ids_flat) = runs
    assert ids_flat.tolist() == ids_padded.tolist() and len(ids_flat) == 4
    if kind == "example":
        assert w_flat.shape == (4,) and float(w_flat.std()) > 0.1
        torch.testing.assert_close(w_flat, w_padded, rtol=1e-2, atol=1e-3)
    else:
        assert w_flat.shape[0] == 1 and float(w_flat.sum()) == pytest.approx(float(w_padded.sum()), rel=1e-3)
    assert max(float(np.abs(p_flat[k] - p_padded[k]).max()) for k in p_padded) < 1e-5


def test_sft_filtered_dataset_labels_follow_or_are_refused(tmp_path):
    """TRL drops fully masked examples: labels taken before are refused, the column is followed."""
    ds = small_dataset(per_domain=8)
    ds = ds.map(lambda ex, i: {"completion_mask": [0 if i < 3 else 1] * len(ex["input_ids"])}, with_indices=True)
    with pytest.raises(ValueError, match="got 24 domain labels for a training set of 21"):
        sft_trainer(
            ds, DataFlexCallback(Uniform(), domains=ds["domain"]), tmp_path, max_steps=2, completion_only_loss=True
        ).train()
    dfx = DataFlexCallback(Static({"code": 1.0}))
    rec = StepRecorder(dfx)
    trainer = sft_trainer(ds, dfx, tmp_path, max_steps=3, extra=[rec], completion_only_loss=True)
    trainer.train()
    assert {trainer.train_dataset[i]["domain"] for v in rec.ids.values() for i in v} == {"code"}
    # ids given by position cannot follow a column: after the dropped rows they named other examples, silently
    from dataflex.selectors import FixedSubset

    dfx = DataFlexSelectCallback(FixedSubset([5, 6, 7, 8]))
    with pytest.raises(ValueError, match="FixedSubset's example ids .* SFTTrainer's holds 21 of the 24 rows"):
        sft_trainer(ds, dfx, tmp_path, max_steps=2, completion_only_loss=True).train()
    kept = ds.filter(lambda ex: any(ex["completion_mask"])).flatten_indices()  # the way out the message names
    dfx = DataFlexSelectCallback(FixedSubset([5, 6, 7, 8]))
    rec = StepRecorder(dfx)
    trainer = sft_trainer(kept, dfx, tmp_path, max_steps=2, extra=[rec], completion_only_loss=True)
    trainer.train()
    trained = sorted({i for v in rec.ids.values() for i in v})
    assert [trainer.train_dataset[i]["input_ids"] for i in trained] == [kept[i]["input_ids"] for i in (5, 6, 7, 8)]


def test_sft_shuffle_dataset_refuses_what_is_given_by_position(ds, tmp_path):
    """shuffle_dataset=True reorders the dataset after the user made per-position inputs from it (subset ids,
    irreducible losses, difficulty scores): each would land on another example, silently. Refused, naming the
    input; without the shuffle the same subset trains exactly its ids."""
    from dataflex.selectors import FixedSubset, RhoLoss

    subset = [0, 5, 13, 30]
    inputs = {
        "FixedSubset's example ids": DataFlexSelectCallback(FixedSubset(subset)),
        "RhoLoss's irreducible losses": DataFlexSelectCallback(RhoLoss(0.5, np.zeros(len(ds))), update_every=1),
        "the curriculum's difficulty scores": DataFlexCurriculumCallback(Curriculum(length_difficulty(ds))),
    }
    for held, dfx in inputs.items():
        with pytest.raises(ValueError, match=f"{held} are given by position .* set shuffle_dataset=False"):
            sft_trainer(ds, dfx, tmp_path, max_steps=1, shuffle_dataset=True).train()
    dfx = DataFlexSelectCallback(FixedSubset(subset))
    rec = StepRecorder(dfx)
    sft_trainer(ds, dfx, tmp_path, max_steps=2, extra=[rec]).train()
    assert sorted({i for ids in rec.ids.values() for i in ids}) == subset


def test_sft_packing_and_unsupported_sampling_are_named(ds, tmp_path):
    with pytest.raises(ValueError, match="packing=True.*padding_free=True"):
        sft_trainer(ds, DataFlexCallback(Uniform()), tmp_path, max_steps=2, packing=True).train()
    with pytest.raises(ValueError, match="batch_rebalance"):
        sft_trainer(
            ds, DataFlexCallback(Uniform()), tmp_path, max_steps=2, train_sampling_strategy="batch_rebalance"
        ).train()


def test_sft_group_by_length_sorts_dataflex_blocks(ds, tmp_path):
    dfx = DataFlexCallback(Uniform())
    rec = StepRecorder(dfx)
    trainer = sft_trainer(ds, dfx, tmp_path, max_steps=4, extra=[rec], train_sampling_strategy="group_by_length")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # honoured, so nothing to warn about
        trainer.train()
    lengths = [len(trainer.train_dataset[i]["input_ids"]) for i in range(len(trainer.train_dataset))]
    trained = [i for step in sorted(rec.ids) for i in rec.ids[step]]
    block = dfx.sampler.length_grouping.megabatch
    assert len(trained) >= block
    for start in range(0, len(trained) - block + 1, block):
        assert np.all(np.diff([lengths[i] for i in trained[start : start + block]]) <= 0)


def ran_with_trl_defaults(*callbacks) -> None:
    """TRL's configs default to gradient checkpointing and bf16 autocast (also on the CPU): the runs compared
    by assert_trainer_resumes_exactly had both on, so their exact resume covers them too (README table)."""
    for callback in callbacks:
        trainer = callback._trainer
        assert trainer.args.gradient_checkpointing and trainer.args.bf16
        assert any(getattr(m, "gradient_checkpointing", False) is True for m in trainer.model.modules())


@pytest.mark.parametrize(
    "kind",
    [
        "mixing",
        "selection",
        "curriculum",
        "mixing_padding_free",
        "selection_padding_free",
        "curriculum_rescored_padding_free",
        "mixing_lora",
    ],
)
def test_sft_crash_and_resume_is_exact(ds, tmp_path, kind):
    """With padding_free, re-selection and re-scoring also see flattened batches (through the Trainer's collator):
    every candidate must still get its own score."""

    def make_callback(allow):
        if kind.startswith("selection"):
            return DataFlexSelectCallback(LossFocus(0.5, "hard"), update_every=3, allow_missing_state=allow)
        if kind == "curriculum":
            return DataFlexCurriculumCallback(
                Curriculum(length_difficulty(ds), pacing="linear", c0=0.3), allow_missing_state=allow
            )
        if kind.startswith("curriculum_rescored"):
            return DataFlexCurriculumCallback(
                Curriculum(scorer=loss_difficulty(8), pacing="root", c0=0.3), rescore_every=4, allow_missing_state=allow
            )
        return DataFlexCallback(ODM(), update_every=2, allow_missing_state=allow)

    sft = {"padding_free": True, "max_length": None, "arch": "llama"} if kind.endswith("padding_free") else {}
    if kind.endswith("lora"):
        sft = {"peft_config": lora_config()}
    full, _ = assert_trainer_resumes_exactly(
        make_callback,
        ds,
        tmp_path,
        accum=2 if kind == "mixing" else 1,
        forced_differs=kind != "curriculum",
        trainer_factory=sft_trainer,
        # TRL restarts its own num_tokens counter on resume (with or without dataflex)
        log_keys_not_resumed=("num_tokens",),
        compare=ran_with_trl_defaults,
        **sft,
    )
    assert len(full.history) > 1 or kind == "curriculum"
    if kind.startswith("selection"):
        assert np.isfinite(full.store.score).all()  # every example scored, none lost to a flattened batch


@pytest.mark.slow
@pytest.mark.parametrize(
    "layout", ["padded", "padding_free", "group_by_length", "vision", "zero2", "zero3", "fsdp2", "kto"]
)
def test_sft_two_processes_identical_ranks_and_exact_resume(tmp_path, layout):
    """SFTTrainer under torchrun (2 processes), padded, padding-free, grouped by length, with a processor and
    images (TRL's vision collator, the tiny LLaVA), under DeepSpeed ZeRO-2 or ZeRO-3 or FSDP2 (on CPU ranks:
    hf_helpers.FSDPOnCPU), and KTOTrainer: same decisions on both ranks, disjoint examples per step, and crash +
    resume equal to the uninterrupted run. Slow; .ci/run runs it."""
    from test_distributed import run_two_processes

    if layout.startswith("zero"):
        pytest.importorskip("deepspeed")

    run_two_processes("trl_dist_worker.py", tmp_path, layout)
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert r0["world"] == 2 and r0["history"] == r1["history"] and len(r0["history"]) == 9
    assert r0["stack"] == {"zero2": "2", "zero3": "3", "fsdp2": "fsdp2"}.get(layout, "ddp")
    assert r0["checkpointed_bf16"]  # gradient checkpointing and bf16 autocast were on, as TRL's configs default
    assert r0["history"][0]["weights"] != r0["history"][-1]["weights"]
    for step in r0["ids"]:
        assert len(r0["ids"][step]) == len(r1["ids"][step]) == 4  # one record per example, also when flattened
        if layout == "kto":  # rows a domain's pass repeats may meet in one global batch: check the dealing itself
            epoch, first = divmod(int(step) - 1, 4)  # 32 rows: 4 global batches of 8 an epoch
            assert r0["ids"][step] + r1["ids"][step] == r0["orders"][epoch][8 * first : 8 * first + 8]
        else:
            assert not set(r0["ids"][step]) & set(r1["ids"][step])  # each rank trains its own examples
    for r in (r0, r1):
        assert r["resumed_ids"] == r["ids"] and r["resumed_history"] == r["history"] and r["resumed_log"] == r["log"]


def preference_rows(n: int = 24) -> list[dict]:
    domains = ["web", "code", "math"]
    return [
        {"prompt": f"Question {i}: {domains[i % 3]}?", "chosen": f" right {i}", "rejected": f" no {i}",
         "completion": f" answer {i * 7}", "label": bool(i % 2), "domain": domains[i % 3]}
        for i in range(n)
    ]  # fmt: skip


def test_kto_scores_each_rows_completion(tmp_path):
    """Each recorded loss is its row's completion loss, recomputed alone. KTOTrainer also runs a no-gradient
    forward per step on mismatched prompt-completion pairs (its KL estimate) and a reference model: the embedding
    cache and the training-dynamics record still hold each row's own policy forward."""
    from datasets import Dataset

    from dataflex.embeddings import EmbeddingCache, hidden_state_embedder

    ds = Dataset.from_list([{k: r[k] for k in ("prompt", "completion", "label", "domain")} for r in preference_rows()])
    settings = trainer_settings(tmp_path, accum=1, max_steps=4, save_steps=4, logging_steps=100, workers=0, seed=0)
    trainer = trl.KTOTrainer(
        model=tiny_model("gpt2", seed=0),
        ref_model=tiny_model("gpt2", seed=0),
        args=trl.KTOConfig(**settings, report_to=[], max_length=64),
        train_dataset=ds,
        processing_class=byte_tokenizer(),
    )
    cache = EmbeddingCache(len(ds))
    dfx = DataFlexCallback(ODM(), update_every=2, trainer=trainer, embeddings=cache, dynamics=True)
    errors: list[float] = []
    alone: dict[int, tuple[np.ndarray, float]] = {}

    class Verify(TrainerCallback):  # each row alone, with the weights of its step
        def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
            ids, losses, _ = dfx.last_step_records()
            with torch.no_grad():
                for i, loss in zip(ids, losses):
                    row = trainer.train_dataset[int(i)]
                    x = torch.tensor([row["prompt_ids"] + row["completion_ids"]])
                    labels = x.clone()
                    labels[0, : len(row["prompt_ids"])] = -100
                    ref = float(model(input_ids=x, labels=labels).loss)
                    errors.append(abs(ref - float(loss)))
                    embedding = hidden_state_embedder(model)({"input_ids": x, "attention_mask": torch.ones_like(x)})
                    alone[int(i)] = (embedding[0].numpy(), ref)

    trainer.add_callback(Verify())
    trainer.train()
    assert len(errors) == 16 and max(errors) < 1e-4, errors
    dfx.dynamics.gather()
    assert len(alone) == 16 and (cache.step >= 0).sum() == 16
    for i, (embedding, loss) in alone.items():  # each row trained once: its visit is the one recomputed
        np.testing.assert_allclose(cache.values[i], embedding, rtol=1e-3, atol=1e-4, err_msg=f"row {i}")
        assert dfx.dynamics.visits[i] == 1 and abs(dfx.dynamics.loss_mean[i] - loss) < 1e-4


def kto_trainer(ds, dfx, out_dir, *, extra, model, compute_loss_func=None, **settings):
    """sft_trainer's twin for KTO (what assert_trainer_resumes_exactly builds), with a fresh reference model."""
    settings = trainer_settings(out_dir, seed=0, **settings)
    trainer = trl.KTOTrainer(
        model=model if model is not None else tiny_model("gpt2", seed=0),
        ref_model=tiny_model("gpt2", seed=0),
        args=trl.KTOConfig(**settings, report_to=[], max_length=64),
        train_dataset=ds,
        processing_class=byte_tokenizer(),
        callbacks=[*extra],
    )
    dfx.attach(trainer)
    return trainer


@pytest.mark.slow  # (9 s) .ci/run runs it
def test_kto_crash_and_resume_is_exact(tmp_path):
    """KTOTrainer under ODM: killed after step 8 and resumed, the example ids of every step, the decisions, the
    log and the model equal the uninterrupted run's (and without dataflex's state the resume is refused)."""
    from datasets import Dataset

    rows = [{k: r[k] for k in ("prompt", "completion", "label", "domain")} for r in preference_rows(30)]
    full, _ = assert_trainer_resumes_exactly(
        lambda allow: DataFlexCallback(ODM(exploration_scale=0.25), update_every=2, allow_missing_state=allow),
        Dataset.from_list(rows),
        tmp_path,
        trainer_factory=kto_trainer,
        log_keys_not_resumed=("num_tokens",),  # TRL restarts this counter on resume (with or without dataflex)
        compare=ran_with_trl_defaults,
    )
    assert full.history[0]["weights"] != full.history[-1]["weights"]  # the mixture moved: decisions were resumed


@pytest.mark.parametrize("kind", ["DPO", "Reward", "GRPO", "ORPO"])
def test_trainers_without_one_loss_per_row_are_refused_by_name(tmp_path, kind):
    from datasets import Dataset
    from transformers import GPT2ForSequenceClassification

    ds = Dataset.from_list([{k: r[k] for k in ("prompt", "chosen", "rejected", "domain")} for r in preference_rows()])
    settings = trainer_settings(tmp_path, accum=1, max_steps=2, save_steps=2, logging_steps=100, workers=0, seed=0)
    if kind == "GRPO":  # rows are prompts; the trainer generates the completions it trains on
        ds = Dataset.from_list([{"prompt": r["prompt"], "domain": r["domain"]} for r in preference_rows(8)])
        settings["per_device_train_batch_size"] = 4
        config = trl.GRPOConfig(**settings, report_to=[], num_generations=2, max_completion_length=4)
        extra = {"reward_funcs": lambda completions, **kwargs: [0.0] * len(completions)}
        model = tiny_model("gpt2", seed=0)
    elif kind == "ORPO":  # TRL keeps it in trl.experimental; not listed when dataflex refused by a list of names
        from trl.experimental.orpo import ORPOConfig, ORPOTrainer

        config, model, extra = ORPOConfig(**settings, report_to=[], max_length=64), tiny_model("gpt2", seed=0), {}
    else:
        config = getattr(trl, f"{kind}Config")(**settings, report_to=[], max_length=64)
    if kind == "DPO":
        model, extra = tiny_model("gpt2", seed=0), {"ref_model": tiny_model("gpt2", seed=0)}
    elif kind == "Reward":
        config_dict = {**tiny_model("gpt2", seed=0).config.to_dict(), "num_labels": 1, "pad_token_id": 256}
        model, extra = GPT2ForSequenceClassification(type(tiny_model("gpt2")).config_class(**config_dict)), {}
    trainer_cls = ORPOTrainer if kind == "ORPO" else getattr(trl, f"{kind}Trainer")
    trainer = trainer_cls(model=model, args=config, train_dataset=ds, processing_class=byte_tokenizer(), **extra)
    DataFlexCallback(Uniform(), trainer=trainer)
    with pytest.raises(ValueError, match=f"does not support TRL's {kind}Trainer: it .* Supported: "):
        trainer.train()


def test_only_the_trl_trainers_checked_with_dataflex_are_accepted():
    """The most derived TRL class decides: TRL's own subclasses of SFTTrainer (GKD, GOLD: distillation on
    generated completions) and trainers dataflex never saw are refused, a user's subclass of SFTTrainer is not."""
    from trl.experimental.gkd import GKDTrainer
    from trl.experimental.gold import GOLDTrainer
    from trl.experimental.online_dpo import OnlineDPOTrainer
    from trl.experimental.tpo.tpo_trainer import TPOTrainer

    from dataflex.hf.adapter import TrainerAdapter

    class MySFTTrainer(trl.SFTTrainer):
        pass

    check = TrainerAdapter._check_trainer_kind  # reads the class only: the instances below are not initialised
    for cls in (MySFTTrainer, trl.SFTTrainer, trl.KTOTrainer):
        check(cls.__new__(cls))
    for cls in (GKDTrainer, GOLDTrainer, OnlineDPOTrainer, trl.DistillationTrainer, TPOTrainer):
        with pytest.raises(ValueError, match=f"does not support TRL's {cls.__name__}: .*Supported: "):
            check(cls.__new__(cls))
    with pytest.raises(ValueError, match="TPOTrainer: dataflex has not been checked with it"):
        check(TPOTrainer.__new__(TPOTrainer))


def llava_processor():
    """A LlavaProcessor for the tiny LLaVA: the byte tokenizer with <image> and a 16x16 grey-image processor."""
    from transformers import CLIPImageProcessor, LlavaProcessor

    from dataflex.testbeds.digits import IMAGE_TOKEN_ID

    tokenizer = byte_tokenizer()
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
    assert tokenizer.convert_tokens_to_ids("<image>") == IMAGE_TOKEN_ID
    images = CLIPImageProcessor(
        size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16}, image_mean=[0.5], image_std=[0.5],
        do_convert_rgb=False,
    )  # fmt: skip
    return LlavaProcessor(
        image_processor=images, tokenizer=tokenizer, patch_size=4, vision_feature_select_strategy="default",
        image_token="<image>", num_additional_image_tokens=1,
    )  # fmt: skip


def image_rows(n: int = 24):
    """``n`` rows of one random grey image and a caption, in 3 domains, as TRL's vision path takes them."""
    from datasets import Dataset
    from PIL import Image

    rng = np.random.default_rng(0)
    rows = [
        {
            "images": [Image.fromarray(rng.integers(0, 255, (16, 16), dtype=np.uint8), mode="L")],
            "text": f"<image>picture {i} shows a {['cat', 'dog', 'bird'][i % 3]}",
            "domain": ["cats", "dogs", "birds"][i % 3],
        }
        for i in range(n)
    ]
    return Dataset.from_list(rows)


VISION_SFT = {"max_length": None, "remove_unused_columns": False}  # SFTConfig settings TRL's vision path needs


def test_sft_vision_collator_scores_the_text_of_each_image_example(tmp_path):
    """TRL's own vision path (processor + DataCollatorForVisionLanguageModeling, images in the dataset): each
    recorded loss is its example's loss over text tokens (TRL leaves the image placeholders in the labels)."""
    from dataflex.testbeds.digits import IMAGE_TOKEN_ID
    from dataflex.testbeds.tiny import tiny_llava

    processor, ds = llava_processor(), image_rows()
    settings = trainer_settings(tmp_path, accum=1, max_steps=4, save_steps=100, logging_steps=100, workers=0, seed=0)
    config = trl.SFTConfig(**settings, report_to=[], **VISION_SFT)
    model = tiny_llava(seed=0)
    trainer = trl.SFTTrainer(model=model, args=config, train_dataset=ds, processing_class=processor)
    dfx = DataFlexCallback(ODM(), update_every=2, trainer=trainer)
    errors: list[float] = []

    class Verify(TrainerCallback):
        def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
            ids, losses, _ = dfx.last_step_records()
            with torch.no_grad():
                for i, loss in zip(ids, losses):
                    row = ds[int(i)]
                    alone = processor(images=row["images"], text=[row["text"]], return_tensors="pt")
                    text = alone["input_ids"].masked_fill(alone["input_ids"] == IMAGE_TOKEN_ID, -100)
                    errors.append(abs(float(model(**alone, labels=text).loss) - float(loss)))

    trainer.add_callback(Verify())
    trainer.train()
    assert len(errors) == 16 and max(errors) < 1e-4, errors


def test_sft_conversations_with_assistant_only_loss_score_the_assistant_turns(tmp_path):
    """A conversational dataset (``messages``) with ``assistant_only_loss=True``: each recorded loss is its row's
    loss over the assistant's tokens only (the chat template's generation block), recomputed alone."""
    from datasets import Dataset

    tokenizer = byte_tokenizer()
    tokenizer.chat_template = (
        "{% for m in messages %}{% if m['role'] == 'assistant' %}{% generation %}{{ m['content'] }}"
        "{% endgeneration %}{% else %}{{ m['role'] }}: {{ m['content'] }}\n{% endif %}{% endfor %}"
    )
    rows = [
        {"messages": [{"role": "user", "content": f"question {i} about {['cats', 'dogs'][i % 2]}"},
                      {"role": "assistant", "content": f"answer {i * 7}"}], "domain": ["cats", "dogs"][i % 2]}
        for i in range(24)
    ]  # fmt: skip
    settings = trainer_settings(tmp_path, accum=1, max_steps=4, save_steps=100, logging_steps=100, workers=0, seed=0)
    config = trl.SFTConfig(**settings, report_to=[], max_length=64, assistant_only_loss=True)
    trainer = trl.SFTTrainer(
        model=tiny_model("gpt2", seed=0), args=config, train_dataset=Dataset.from_list(rows), processing_class=tokenizer
    )
    for i, row in enumerate(trainer.train_dataset):  # TRL's labels hold the assistant's tokens only
        prompt = len(f"user: question {i} about cats\n")
        assert all(t == -100 for t in row["labels"][:prompt]) and -100 not in row["labels"][prompt:]
    dfx = DataFlexCallback(ODM(), update_every=2, trainer=trainer)
    verify = VerifyLosses(dfx)  # each recorded loss against its row alone, over those labels
    verify.trainer = trainer
    trainer.add_callback(verify)
    trainer.train()
    assert verify.checked == 16 and verify.max_err < 1e-4, verify.max_err


@pytest.mark.slow  # 16 s; .ci/run runs it
def test_sft_vision_collator_crash_and_resume_is_exact(tmp_path):
    """TRL's vision path with a processor, crashed after a checkpoint and resumed: same ids, decisions, logs and
    model as the uninterrupted run (gradient checkpointing and bf16 on, as TRL's config defaults)."""
    from dataflex.testbeds.tiny import tiny_llava

    processor, ds = llava_processor(), image_rows()
    assert_trainer_resumes_exactly(
        lambda allow: DataFlexCallback(ODM(), update_every=2, allow_missing_state=allow),
        ds,
        tmp_path,
        trainer_factory=sft_trainer,
        make_model=lambda: tiny_llava(seed=0),
        processing_class=processor,
        log_keys_not_resumed=("num_tokens",),
        compare=ran_with_trl_defaults,
        **VISION_SFT,
    )
