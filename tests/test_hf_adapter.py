"""The Trainer adapter: batch tracking, logging, labels, attach, and exact resume of every decider."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch
from hf_helpers import (
    CrashAt,
    StepRecorder,
    assert_trainer_resumes_exactly,
    comparable_log,
    make_trainer,
    small_dataset,
)
from torch.utils.data import BatchSampler, DataLoader, SequentialSampler
from transformers import Trainer, TrainingArguments

from dataflex import DataFlexCallback, DataFlexCurriculumCallback, DataFlexSelectCallback
from dataflex.batching import LoaderLayout
from dataflex.curriculum import Curriculum, length_difficulty, loss_difficulty
from dataflex.hf.tracking import BatchTracker
from dataflex.policies import ADO, ODM, LawCorrected, Natural, Static, Temperature, Uniform
from dataflex.proxies.doremi import DoReMiOnline
from dataflex.selectors import FixedSubset, Influence, LossFocus, RandomSelection, RhoLoss
from dataflex.testbeds.tiny import collate_causal, tiny_gpt2
from dataflex.weighting import ExampleWeightedLoss


@pytest.fixture(scope="module")
def ds():
    return small_dataset(per_domain=12)  # 36 examples: 9 micro-batches of 4 an epoch


# -- batch tracking, driven by the event sequence a Trainer produces ----------------------------------
def trainer_events(n, batch, accum, workers, drop_last, steps, resume_at=0):
    """Replay what the Trainer does: epochs of micro-batches from a real DataLoader, grouped into optimizer
    steps (the last of an epoch may be short), skipping the batches a resumed run already consumed.
    Yields ("epoch", step), ("step", step), ("micro", positions) and ("done", step, next global index)."""
    loader = DataLoader(list(range(n)), batch_size=batch, drop_last=drop_last, num_workers=workers)
    per_epoch = len(loader)
    updates = -(-per_epoch // accum)
    step = resume_at
    while step < steps:
        epoch = step // updates
        yield ("epoch", step)
        batches = list(loader)[(step - epoch * updates) * accum :]
        for start in range(0, len(batches), accum):
            if step >= steps:
                return
            yield ("step", step)
            group = batches[start : start + accum]
            for b in group:
                yield ("micro", np.asarray(b))
            step += 1
            within = (step - epoch * updates) * accum * batch
            yield ("done", step, epoch * n + within if within < per_epoch * batch else (epoch + 1) * n)


@pytest.mark.parametrize(
    "n,batch,accum,workers,drop_last",
    [(37, 4, 1, 0, False), (37, 4, 2, 2, False), (37, 4, 4, 0, True), (40, 4, 2, 0, True)],
)
def test_batch_tracker_follows_trainer_events(n, batch, accum, workers, drop_last):
    layout = LoaderLayout(
        BatchSampler(SequentialSampler(range(n)), batch, drop_last), None, batch, workers, 2 if workers else 0
    )
    steps = 3 * (-(-(n // batch if drop_last else -(-n // batch)) // accum)) + 1  # three epochs and a bit
    for resume_at in (0, 1, 5):
        tracker = BatchTracker.from_layout(layout, n, accum)
        seen = 0
        for event in trainer_events(n, batch, accum, workers, drop_last, steps, resume_at):
            if event[0] == "epoch":
                tracker.start_epoch(event[1])
            elif event[0] == "step":
                tracker.start_step(event[1])
            elif event[0] == "micro":
                np.testing.assert_array_equal(tracker.take(), event[1])
                seen += 1
            else:
                assert tracker.consumed_samples(event[1]) == min(event[2], (event[2] // n) * n + n)
        assert seen > 0
        # decisions land after anything the DataLoader (workers x prefetch) and the accumulation can hold
        assert tracker.lookahead_samples >= (accum + workers * 2 + 1) * batch
    with pytest.raises(RuntimeError, match="out of sync"):
        tracker.micro = len(tracker.positions)
        tracker.take()


# -- logging never costs the Trainer its own log -------------------------------------------------------
def trainer_log(ds, out, *, logging_steps, update_every, steps, with_dataflex):
    cb = DataFlexCallback(ODM(), update_every=update_every) if with_dataflex else None
    args = TrainingArguments(
        output_dir=str(out),
        per_device_train_batch_size=2,
        max_steps=steps,
        save_strategy="no",
        logging_steps=logging_steps,
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
    )
    model = tiny_gpt2(n_layer=1, n_embd=16, n_head=2, seed=0)
    trainer = Trainer(model=model, args=args, train_dataset=ds, data_collator=collate_causal)
    if cb is not None:
        cb.attach(trainer)
    trainer.train()
    return trainer.state.log_history


@pytest.mark.parametrize(
    "logging_steps,update_every,steps",
    [(4, 4, 12), (2, 4, 12), (3, 4, 12), pytest.param(500, 50, 500, marks=pytest.mark.slow)],  # the defaults: 9 s
)
def test_trainer_keeps_its_own_log_entries(logging_steps, update_every, steps, tmp_path):
    """Same loss/grad_norm/learning_rate entries at the same steps with and without dataflex; dataflex's own at
    every update. The last case is the default settings (logging_steps=500, update_every=50)."""
    ds = small_dataset(per_domain=8, max_len=16)
    stock = trainer_log(
        ds, tmp_path / "a", logging_steps=logging_steps, update_every=update_every, steps=steps, with_dataflex=False
    )
    mixed = trainer_log(
        ds, tmp_path / "b", logging_steps=logging_steps, update_every=update_every, steps=steps, with_dataflex=True
    )

    def shape(log):
        return [(h["step"], sorted(h)) for h in comparable_log(log) if not any(k.startswith("dataflex/") for k in h)]

    assert shape(mixed) == shape(stock)
    assert [h["step"] for h in stock if "loss" in h] == list(range(logging_steps, steps + 1, logging_steps))
    assert [h["step"] for h in mixed if "dataflex/entropy" in h] == list(range(update_every, steps + 1, update_every))


# -- labels follow the dataset the Trainer trains on ----------------------------------------------------
class ShufflingTrainer(Trainer):
    """A trainer that reorders its dataset after the user built it (as TRL's shuffle_dataset=True does)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.train_dataset = self.train_dataset.shuffle(seed=1)


class FilteringTrainer(Trainer):
    """A trainer that drops examples (as TRL does with over-long or fully masked ones)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.train_dataset = self.train_dataset.select(range(len(self.train_dataset) - 5))


def labelled_run(trainer_cls, ds, cb, out, steps=4, model=None, attach=True, **overrides):
    args = TrainingArguments(
        output_dir=str(out),
        per_device_train_batch_size=4,
        max_steps=steps,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        **overrides,
    )
    rec = StepRecorder(cb)
    trainer = trainer_cls(
        model=model if model is not None else tiny_gpt2(n_layer=1, n_embd=16, n_head=2, seed=0),
        args=args,
        train_dataset=ds,
        data_collator=collate_causal,
        callbacks=[rec] if attach else [cb, rec],
    )
    if attach:
        cb.attach(trainer)
    trainer.train()
    return trainer, rec


def test_labels_taken_before_the_trainer_reordered_its_dataset_are_refused(ds, tmp_path):
    cb = DataFlexCallback(Static({"code": 1.0}), domains=ds["domain"])
    with pytest.raises(ValueError, match="reordered or filtered after the labels were taken"):
        labelled_run(ShufflingTrainer, ds, cb, tmp_path)
    cb = DataFlexCallback(Static({"code": 1.0}), domains=ds["domain"])
    with pytest.raises(ValueError, match="got 36 domain labels for a training set of 31"):
        labelled_run(FilteringTrainer, ds, cb, tmp_path)


class OwnSamplerTrainer(Trainer):
    """A Trainer whose own sampler draws only code examples."""

    def _get_train_sampler(self, train_dataset=None):
        from torch.utils.data import WeightedRandomSampler

        weights = [float(d == "code") for d in self.train_dataset["domain"]]
        return WeightedRandomSampler(weights, num_samples=len(weights))


def test_a_sampler_of_the_users_own_is_refused_not_replaced(ds, tmp_path):
    """dataflex replaced whatever sampler the Trainer's DataLoader held: a _get_train_sampler override that drew
    only code trained every domain under Uniform(), its order dropped without a word. Refused, naming it."""
    with pytest.raises(ValueError, match="draws with a WeightedRandomSampler .* dropping its order"):
        labelled_run(OwnSamplerTrainer, ds, DataFlexCallback(Uniform()), tmp_path, steps=1)


def test_several_gpus_in_one_process_are_refused_naming_the_launch_that_works(ds, tmp_path):
    """With several GPUs visible and no distributed launch the Trainer wraps the model in torch.nn.DataParallel,
    whose replicas run the model's forward hooks on threads, one slice of the batch each: the captured losses
    would land on the wrong examples. Refused at train begin. (No GPU here: the Trainer's GPU count is set by
    hand, and on the CPU DataParallel would run the model as is, so without the check this run would train.)"""
    trainer = make_trainer(ds, DataFlexCallback(Uniform()), tmp_path, max_steps=2)
    trainer.args._n_gpu = 2
    with pytest.raises(ValueError, match=r"DataParallel \(2 GPUs in one process\).*torchrun --nproc_per_node 2"):
        trainer.train()
    assert trainer.state.global_step == 0


@pytest.mark.parametrize("split", ["tensor_parallel_model", "context_parallel", "sequence_parallel"])
def test_tensor_context_and_sequence_parallelism_are_refused_naming_the_size(split, ds, tmp_path):
    """Tensor-parallel ranks train the same examples and context/sequence-parallel ranks a slice of each sequence:
    dataflex would count examples twice or score them from part of their tokens. Those layouts need several
    processes with a device mesh, so the run's settings are given by hand to a one-process Trainer, the way a model
    loaded with a tp_plan (``_tp_size``) or TrainingArguments(parallelism_config=...) would carry them."""
    from accelerate.parallelism_config import ParallelismConfig

    trainer = make_trainer(ds, DataFlexCallback(Uniform()), tmp_path, max_steps=2)
    if split == "tensor_parallel_model":
        trainer.model._tp_size, named = 2, "tp_size=2"
    else:
        size = "cp_size" if split == "context_parallel" else "sp_size"
        trainer.args.parallelism_config, named = ParallelismConfig(**{size: 2}), f"{size}=2"
    with pytest.raises(ValueError, match=rf"the sequence over ranks \({named}\).*data parallelism only"):
        trainer.train()
    assert trainer.state.global_step == 0


def test_labels_follow_the_trainers_own_column(ds, tmp_path):
    """Without domains=, labels come from trainer.train_dataset (which keeps the column the Trainer drops
    from its DataLoader's copy), so a shuffled dataset still trains on the intended domain only."""
    cb = DataFlexCallback(Static({"code": 1.0}))
    trainer, rec = labelled_run(ShufflingTrainer, ds, cb, tmp_path)
    assert trainer.args.remove_unused_columns
    trained = {trainer.train_dataset[i]["domain"] for ids in rec.ids.values() for i in ids}
    assert trained == {"code"}
    assert sum(len(v) for v in rec.ids.values()) == 16


def test_labels_of_a_dataset_tokenised_on_the_fly_come_from_its_stored_column(tmp_path):
    """A dataset with a format transform (set_transform: tokenising as rows are read) gives only the transform's
    output, also to a column read, so reading its domain column raised KeyError; dataflex reads the stored
    column, and the mixture trains on the domain it names."""
    from datasets import Dataset

    from dataflex.testbeds.tiny import encode_bytes

    rows = small_dataset(per_domain=12).select_columns(["domain"]).to_list()
    raw = Dataset.from_list([{"text": f"{r['domain']} row {i}", **r} for i, r in enumerate(rows)])
    stored = list(raw["domain"])
    raw.set_transform(lambda batch: {"input_ids": [encode_bytes(t, 24) for t in batch["text"]]})
    with pytest.raises(KeyError):
        list(raw["domain"])  # what a plain column read gives
    for given in (None, stored):
        cb = DataFlexCallback(Static({"code": 1.0}), domains=given)
        args = dict(remove_unused_columns=False)  # the transform needs its "text" column
        trainer, rec = labelled_run(Trainer, raw, cb, tmp_path / str(given is None), **args)
        assert {stored[i] for ids in rec.ids.values() for i in ids} == {"code"}


def test_labels_without_a_column_to_check_warn(ds, tmp_path):
    cb = DataFlexCallback(Uniform(), domains=ds["domain"])
    with pytest.warns(UserWarning, match="cannot check that the labels"):
        labelled_run(Trainer, ds.rename_column("domain", "source"), cb, tmp_path, steps=1)
    cb = DataFlexCallback(Uniform(), domains=ds["domain"], domain_column=None)  # stated: there is no column
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        labelled_run(Trainer, ds.rename_column("domain", "source"), cb, tmp_path, steps=1)


# -- models whose labels are not the next tokens ------------------------------------------------------------
def not_next_token_model(kind: str):
    """A tiny transformers model, seeded, whose labels are not next tokens: encoder-decoder or another head."""
    import transformers as tf

    torch.manual_seed(0)
    sizes = dict(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=16, vocab_size=300)
    bert = tf.BertConfig(**sizes)
    if kind == "t5":
        config = tf.T5Config(
            d_model=16, d_ff=32, num_layers=1, num_heads=2, d_kv=8, vocab_size=300, decoder_start_token_id=0
        )
        return tf.T5ForConditionalGeneration(config)
    if kind == "bart":
        sizes = dict(encoder_layers=1, decoder_layers=1, encoder_attention_heads=2, decoder_attention_heads=2)
        config = tf.BartConfig(d_model=16, encoder_ffn_dim=16, decoder_ffn_dim=16, vocab_size=300, **sizes)
        return tf.BartForConditionalGeneration(config)
    return {"masked_lm": tf.BertForMaskedLM, "token_classification": tf.BertForTokenClassification}[kind](bert)


@pytest.mark.parametrize(
    "kind, why",
    [
        ("t5", "is an encoder-decoder model"),
        ("bart", "is an encoder-decoder model"),
        ("masked_lm", "has a ForMaskedLM head"),
        ("token_classification", "has a ForTokenClassification head"),
    ],
)
def test_models_whose_labels_are_not_next_tokens_are_refused(kind, why, ds, tmp_path):
    """Every loss dataflex computes shifts the labels by one (position t predicts label t + 1). A T5 or BART
    decoder predicts label t at t and a masked LM or a tagger scores labels of its own kind: dataflex used to
    train them, record losses against the wrong tokens and decide on those without a word (and a reweighted
    loss trained on them). Each entry point that scores or trains a model now refuses one, naming it."""
    from dataflex.influence import GradientFeaturizer
    from dataflex.offline import token_mean_losses
    from dataflex.token_weighting import reference_token_losses
    from proxies.loop import train_mixture

    model = not_next_token_model(kind)
    named = f"{type(model).__name__} {why}"
    with pytest.raises(ValueError, match=named):
        labelled_run(Trainer, ds, DataFlexCallback(Uniform()), tmp_path, steps=1, model=model)
    with pytest.raises(ValueError, match=named):
        token_mean_losses(model)
    with pytest.raises(ValueError, match=named):
        GradientFeaturizer(model, {})
    with pytest.raises(ValueError, match=named):
        reference_token_losses(model, ds, collate_causal)
    names = sorted(set(ds["domain"]))
    ids = np.array([names.index(d) for d in ds["domain"]])
    with pytest.raises(ValueError, match=named):
        train_mixture(model, ds, ids, names, Uniform(), collate=collate_causal, steps=1, batch_size=4, lr=1e-3, seed=0)
    if "encoder-decoder" in why:  # a loss given as compute_loss_func sees the output only, which says it
        outputs = model(**collate_causal([ds[0], ds[1]]))
        with pytest.raises(ValueError, match="holds an encoder's last hidden state"):
            ExampleWeightedLoss()(outputs, collate_causal([ds[0], ds[1]])["labels"])


def test_causal_models_and_their_wrappers_pass_the_next_token_check():
    from peft import LoraConfig, get_peft_model

    from dataflex.losses import causal_lm_problem
    from dataflex.testbeds.tiny import tiny_llama, tiny_llava

    gpt2 = tiny_gpt2(n_layer=1, n_embd=16, n_head=2, seed=0)
    models = [gpt2, tiny_llama(n_layer=1, hidden=16, n_head=2), tiny_llava(), torch.compile(gpt2)]
    models += [torch.nn.DataParallel(gpt2), get_peft_model(gpt2, LoraConfig(r=2, target_modules=["c_attn"]))]
    assert [causal_lm_problem(m) for m in models] == [None] * len(models)
    t5 = get_peft_model(not_next_token_model("t5"), LoraConfig(r=2, target_modules=["q", "v"]))
    assert "T5ForConditionalGeneration is an encoder-decoder model" in causal_lm_problem(t5)  # seen through LoRA


# -- the Trainer, explicitly ----------------------------------------------------------------------------
def test_trainer_argument_attach_and_the_stack_fallback(ds, tmp_path):
    args = TrainingArguments(
        output_dir=str(tmp_path),
        per_device_train_batch_size=4,
        max_steps=2,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
    )
    model = tiny_gpt2(n_layer=1, n_embd=16, n_head=2, seed=0)
    trainer = Trainer(model=model, args=args, train_dataset=ds, data_collator=collate_causal)
    cb = DataFlexCallback(Uniform(), update_every=1, trainer=trainer)  # TRL's style: the callback takes the trainer
    assert sum(c is cb for c in trainer.callback_handler.callbacks) == 1
    cb.attach(trainer)  # attaching again does not add it twice
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        trainer.train()
    assert any("dataflex/entropy" in h for h in trainer.state.log_history)

    fallback = DataFlexCallback(Uniform(), update_every=1)
    trainer = Trainer(model=model, args=args, train_dataset=ds, data_collator=collate_causal, callbacks=[fallback])
    with pytest.warns(UserWarning, match="not attached to its Trainer") as caught:
        trainer.train()
    assert sum("not attached" in str(w.message) for w in caught) == 1
    assert any("dataflex/entropy" in h for h in trainer.state.log_history)

    twice = DataFlexCallback(Uniform())
    trainer = Trainer(model=model, args=args, train_dataset=ds, data_collator=collate_causal, callbacks=[twice])
    trainer.add_callback(twice)
    twice.attach(trainer)
    with pytest.raises(RuntimeError, match="added to the Trainer twice"):
        trainer.train()
    # two dataflex callbacks would each install a sampler, the last silently replacing the other's
    mixing, selecting = DataFlexCallback(Uniform()), DataFlexSelectCallback(LossFocus(0.5), update_every=2)
    trainer = Trainer(model=model, args=args, train_dataset=ds, data_collator=collate_causal, callbacks=[selecting])
    mixing.attach(trainer)
    with pytest.raises(ValueError, match=r"2 dataflex callbacks \(DataFlexSelectCallback, DataFlexCallback\)"):
        trainer.train()
    with pytest.raises(TypeError, match="needs a transformers.Trainer"):
        DataFlexCallback(Uniform()).attach(object())


def test_a_callback_reused_for_a_second_trainer_follows_that_trainer(ds, tmp_path):
    """One callback object in two Trainers one after the other (a loop over seeds or datasets): found on the call
    stack, it kept the first Trainer, so the second run took its labels from the first one's dataset (a shuffled
    copy trained Static({"code": 1}) on every domain), and would have logged into the first one's history and
    resumed from the first one's checkpoint. Each run now follows the Trainer that runs it; attached to another, it
    refuses."""
    cb = DataFlexCallback(Static({"code": 1.0}))
    for k, data in enumerate([ds, ds.shuffle(seed=1)]):
        with pytest.warns(UserWarning, match="not attached to its Trainer"):
            trainer, rec = labelled_run(Trainer, data, cb, tmp_path / str(k), steps=3, attach=False)
        assert {data[i]["domain"] for ids in rec.ids.values() for i in ids} == {"code"}
    args = TrainingArguments(output_dir=str(tmp_path / "two"), use_cpu=True, report_to=[], disable_tqdm=True)
    first, second = (
        Trainer(
            model=tiny_gpt2(n_layer=1, n_embd=16, n_head=2), args=args, train_dataset=ds, data_collator=collate_causal
        )
        for _ in range(2)
    )
    cb = DataFlexCallback(Uniform(), trainer=first)
    second.add_callback(cb)
    with pytest.raises(ValueError, match="attached to another Trainer than the one now training"):
        second.train()


def test_a_checkpoint_of_another_policy_is_refused(ds, tmp_path):
    make_trainer(ds, DataFlexCallback(ODM(), update_every=2), tmp_path, max_steps=4, save_steps=4).train()
    cb = DataFlexCallback(Uniform(), update_every=2)
    with pytest.raises(ValueError, match="the checkpoint's mixing policy is 'dataflex.policies.odm.ODM'"):
        make_trainer(ds, cb, tmp_path, max_steps=6).train(resume_from_checkpoint=str(tmp_path / "checkpoint-4"))


def test_a_checkpoint_made_with_other_settings_is_refused_naming_them(ds, tmp_path):
    """A Static mixture resumed with other weights went on training on the saved weights (the restored schedule)
    and logging them, ignoring the new ones without a word; another knob, cadence or warm-up likewise decided
    nothing or decided under another rule. Refused, naming each difference (another seed
    or replacement was refused before: the sampler's order would differ)."""
    code_only = {"code": 1.0, "literature": 0.0, "trivia": 0.0}
    make_trainer(ds, DataFlexCallback(Static(code_only), update_every=2), tmp_path, max_steps=4, save_steps=4).train()
    checkpoint = str(tmp_path / "checkpoint-4")
    for cb, named in (
        (DataFlexCallback(Static({**code_only, "code": 0.0, "trivia": 1.0}), update_every=2),
         r"decider.policy.weights.code: 1.0 there, 0.0 now; decider.policy.weights.trivia: 0.0 there, 1.0 now"),
        (DataFlexCallback(Static(code_only), update_every=4), r"update_every: 2 there, 4 now"),
        (DataFlexCallback(Static(code_only), update_every=2, warmup_steps=2), r"warmup_steps: 0 there, 2 now"),
    ):  # fmt: skip
        steps = StepRecorder(cb)
        with pytest.raises(
            ValueError, match=r"checkpoint-4/dataflex/dataflex_state.json cannot be resumed: .*" + named
        ):
            make_trainer(ds, cb, tmp_path, max_steps=6, extra=[steps]).train(resume_from_checkpoint=checkpoint)
        assert steps.ids == {}
    cb = DataFlexCallback(Static(dict(code_only)), update_every=2)  # the same settings, built anew: resumes
    make_trainer(ds, cb, tmp_path, max_steps=6).train(resume_from_checkpoint=checkpoint)
    assert [h["weights"] for h in cb.history] == [[1.0, 0.0, 0.0]] * len(cb.history)
    # Kept to a few kB in the state: an influence selector's target examples by their digest; the scoring batch
    # size (memory, not the result) is not compared.
    target = [{"input_ids": list(range(200))}] * 50
    settings = DataFlexSelectCallback(Influence(0.5, target=target), update_every=2)._decision_settings()
    assert len(json.dumps(settings)) < 2000 and settings["decider"]["selector"]["target"]["json_chars"] > 10_000
    assert "score_batch_size" not in settings["decider"]


def test_resume_from_checkpoint_true_uses_the_newest_checkpoint(ds, tmp_path):
    """``train(resume_from_checkpoint=True)``: dataflex restores from the folder the Trainer picked."""
    full = DataFlexCallback(ODM(), update_every=2)
    make_trainer(ds, full, tmp_path / "full", max_steps=8, save_steps=2).train()
    try:
        make_trainer(
            ds,
            DataFlexCallback(ODM(), update_every=2),
            tmp_path / "crash",
            max_steps=8,
            save_steps=2,
            extra=[CrashAt(6)],
        ).train()
    except KeyboardInterrupt:
        pass
    resumed = DataFlexCallback(ODM(), update_every=2)
    make_trainer(ds, resumed, tmp_path / "crash", max_steps=8, save_steps=2).train(resume_from_checkpoint=True)
    assert resumed.history == full.history and len(full.history) == 5


# -- every decider resumes exactly through the Trainer ----------------------------------------------
def lora_model():
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn"], lora_dropout=0.0)
    torch.manual_seed(0)  # LoRA's A matrices are drawn from the global generator
    return get_peft_model(tiny_gpt2(n_layer=1, n_embd=32, n_head=2, seed=0), config)


def doremi_online():
    return DoReMiOnline(
        tiny_gpt2(n_layer=1, n_embd=32, n_head=2, seed=1),
        tiny_gpt2(n_layer=1, n_embd=32, n_head=2, seed=2),
        use_average=False,
    )


def prepared_doremi_online(work_dir, ds):
    from dataflex.domains import encode_domains
    from dataflex.proxies.doremi import PreparedDoReMiOnline

    def make():
        policy = PreparedDoReMiOnline(reference_steps=3, use_average=False)
        ids, names = encode_domains(ds["domain"])
        make_model = lambda: tiny_gpt2(n_layer=1, n_embd=32, n_head=2, seed=3)  # noqa: E731
        policy.prepare(
            make_model,
            ds,
            ids,
            names,
            work_dir,
            {"collate": collate_causal, "steps": 3, "batch_size": 4, "lr": 1e-3, "seed": 0, "progress": False},
        )
        return policy

    return make


def law_corrected():
    return LawCorrected(
        {"code": 0.5, "literature": 0.3, "trivia": 0.2}, {"code": 3.0, "literature": 3.0, "trivia": 3.0}, radius=0.3
    )


def deciders(ds, work_dir):
    """name -> (make_callback(allow_missing_state), accumulation, workers, make_model, make_loss)."""
    code = [ds[i] for i in range(len(ds)) if ds[i]["domain"] == "code"][:4]
    mix = lambda policy: lambda allow: DataFlexCallback(policy(), update_every=2, allow_missing_state=allow)  # noqa: E731

    def sel(selector):
        return lambda allow: DataFlexSelectCallback(selector(), update_every=3, allow_missing_state=allow)

    lengths = length_difficulty(ds)
    return {
        "uniform": (mix(Uniform), 1, 0, None, None),
        "natural": (mix(Natural), 2, 2, None, None),
        "temperature": (mix(lambda: Temperature(3.0)), 1, 2, None, None),
        "static": (mix(lambda: Static({"code": 0.6, "literature": 0.3, "trivia": 0.1})), 2, 0, None, None),
        "odm": (mix(ODM), 2, 2, None, None),
        "law_corrected": (mix(law_corrected), 1, 0, None, None),
        "ado": (mix(lambda: ADO(warmup_updates=3)), 1, 0, None, None),
        "doremi_online": (mix(doremi_online), 2, 0, None, None),
        "prepared_doremi_online": (mix(prepared_doremi_online(work_dir / "doremi", ds)), 1, 0, None, None),
        "loss_focus": (sel(lambda: LossFocus(0.5, "hard", history="mean")), 1, 2, None, None),
        "rho_loss": (sel(lambda: RhoLoss(0.5, np.linspace(0, 2, len(ds)))), 2, 0, None, None),
        "influence": (sel(lambda: Influence(0.5, code, mode="less", dim=64)), 1, 0, lora_model, None),
        "random": (sel(lambda: RandomSelection(0.5)), 2, 2, None, None),
        "fixed_subset": (sel(lambda: FixedSubset(np.arange(0, 36, 2))), 1, 0, None, None),
        "curriculum": (
            lambda allow: DataFlexCurriculumCallback(
                Curriculum(lengths, pacing="linear", c0=0.3), allow_missing_state=allow
            ),
            2,
            2,
            None,
            None,
        ),
        "curriculum_rescored": (
            lambda allow: DataFlexCurriculumCallback(
                Curriculum(scorer=loss_difficulty(16), pacing="root", c0=0.3),
                rescore_every=4,
                allow_missing_state=allow,
            ),
            1,
            0,
            None,
            None,
        ),
        "loss_reweighting": (
            mix(Uniform),
            2,
            0,
            None,
            lambda cb: cb.wrap_loss(ExampleWeightedLoss(gradient_accumulation_steps=2)),
        ),
    }


DECIDERS = [
    "uniform",
    "natural",
    "temperature",
    "static",
    "odm",
    "law_corrected",
    "ado",
    "doremi_online",
    "prepared_doremi_online",
    "loss_focus",
    "rho_loss",
    "influence",
    "random",
    "fixed_subset",
    "curriculum",
    "curriculum_rescored",
    "loss_reweighting",
]


@pytest.mark.parametrize("name", DECIDERS)
def test_every_decider_resumes_exactly_through_the_trainer(name, ds, tmp_path):
    if name == "influence":
        pytest.importorskip("peft")
    make_callback, accum, workers, make_model, make_loss = deciders(ds, tmp_path)[name]
    # A fixed curriculum's order is a pure function of seed, difficulty and pacing: with its state
    # dropped, a forced resume must give the very same run.
    full, records = assert_trainer_resumes_exactly(
        make_callback,
        ds,
        tmp_path,
        accum=accum,
        workers=workers,
        make_model=make_model,
        make_loss=make_loss,
        forced_differs=name != "curriculum",
    )
    assert len(full.history) > 1 or name == "curriculum"  # decisions were taken (and compared)
    if name in ("doremi_online", "prepared_doremi_online"):  # one proxy step per micro-batch, restored on resume
        assert full.policy.steps == sum(len(ids) for ids in records.ids.values()) // 4


def test_doremi_online_proxy_resumes_bit_exact(ds, tmp_path):
    """The proxy's parameters and optimizer are saved beside the JSON state and restored on resume."""
    runs = {}
    for name, crash in (("full", None), ("crash", 4)):
        cb = DataFlexCallback(doremi_online(), update_every=2)
        extra = [CrashAt(crash)] if crash else []
        try:
            make_trainer(ds, cb, tmp_path / name, max_steps=8, extra=extra).train()
        except KeyboardInterrupt:
            pass
        runs[name] = cb
    assert (tmp_path / "crash" / "checkpoint-4" / "dataflex" / "dataflex_state.pt").is_file()
    resumed = DataFlexCallback(doremi_online(), update_every=2)
    make_trainer(ds, resumed, tmp_path / "crash", max_steps=8).train(str(tmp_path / "crash" / "checkpoint-4"))
    full = runs["full"].policy
    for k, v in full.proxy.state_dict().items():
        assert torch.equal(v, resumed.policy.proxy.state_dict()[k]), k
    np.testing.assert_array_equal(full.alpha, resumed.policy.alpha)


@pytest.mark.parametrize(
    "settings",
    [
        {"dataloader_drop_last": True},
        {"gradient_checkpointing": True},
        {"bf16": True},
        {"eval_strategy": "steps", "eval_steps": 2},
        {"num_train_epochs": 2, "max_steps": -1},
    ],
)
def test_trainer_settings_users_combine_with_dataflex(settings, tmp_path):
    """Drop-last, gradient checkpointing, bf16 autocast on CPU, evaluation during training and epoch-based runs:
    one record per trained example, evaluation forwards never counted, decisions taken."""
    ds = small_dataset(per_domain=6, max_len=32)  # 18 examples: 4 full batches + 2 (dropped with drop_last)
    dfx = DataFlexCallback(ODM(), update_every=2)
    rec = StepRecorder(dfx)
    evaluation = ds.select(range(8)) if "eval_strategy" in settings else None
    trainer = make_trainer(
        ds,
        dfx,
        tmp_path,
        max_steps=settings.pop("max_steps", 6),
        save_steps=100,
        extra=[rec],
        eval_dataset=evaluation,
        **settings,
    )
    trainer.train()
    if evaluation is not None:
        assert any("eval_loss" in h for h in trainer.state.log_history)
    sizes = [len(v) for v in rec.ids.values()]
    assert sizes and all(n in (4, 2) for n in sizes)
    if settings.get("dataloader_drop_last"):
        assert all(n == 4 for n in sizes)
    if "num_train_epochs" in settings:
        assert sum(sizes) == 2 * len(ds)
    assert len(dfx.history) > 1 and np.isfinite(dfx.last_step_records()[1]).all()


def test_a_retry_with_a_smaller_batch_starts_a_new_decision_history(ds, tmp_path):
    """auto_find_batch_size: after an out-of-memory error the Trainer runs its loop again with half the batch,
    calling on_train_begin again. The failed attempt's decisions must not stay in the history: they did not
    happen in the run that continues, and a checkpoint holding them could not be resumed (the history no
    longer matches the schedule). Simulated here by raising the error the Trainer recognises, after a decision."""
    from hf_helpers import OutOfMemoryOnce

    def run(folder, resume=None, **overrides):
        cb = DataFlexCallback(ODM(), update_every=2)
        rec = StepRecorder(cb)
        trainer = make_trainer(
            ds, cb, folder, max_steps=8, save_steps=4, extra=[rec, *overrides.pop("extra", [])], **overrides
        )
        trainer.train(resume_from_checkpoint=resume)
        return cb, rec, trainer

    retried, retried_rec, trainer = run(tmp_path / "retried", auto_find_batch_size=True, extra=[OutOfMemoryOnce()])
    smaller = trainer._train_batch_size
    assert smaller < 4  # the Trainer's retry took a smaller batch (transformers 5: 90 % of it)
    fresh, fresh_rec, _ = run(tmp_path / "fresh", per_device_train_batch_size=smaller)
    assert retried_rec.ids == fresh_rec.ids
    # the same decision points (the weights differ a little: the failed attempt trained the model for 2 steps)
    assert [(h["step"], h["effective_at"]) for h in retried.history] == [
        (h["step"], h["effective_at"]) for h in fresh.history
    ]
    resumed, _, _ = run(
        tmp_path / "retried", resume=str(tmp_path / "retried" / "checkpoint-4"), per_device_train_batch_size=smaller
    )
    assert resumed.history == retried.history


def test_a_new_training_run_starts_with_an_empty_embedding_cache(ds, tmp_path):
    """A second train() (or a retry at a smaller batch) is a new run: the cache kept the earlier run's embeddings,
    of a model the new run no longer has and stamped with that run's steps, for every example it did not retrain."""
    from dataflex.embeddings import EmbeddingCache

    cache = EmbeddingCache(len(ds))
    trainer = make_trainer(ds, DataFlexCallback(Uniform(), embeddings=cache), tmp_path, max_steps=6, save_steps=100)
    trainer.train()
    assert cache.filled.sum() == 24
    trainer.args.max_steps = 1
    trainer.train()
    assert cache.filled.sum() == 4 and set(cache.step[cache.filled].tolist()) == {0}


def test_gradient_checkpointing_changes_no_record(ds, tmp_path):
    """With gradient_checkpointing=True the blocks run their forward again inside backward; the per-example
    losses, the training-dynamics record and the embeddings are taken once per training forward, so every record
    equals the run without it (ids, visits, loss statistics, embeddings and their steps, decisions)."""
    from dataflex.embeddings import EmbeddingCache

    def run(folder, **overrides):
        cb = DataFlexCallback(ODM(), update_every=2, dynamics=True, embeddings=EmbeddingCache(len(ds)))
        rec = StepRecorder(cb)
        make_trainer(ds, cb, folder, max_steps=6, save_steps=100, extra=[rec], arch="llama", **overrides).train()
        return cb, rec

    plain, plain_rec = run(tmp_path / "plain")
    checkpointed, checkpointed_rec = run(tmp_path / "checkpointed", gradient_checkpointing=True)
    assert checkpointed_rec.ids == plain_rec.ids and checkpointed.history == plain.history
    assert np.array_equal(checkpointed.dynamics.visits, plain.dynamics.visits) and plain.dynamics.visits.sum() == 24
    assert np.allclose(checkpointed.dynamics.loss_mean, plain.dynamics.loss_mean, equal_nan=True, rtol=0, atol=1e-6)
    assert np.array_equal(checkpointed.embeddings.step, plain.embeddings.step)
    assert np.allclose(checkpointed.embeddings.values, plain.embeddings.values, equal_nan=True, rtol=0, atol=1e-6)
