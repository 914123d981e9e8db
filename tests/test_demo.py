"""The README's demo: a short run prints its table and writes its plot; bad arguments are named before any work."""

from __future__ import annotations

import json
import sys

import pytest

from dataflex.recipes import demo_mixing


def run_demo(monkeypatch, *args: str) -> None:
    monkeypatch.setattr(sys, "argv", ["demo_mixing.py", *args])
    demo_mixing.main()


def test_a_short_demo_prints_the_table_and_writes_the_plot(monkeypatch, tmp_path, capsys):
    small = ["--steps", "8", "--val-per-domain", "3", "--max-len", "32", "--width", "16", "--layers", "1"]
    run_demo(monkeypatch, *small, "--update-every", "2", "--policies", "uniform,odm", "--out", str(tmp_path))
    printed = capsys.readouterr().out
    assert "| domain | uniform | odm |" in printed and "| **worst** |" in printed
    assert (tmp_path / "weights.png").stat().st_size > 0
    results = json.loads((tmp_path / "results.json").read_text())["results"]
    assert set(results) == {"uniform", "odm"} and len(results["odm"]["val_loss"]) == 8
    # Rerun into the same folder with fixed-weight policies only: no plot of the earlier run is left to pass for it.
    small[1] = "2"
    run_demo(monkeypatch, *small, "--policies", "uniform,natural", "--out", str(tmp_path))
    assert "no weight plot: uniform, natural kept their weights fixed" in capsys.readouterr().out
    assert not list(tmp_path.glob("weights*.png"))


@pytest.mark.parametrize(
    "args,message",
    [
        (["--steps", "0"], "argument --steps: must be a positive integer; got 0"),
        (["--lr", "0"], "argument --lr: must be a finite number > 0; got 0"),
        (["--width", "7"], "argument --width: must be a multiple of the model's 4 attention heads; got 7"),
        (["--policies", "odm,odm"], "--policies needs distinct names"),
        (["--policies", "odm,foo"], "unknown policies ['foo']"),
        (["--data", "data/textmix/train"], "argument --data: data/textmix/train has no .jsonl files in train/"),
    ],
)
def test_bad_arguments_are_named(monkeypatch, tmp_path, capsys, args, message):
    with pytest.raises(SystemExit):
        run_demo(monkeypatch, *args, "--out", str(tmp_path))
    assert message in capsys.readouterr().err
    assert not (tmp_path / "results.json").exists()


def test_domains_called_mean_or_worst_keep_their_own_rows(monkeypatch, tmp_path, capsys):
    """The table's summary rows were found by name, so a domain called "mean" showed the mean over domains."""
    for split in ("train", "validation"):
        (tmp_path / "data" / split).mkdir(parents=True)
        lines = [
            json.dumps({"text": f"{word} number {i} " * 4, "domain": domain})
            for domain, word in (("mean", "average"), ("worst", "bad"), ("code", "x = 1;"))
            for i in range(12)
        ]
        (tmp_path / "data" / split / "all.jsonl").write_text("\n".join(lines) + "\n")
    small = ["--steps", "4", "--max-len", "32", "--width", "16", "--layers", "1", "--policies", "uniform,odm"]
    run_demo(monkeypatch, *small, "--update-every", "2", "--data", str(tmp_path / "data"), "--out", str(tmp_path))
    printed = capsys.readouterr().out
    results = json.loads((tmp_path / "results.json").read_text())["results"]
    for domain in ("mean", "worst"):
        shown = next(line for line in printed.splitlines() if line.startswith(f"| {domain} |"))
        cells = [f"{results[p]['val_loss'][domain]:.3f}" for p in ("uniform", "odm")]
        assert shown == f"| {domain} | {cells[0]} | {cells[1]} |"
    overall = [sum(results[p]["val_loss"].values()) / 3 for p in ("uniform", "odm")]
    assert f"| **mean** | {overall[0]:.3f} | {overall[1]:.3f} |" in printed
