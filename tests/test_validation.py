"""Bad labels, bad state and resumes under other batch settings: refused with the value named."""

from __future__ import annotations

import json
import shutil
import warnings

import numpy as np
import pytest
import torch
from conftest import changed_digit, unsigned
from hf_helpers import make_trainer, small_dataset
from transformers import TrainerCallback

from dataflex import DataFlexCallback, DataFlexCurriculumCallback
from dataflex.curriculum import Curriculum
from dataflex.detectors import DropNoisy
from dataflex.domains import encode_domains, label_texts
from dataflex.policies import ODM, Uniform
from dataflex.samplers import DomainMixtureSampler
from dataflex.schedule import WeightSchedule
from dataflex.state import read_json


@pytest.fixture(scope="module")
def ds():
    return small_dataset(per_domain=12)


@pytest.mark.parametrize(
    "labels,message",
    [
        (["a", None, "b", None], r"missing \(None or NaN\) at 2 of 4 examples, first at positions \[1, 3\]"),
        (["a", float("nan"), "b"], r"missing \(None or NaN\) at 1 of 3 examples, first at positions \[1\]"),
        (["a", np.float32("nan")], r"positions \[1\]"),
        ([1, "1", 2], r"1 \(int\) and '1' \(str\) both read as '1'"),
        ([True, "True"], r"True \(bool\) and 'True' \(str\)"),
        (["a", "", "b", "  "], r"empty or blank at 2 of 4 examples, first at positions \[1, 3\]"),
        (
            ["code", "code ", "math", "\tmath"],
            r"differ only by surrounding whitespace: \[\['\\tmath', 'math'\], \['code', 'code '\]\]",
        ),
        # several tags per example would make every combination a domain
        ([["code"], ["code", "math"]], r"one value per example .* 2 of 2 are lists, first at position 0: \['code'\]"),
        (["a", {"d": "b"}], r"1 of 2 are dicts, first at position 1"),
        # equal to Python, two domains by their text
        ([1, 1.0, 2], r"equal values that print differently: \[\['1', '1.0'\]\]"),
        ([1, True], r"equal values that print differently: \[\['1', 'True'\]\]"),
        # composed and decomposed é print alike
        (["caf\u00e9", "cafe\u0301", "b"], r"differ only in Unicode normalisation: .*cafe\\\\u0301.*caf\\\\xe9"),
    ],
)
def test_labels_that_text_would_distort_are_refused(labels, message):
    with pytest.raises(ValueError, match=message):
        encode_domains(labels)


def test_labels_that_differ_only_in_case_warn_and_stay_separate():
    with pytest.warns(UserWarning, match=r"differ only in case: \[\['CODE', 'code'\]\]"):
        ids, names = encode_domains(["code", "CODE", "math"])
    assert names == ["CODE", "code", "math"] and ids.tolist() == [1, 0, 2]


def test_labels_of_equal_value_and_different_types_are_one_domain():
    assert label_texts(["a", np.str_("a"), "b"]) == ["a", "a", "b"]
    ids, names = encode_domains([1, np.int64(1), 2])
    assert names == ["1", "2"] and ids.tolist() == [0, 0, 1]


def one_domain_sampler(seed):
    return DomainMixtureSampler(np.zeros(4, np.int64), WeightSchedule(["a"], [1.0]), seed=seed)


