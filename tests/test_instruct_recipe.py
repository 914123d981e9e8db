"""The noisy-instruction test bed and recipe: swapped responses, detectors as Hydra choices, resume."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from dataflex.detectors import DETECTORS as RECORD_DETECTORS
from dataflex.testbeds.noisy_instruct import noisy_instructions
from dataflex.testbeds.tiny import default_data_dir

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@pytest.fixture(scope="module")
def noisy():
    return noisy_instructions(default_data_dir(), tasks=("gsm8k", "jeopardy"), per_task=40, noise=0.3, seed=3)


def test_swapped_responses_come_from_outside_the_pool_of_their_task_and_are_seeded(noisy):
    clean = noisy_instructions(default_data_dir(), tasks=("gsm8k", "jeopardy"), per_task=40, noise=0.0)
    train, mask = noisy["train"], noisy["noisy"]
    assert len(train) == 80 and mask.sum() == 24 and list(train["noisy"]) == mask.tolist()
    assert mask[:40].sum() == mask[40:].sum() == 12 and not clean["noisy"].any()
    same = [a == b for a, b in zip(train["input_ids"], clean["train"]["input_ids"])]
    assert np.array_equal(~np.asarray(same), mask)  # exactly the masked examples changed

    def response(ds, i):
        return bytes(x for x in ds["input_ids"][i][ds["prompt_len"][i] :] if x < 256).decode(errors="ignore")

    donated = []
    for i in np.flatnonzero(mask):  # another example's response of the same task, from beyond the pool
        task = train["task"][i]
        rows = [json.loads(line) for line in open(default_data_dir() / "instruct" / "train" / f"{task}.jsonl")]
        outside = {r["response"] for r in rows[40:]} - {r["response"] for r in rows[:40]}
        got = response(train, i)  # cut to max_len, as encoded
        assert any(r.startswith(got) for r in outside) and got != response(clean["train"], i)
        donated.append(got)
    assert len(set(donated)) == len(donated)  # each donor once: no swapped response is a duplicate
    again = noisy_instructions(default_data_dir(), tasks=("gsm8k", "jeopardy"), per_task=40, noise=0.3, seed=3)
    other = noisy_instructions(default_data_dir(), tasks=("gsm8k", "jeopardy"), per_task=40, noise=0.3, seed=4)
    assert np.array_equal(again["noisy"], mask) and not np.array_equal(other["noisy"], mask)
    assert again["train"]["input_ids"] == train["input_ids"]
    assert set(noisy["validation"]) == set(noisy["test"]) == {"gsm8k", "jeopardy"}


def test_noisy_instructions_refuse_bad_arguments():
    with pytest.raises(FileNotFoundError, match=r"tasks \['gsm8kk'\]; tasks there: \[.*'gsm8k'"):
        noisy_instructions(default_data_dir(), tasks=("gsm8kk",))
    with pytest.raises(ValueError, match=r"noise must be in \[0, 1\); got 1.0"):
        noisy_instructions(default_data_dir(), noise=1.0)
    with pytest.raises(ValueError, match="tasks must be distinct task names"):
        noisy_instructions(default_data_dir(), tasks=("gsm8k", "gsm8k"))
    with pytest.raises(ValueError, match="task 'human_eval' has 124 training examples: 100 in the pool leave 24 "):
        noisy_instructions(default_data_dir(), tasks=("human_eval",), per_task=100)


def test_instruction_data_a_user_brings_is_checked_record_by_record(tmp_path):
    """A pool of the user's own: a damaged line or a record without a response raised json's or a KeyError naming
    no file; a record whose task is not its file's would be trained under one task name and reported under the
    other. Each is refused naming the file."""
    folder = tmp_path / "instruct"
    for split in ("train", "validation", "test"):
        (folder / split).mkdir(parents=True)
        rows = [{"instruction": f"q{i}", "response": f"a{i}", "task": "qa"} for i in range(12)]
        (folder / split / "qa.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert len(noisy_instructions(tmp_path, tasks=("qa",), per_task=6, noise=0.5)["train"]) == 6
    train = folder / "train" / "qa.jsonl"
    lines = train.read_text().splitlines()
    train.write_text("\n".join(lines[:3] + ['{"instruction": "q", "task": "qa"}'] + lines[3:]) + "\n")
    with pytest.raises(ValueError, match=r"qa\.jsonl:4 has no 'response' field"):
        noisy_instructions(tmp_path, tasks=("qa",), per_task=6, noise=0.5)
    train.write_text("\n".join(lines[:3] + [lines[3].replace('"qa"', '"math"')] + lines[4:]) + "\n")
    with pytest.raises(ValueError, match=r"qa\.jsonl holds a record \(record 4\) whose task is 'math', not 'qa'"):
        noisy_instructions(tmp_path, tasks=("qa",), per_task=6, noise=0.5)


def test_keep_per_task_drops_the_highest_scores_of_every_task():
    from dataflex.recipes.instruct import keep_per_task

    tasks = np.array(["a"] * 10 + ["b"] * 10)
    scores = np.concatenate([np.arange(10.0), -np.arange(10.0)])
    kept = keep_per_task(scores, tasks, drop=0.3)
    assert kept.tolist() == list(range(7)) + list(range(13, 20))
    scores[[0, 9]] = np.nan  # no evidence: kept, ahead of the least suspect scored examples
    assert keep_per_task(scores, tasks, drop=0.3).tolist() == [0, *range(1, 6), 9, *range(13, 20)]


@pytest.mark.parametrize(
    "detector",  # all but one (12 s each) in the slow run, which .ci/run runs
    [pytest.param("aum", marks=pytest.mark.slow), pytest.param("clean_oracle", marks=pytest.mark.slow),
     pytest.param("out_of_fold", marks=pytest.mark.slow), "prompt_support"],
)  # fmt: skip
def test_train_instruct_runs_each_kind_of_detector(noisy, tmp_path, detector):
    from dataflex.detectors import detection_quality
    from dataflex.recipes.instruct import keep_per_task, train_instruct

    kwargs = dict(
        out=tmp_path / detector, steps=6, batch_size=8, warmup=2, update_every=2, folds=2, fold_steps=2, save_steps=3
    )
    result = train_instruct(detector, noisy, **kwargs)
    assert set(result["validation_loss"]) == set(result["test_loss"]) == {"gsm8k", "jeopardy"}
    assert np.isfinite(result["mean_test_loss"])
    # The final model, whole or not at all, with a digest that refuses a damaged copy.
    import torch

    from dataflex.state import open_checked

    final = tmp_path / detector / "final_model.pt"
    assert torch.load(open_checked(final)).keys() and final.with_name("final_model.pt.sha256").is_file()
    if detector == "clean_oracle":
        assert result["noisy_share"] == 0.0
    if detector == "aum":  # the record's detectors are measured at the first decision and at the end
        assert set(result["detection"]["at_end"]) == set(RECORD_DETECTORS)
        state = json.loads((tmp_path / detector / "checkpoint-6" / "dataflex" / "dataflex_state.json").read_text())
        decided = [h for h in state["history"] if h["step"] > 0]  # every update_every steps *after* warmup
        assert [h["step"] for h in decided] == [4, 6] and all(h["size"] < len(noisy["train"]) for h in decided)
    if detector == "out_of_fold":
        quality = result["detection"]["at_end"]["out_of_fold"]
        assert 0 <= quality["auroc"] <= 1
        assert sorted(p.name for p in (tmp_path / detector / "folds" / "scores").iterdir()) == [
            "fold-0-of-2.json",
            "fold-1-of-2.json",
        ]
    if detector == "prompt_support":  # scored from the text: the top drop share of every task is never trained on
        from dataflex.prompt_support import prompt_support_scores

        text = noisy["train_text"]
        scores = prompt_support_scores(text["prompts"], text["responses"], text["tasks"])
        quality = result["detection"]["at_end"]["prompt_support"]
        assert quality == detection_quality(scores, noisy["noisy"]) and quality["auroc"] > 0.6
        kept = keep_per_task(scores, np.asarray(noisy["train"]["task"]), 0.3)
        state = json.loads((tmp_path / detector / "checkpoint-6" / "dataflex" / "dataflex_state.json").read_text())
        assert state["history"][-1]["size"] == kept.size < len(noisy["train"])
    with pytest.raises(ValueError, match=r"unknown detector 'bogus'; valid: \['none', 'aum'"):
        train_instruct("bogus", noisy, out=tmp_path / "bogus")


@pytest.mark.parametrize(
    "override,message",
    [
        ("detector.drop=1.5", r"detector.drop must be a number in \(0, 1\); got 1.5"),
        ("detector.warmup=-1", "detector.warmup must be an integer >= 0; got -1"),
        ("tasks=[]", "tasks must be a non-empty list of task names; got"),
        ("tasks=[gsm8k,gsm8k]", r"tasks must be distinct; got \['gsm8k', 'gsm8k'\]"),
        ("noise=1", r"noise must be a number in \[0, 1\); got 1"),
        ("per_task=0", "per_task must be a positive integer; got 0"),
        ("data_seed=-1", r"data_seed must be an integer in \[0, 2\*\*32\); got -1"),
        ("steps=abc", "steps must be a positive integer; got 'abc'"),
        ("lr=-1", "lr must be a positive finite number; got -1"),
        ("base=/no/model.pt", "base='/no/model.pt': no such file"),
        ("data_dir=/no/data", "data_dir='/no/data': no such folder"),
    ],
)
def test_bad_instruct_overrides_name_the_key(override, message):
    from hydra import compose, initialize_config_dir

    from dataflex.recipes.instruct import DETECTORS
    from dataflex.recipes.settings import check_instruct_settings

    with initialize_config_dir(config_dir=str(CONFIGS), version_base=None):
        cfg = compose(config_name="instruct", overrides=["detector=aum", override])
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        check_instruct_settings(cfg, DETECTORS)


def test_out_of_fold_settings_are_checked():
    from hydra import compose, initialize_config_dir

    from dataflex.recipes.instruct import DETECTORS
    from dataflex.recipes.settings import check_instruct_settings

    with initialize_config_dir(config_dir=str(CONFIGS), version_base=None):
        for choice in DETECTORS:  # every detector has its config file, and each checks out
            check_instruct_settings(compose(config_name="instruct", overrides=[f"detector={choice}"]), DETECTORS)
        cfg = compose(config_name="instruct", overrides=["detector=out_of_fold", "detector.folds=1"])
        bad_analyzer = compose(config_name="instruct", overrides=["detector=prompt_support", "detector.analyzer=bpe"])
    with pytest.raises(ValueError, match="detector.folds must be >= 2"):
        check_instruct_settings(cfg, DETECTORS)
    with pytest.raises(ValueError, match="detector.analyzer='bpe'; valid values are char_wb, word"):
        check_instruct_settings(bad_analyzer, DETECTORS)


@pytest.mark.slow
def test_instruct_recipe_cli_runs_and_resumes(tmp_path):
    """The Hydra recipe end to end with a detector chosen on the command line, then the same command resumes."""
    cmd = [
        sys.executable,
        "-m",
        "dataflex.recipes.instruct",
        "detector=cartography",
        "detector.warmup=2",
        "steps=4",
        "save_steps=2",
        "update_every=2",
        "batch_size=8",
        "per_task=16",
        "hydra.run.dir=run",
    ]
    first = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert first.returncode == 0, first.stderr[-3000:]
    result = json.loads((tmp_path / "run" / "results.json").read_text())
    assert result["detector"] == "cartography" and not result["resumed"]
    assert (tmp_path / "run" / "checkpoint-4" / "dataflex" / "dataflex_state.json").is_file()
    suspects = (tmp_path / "run" / "suspects.md").read_text()  # the detector's 30 most suspect, with the truth
    head = "Most suspect training examples, detector=cartography: 30 most suspect of 64 examples (32 without a finite"
    assert suspects.startswith(head)  # (4 steps x 8 of 4 tasks x 16 visited)
    assert (
        len(re.findall(r"^\| \d+ \| \d+ \| ", suspects, flags=re.M)) == 30
        and "| task | prompt | response |" in suspects
    )
    again = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    resumed = json.loads((tmp_path / "run" / "results.json").read_text())
    assert resumed["resumed"]
    assert (tmp_path / "run" / "suspects.md").read_text() == suspects  # from the record the checkpoint restored
    # The noise counter and detection probe live in memory: the rerun (nothing left to train) reported a noisy
    # share of 0.0 and no detection at the warm-up step. Kept with each checkpoint, the results are the first's.
    same = ("resumed", "seconds")
    assert {k: v for k, v in resumed.items() if k not in same} == {k: v for k, v in result.items() if k not in same}
    assert result["noisy_share"] > 0 and result["detection"]["at_warmup"]
    longer = [c if c != "steps=4" else "steps=6" for c in cmd]  # another command, same folder: refused
    other = subprocess.run(longer, capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert other.returncode != 0 and "holds a run made with other settings (steps: 4 there, 6 now)" in other.stderr
    bogus = [c if c != "detector=cartography" else "detector=bogus" for c in cmd]
    bad = subprocess.run(bogus, capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert bad.returncode != 0 and "bogus" in bad.stderr and "Available options" in bad.stderr


def test_prompt_reliance_is_the_loss_of_each_response_under_the_previous_prompt_minus_under_its_own():
    import torch

    from dataflex.testbeds.noisy_instruct import prompt_reliance
    from dataflex.testbeds.tiny import encode_instruction, tiny_gpt2

    model = tiny_gpt2(n_layer=1, n_embd=32, n_head=2, n_positions=64, seed=0).eval()
    rows = [
        {"instruction": "What is 2+3?", "response": "5", "task": "t"},
        {"instruction": "Capital of France", "response": "Paris", "task": "t"},
        {"instruction": "Same answer as before", "response": "Paris", "task": "t"},  # neighbour repeats: skipped
        {"instruction": "A much longer instruction that gets cut at the front", "response": "yes", "task": "t"},
    ]

    def loss(instruction: str, response: str) -> float:
        ids, prompt_len = encode_instruction(instruction, response, 64)
        x = torch.tensor([ids])
        with torch.no_grad():
            logits = model(input_ids=x).logits[0, :-1]
        target = x[0, 1:].clone()
        target[: prompt_len - 1] = -100
        return torch.nn.functional.cross_entropy(logits, target, ignore_index=-100).item()

    expected = np.mean(
        [
            loss(rows[j - 1]["instruction"], rows[j]["response"]) - loss(rows[j]["instruction"], rows[j]["response"])
            for j in (0, 1, 3)
        ]
    )
    got = prompt_reliance(model, {"t": rows, "lone": rows[1:3]}, max_len=64)
    assert got["t"] == pytest.approx(expected, abs=1e-5) and abs(expected) > 1e-4
    assert np.isnan(got["lone"])  # both pairs share their response: no evidence


@pytest.mark.slow  # (a minute; .ci/run runs it)
def test_a_sweep_of_detectors_ends_with_its_summary_beside_none(tmp_path):
    """``-m detector=none,loss``: when the multirun ends, every detector's clean loss per task, median [min, max]
    over seeds, is printed beside the detector=none runs and written to sweep_summary.md and .png."""
    small = ["steps=4", "save_steps=4", "update_every=2", "batch_size=8", "per_task=16"]
    cmd = [sys.executable, "-m", "dataflex.recipes.instruct", "-m", "detector=none,loss", "seed=0", *small,
           f"hydra.sweep.dir={tmp_path / 'sweep'}"]  # fmt: skip
    run = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    summary = (tmp_path / "sweep" / "sweep_summary.md").read_text()
    assert summary in run.stdout and (tmp_path / "sweep" / "sweep_summary.png").is_file()
    assert "seeds better than none (same seed; mean and worst, test)" in summary
    assert "| none | 0 |" in summary and re.search(r"\| loss \| 0 \|.* [01] of 1 \|", summary)
    assert "| gsm8k |" in summary  # the tasks are the rows of the per-domain table
