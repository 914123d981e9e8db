"""dataflex.sweep: a Hydra sweep's runs side by side — medians and spreads over seeds, seed-paired comparison
with uniform, one table per settings, and refusals for runs that cannot be compared."""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

from dataflex.sweep import collect_runs, main, plot_sweep, summarize_sweep

DOMAINS = ("code", "math", "web")


def write_run(root: Path, policy: str, seed: int, losses: dict[str, float], settings: str = "", **extra) -> None:
    folder = root / policy / f"seed{seed}" / settings
    folder.mkdir(parents=True, exist_ok=True)
    result = {"policy": policy, "seed": seed, "validation_loss": losses, **extra}
    (folder / "results.json").write_text(json.dumps(result))


def row(text: str, policy: str) -> list[str]:
    """The cells of ``policy``'s row in the first table of ``text``."""
    line = next(line for line in text.splitlines() if line.startswith(f"| {policy} |"))
    return [cell.strip() for cell in line.strip("|").split("|")]


def test_the_summary_gives_medians_spreads_and_seed_paired_wins(tmp_path):
    uniform = {0: [2.0, 3.0, 4.0], 1: [2.2, 3.1, 4.1], 2: [1.9, 2.9, 3.9]}
    odm = {0: [1.9, 2.9, 3.9], 1: [2.4, 3.1, 4.0], 2: [1.8, 2.8, 4.2]}  # 0: better on both; 1, 2: not
    for seed in range(3):
        write_run(tmp_path, "uniform", seed, dict(zip(DOMAINS, uniform[seed])))
        write_run(tmp_path, "odm", seed, dict(zip(DOMAINS, odm[seed])), test_loss=dict(zip(DOMAINS, odm[seed])))
    text = summarize_sweep(tmp_path)
    means = [statistics.fmean(odm[s]) for s in range(3)]
    cells = row(text, "odm")
    assert cells[:4] == ["odm", "0,1,2", f"{statistics.median(means):.4f} [{min(means):.4f}, {max(means):.4f}]",
                         "4.0000 [3.9000, 4.2000]"]  # fmt: skip
    assert cells[4] == "1 of 3"  # seed 0 alone beats its own uniform run on mean and worst
    assert row(text, "uniform")[4] == "-"
    assert text.index("| uniform |") < text.index("| odm |")  # uniform first
    # test losses only where every run has them: here the uniform runs do not, so validation alone
    assert "test mean" not in text
    assert "| web | 4.0000 | 4.0000 |" in text  # per-domain medians, uniform then odm
    assert (tmp_path / "sweep_summary.md").read_text() == text
    assert (tmp_path / "sweep_summary.png").stat().st_size > 5000


def test_runs_of_other_settings_are_other_tables(tmp_path):
    for settings, shift in (("lr=0.01", 0.0), ("lr=0.1", 1.0)):
        for seed in (0, 1):
            write_run(tmp_path, "uniform", seed, {d: 2.0 + shift for d in DOMAINS}, settings)
            write_run(tmp_path, "odm", seed, {d: 1.9 + shift for d in DOMAINS}, settings)
    write_run(tmp_path, "natural", 5, {d: 1.0 for d in DOMAINS}, "lr=0.1")  # a seed uniform did not run
    text = summarize_sweep(tmp_path)
    first, second = text.split("### lr=0.1")
    assert "### lr=0.01" in first and row(first, "odm")[2].startswith("1.9000") and row(first, "odm")[4] == "2 of 2"
    assert row(second, "odm")[2].startswith("2.9000")
    assert row(second, "natural")[4] == "no uniform run with these seeds"