@pytest.mark.parametrize(
    "make,message",
    [
        # a truthy string would have switched the option on: "no", "false"
        (lambda: DataFlexCallback(ODM(), replacement="no"), r"replacement must be True or False; got 'no' \(str\)"),
        (lambda: DataFlexCallback(ODM(), stratified="false"), r"stratified must be True or False"),
        (lambda: DataFlexCallback(ODM(), dynamics="true"), r"dynamics must be True or False"),
        (lambda: DataFlexCallback(ODM(), check_ids="false"), r"check_ids must be True or False"),
        (lambda: Curriculum(np.arange(10.0), reverse="no"), r"reverse must be True or False; got 'no'"),
        # refused only once training started, or with a TypeError that named nothing
        (lambda: DataFlexCallback(ODM(), when_exhausted="loop"), r"when_exhausted='loop'; valid values are"),
        (lambda: DataFlexCallback(ODM(), seed="1"), r"seed must be an integer; got '1' \(str\)"),
        # numpy refused a negative seed at the first draw, naming neither; 1.5 was silently read as 1
        (lambda: DataFlexCallback(ODM(), seed=-1), r"seed must be an integer >= 0; got -1"),
        (lambda: one_domain_sampler(seed=1.5), r"seed must be an integer; got 1\.5"),
        (lambda: one_domain_sampler(seed=-2), r"seed must be an integer >= 0; got -2"),
        # a bool is an int to Python: update_every=True would have meant every step
        (lambda: DataFlexCallback(ODM(), update_every=True), r"update_every must be a positive integer; got True"),
        (lambda: DataFlexCallback(ODM(), warmup_steps=False), r"warmup_steps must be an integer >= 0; got False"),
        (
            lambda: DataFlexCurriculumCallback(Curriculum(scorer=lambda *a: None), rescore_every="5"),
            r"rescore_every must be an integer; got '5'",
        ),
        (
            lambda: DataFlexCurriculumCallback(Curriculum(np.arange(10.0)), horizon_steps="100"),
            r"horizon_steps must be",
        ),
        (lambda: Curriculum(np.arange(10.0), c0="0.1"), r"c0 must be a number; got '0.1'"),
        (lambda: DropNoisy("aum", drop="0.3"), r"drop must be a number; got '0.3'"),
    ],
)
def test_callback_settings_of_the_wrong_type_are_refused_when_made(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_a_label_column_with_one_value_per_example_warns_that_it_is_not_domains(ds, tmp_path):
    """Given the wrong column (an id, the text) as domains, the mixture would be over one-example "domains":
    a warning says so; real domains (3 here) do not warn."""
    ids = ds.remove_columns("domain").add_column("domain", [f"row-{i}" for i in range(len(ds))])
    n = len(ds)
    with pytest.warns(UserWarning, match=rf"{n} distinct values for {n} examples .*looks like a per-example column"):
        make_trainer(ids, DataFlexCallback(Uniform()), tmp_path / "ids", max_steps=1).train()
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*per-example column")
        make_trainer(ds, DataFlexCallback(Uniform()), tmp_path / "domains", max_steps=1).train()


def test_trainer_refuses_a_domain_column_with_missing_labels(ds, tmp_path):
    domains = list(ds["domain"])
    domains[5] = None
    bad = ds.remove_columns("domain").add_column("domain", domains)
    with pytest.raises(ValueError, match=r"the 'domain' labels are missing .* positions \[5\]"):
        make_trainer(bad, DataFlexCallback(Uniform()), tmp_path, max_steps=1).train()


def test_resume_with_other_batch_settings_is_refused_naming_both(ds, tmp_path):
    make_trainer(ds, DataFlexCallback(ODM(), update_every=2), tmp_path, max_steps=4, save_steps=4).train()
    ckpt = tmp_path / "checkpoint-4"
    before, after = "gradient accumulation 1 but this run", "gradient accumulation 2"
    with pytest.raises(ValueError, match=rf"1 process\(es\) x per-device batch 4 x {before} has .* {after}"):
        make_trainer(ds, DataFlexCallback(ODM(), update_every=2), tmp_path, max_steps=8, accum=2).train(str(ckpt))
    # ignore_data_skip=True: the Trainer would restart the epoch instead of skipping the trained batches
    with pytest.raises(ValueError, match=r"ignore_data_skip=True: .*step 4.*repeat examples"):
        make_trainer(ds, DataFlexCallback(ODM(), update_every=2), tmp_path, max_steps=8, ignore_data_skip=True).train(
            str(ckpt)
        )
    state_file = ckpt / "dataflex" / "dataflex_state.json"
    state = json.loads(state_file.read_text())
    state["batching"]["world_size"] = 2  # as if written by a 2-process run
    state_file.write_text(json.dumps(unsigned(state)))
    with pytest.raises(ValueError, match=r"written with 2 process\(es\).*this run has 1 process\(es\)"):
        make_trainer(ds, DataFlexCallback(ODM(), update_every=2), tmp_path, max_steps=8).train(str(ckpt))


class PoisonParameters(TrainerCallback):
    """Sets one weight to NaN before step ``at`` (as a diverged run would)."""

    def __init__(self, at: int) -> None:
        self.at = at

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        if state.global_step == self.at:
            with torch.no_grad():
                model.transformer.wte.weight[3, 0] = float("nan")


def test_no_signal_is_warned_once_per_condition(ds, tmp_path):
    import dataflex.testbeds.tiny as tiny

    def collate_masking_most(features):
        batch = tiny.collate_causal(features)
        batch["labels"][1:, :] = -100  # 3 of 4 examples have no label token
        return batch

    dfx = DataFlexCallback(ODM(), update_every=1)
    trainer = make_trainer(ds, dfx, tmp_path / "masked", max_steps=4, save_steps=100)
    trainer.data_collator = collate_masking_most
    with pytest.warns(UserWarning, match="3 of 4 examples had no label token") as caught:
        trainer.train()
    assert sum("no label token" in str(w.message) for w in caught) == 1

    dfx = DataFlexCallback(ODM(), update_every=1)
    trainer = make_trainer(ds, dfx, tmp_path / "nan", max_steps=4, save_steps=100, extra=[PoisonParameters(2)])
    with pytest.warns(UserWarning, match="parameters are not finite \\(first: transformer.wte.weight\\)") as caught:
        trainer.train()
    assert sum("had a NaN/Inf loss" in str(w.message) for w in caught) == 1
    assert all(np.isfinite(h["weights"]).all() for h in dfx.history)


def _corrupt(edit):
    def apply(state):
        edit(state)
        return unsigned(state)

    return apply


BAD_STATES = {
    "negative weight": (
        _corrupt(lambda s: s["sampler"]["schedule"]["events"][1].__setitem__(1, [1.2, -0.1, -0.1])),
        r"saved schedule weights \(event 1\) must be >= 0",
    ),
    "unnormalised weights": (
        _corrupt(lambda s: s["sampler"]["schedule"]["events"][1].__setitem__(1, [0.5, 0.5, 0.5])),
        r"saved schedule weights \(event 1\) must sum to 1",
    ),
    "unsorted events": (
        _corrupt(lambda s: s["sampler"]["schedule"]["events"].reverse()),
        r"must begin at 0 and increase strictly",
    ),
    "truncated history": (
        _corrupt(lambda s: s["history"].pop()),
        r"decision history \(2 entries\) does not match the sampler's schedule",
    ),
    "NaN reward": (
        _corrupt(lambda s: s["decider"]["policy"].__setitem__("rewards", [float("nan"), 1.0, 1.0])),
        r"ODM state 'rewards' holds non-finite values",
    ),
    "pending id out of range": (
        _corrupt(lambda s: s["store"].__setitem__("pending", [[99, 1.0, 1]])),
        r"'pending' names example ids \[99.0\] outside \[0, 36\)",
    ),
    "missing field": (
        _corrupt(lambda s: s["decider"]["policy"].pop("t")),
        r"dataflex_state.json is incomplete: it has no field 't'",
    ),
    "negative count": (
        _corrupt(lambda s: s["decider"]["policy"].__setitem__("t", -3)),
        r"ODM state 't' must be an integer >= 0; got -3",
    ),
}


@pytest.fixture(scope="module")
def saved_state(ds, tmp_path_factory):
    out = tmp_path_factory.mktemp("saved")
    make_trainer(ds, DataFlexCallback(ODM(), update_every=2), out, max_steps=4, save_steps=4).train()
    return out / "checkpoint-4"


@pytest.mark.parametrize("name", list(BAD_STATES))
def test_corrupted_but_parseable_state_is_refused_naming_the_field(ds, saved_state, tmp_path, name):
    edit, message = BAD_STATES[name]
    ckpt = tmp_path / "checkpoint-4"
    shutil.copytree(saved_state, ckpt)
    path = ckpt / "dataflex" / "dataflex_state.json"
    path.write_text(json.dumps(edit(json.loads(path.read_text()))))
    with pytest.raises(ValueError, match=message):
        make_trainer(ds, DataFlexCallback(ODM(), update_every=2), tmp_path, max_steps=8).train(str(ckpt))


def test_unparseable_state_names_its_file(ds, saved_state, tmp_path):
    ckpt = tmp_path / "checkpoint-4"
    shutil.copytree(saved_state, ckpt)
    path = ckpt / "dataflex" / "dataflex_state.json"
    path.write_text(path.read_text()[:100])
    with pytest.raises(ValueError, match=r"checkpoint-4/dataflex/dataflex_state.json"):
        make_trainer(ds, DataFlexCallback(ODM(), update_every=2), tmp_path, max_steps=8).train(str(ckpt))


def test_embedding_cache_files_that_do_not_fit_are_refused(tmp_path):
    from dataflex.embeddings import EmbeddingCache

    cache = EmbeddingCache(6)
    cache.update(np.array([1, 4]), torch.ones(2, 3), step=2)
    cache.save(tmp_path / "ok.npz")
    restored = EmbeddingCache(6)
    restored.load(tmp_path / "ok.npz")
    assert restored.step.tolist() == [-1, 2, -1, -1, 2, -1]
    with pytest.raises(ValueError, match="but this cache has 7 examples"):
        EmbeddingCache(7).load(tmp_path / "ok.npz")
    values = restored.values.copy()
    values[1, 0] = np.nan
    np.savez(tmp_path / "nan.npz", values=values, step=restored.step)
    with pytest.raises(ValueError, match="marked as taken hold NaN"):
        EmbeddingCache(6).load(tmp_path / "nan.npz")
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="junk.npz is not a readable embedding cache"):
        EmbeddingCache(6).load(tmp_path / "junk.npz")
    # a flipped byte inside a saved cache fails the zip's CRC: named too, not a bare BadZipFile
    good = EmbeddingCache(6)
    good.values, good.step = np.ones((6, 4), np.float32), np.arange(6)
    good.save(tmp_path / "good.npz")
    data = bytearray((tmp_path / "good.npz").read_bytes())
    data[data.find(b"\x00\x00\x80\x3f") + 3] ^= 0x01  # inside the first stored 1.0f
    (tmp_path / "flipped.npz").write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"flipped.npz is not a readable embedding cache: Bad CRC-32"):
        EmbeddingCache(6).load(tmp_path / "flipped.npz")


