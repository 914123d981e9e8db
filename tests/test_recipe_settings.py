"""Recipe settings are checked before any data is read; the mixture recipe checkpoints and resumes exactly."""

from __future__ import annotations

from pathlib import Path

import pytest

from dataflex.policies import ODM, Static
from dataflex.recipes.mixture import run_experiment
from dataflex.testbeds.tiny import default_data_dir, tiny_gpt2


def mixture_settings(tmp_path: Path, **over):
    kw = dict(
        policy=ODM(),
        make_model=lambda: tiny_gpt2(n_layer=1, n_embd=32, n_head=2, n_positions=64, seed=0),
        data_root=default_data_dir() / "textmix",
        steps=12,
        batch_size=4,
        lr=3e-3,
        seed=0,
        update_every=2,
        eval_every=6,
        max_len=48,
        val_per_domain=2,
        train_per_domain=8,
        work_dir=tmp_path / "work",
        curve_per_domain=2,
        progress=False,
        ckpt_every=4,
    )
    return {**kw, **over}


@pytest.mark.parametrize(
    "key,value,message",
    [
        ("update_every", -1, "update_every must be a positive integer; got -1"),
        ("update_every", 0, "update_every must be a positive integer; got 0"),
        ("steps", -5, "steps must be a positive integer; got -5"),
        ("batch_size", 0, "batch_size must be a positive integer; got 0"),
        ("seed", "abc", r"seed must be an integer in \[0, 2\*\*32\); got 'abc'"),
        ("seed", -1, r"seed must be an integer in \[0, 2\*\*32\); got -1"),
        ("lr", "abc", "lr must be a positive finite number; got 'abc'"),
        ("lr", float("inf"), "lr must be a positive finite number; got inf"),
        ("eval_every", -1, "eval_every must be an integer >= 0; got -1"),
        ("max_len", 100, r"data.max_len=100 exceeds the model's 64 positions"),
        ("train_per_domain", 0, "data.train_per_domain must be a positive integer; got 0"),
    ],
)
def test_bad_mixture_settings_name_the_key_before_reading_data(tmp_path, key, value, message):
    with pytest.raises(ValueError, match=message):
        run_experiment(**mixture_settings(tmp_path, data_root=tmp_path / "no-data-here", **{key: value}))


def test_mixture_recipe_killed_midway_continues_exactly(tmp_path, monkeypatch):
    import dataflex.proxies.loop as loop

    loaded = []
    real_load = loop._load
    monkeypatch.setattr(loop, "_load", lambda folder, parts: loaded.append(folder.name) or real_load(folder, parts))
    full = run_experiment(**mixture_settings(tmp_path, ckpt_dir=tmp_path / "full"))
    run_experiment(**mixture_settings(tmp_path, ckpt_dir=tmp_path / "cut", stop_after=6))  # pre-empted at 6
    assert sorted(p.name for p in (tmp_path / "cut").iterdir()) == ["run_settings.json", "step-4", "step-6"]
    resumed = run_experiment(**mixture_settings(tmp_path, ckpt_dir=tmp_path / "cut"))
    assert loaded == ["step-6"]  # continued from the checkpoint, not retrained from step 0
    for key in ("history", "curve", "validation_loss"):
        assert resumed[key] == full[key], key