def test_runs_that_cannot_be_compared_are_refused_naming_them(tmp_path):
    write_run(tmp_path / "a", "uniform", 1, dict.fromkeys(DOMAINS, 2.0))
    (tmp_path / "a" / "uniform" / "seed1").rename(tmp_path / "a" / "uniform" / "seed01")  # seed=01 on the command line
    write_run(tmp_path / "a", "uniform", 1, dict.fromkeys(DOMAINS, 2.1))
    with pytest.raises(ValueError, match=r"two runs of policy 'uniform', seed 1 .*seed01.*seed1"):
        summarize_sweep(tmp_path / "a")
    write_run(tmp_path / "b", "uniform", 0, dict.fromkeys(DOMAINS, 2.0))
    write_run(tmp_path / "b", "odm", 0, dict.fromkeys(("code", "math"), 1.0))  # another corpus, same settings
    with pytest.raises(ValueError, match=r"validation loss over different domains.*\['code', 'math'\]"):
        summarize_sweep(tmp_path / "b")
    with pytest.raises(ValueError, match=r"validation loss over different domains"):  # the plot on its own too
        plot_sweep(collect_runs(tmp_path / "b"), tmp_path / "b.png")
    write_run(tmp_path / "c", "uniform", 0, dict.fromkeys(DOMAINS, 2.0))
    (tmp_path / "c" / "results.json").write_text("{}")  # not inside <policy>/seed<k>
    with pytest.raises(ValueError, match=r"c/results.json: not inside a <policy>/seed<k> folder"):
        collect_runs(tmp_path / "c")
    write_run(tmp_path / "d", "uniform", 0, dict.fromkeys(DOMAINS, 2.0))
    (tmp_path / "d" / "uniform" / "seed0").rename(tmp_path / "d" / "uniform" / "seed3")
    with pytest.raises(ValueError, match="records seed 0 but sits in folder 'seed3'"):
        collect_runs(tmp_path / "d")
    with pytest.raises(ValueError, match="no results.json under"):
        collect_runs(tmp_path / "empty")
    with pytest.raises(SystemExit, match="no results.json under"):
        (tmp_path / "empty").mkdir()
        main([str(tmp_path / "empty")])