def test_epoch_save_strategy_puts_the_state_in_every_checkpoint(ds, tmp_path):
    """save_strategy="epoch" is announced at on_epoch_end: the state is staged there and moved in at on_save."""
    make_trainer(
        ds, DataFlexCallback(ODM(), update_every=2), tmp_path / "epoch", max_steps=12, save_strategy="epoch"
    ).train()
    folders = sorted((tmp_path / "epoch").glob("checkpoint-*"))
    assert len(folders) >= 2 and all((f / "dataflex" / "dataflex_state.json").is_file() for f in folders)
    assert not any((tmp_path / "epoch" / ".dataflex-pending").iterdir())  # everything staged was moved in


def test_best_save_strategy_stages_the_state_before_the_trainer_saves(ds, tmp_path):
    """save_strategy="best" saves right after an evaluation, with no event between: the state must already be
    staged when the Trainer starts writing (and rotating), or a kill there leaves a checkpoint without it."""
    out = tmp_path / "best"
    trainer = make_trainer(
        ds,
        DataFlexCallback(ODM(), update_every=2),
        out,
        max_steps=12,
        save_strategy="best",
        eval_strategy="steps",
        eval_steps=3,
        metric_for_best_model="loss",
        greater_is_better=True,  # the loss falls: only the first evaluation is a "best", the others stage in vain
        save_total_limit=1,
        eval_dataset=ds.select(range(8)),
    )
    staged_when_saving = []
    save_checkpoint = trainer._save_checkpoint

    def checked_save(model, trial):
        step = trainer.state.global_step
        staged_when_saving.append((step, (out / ".dataflex-pending" / f"checkpoint-{step}").is_dir()))
        return save_checkpoint(model, trial)

    trainer._save_checkpoint = checked_save
    trainer.train()
    assert staged_when_saving and all(staged for _, staged in staged_when_saving), staged_when_saving
    folders = sorted(out.glob("checkpoint-*"))
    assert [f.name for f in folders] == ["checkpoint-3"]
    assert (folders[0] / "dataflex" / "dataflex_state.json").is_file()
    assert not any((out / ".dataflex-pending").glob("checkpoint-*"))  # nothing left behind but what was moved in


