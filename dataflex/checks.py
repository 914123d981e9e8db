"""Type checks on user-given numbers, so a bad value is refused by name before any arithmetic sees it.

A Hydra override arrives as the string it was typed as (``policy.alpha=abc``), and a YAML ``yes`` as a bool;
without these, the first comparison fails with ``'<=' not supported between 'float' and 'str'``, which names
neither the setting nor the value.
"""

from __future__ import annotations

import numbers
from typing import Any

import numpy as np

__all__ = ["flag", "is_real", "is_whole", "real_number", "seed_number", "whole_number"]


def is_real(value: Any) -> bool:
    """A real number, numpy's included; a bool is not one (``True`` would pass for 1)."""
    return isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_))


def is_whole(value: Any) -> bool:
    """An integer, numpy's included; a bool is not one (``update_every=True`` would pass for 1)."""
    return isinstance(value, numbers.Integral) and not isinstance(value, (bool, np.bool_))


def real_number(name: str, value: Any) -> float:
    """``value`` as a float; ``ValueError`` naming ``name`` if it is not a real number (a bool is not)."""
    if not is_real(value):
        raise ValueError(f"{name} must be a number; got {value!r} ({type(value).__name__})")
    return float(value)


def whole_number(name: str, value: Any) -> int:
    """``value`` as an int; ``ValueError`` naming ``name`` if it is not an integer (a bool or 2.5 is not)."""
    if not is_whole(value):
        raise ValueError(f"{name} must be an integer; got {value!r} ({type(value).__name__})")
    return int(value)


def seed_number(name: str, value: Any) -> int:
    """``value`` as a seed: an integer >= 0 (numpy's ``SeedSequence`` refuses a negative one at the first draw, with
    an error naming neither the setting nor the value)."""
    seed = whole_number(name, value)
    if seed < 0:
        raise ValueError(f"{name} must be an integer >= 0; got {value!r}")
    return seed


def flag(name: str, value: Any) -> bool:
    """``value`` as a bool; ``ValueError`` naming ``name`` for anything else — a string such as ``"false"``
    or ``"no"`` is truthy and would silently switch the option on."""
    if not isinstance(value, (bool, np.bool_)):
        raise ValueError(f"{name} must be True or False; got {value!r} ({type(value).__name__})")
    return bool(value)
