"""Prompt-support noise scores: does a response fit its own prompt better than its task's other prompts?

A swapped or misattached response (the wrong answer of a plausible format) shares little of its prompt's
content: a math solution reuses the numbers and expressions of its own problem, not another's. The score
asks, for every example, how its own prompt-response similarity ranks among *counterfactual pairs* of its
group (task): its prompt with other examples' responses, and its response with other examples' prompts.
A right pair outranks nearly all of them; a wrong one ranks like a random pair. This is the content check
behind instruction-following difficulty (IFD, Li et al., arXiv 2308.12032: how much a prompt helps predict its
response), computed from text alone, with no model and no training: it works where a small model does not
condition on the prompt (``benchmarks/noisy_instruct``: the training-dynamics detectors reach AUROC 0.52 there),
and it fails where a response need not repeat anything of its prompt (a one-word trivia answer).

Similarity is the cosine of TF-IDF vectors fitted on the group's own prompts and responses (scikit-learn), so
words every example of a task repeats ("Answer", "the") weigh little. ``analyzer="char_wb"`` (character
3-5-grams within word bounds) matches numbers, formulas and inflected words that a word tokenizer splits
apart; ``"word"`` is the plain alternative. Each example is compared with ``references`` others of its group
(all of them when the group is smaller), drawn once per group with a fixed seed.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from dataflex.checks import whole_number
from dataflex.domains import label_texts

__all__ = ["ANALYZERS", "prompt_support_scores"]

#: analyzer -> (scikit-learn analyzer, n-gram range)
ANALYZERS = {"char_wb": ("char_wb", (3, 5)), "word": ("word", (1, 1))}
_TIE = 1e-9
_ROWS = 8192  # examples compared at once: two (rows x references) float64 blocks, 32 MB at 256 references


def _texts(name: str, values: Sequence[Any]) -> list[str]:
    bad = next((i for i, v in enumerate(values) if not isinstance(v, str)), None)
    if bad is not None:
        raise ValueError(f"{name}[{bad}] is {values[bad]!r}; every {name[:-1]} must be a string")
    return list(values)


def _midrank_share(below: np.ndarray, tied: np.ndarray, count: np.ndarray) -> np.ndarray:
    """Share of references ranked under the example, ties counted half (no evidence either way)."""
    return np.divide(below + 0.5 * tied, count, out=np.full(count.shape, np.nan), where=count > 0)


def _support(p: Any, r: Any, ref: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """Mean midrank share of the two directions for the group's examples ``rows`` against the references."""
    own = np.asarray(p[rows].multiply(r[rows]).sum(axis=1)).ravel()
    other = rows[:, None] != ref[None, :]  # an example is not its own reference
    count = other.sum(axis=1)
    support = np.zeros(rows.size)
    for sims in ((p[rows] @ r[ref].T).toarray(), (r[rows] @ p[ref].T).toarray()):  # its prompt vs others'
        # responses, its response vs others' prompts. Equal cosines computed in different orders differ in the
        # last bits: closer than _TIE is a tie.
        below = ((sims < own[:, None] - _TIE) & other).sum(axis=1)
        tied = ((np.abs(sims - own[:, None]) <= _TIE) & other).sum(axis=1)
        support += _midrank_share(below, tied, count) / 2
    return support


def prompt_support_scores(
    prompts: Sequence[str],
    responses: Sequence[str],
    groups: Sequence[Any] | None = None,
    *,
    analyzer: str = "char_wb",
    references: int = 256,
    seed: int = 0,
) -> np.ndarray:
    """Noise score per example in [0, 1] (higher = more likely a wrong response): one minus the share of
    counterfactual pairs of its group whose similarity is below its own (module docstring), averaged over the
    two directions (other responses for its prompt, other prompts for its response). About 0.5 for a random
    pair, near 0 for a response that fits only its own prompt. NaN (no evidence) for an example alone in its
    group, or in a group without a single word or n-gram. ``groups`` (one label per example, e.g. the task)
    sets who is compared with whom.
    """
    prompts, responses = _texts("prompts", prompts), _texts("responses", responses)
    n = len(prompts)
    if len(responses) != n:
        raise ValueError(f"got {n} prompts but {len(responses)} responses; give one response per prompt")
    if analyzer not in tuple(ANALYZERS):
        raise ValueError(f"analyzer={analyzer!r}; valid analyzers are {', '.join(ANALYZERS)}")
    references = whole_number("references", references)
    if references < 1:
        raise ValueError(f"references must be at least 1; got {references!r}")
    if groups is not None and len(groups) != n:
        raise ValueError(f"groups must give one label per example ({n}); got {len(groups)}")
    # Missing, blank or ambiguous labels are refused as domain labels are (a None would be a group of its own).
    names = np.zeros(n, dtype=np.int64) if groups is None else label_texts(groups, "groups")
    _, codes = np.unique(np.asarray(names), return_inverse=True)
    from sklearn.feature_extraction.text import TfidfVectorizer

    kind, ngrams = ANALYZERS[analyzer]
    scores = np.full(n, np.nan)
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0x5B]))
    for ids in np.split(np.argsort(codes, kind="stable"), np.flatnonzero(np.diff(np.sort(codes))) + 1):
        # groups in the sorted order of their labels: the seeded draws do not depend on the examples' order
        if ids.size < 2:
            continue
        # Words of one character count (single digits): scikit-learn's default pattern drops them.
        words = {"token_pattern": r"(?u)\b\w+\b"} if kind == "word" else {}
        vectorizer = TfidfVectorizer(analyzer=kind, ngram_range=ngrams, **words)
        texts = [prompts[i] for i in ids] + [responses[i] for i in ids]
        if not any(vectorizer.build_analyzer()(t) for t in texts):
            continue  # no word or n-gram in the whole group (empty or punctuation-only texts): no evidence
        both = vectorizer.fit_transform(texts)  # rows are L2-normalised: a dot product is a cosine
        p, r = both[: ids.size], both[ids.size :]
        ref = np.sort(rng.choice(ids.size, size=min(references, ids.size), replace=False))
        support = np.concatenate(
            [_support(p, r, ref, rows) for rows in np.array_split(np.arange(ids.size), -(-ids.size // _ROWS))]
        )
        scores[ids] = 1.0 - support
    return scores