def test_the_newest_usable_checkpoint_skips_one_whose_state_was_damaged_on_disk(ds, tmp_path):
    """A checkpoint whose dataflex state fails its digest (a bit flipped on disk) is not offered for resuming:
    last_complete_checkpoint warns, naming it, and returns the one before; the resume from it is refused too."""
    from dataflex.hf import last_complete_checkpoint

    make_trainer(ds, DataFlexCallback(ODM(), update_every=2), tmp_path, max_steps=4, save_steps=2).train()
    assert last_complete_checkpoint(tmp_path) == str(tmp_path / "checkpoint-4")
    path = tmp_path / "checkpoint-4" / "dataflex" / "dataflex_state.json"
    text = path.read_text()
    at = text.index('"rewards": [') + len('"rewards": [') + 3  # a digit of the first reward: still valid JSON
    path.write_text(text[:at] + ("1" if text[at] != "1" else "2") + text[at + 1 :])
    with pytest.warns(UserWarning, match=r"skipping .*checkpoint-4: .*dataflex_state.json is damaged"):
        assert last_complete_checkpoint(tmp_path) == str(tmp_path / "checkpoint-2")
    with pytest.raises(ValueError, match="dataflex_state.json is damaged"):
        make_trainer(ds, DataFlexCallback(ODM(), update_every=2), tmp_path, max_steps=6).train(
            str(tmp_path / "checkpoint-4")
        )


