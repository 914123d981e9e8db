"""Curricula: how hard each example is, and how fast training moves from easy to hard.

A :class:`Curriculum` pairs a difficulty source with a pacing function (:mod:`dataflex.pacing`).
Difficulty is any per-example score where lower means easier: a fixed array (e.g. a reference
model's loss from :func:`dataflex.offline.score_pool`, or :func:`length_difficulty`), or a *scorer*
called with the live model (:func:`loss_difficulty`: the current loss), optionally re-run every few
steps. Curriculum learning in the sense of Bengio et al. 2009; competence pacing from Platanios et al.
2019 (arXiv 1903.09848). ``reverse=True`` gives the anti-curriculum (hardest first).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from dataflex.checks import flag
from dataflex.pacing import PACINGS, make_pacing
from dataflex.ranking import rank_ids

__all__ = ["Curriculum", "length_difficulty", "loss_difficulty"]

Scorer = Callable[[torch.nn.Module, Any, Callable], np.ndarray]


def length_difficulty(dataset: Any, column: str = "input_ids") -> np.ndarray:
    """Sequence length as difficulty (longer = harder)."""
    return np.array([len(dataset[i][column]) for i in range(len(dataset))], dtype=np.float64)


def loss_difficulty(batch_size: int = 32) -> Scorer:
    """A scorer: each example's current token-mean loss under the model (batched, length-sorted)."""
    from dataflex.offline import score_pool, token_mean_losses

    def score(model: torch.nn.Module, dataset: Any, collate: Callable) -> np.ndarray:
        return score_pool(token_mean_losses(model), dataset, collate, batch_size=batch_size, progress=False)

    return score


class Curriculum:
    """Difficulty + pacing + direction, as used by :class:`~dataflex.hf.DataFlexCurriculumCallback`.

    Args:
        difficulty: per-example difficulty (lower = easier), in dataset order; or
        scorer: ``scorer(model, dataset, collate) -> difficulty``, run at the start of training (and every
            ``rescore_every`` steps of the callback).
        pacing: ``linear`` | ``root`` | ``competence`` | ``step``; ``c0``: fraction open at the start.
        reverse: anti-curriculum (hardest first).
        pacing_kwargs: ``p`` for ``root``, ``steps`` for ``step``.
    """

    def __init__(
        self,
        difficulty: Sequence[float] | np.ndarray | None = None,
        *,
        scorer: Scorer | None = None,
        pacing: str = "competence",
        c0: float = 0.1,
        reverse: bool = False,
        **pacing_kwargs: float,
    ) -> None:
        if (difficulty is None) == (scorer is None):
            raise ValueError("give exactly one of difficulty= (an array) or scorer= (a function of the model)")
        if pacing not in PACINGS:
            raise ValueError(f"pacing={pacing!r}; valid values are {', '.join(PACINGS)}")
        self.difficulty = None if difficulty is None else np.asarray(difficulty, dtype=np.float64)
        self.scorer, self.reverse, self.pacing_name = scorer, flag("reverse", reverse), pacing
        self.pacing = make_pacing(pacing, c0, **pacing_kwargs)

    def order(self, model: torch.nn.Module | None = None, dataset: Any = None, collate: Callable | None = None):
        """Example ids easiest first, from the fixed difficulty or by running the scorer."""
        if self.scorer is not None:
            if model is None:
                raise ValueError("this curriculum scores with the model: pass model, dataset and collate")
            difficulty = np.asarray(self.scorer(model, dataset, collate), dtype=np.float64)
        else:
            difficulty = self.difficulty
        if dataset is not None and len(difficulty) != len(dataset):
            raise ValueError(f"got {len(difficulty)} difficulty scores for a training set of {len(dataset)} examples")
        return rank_ids(difficulty, descending=self.reverse)

    @property
    def positional_input(self) -> str | None:
        """What this curriculum holds per example by position in the training set (its fixed difficulty)."""
        return None if self.difficulty is None else "the curriculum's difficulty scores"

    # a curriculum has no state of its own: its orders live in the sampler's schedule
    def state_dict(self) -> dict[str, Any]:
        return {"pacing": self.pacing_name, "reverse": self.reverse}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state != self.state_dict():
            raise ValueError(f"checkpoint curriculum {state} differs from this run's {self.state_dict()}")
