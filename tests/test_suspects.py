"""dataflex.suspects: the most suspect examples listed for reading — order, text on one line, known truth."""

from __future__ import annotations

import numpy as np
import pytest

from dataflex.suspects import most_suspect, suspects_table


def test_most_suspect_is_the_highest_finite_scores_ties_by_id():
    scores = np.array([0.1, 3.0, np.nan, 3.0, -1.0, np.inf])
    assert most_suspect(scores, 3).tolist() == [1, 3, 0]  # 1 before 3 (a tie); NaN and inf (no finite score) never
    assert most_suspect(np.array([np.nan, 2.0, np.nan]), 10).tolist() == [1]  # never scored: never listed
    for bad in (0, -1, 2.5, True, "3"):
        with pytest.raises(ValueError, match=r"top must be a whole number >= 1; got"):
            most_suspect(scores, bad)


def test_the_table_lists_text_on_one_line_with_the_known_truth_and_precision():
    scores = np.array([0.2, 0.9, 0.5, np.nan, 0.7])
    columns = {"task": ["a", "b", "a", "b", "a"], "response": ["ok", "x | y\nz", "fine", "?", "w" * 100]}
    wrong = np.array([False, True, False, True, True])
    table = suspects_table(scores, columns, top=3, known_wrong=wrong, width=20)
    lines = table.splitlines()
    assert lines[0] == (
        "3 most suspect of 5 examples (1 without a finite score); 2 of these 3 are known wrong (precision 0.67; "
        "0.60 of all examples are)."
    )
    assert lines[2] == "| rank | id | score | task | response | wrong |"
    assert lines[4] == "| 1 | 1 | 0.9 | b | x \\| y z | yes |"  # one line; the pipe cannot split the cell
    assert lines[5] == f"| 2 | 4 | 0.7 | a | {'w' * 19}… | yes |"  # shortened to the width
    assert lines[6] == "| 3 | 2 | 0.5 | a | fine | no |"
    assert len(lines) == 7
    plain = suspects_table(scores, {}, top=1)
    assert plain.splitlines()[2:] == ["| rank | id | score |", "|---|---|---|", "| 1 | 1 | 0.9 |"]
    with pytest.raises(ValueError, match=r"column 'task' has 2 values for 5 scored examples"):
        suspects_table(scores, {"task": ["a", "b"]})
    with pytest.raises(ValueError, match=r"column 'known_wrong' has 4 values"):
        suspects_table(scores, {}, known_wrong=wrong[:4])