def test_a_trainer_file_changed_on_disk_is_refused_before_the_resume_trains(ds, tmp_path):
    """The Trainer's own files carry no checksum: torch.load reads a flipped byte of optimizer.pt as another Adam
    moment, and the resume continued another run without a word. dataflex records each file's size and CRC-32
    when it saves its state; a changed or missing file is named, its checkpoint skipped by
    last_complete_checkpoint and a resume from it refused before the first step."""
    from dataflex.hf import last_complete_checkpoint

    make_trainer(ds, DataFlexCallback(ODM(), update_every=2), tmp_path, max_steps=4, save_steps=2).train()
    record = read_json(tmp_path / "checkpoint-4" / "dataflex" / "trainer_files.json")["files"]
    assert {"optimizer.pt", "model.safetensors", "trainer_state.json", "scheduler.pt"} <= set(record)
    path = tmp_path / "checkpoint-4" / "optimizer.pt"
    intact = torch.load(path, weights_only=True)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x08
    path.write_bytes(bytes(data))
    damaged = torch.load(path, weights_only=True)  # loads: another optimizer state, silently
    moments = [(a[k], b[k]) for a, b in zip(intact["state"].values(), damaged["state"].values()) for k in a]
    assert any(not torch.equal(a, b) for a, b in moments)
    with pytest.warns(
        UserWarning, match=r"skipping .*checkpoint-4: the Trainer's files .* \(changed: \['optimizer.pt'\]"
    ):
        assert last_complete_checkpoint(tmp_path) == str(tmp_path / "checkpoint-2")
    assert last_complete_checkpoint(tmp_path, verify_trainer_files=False) == str(tmp_path / "checkpoint-4")
    steps = StepCounter()
    with pytest.raises(ValueError, match=r"checkpoint-4 are not those it saved \(changed: \['optimizer.pt'\]"):
        make_trainer(ds, DataFlexCallback(ODM(), update_every=2), tmp_path, max_steps=6, extra=[steps]).train(
            str(tmp_path / "checkpoint-4")
        )
    assert steps.count == 0
    (tmp_path / "checkpoint-2" / "rng_state.pth").unlink()
    with pytest.raises(ValueError, match=r"checkpoint-2 are not those it saved \(missing: \['rng_state.pth'\]"):
        from dataflex.hf.checkpoint import verify_checkpoint_files

        verify_checkpoint_files(str(tmp_path / "checkpoint-2"))


