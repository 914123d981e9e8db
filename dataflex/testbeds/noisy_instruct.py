"""Noisy instruction finetuning: the bundled instruction pool with a known share of swapped responses.

A share ``noise`` of each task's training examples get the response of *another example of the same task*
(a plausible wrong answer: right format, wrong content), taken from that task's examples *outside* the
training pool, each at most once. Donors from inside the pool would make every swapped response a duplicate
of a training example, seen twice as often as the others and so learnt faster: loss-based detectors then
rank the wrong examples as the *easiest* (measured: AUROC 0.47 for every detector). The mask is returned
for scoring only. Validation and test splits are clean.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from dataflex.testbeds.tiny import INSTRUCTION_FIELDS, collate_causal, instruct_dataset, load_jsonl

__all__ = ["NOISY_TASKS", "noisy_instructions", "prompt_reliance"]

#: Tasks whose responses depend on the instruction's content (numbers, names), so a swapped response is wrong
#: in a way a model could in principle notice (letter or yes/no answers are not), with enough examples beyond
#: a pool of 500 to donate responses (human_eval has 124).
NOISY_TASKS = ("gsm8k", "competition_math", "jeopardy")


def _task_records(folder: Path, tasks: tuple[str, ...], cap: int | None) -> list[dict[str, Any]]:
    missing = [t for t in tasks if not (folder / f"{t}.jsonl").is_file()]
    if missing:
        known = sorted(p.stem for p in folder.glob("*.jsonl"))
        raise FileNotFoundError(f"no {folder}/<task>.jsonl for tasks {missing}; tasks there: {known}")
    records: list[dict[str, Any]] = []
    for t in tasks:
        path = folder / f"{t}.jsonl"
        rows = load_jsonl(path, cap, require=INSTRUCTION_FIELDS)
        # The file names the task (its evaluation split, its donors); a record's own "task" labels it in training:
        # two names for one task would train under one label and report under the other.
        other = next((i for i, r in enumerate(rows) if r["task"] != t), None)
        if other is not None:
            raise ValueError(
                f"{path} holds a record (record {other + 1}) whose task is {rows[other]['task']!r}, not {t!r}: each "
                "<task>.jsonl must hold that task's records only"
            )
        records += rows
    return records


def noisy_instructions(
    data_root: str | Path,
    *,
    tasks: tuple[str, ...] = NOISY_TASKS,
    per_task: int | None = 500,
    noise: float = 0.3,
    seed: int = 0,
    max_len: int = 256,
    eval_per_task: int | None = None,
) -> dict[str, Any]:
    """``train`` (a ``datasets.Dataset`` with ``input_ids, prompt_len, task, noisy``), ``train_text`` (its
    ``prompts``, ``responses`` and ``tasks`` as text, for text-based detectors), per task the clean
    ``validation`` and ``test`` datasets, ``validation_text`` (the validation examples as text) and
    ``records`` (``{"validation"|"test": {task: records}}``, for :func:`prompt_reliance`).
    ``per_task`` caps each task's training examples (its first ones); ``seed`` draws which examples are
    swapped (``round(noise * per_task)`` of every task) and their donors."""
    root = Path(data_root) / "instruct"
    tasks = tuple(tasks)
    if not tasks or len(set(tasks)) != len(tasks):
        raise ValueError(f"tasks must be distinct task names; got {list(tasks)}")
    if not 0 <= noise < 1:
        raise ValueError(f"noise must be in [0, 1); got {noise!r}")
    records: list[dict[str, Any]] = []
    noisy_parts = []
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0x5A]))
    for task in tasks:
        rows = _task_records(root / "train", (task,), None)
        pool, donors = rows[:per_task], rows[per_task if per_task is not None else len(rows) :]
        swapped = rng.choice(len(pool), size=int(round(noise * len(pool))), replace=False)
        if swapped.size > len(donors):
            raise ValueError(
                f"task {task!r} has {len(rows)} training examples: {len(pool)} in the pool leave {len(donors)} "
                f"to donate responses, fewer than the {swapped.size} swapped; lower per_task or noise"
            )
        # Each donor is used once; one whose response equals the example's own (short answers repeat) is
        # skipped, so every swapped example is surely wrong.
        order = iter(rng.permutation(len(donors)).tolist())
        pool = [dict(r) for r in pool]
        for i in swapped.tolist():
            response = next(
                (donors[d]["response"] for d in order if donors[d]["response"] != pool[i]["response"]), None
            )
            if response is None:
                raise ValueError(f"task {task!r} ran out of donor responses that differ from the swapped ones")
            pool[i]["response"] = response
        mask = np.zeros(len(pool), dtype=bool)
        mask[swapped] = True
        records += pool
        noisy_parts.append(mask)
    noisy = np.concatenate(noisy_parts)
    train = instruct_dataset(records, max_len).add_column("noisy", noisy.tolist())
    held_out = {
        split: {t: _task_records(root / split, (t,), eval_per_task) for t in tasks} for split in ("validation", "test")
    }
    splits = {
        split: {t: instruct_dataset(rows, max_len) for t, rows in by_task.items()}
        for split, by_task in held_out.items()
    }
    validation_rows = [r for rows in held_out["validation"].values() for r in rows]
    return {
        "train": train,
        "noisy": noisy,
        "train_text": _text(records),
        "validation_text": _text(validation_rows),
        "records": held_out,
        **splits,
    }


def _text(records: list[dict[str, Any]]) -> dict[str, list[str]]:
    return {
        key: [r[field] for r in records]
        for key, field in (("prompts", "instruction"), ("responses", "response"), ("tasks", "task"))
    }


def prompt_reliance(
    model: Any, records_by_task: dict[str, list[dict[str, Any]]], max_len: int = 256, batch_size: int = 32
) -> dict[str, float]:
    """Per task, how much a model reads its instruction: the mean over examples ``j`` of the token-mean loss
    of response ``j`` under the *previous* example's instruction minus its loss under its own.

    Clean test loss mostly measures how well responses are modelled as text of their task; a swapped training
    response teaches the wrong instruction-response link, which this isolates: the response bytes are the same
    in both encodings (``encode_instruction`` keeps a response's start whatever the prompt's length), only the
    instruction differs. Pairs whose neighbour has the same response (short answers repeat) are skipped, since
    there the other instruction is also right. 0 means the instruction is ignored; NaN if no pair is left.
    """
    from dataflex.offline import score_pool, token_mean_losses

    scorer = token_mean_losses(model)
    reliance: dict[str, float] = {}
    for task, rows in records_by_task.items():
        previous = np.roll(np.arange(len(rows)), 1)
        pairs = [j for j in range(len(rows)) if rows[previous[j]]["response"] != rows[j]["response"]]
        if not pairs:
            reliance[task] = float("nan")
            continue
        own = instruct_dataset([rows[j] for j in pairs], max_len)
        other = instruct_dataset([{**rows[j], "instruction": rows[previous[j]]["instruction"]} for j in pairs], max_len)
        losses = [score_pool(scorer, ds, collate_causal, batch_size=batch_size, progress=False) for ds in (own, other)]
        reliance[task] = float(np.nanmean(losses[1] - losses[0]))
    return reliance