def test_the_cli_prints_the_summary(tmp_path):
    for seed in (0, 1):
        write_run(tmp_path, "uniform", seed, dict.fromkeys(DOMAINS, 2.0 + seed))
    proc = subprocess.run([sys.executable, "-m", "dataflex.sweep", str(tmp_path)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "| uniform | 0,1 | 2.5000 [2.0000, 3.0000] |" in proc.stdout


def test_the_instruction_recipes_sweep_is_compared_with_its_none_arm(tmp_path):
    """The instruction recipe's arms are detectors and its baseline is detector=none; a run that did not evaluate
    the test split writes an empty test_loss, so the table is on validation."""
    for seed in (0, 1):
        write_run(tmp_path, "none", seed, dict.fromkeys(DOMAINS, 2.0), test_loss={})
        write_run(tmp_path, "aum", seed, dict.fromkeys(DOMAINS, 1.9 + 0.2 * seed), test_loss={})
    proc = subprocess.run([sys.executable, "-m", "dataflex.sweep", str(tmp_path), "--reference", "none"],
                          capture_output=True, text=True)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert row(proc.stdout, "none")[4] == "-" and row(proc.stdout, "aum")[4] == "1 of 2"
    assert "seeds better than none (same seed; mean and worst, validation)" in proc.stdout
    assert "--reference none" in (tmp_path / "sweep_summary.md").read_text()  # how to write it again


def test_a_summary_that_cannot_be_made_does_not_fail_the_finished_sweep(tmp_path):
    """Every job has finished when the Hydra callback runs: a sweep laid out otherwise (a custom
    hydra.sweep.subdir) gets a warning naming why there is no summary, not a failed multirun."""
    from omegaconf import OmegaConf

    from dataflex.recipes.sweep_summary import SweepSummary

    (tmp_path / "0").mkdir()
    (tmp_path / "0" / "results.json").write_text(json.dumps({"validation_loss": {"a": 1.0}}))
    config = OmegaConf.create({"hydra": {"sweep": {"dir": str(tmp_path)}}})
    with pytest.warns(UserWarning, match=r"no sweep summary for .*: .*not inside a <policy>/seed<k> folder"):
        SweepSummary().on_multirun_end(config)
    assert not (tmp_path / "sweep_summary.md").exists()
    write_run(tmp_path / "ok", "uniform", 0, dict.fromkeys(DOMAINS, 2.0))
    SweepSummary(reference="uniform").on_multirun_end(
        OmegaConf.create({"hydra": {"sweep": {"dir": str(tmp_path / "ok")}}})
    )
    assert (tmp_path / "ok" / "sweep_summary.md").is_file()


def test_a_diverged_run_is_named_not_ordered_among_the_others(tmp_path):
    """A NaN loss (a diverged run) would sort anywhere in a median; its row says so and goes last."""
    for seed in (0, 1):
        write_run(tmp_path, "uniform", seed, dict.fromkeys(DOMAINS, 2.0))
        write_run(tmp_path, "odm", seed, dict.fromkeys(DOMAINS, 1.5))
        write_run(tmp_path, "ado", seed, {"code": float("nan") if seed else 1.0, "math": 1.0, "web": 1.0})
    text = summarize_sweep(tmp_path)
    assert row(text, "ado")[2:5] == ["not finite in 1 of 2 seeds", "not finite in 1 of 2 seeds", "1 of 2"]
    assert text.index("| uniform |") < text.index("| odm |") < text.index("| ado |")
    assert "| code | 2.0000 | 1.5000 | nan |" in text
    assert (tmp_path / "sweep_summary.png").is_file()


def test_a_vlm_sweep_is_compared_on_clean_accuracy_higher_being_better(tmp_path):
    """The VLM recipe reports clean test accuracy per question type: its best arm is the highest, its worst
    question type the lowest, and a seed beats uniform by being higher on both."""
    uniform = {0: [0.5, 0.7], 1: [0.6, 0.8]}
    rho = {0: [0.55, 0.75], 1: [0.75, 0.7]}  # both seeds higher on mean and worst
    weak = {0: [0.4, 0.6], 1: [0.5, 0.9]}  # seed 1: uniform's mean (0.7), a lower worst (0.5 < 0.6)
    for policy, arms in (("uniform", uniform), ("rho", rho), ("weak", weak)):
        for seed, accuracies in arms.items():
            folder = tmp_path / policy / f"seed{seed}"
            folder.mkdir(parents=True)
            by_question = dict(zip(("what digit", "is it even"), accuracies))
            result = {"method": policy, "seed": seed, "accuracy": 0.0, "accuracy_by_question": by_question}
            (folder / "results.json").write_text(json.dumps(result))
    text = summarize_sweep(tmp_path)
    assert "test mean clean accuracy | test worst question type" in text and "validation" not in text
    assert text.index("| uniform |") < text.index("| rho |") < text.index("| weak |")  # best first after uniform
    assert row(text, "rho")[2:5] == ["0.6875 [0.6500, 0.7250]", "0.6250 [0.5500, 0.7000]", "2 of 2"]
    assert row(text, "weak")[3:5] == ["0.4500 [0.4000, 0.5000]", "0 of 2"]
    assert "| is it even | 0.7500 | 0.7250 | 0.7500 |" in text  # per question type, uniform then rho then weak
    assert "higher is better" in text and (tmp_path / "sweep_summary.png").stat().st_size > 5000
    # results of another recipe in the same table are not compared with these
    write_run(tmp_path, "odm", 0, dict.fromkeys(DOMAINS, 2.0))
    mixed = r"different measures in one comparison: .*odm/seed0 reports loss, .*seed0 clean accuracy"
    with pytest.raises(ValueError, match=mixed):
        summarize_sweep(tmp_path)


def test_a_policys_own_settings_make_arms_of_one_table_beside_uniform(tmp_path):
    """``-m policy=temperature policy.tau=2,4`` and ``-m policy=uniform`` into one sweep folder: the temperatures
    are two arms of the table uniform is in, not tables of their own without it; other overrides still split."""
    for seed in (0, 1):
        write_run(tmp_path, "uniform", seed, dict.fromkeys(DOMAINS, 2.0), "lr=0.01")
        write_run(tmp_path, "temperature", seed, dict.fromkeys(DOMAINS, 1.9), "lr=0.01,policy.tau=2")
        write_run(tmp_path, "temperature", seed, dict.fromkeys(DOMAINS, 2.1), "lr=0.01,policy.tau=4")
        write_run(tmp_path, "static", seed, dict.fromkeys(DOMAINS, 1.8), "lr=0.01,policy.weights={code: 0.5, web: 0.5}")
        write_run(tmp_path, "temperature", seed, dict.fromkeys(DOMAINS, 1.0), "lr=0.1,policy.tau=2")
    text = summarize_sweep(tmp_path)
    first, second = text.split("### lr=0.1")
    assert row(first, "temperature(tau=2)")[4] == "2 of 2" and row(first, "temperature(tau=4)")[4] == "0 of 2"
    assert row(first, "static(weights={code: 0.5, web: 0.5})")[2].startswith("1.8000")
    assert row(second, "temperature(tau=2)")[4] == "no uniform run with these seeds"
    # a weight per domain is too long for a folder name: shortened by the recipe, it is still an arm of this table
    from dataflex.run_folder import folder_name

    weights = "policy.weights={" + ", ".join(f"domain_{i}: 0.0625" for i in range(16)) + "}"
    write_run(tmp_path, "static", 0, dict.fromkeys(DOMAINS, 1.6), folder_name(f"lr=0.01,{weights}"))
    first = summarize_sweep(tmp_path).split("### lr=0.1")[0]
    (arm,) = [line for line in first.splitlines() if line.startswith("| static(weights={domain_0")]
    assert "1.6000" in arm and row(first, "uniform")[4] == "-"  # in the table uniform is in
    # a folder name cut to its start has lost its last overrides: its own table, never grouped by a prefix
    write_run(
        tmp_path, "static", 0, dict.fromkeys(DOMAINS, 1.7), "lr=0.01,policy.weights={code: 0.5, w~0123456789abcdef"
    )
    assert "### lr=0.01,policy.weights={code: 0.5, w~0123456789abcdef" in summarize_sweep(tmp_path)


def test_the_sweep_plot_draws_every_domain_and_setting_name_it_is_given(tmp_path):
    """Domains in a script matplotlib's fonts lack were drawn as empty boxes, alike on the x axis."""
    import warnings

    for seed in (0, 1):
        for policy in ("uniform", "odm"):
            write_run(tmp_path, policy, seed, {"日本語": 2.0 + seed, "中文": 2.5, "cost $5 or $6": 3.0}, "lr=0.01")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # matplotlib warns for each glyph it has to draw as a box
        summarize_sweep(tmp_path)
    assert "| 日本語 |" in (tmp_path / "sweep_summary.md").read_text()  # the table keeps the names as they are


@pytest.mark.parametrize(
    "content,message",
    [
        ("{bad", r"odm/seed1/results.json is not readable JSON \(Expecting property name"),
        ("[1, 2]", r"odm/seed1/results.json holds a JSON list, not a recipe's results object"),
        (
            '{"validation_loss": {"code": "2.1", "math": 2.0, "web": 2.0}}',
            r"values must be numbers; got \{'code': '2.1'\}",
        ),
        (
            '{"validation_loss": {"code": true, "math": 2.0, "web": 2.0}}',
            r"values must be numbers; got \{'code': True\}",
        ),
    ],
)
def test_a_damaged_results_file_is_refused_naming_it(tmp_path, content, message):
    """A half-edited results.json stopped the summary with a bare JSON error naming no file, or a numpy TypeError."""
    for seed in (0, 1):
        write_run(tmp_path, "uniform", seed, dict.fromkeys(DOMAINS, 2.0))
        write_run(tmp_path, "odm", seed, dict.fromkeys(DOMAINS, 1.9))
    (tmp_path / "odm" / "seed1" / "results.json").write_text(content)
    with pytest.raises(ValueError, match=message):
        summarize_sweep(tmp_path)


def test_a_reference_no_run_has_is_said_at_the_top_naming_the_arms(tmp_path):
    """``--reference unifrom`` gave a table whose every row read "no unifrom run with these seeds"."""
    for policy in ("uniform", "odm"):
        write_run(tmp_path, policy, 0, dict.fromkeys(DOMAINS, 2.0))
    text = summarize_sweep(tmp_path, reference="unifrom")
    assert "**No 'unifrom' run in this folder to compare with**; its arms: odm, uniform." in text
    assert "**No" not in summarize_sweep(tmp_path)