def test_a_model_only_checkpoint_is_refused_as_a_resume(ds, tmp_path):
    """save_only_model=True writes weights without optimizer, scheduler or RNG state, and the Trainer resumed from
    it without a word: a fresh optimizer and the learning-rate schedule restarted at its peak, another run than
    the interrupted one, while dataflex's state continued that one's decisions. Refused, naming the folder."""
    from transformers import TrainerCallback

    class LearningRates(TrainerCallback):
        def __init__(self) -> None:
            self.rates: dict[int, float] = {}

        def on_log(self, args, state, control, logs=None, **kwargs):
            if "learning_rate" in logs:
                self.rates[state.global_step] = logs["learning_rate"]

    def run(folder, resume=None, callback=None):
        rates = LearningRates()
        cb = callback or DataFlexCallback(ODM(), update_every=2)
        trainer = make_trainer(ds, cb, folder, max_steps=4, save_steps=2, logging_steps=1, extra=[rates],
                               save_only_model=True)  # fmt: skip
        trainer.train(resume_from_checkpoint=resume)
        return rates.rates

    full = run(tmp_path / "full")
    # The control, without dataflex: the Trainer resumes at step 3 with the schedule back at step 1's rate.
    stock = run(tmp_path / "full", str(tmp_path / "full" / "checkpoint-2"), callback=TrainerCallback())
    assert stock[3] == full[1] != full[3]
    steps = StepCounter()
    with pytest.raises(ValueError, match=r"checkpoint-2 holds no optimizer, scheduler or RNG state .*save_only_model"):
        make_trainer(ds, DataFlexCallback(ODM(), update_every=2), tmp_path / "full", max_steps=4, extra=[steps],
                     save_only_model=True).train(str(tmp_path / "full" / "checkpoint-2"))  # fmt: skip
    assert steps.count == 0


class StepCounter(TrainerCallback):
    count = 0

    def on_step_end(self, args, state, control, **kwargs):
        self.count += 1


def test_a_class_label_column_names_domains_by_its_class_names(ds, tmp_path):
    """A datasets ClassLabel column stores ids; the domains are its class names, so weights keyed by name apply,
    and ds["domain"] (the ids) passed as domains= is the same labelling, not a disagreement."""
    from datasets import ClassLabel

    from dataflex.policies import Static

    coded = ds.cast_column("domain", ClassLabel(names=["code", "literature", "trivia"]))
    assert coded["domain"][0] == 0
    weights = {"code": 0.6, "literature": 0.2, "trivia": 0.2}
    for given in (None, coded["domain"]):
        dfx = DataFlexCallback(Static(weights), domains=given, update_every=2)
        make_trainer(coded, dfx, tmp_path / str(given is None), max_steps=2, save_steps=100).train()
        assert dfx.domain_names == ["code", "literature", "trivia"] and dfx.weights == pytest.approx(weights)
        assert dfx.run.domain_ids.tolist() == coded["domain"]


def test_a_list_of_weights_is_refused_when_a_class_label_orders_the_domains_otherwise(ds, tmp_path):
    """dataflex orders domains by name; a ClassLabel column declares its own order, its class ids. A list of
    weights written in that order would go to other domains without a word (here 0.6 meant for trivia would go
    to code): refused, naming both orders. By name it works, and so does a list when the two orders agree."""
    from datasets import ClassLabel

    from dataflex.policies import Piecewise, Static

    coded = ds.cast_column("domain", ClassLabel(names=["trivia", "code", "literature"]))
    for policy in (Static([0.6, 0.2, 0.2]), Piecewise([(0, [0.6, 0.2, 0.2]), (2, [0.2, 0.4, 0.4])], update_every=2)):
        steps = StepCounter()
        trainer = make_trainer(coded, DataFlexCallback(policy, update_every=2), tmp_path, max_steps=2, extra=[steps])
        with pytest.raises(ValueError, match=r"sorted names \['code', 'literature', 'trivia'\]; the 'domain' column's "
                           r"ClassLabel orders them \['trivia', 'code', 'literature'\].*by name"):  # fmt: skip
            trainer.train()
        assert steps.count == 0
    dfx = DataFlexCallback(Static({"trivia": 0.6, "code": 0.2, "literature": 0.2}), update_every=2)
    make_trainer(coded, dfx, tmp_path / "named", max_steps=1, save_steps=100).train()
    assert dfx.weights == pytest.approx({"code": 0.2, "literature": 0.2, "trivia": 0.6})
    in_order = ds.cast_column("domain", ClassLabel(names=["code", "literature", "trivia"]))
    dfx = DataFlexCallback(Static([0.6, 0.2, 0.2]), update_every=2)
    make_trainer(in_order, dfx, tmp_path / "list", max_steps=1, save_steps=100).train()
    assert dfx.weights == pytest.approx({"code": 0.6, "literature": 0.2, "trivia": 0.2})


