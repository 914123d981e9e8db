"""Curriculum pacing: which fraction of the examples, easiest first, training may draw from at progress t.

Every function maps progress ``t`` in [0, 1] (samples seen / curriculum horizon) to a fraction
``c(t)`` in (0, 1], is non-decreasing and reaches 1 at ``t = 1``; ``c0`` is the starting fraction.

* ``linear``: c(t) = c0 + (1 - c0) t
* ``root`` (p-th root): c(t) = min(1, (t (1 - c0^p) + c0^p)^(1/p))
* ``competence``: the square-root competence of Platanios et al. 2019 (arXiv 1903.09848),
  c(t) = min(1, sqrt(t (1 - c0^2) + c0^2)) -- ``root`` with p = 2
* ``step``: ``steps`` equal stairs from c0 to 1
"""

from __future__ import annotations

import math
from collections.abc import Callable

from dataflex.checks import real_number

__all__ = ["PACINGS", "competence", "linear", "make_pacing", "root", "step"]

Pacing = Callable[[float], float]
PACINGS = ("linear", "root", "competence", "step")


def _check_c0(c0: float) -> None:
    if not 0 < c0 <= 1:
        raise ValueError(f"c0 (the starting fraction) must lie in (0, 1]; got {c0}")


def _clip(t: float) -> float:
    return min(1.0, max(0.0, float(t)))


def linear(c0: float = 0.1) -> Pacing:
    _check_c0(c0)
    return lambda t: min(1.0, c0 + (1 - c0) * _clip(t))


def root(c0: float = 0.1, p: float = 2.0) -> Pacing:
    _check_c0(c0)
    if p < 1:
        raise ValueError(f"root pacing needs p >= 1; got {p}")
    return lambda t: min(1.0, (_clip(t) * (1 - c0**p) + c0**p) ** (1 / p))


def competence(c0: float = 0.1) -> Pacing:
    """Platanios et al. (2019): c(t) = min(1, sqrt(t (1 - c0^2) / T + c0^2)) with t already divided by T."""
    return root(c0, 2.0)


def step(c0: float = 0.1, steps: int = 4) -> Pacing:
    _check_c0(c0)
    if steps < 1:
        raise ValueError(f"step pacing needs steps >= 1; got {steps}")
    return lambda t: min(1.0, c0 + (1 - c0) * math.floor(_clip(t) * steps) / steps)


def make_pacing(name: str, c0: float = 0.1, **kwargs: float) -> Pacing:
    """A pacing function by name: ``linear``, ``root`` (``p=``), ``competence`` or ``step`` (``steps=``)."""
    makers = {"linear": linear, "root": root, "competence": competence, "step": step}
    if name not in makers:
        raise ValueError(f"pacing={name!r}; valid values are {', '.join(PACINGS)}")
    kwargs = {key: real_number(key, value) for key, value in kwargs.items()}
    return makers[name](real_number("c0", c0), **kwargs)