def test_a_loop_checkpoint_folder_is_not_continued_by_another_run(tmp_path):
    """train_mixture's own guard (for callers without a recipe): a ckpt_dir cut at step 6 by an ODM run is
    refused to a run with another ODM knob, learning rate, policy or mixed precision, naming it, and continued by
    the same run, also when the same policy object (whose update count and rewards the first call changed) is
    passed again."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    odm = ODM()
    run_experiment(**mixture_settings(tmp_path, ckpt_dir=tmp_path / "cut", policy=odm, stop_after=6))
    with pytest.raises(
        ValueError, match=r"cut holds a run made with other settings \(policy.alpha: 0.9 there, 0.5 now"
    ):
        run_experiment(**mixture_settings(tmp_path, ckpt_dir=tmp_path / "cut", policy=ODM(alpha=0.5)))
    with pytest.raises(ValueError, match=r"\(lr: 0.003 there, 0.01 now\).*give this run another ckpt_dir"):
        run_experiment(**mixture_settings(tmp_path, ckpt_dir=tmp_path / "cut", lr=1e-2))
    with pytest.raises(ValueError, match=r"\(data.tokens: '[0-9a-f]+' there, '[0-9a-f]+' now\)"):
        run_experiment(**mixture_settings(tmp_path, ckpt_dir=tmp_path / "cut", max_len=40))  # same labels, other text
    assert odm.t == 3  # the object carries its run's state; only its constructor arguments are the run's settings
    AcceleratorState._reset_state(reset_partial_state=True)  # as a process launched with bf16 would start
    bf16 = Accelerator(cpu=True, mixed_precision="bf16")
    with pytest.raises(ValueError, match=r"\(mixed_precision: None there, 'bf16' now\)"):
        run_experiment(**mixture_settings(tmp_path, ckpt_dir=tmp_path / "cut", policy=odm, accelerator=bf16))
    AcceleratorState._reset_state(reset_partial_state=True)
    assert run_experiment(**mixture_settings(tmp_path, ckpt_dir=tmp_path / "cut", policy=odm))["steps"] == 12

    names = sorted(p.stem for p in (default_data_dir() / "textmix" / "train").glob("*.jsonl"))
    even = Static(dict.fromkeys(names, 0.125))
    run_experiment(**mixture_settings(tmp_path, ckpt_dir=tmp_path / "static", policy=even, stop_after=4))
    other = Static({**dict.fromkeys(names, 0.1), names[0]: 0.3})
    with pytest.raises(ValueError, match=rf"policy.weights.{names[0]}: 0.125 there, 0.3 now"):
        run_experiment(**mixture_settings(tmp_path, ckpt_dir=tmp_path / "static", policy=other))


@pytest.mark.parametrize(
    "override,message",
    [
        ("method=fancy", "method='fancy'; valid values are uniform"),
        ("noise=1.5", r"noise must be a number in \[0, 1\); got 1.5"),
        ("fraction=0", r"fraction must be a number in \(0, 1\]; got 0"),
        ("steps=-5", "steps must be a positive integer; got -5"),
        ("update_every=0", "update_every must be a positive integer; got 0"),
        ("seed=abc", r"seed must be an integer in \[0, 2\*\*32\); got 'abc'"),
        ("data_seed=-1", r"data_seed must be an integer in \[0, 2\*\*32\); got -1"),
        ("lr=abc", "lr must be a positive finite number; got 'abc'"),
        ("lr=inf", "lr must be a positive finite number; got inf"),
        ("temperature=-inf", "temperature must be a positive number; got -inf"),
        ("label_by=answer", "label_by='answer'; valid values are question, question_answer"),
        ("class_conditional=maybe", "class_conditional must be true or false; got 'maybe'"),
        ("clean_with=margin", "clean_with='margin'; valid values are aum, cartography, loss, forgetting, last_loss"),
        ("clean_with=aum method=rho", "clean_with reads the record of a plain run; it needs method=uniform"),
        ("method=subset", "method=subset needs subset_file="),
        ("method=subset subset_file=nowhere.json", "subset_file='nowhere.json': no such file"),
        ("subset_file=kept.json", "subset_file is read by method=subset only; this run has method='uniform'"),
    ],
)
def test_bad_vlm_overrides_name_the_key(override, message):
    from hydra import compose, initialize_config_dir

    from dataflex.recipes.settings import check_vlm_settings
    from dataflex.recipes.vlm import METHODS

    configs = Path(__file__).resolve().parents[1] / "configs"
    with initialize_config_dir(config_dir=str(configs), version_base=None):
        cfg = compose(config_name="vlm", overrides=override.split())
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        check_vlm_settings(cfg, METHODS)


def test_the_default_vlm_config_passes_its_checks():
    from hydra import compose, initialize_config_dir

    from dataflex.recipes.settings import check_vlm_settings
    from dataflex.recipes.vlm import METHODS

    with initialize_config_dir(config_dir=str(Path(__file__).resolve().parents[1] / "configs"), version_base=None):
        check_vlm_settings(compose(config_name="vlm"), METHODS)


def select_offline_config(tmp_path: Path, overrides: list[str]):
    from hydra import compose, initialize_config_dir

    (tmp_path / "ckpt").mkdir(exist_ok=True)
    (tmp_path / "target.jsonl").write_text('{"instruction": "a", "response": "b", "task": "t"}\n')
    paths = [f"checkpoint={tmp_path / 'ckpt'}", f"target={tmp_path / 'target.jsonl'}"]
    with initialize_config_dir(config_dir=str(Path(__file__).resolve().parents[1] / "configs"), version_base=None):
        return compose(config_name="select_offline", overrides=paths + overrides)


@pytest.mark.parametrize(
    "override,error,message",
    [
        ("method=lesss", ValueError, "method='lesss'; valid values are less, tracin, loss_hard, loss_easy, random"),
        ("fraction=1.5", ValueError, r"fraction must be a number in \(0, 1\]; got 1.5"),
        ("dim=0", ValueError, "dim must be a positive integer; got 0"),
        ("max_len=-1", ValueError, "max_len must be a positive integer; got -1"),
        ("batch_size=abc", ValueError, "batch_size must be a positive integer; got 'abc'"),
        ("seed=1.5", ValueError, r"seed must be an integer in \[0, 2\*\*32\); got 1.5"),
        ("seed=4294967296", ValueError, r"seed must be an integer in \[0, 2\*\*32\); got 4294967296"),
        ("checkpoint=/nonexistent/ckpt", FileNotFoundError, "checkpoint='/nonexistent/ckpt': no such folder"),
        ("target=/nonexistent.jsonl", FileNotFoundError, "target='/nonexistent.jsonl': no such file"),
        ("pool=/nonexistent", FileNotFoundError, "pool='/nonexistent': no such folder"),
        ("base_weights=/no.pt", FileNotFoundError, "base_weights='/no.pt': no such file"),
        ("out=null", ValueError, "out must be a file path; got None"),
        ("checkpoint=null warmup.fraction=0", ValueError, r"warmup.fraction must be a number in \(0, 1\]; got 0"),
        ("checkpoint=null warmup.epochs=0", ValueError, "warmup.epochs must be a positive integer; got 0"),
        ("checkpoint=null warmup.lr=-1", ValueError, "warmup.lr must be a positive finite number; got -1"),
        ("checkpoint=null warmup.target_modules=[]", ValueError, "warmup.target_modules must be a non-empty list"),
        ("checkpoint=null warmup.target_modules=c_attn", ValueError, "got 'c_attn'"),
        ("checkpoint=null work_dir=null", ValueError, "work_dir must be a folder path .*; got None"),
    ],
)
def test_bad_select_offline_overrides_name_the_key(tmp_path, override, error, message):
    from dataflex.recipes.select_offline import METHODS
    from dataflex.recipes.settings import check_select_offline_settings

    with pytest.raises(error, match=message):
        check_select_offline_settings(select_offline_config(tmp_path, override.split()), METHODS)


def test_select_offline_defaults_pass_and_a_too_long_max_len_is_named(tmp_path):
    from hydra.utils import instantiate

    from dataflex.recipes.select_offline import METHODS
    from dataflex.recipes.settings import check_model_fits, check_select_offline_settings

    cfg = select_offline_config(tmp_path, ["max_len=100000"])
    check_select_offline_settings(cfg, METHODS)
    with pytest.raises(ValueError, match="max_len=100000 exceeds the model's"):
        check_model_fits(instantiate(cfg.model, seed=0), max_len=cfg.max_len, vocab_needed=257, len_key="max_len")


def test_a_run_folder_takes_one_command_and_names_what_another_changes(tmp_path):
    """Resumable recipes continue from their folder's checkpoints: the first run records its settings there,
    the same settings continue, other settings are refused naming each difference (nested keys dotted) once the
    folder holds anything of the run."""
    from dataflex.run_folder import RUN_SETTINGS, claim_run_folder
    from dataflex.state import read_json

    folder = tmp_path / "run"
    settings = {"lr": 0.002, "steps": 20, "policy": {"_target_": "ODM", "alpha": 0.9}, "tags": [1, 2]}
    claim_run_folder(folder, settings)
    assert read_json(folder / RUN_SETTINGS) == settings
    claim_run_folder(folder, dict(settings))  # the same command again: continues
    changed = {**settings, "lr": 0.01, "policy": {"_target_": "ODM", "alpha": 0.5}, "extra": True}
    # Nothing written yet but the record, Hydra's config copy and its log (a command refused for a bad setting,
    # or killed at once): nothing to continue, so the corrected command takes the folder over.
    (folder / ".hydra").mkdir()
    (folder / "trainer.log").write_text("ValueError: alpha must be a number; got 'abc'\n")
    claim_run_folder(folder, {**settings, "lr": 0.003})
    assert read_json(folder / RUN_SETTINGS) == {**settings, "lr": 0.003}
    claim_run_folder(folder, {**settings, "lr": float("nan"), "steps": float("inf")})  # strict JSON has neither
    assert read_json(folder / RUN_SETTINGS) == {**settings, "lr": "NaN", "steps": "Infinity"}
    claim_run_folder(folder, settings)
    (folder / "checkpoint-4").mkdir()  # the run wrote something a rerun would continue from
    with pytest.raises(ValueError) as error:
        claim_run_folder(folder, changed)
    message = str(error.value)
    assert "extra: None there, True now; lr: 0.002 there, 0.01 now; policy.alpha: 0.9 there, 0.5 now" in message
    assert str(folder) in message and "hydra.run.dir" in message
    assert read_json(folder / RUN_SETTINGS) == settings  # the record is not overwritten


@pytest.mark.parametrize(
    "recipe, naming", [("mixture", "policy"), ("trainer", "policy"), ("instruct", "detector"), ("vlm", "method")]
)
def test_a_folder_name_and_its_recorded_settings_leave_out_the_same_keys(recipe, naming):
    """Settings left out of a run's folder name but recorded by it would refuse a rerun that only changed them;
    recorded-out but in the name, two commands differing only there would share a folder unchecked."""
    import importlib

    import yaml

    config = yaml.safe_load((Path(__file__).resolve().parents[1] / "configs" / f"{recipe}.yaml").read_text())
    excluded = config["hydra"]["job"]["config"]["override_dirname"]["exclude_keys"]
    module = importlib.import_module(f"dataflex.recipes.{recipe}")
    assert excluded == [naming, "seed", *module.SAME_RESULT]


def test_a_folder_name_longer_than_a_file_system_takes_is_shortened_to_one_of_its_own():
    """The recipes name a run's folder by its overrides; a weight per domain passes the 255 bytes a file name may
    have (Hydra failed with "File name too long"). Such a name keeps its start and gets a digest of the whole."""
    from dataflex.run_folder import MAX_FOLDER_NAME, folder_name

    assert folder_name("lr=0.01,steps=100") == "lr=0.01,steps=100"
    assert folder_name("data.path=/data/é/corpus,lr=0.01") == "data.path=/data/é/corpus,lr=0.01"  # short parts
    weights = "policy.weights={" + ", ".join(f"domain_{i}: 0.0625" for i in range(16)) + "}"
    long = folder_name(f"lr=0.01,{weights},steps=4")
    assert len(long.encode()) <= MAX_FOLDER_NAME and "/" not in long and long.startswith("lr=0.01,policy.weights={")
    assert long.endswith(",steps=4")  # the long override alone is shortened: the others stay readable
    assert folder_name(f"lr=0.01,{weights},steps=4") == long  # the same command: the same folder
    assert folder_name(f"lr=0.02,{weights},steps=4") != long and folder_name(f"lr=0.01,{weights[:-1]},steps=4") != long
    many = folder_name(",".join(f"key{i}=value{i}" for i in range(40)))  # short items, too many: cut, 16-digit digest
    assert len(many.encode()) <= MAX_FOLDER_NAME and many.startswith("key0=value0,") and many[-17] == "~"
    accents = folder_name("data.path=/" + "é" * 300)  # cut at a character, not inside one
    assert len(accents.encode()) <= MAX_FOLDER_NAME and accents.encode().decode() == accents