def test_a_changed_byte_of_a_reused_cache_is_refused_naming_the_file(tmp_path):
    """Caches read back instead of recomputed (a swarm's runs, a fold's scores, a subset, a fitted law, a model,
    an array of losses) are checked against a digest written with them: a flipped digit still parses, and
    torch.load / np.load of a .npy read a flipped byte as another number, so each passed a wrong value on."""

    from dataflex.detectors import out_of_fold_scores
    from dataflex.mixture_law import MixtureLaw
    from dataflex.offline import read_subset, write_subset
    from dataflex.state import DatasetFingerprint, open_checked, read_json, write_checked
    from dataflex.swarm import Swarm

    def damage(path, marker):
        path.write_text(changed_digit(path.read_text(), marker))

    def train(weights, index):
        return {"losses": {"a": 2.0 + float(weights[0]), "b": 3.0 - index / 10}, "tokens": {"a": 10.0, "b": 5.0}}

    swarm = Swarm(tmp_path / "swarm", ["a", "b"], size=6, seed=1)
    swarm.run(train, progress=False)
    intact = swarm.result_path(2).read_text()
    damage(swarm.result_path(2), '"b": ')  # 2.8 -> 3.8: parses, and would have been fitted
    with pytest.raises(ValueError, match=r"run-00002\.json is damaged: its content does not match the sha256"):
        swarm.collect()
    swarm.result_path(2).write_text(intact)
    law = MixtureLaw("loglinear", seed=0).fit(swarm.collect())
    law.save(tmp_path / "law.json")
    damage(tmp_path / "law.json", '"params": [[')
    with pytest.raises(ValueError, match=r"law\.json is damaged"):
        MixtureLaw.load(tmp_path / "law.json")

    def fold_scores(train_ids, held_out, fold):
        return held_out.astype(float) / 10

    scores = out_of_fold_scores(12, 3, fold_scores, cache=tmp_path / "folds", cache_key={"data": "d"})
    damage(tmp_path / "folds" / "fold-1-of-3.json", '"scores": [')
    with pytest.raises(ValueError, match=r"fold-1-of-3\.json is damaged"):
        out_of_fold_scores(12, 3, fold_scores, cache=tmp_path / "folds", cache_key={"data": "d"})
    assert scores.shape == (12,)

    pool = DatasetFingerprint.from_labels(np.zeros(40, dtype=np.int64), ["all"])
    write_subset(tmp_path / "subset.json", np.array([3, 17, 25]), pool=pool, method="fixed", fraction=0.075)
    damage(tmp_path / "subset.json", '"ids": [')  # [3, 17, 25] -> [4, 17, 25]: another example trained
    with pytest.raises(ValueError, match=r"subset\.json is damaged"):
        read_subset(tmp_path / "subset.json", pool)

    # Binary caches: a digest beside them. Without it, torch.load reads a changed byte of the weights as a
    # changed weight (the control below), and so does np.load of a .npy.
    weights = {"w": torch.arange(64, dtype=torch.float32)}
    write_checked(tmp_path / "model.pt", lambda f: torch.save(weights, f))
    assert torch.equal(torch.load(open_checked(tmp_path / "model.pt"))["w"], weights["w"])
    data = bytearray((tmp_path / "model.pt").read_bytes())
    data[data.index(weights["w"].numpy().tobytes()) + 41] ^= 0x01  # a byte of weight 10
    (tmp_path / "model.pt").write_bytes(bytes(data))
    assert not torch.equal(torch.load(tmp_path / "model.pt")["w"], weights["w"])  # silently another weight
    with pytest.raises(
        ValueError, match=r"model\.pt is damaged: its bytes do not match the sha256 in model\.pt\.sha256"
    ):
        open_checked(tmp_path / "model.pt")
    losses = np.linspace(0.5, 3.0, 50)
    write_checked(tmp_path / "losses.npy", lambda f: np.save(f, losses))
    assert np.array_equal(np.load(open_checked(tmp_path / "losses.npy")), losses)
    data = bytearray((tmp_path / "losses.npy").read_bytes())
    data[-3] ^= 0x10
    (tmp_path / "losses.npy").write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"losses\.npy is damaged"):
        open_checked(tmp_path / "losses.npy")
    # A file written without a digest (an older cache) is still read.
    (tmp_path / "old.json").write_text('{"x": 1}')
    assert read_json(tmp_path / "old.json") == {"x": 1}
