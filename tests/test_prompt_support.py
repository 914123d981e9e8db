"""Prompt-support noise scores: a response that does not fit its own prompt is ranked as noise."""

from __future__ import annotations

import numpy as np
import pytest

from dataflex.detectors import detection_quality
from dataflex.prompt_support import prompt_support_scores


def planted_problems(n: int = 60, seed: int = 0) -> tuple[list[str], list[str], np.ndarray]:
    """Arithmetic problems whose right solutions repeat the problem's numbers; a seeded third swapped."""
    rng = np.random.default_rng(seed)
    a, b = rng.integers(100, 999, size=(2, n))
    prompts = [f"Tom has {x} apples and buys {y} more. How many apples now?" for x, y in zip(a, b)]
    responses = [f"He has {x} + {y} = {x + y} apples." for x, y in zip(a, b)]
    swapped = np.zeros(n, dtype=bool)
    swapped[rng.choice(n, size=n // 3, replace=False)] = True
    donors = np.roll(np.flatnonzero(swapped), 1)  # each swapped example gets another swapped one's solution
    original = list(responses)
    for i, d in zip(np.flatnonzero(swapped), donors):
        responses[i] = original[d]
    return prompts, responses, swapped


def by_direct_ranking(prompts, responses, analyzer_kind, ngrams) -> np.ndarray:
    """The score computed the slow way: every pair's cosine, each example against all the others."""
    from sklearn.feature_extraction.text import TfidfVectorizer

    extra = {"token_pattern": r"(?u)\b\w+\b"} if analyzer_kind == "word" else {}
    v = TfidfVectorizer(analyzer=analyzer_kind, ngram_range=ngrams, **extra).fit(list(prompts) + list(responses))
    p, r = v.transform(prompts).toarray(), v.transform(responses).toarray()
    sim = p @ r.T  # sim[i, j]: prompt i with response j
    n = len(prompts)
    out = np.empty(n)
    for i in range(n):
        others = [j for j in range(n) if j != i]
        own = sim[i, i]
        support = []
        for row in (sim[i, others], sim[others, i]):
            tied = np.abs(row - own) <= 1e-9
            support.append((np.sum((row < own) & ~tied) + 0.5 * np.sum(tied)) / len(others))
        out[i] = 1 - np.mean(support)
    return out


@pytest.mark.parametrize("analyzer", ["char_wb", "word"])
def test_swapped_solutions_rank_first_and_match_a_direct_computation(analyzer):
    prompts, responses, swapped = planted_problems()
    scores = prompt_support_scores(prompts, responses, analyzer=analyzer)
    assert scores.shape == (60,) and np.all((scores >= 0) & (scores <= 1))
    assert detection_quality(scores, swapped)["auroc"] > 0.95
    kind, ngrams = {"char_wb": ("char_wb", (3, 5)), "word": ("word", (1, 1))}[analyzer]
    np.testing.assert_allclose(scores, by_direct_ranking(prompts, responses, kind, ngrams), atol=1e-12)


def test_groups_compare_within_their_own_task_and_a_lone_example_has_no_score():
    prompts, responses, swapped = planted_problems(40)
    # A second task whose responses share nothing with the first's: grouped, the first task's scores are its own.
    prompts2 = [f"Name a colour number {i}" for i in range(20)]
    responses2 = [f"colour {i}" for i in range(20)]
    groups = ["math"] * 40 + ["colours"] * 20 + ["alone"]
    scores = prompt_support_scores(prompts + prompts2 + ["x y z"], responses + responses2 + ["q"], groups)
    np.testing.assert_allclose(scores[:40], prompt_support_scores(prompts, responses), atol=1e-12)
    assert np.isnan(scores[60]) and np.isfinite(scores[:60]).all()
    # A group with no word or n-gram at all has no evidence either (scikit-learn would refuse to fit it).
    blank = prompt_support_scores(["", "..", "a b", "c"], ["", "!", "a", "d"], ["x", "x", "y", "y"], analyzer="word")
    assert np.isnan(blank[:2]).all() and np.isfinite(blank[2:]).all()


def test_sampled_references_are_seeded_and_still_find_the_swaps():
    prompts, responses, swapped = planted_problems(90, seed=1)
    a = prompt_support_scores(prompts, responses, references=20, seed=5)
    assert np.array_equal(a, prompt_support_scores(prompts, responses, references=20, seed=5))
    assert not np.array_equal(a, prompt_support_scores(prompts, responses, references=20, seed=6))
    assert detection_quality(a, swapped)["auroc"] > 0.9


def test_large_groups_are_compared_in_blocks_with_the_same_result(monkeypatch):
    import dataflex.prompt_support as ps

    prompts, responses, _ = planted_problems(90, seed=2)
    whole = prompt_support_scores(prompts, responses, references=30)
    monkeypatch.setattr(ps, "_ROWS", 7)  # 13 blocks, the last one shorter
    assert np.array_equal(prompt_support_scores(prompts, responses, references=30), whole)


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(responses=["a"]), "got 2 prompts but 1 responses"),
        (dict(responses=["a", None]), r"responses\[1\] is None; every response must be a string"),
        (dict(analyzer="bpe"), "analyzer='bpe'; valid analyzers are char_wb, word"),
        (dict(analyzer=["word"]), r"analyzer=\['word'\]; valid analyzers"),
        (dict(references=0), "references must be at least 1; got 0"),
        (dict(references=True), "references must be"),
        (dict(groups=["a"]), r"groups must give one label per example \(2\); got 1"),
        (dict(groups=["a", None]), r"groups are missing \(None or NaN\) at 1 of 2 examples, first at positions \[1\]"),
        (
            dict(groups=[float("nan"), "a"]),
            r"groups are missing \(None or NaN\) at 1 of 2 examples, first at positions \[0\]",
        ),
        (dict(groups=["a", " "]), r"groups are empty or blank at 1 of 2 examples"),
        (dict(groups=["a", "a "]), "groups differ only by surrounding whitespace"),
    ],
)
def test_bad_arguments_are_refused_by_name(kwargs, message):
    given = dict(prompts=["p one", "p two"], responses=["r one", "r two"]) | kwargs
    with pytest.raises(ValueError, match=message):
        prompt_support_scores(given.pop("prompts"), given.pop("responses"), **given)
