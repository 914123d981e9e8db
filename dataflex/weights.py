"""Domain-weight vectors: validation, flooring and entropy.

Every policy returns a weight vector over the domains, in the order of ``domain_names``. The helpers
here are the single place where a vector is checked, so every error message has the same shape: it
shows the bad value and says what would be valid.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from contextvars import ContextVar

import numpy as np

__all__ = [
    "SUM_TOLERANCE",
    "apply_floor",
    "entropy",
    "lists_may_follow",
    "user_weights",
    "validate_weights",
    "weights_from_mapping",
]

#: Tolerance on ``sum(weights) == 1`` for user-given weights.
SUM_TOLERANCE = 1e-6


def weights_from_mapping(weights: Mapping[str, float], domain_names: Sequence[str]) -> np.ndarray:
    """Turn ``{"code": 0.3, ...}`` into a vector ordered like ``domain_names``.

    Domains missing from the mapping get weight 0, with a warning naming them; names that are not domains raise.
    Keys are read as domain names are made from labels (their text), so ``{0: 0.8, 1: 0.2}`` fits integer labels;
    keys that would read alike (``0`` and ``"0"``) raise.
    """
    from dataflex.domains import label_texts

    weights = dict(zip(label_texts(list(weights), "the weights' domain names"), weights.values()))
    unknown = sorted(set(weights) - set(domain_names))
    if unknown:
        raise ValueError(f"unknown domain name(s) {unknown}; valid domains are {list(domain_names)}")
    omitted = [name for name in domain_names if name not in weights]
    if omitted:  # allowed (a way to leave domains out), but a forgotten domain would silently never be trained on
        warnings.warn(
            f"the weights {dict(weights)} give no weight for domain(s) {omitted}: they get weight 0 and are never "
            "sampled; list them with 0 to leave them out on purpose",
            UserWarning,
            stacklevel=3,
        )
    return np.array([float(weights.get(name, 0.0)) for name in domain_names], dtype=np.float64)


def validate_weights(
    weights: Sequence[float] | np.ndarray | Mapping[str, float],
    domain_names: Sequence[str],
    *,
    what: str = "weights",
) -> np.ndarray:
    """Check a user-supplied weight vector and return it as float64.

    Valid means: one entry per domain, all finite, none negative, at least one positive, and summing
    to 1 within ``SUM_TOLERANCE``. We do not silently renormalise: a vector that does not sum to 1 is
    usually a typo (a missing domain, a percent instead of a fraction), and guessing hides it.
    """
    if isinstance(weights, Mapping):
        vec = weights_from_mapping(weights, domain_names)
    else:
        vec = np.asarray(weights, dtype=np.float64).reshape(-1)
        if vec.shape[0] != len(domain_names):
            raise ValueError(
                f"{what} has {vec.shape[0]} entries but there are {len(domain_names)} domains "
                f"{list(domain_names)}; give one weight per domain"
            )
    named = dict(zip(domain_names, vec.tolist()))
    bad = {k: v for k, v in named.items() if not np.isfinite(v)}
    if bad:
        raise ValueError(f"{what} must be finite; got non-finite values {bad}")
    neg = {k: v for k, v in named.items() if v < 0}
    if neg:
        raise ValueError(f"{what} must be >= 0; got negative values {neg}")
    total = float(vec.sum())
    if total <= 0:
        raise ValueError(f"{what} must have at least one positive entry; got {named}")
    if abs(total - 1.0) > SUM_TOLERANCE:
        raise ValueError(
            f"{what} must sum to 1 (within {SUM_TOLERANCE}); got sum {total:.8g} for {named}. "
            "Divide by the sum if you meant proportions."
        )
    return vec / total


#: Another order the data declares its domains in (a ``datasets.ClassLabel``'s class ids), and what declares it.
_DECLARED_ORDER: ContextVar[tuple[tuple[str, ...], str] | None] = ContextVar("declared_domain_order", default=None)


@contextmanager
def lists_may_follow(order: Sequence[str] | None, source: str) -> Iterator[None]:
    """Within this block :func:`user_weights` refuses a list when the data declares its domains in ``order``
    (by ``source``) and that order is not dataflex's: a list written in the declared order would be misread.
    ``order=None`` declares nothing."""
    token = _DECLARED_ORDER.set(None if order is None else (tuple(order), source))
    try:
        yield
    finally:
        _DECLARED_ORDER.reset(token)


def _list_order_error(what: str, domain_names: Sequence[str]) -> str | None:
    """Why a list over ``domain_names`` would be easily meant in another order, or None."""
    declared = _DECLARED_ORDER.get()
    if declared is not None:
        order, source = declared
        names = set(domain_names)
        present = [name for name in order if name in names]
        if present != list(domain_names):
            return (
                f"{what} are a list, which follows dataflex's domain order, the sorted names {list(domain_names)}; "
                f"{source} orders them {present}, so a list is easily meant in that order. Give the weights by "
                f"name, e.g. {{{domain_names[0]!r}: ..., {domain_names[1]!r}: ...}}"
            )
    try:
        numbers = [float(name) for name in domain_names]
    except ValueError:
        return None
    if numbers == sorted(numbers):
        return None
    return (
        f"{what} are a list, which follows dataflex's domain order, the sorted text of the names: "
        f"{list(domain_names)}; these names are numbers, whose numeric order differs, so a list is easily "
        f"meant in the wrong order. Give the weights by name, e.g. {{{domain_names[0]!r}: ..., "
        f"{domain_names[1]!r}: ...}}"
    )


def user_weights(
    weights: Sequence[float] | np.ndarray | Mapping[str, float],
    domain_names: Sequence[str],
    *,
    what: str = "weights",
) -> np.ndarray:
    """:func:`validate_weights` for weights a user wrote, refusing a list whose order is easy to misread.

    A list follows dataflex's domain order, the sorted text of the names. When the names are numbers (labels
    0..11, say) that is not their numeric order ("10" and "11" come before "2"), so a list written in numeric
    order would give most weights to other domains without a word: refused, asking for the weights by name. So is
    a list when the data declares its domains in another order (:func:`lists_may_follow`).
    """
    if not isinstance(weights, Mapping):
        error = _list_order_error(what, domain_names)
        if error:
            raise ValueError(error)
    return validate_weights(weights, domain_names, what=what)


def apply_floor(weights: np.ndarray, floor: float) -> np.ndarray:
    """Mix ``weights`` with the uniform vector so every entry is at least ``floor``.

    ``w' = floor + (1 - K * floor) * w / sum(w)``: this keeps the ordering of the weights, sums to 1,
    and guarantees a minimum share. For example K = 8, floor = 0.01 maps a one-hot vector to
    (0.93, 0.01, ..., 0.01). Non-finite entries are treated as 0 so a bad update cannot poison the mix.
    """
    k = weights.shape[0]
    if not 0.0 <= floor * k < 1.0:
        raise ValueError(f"floor={floor} is too large for {k} domains: need 0 <= floor < 1/{k} = {1 / k:.4g}")
    w = np.where(np.isfinite(weights) & (weights > 0), weights, 0.0).astype(np.float64)
    total = w.sum()
    w = np.full(k, 1.0 / k) if total <= 0 else w / total
    return floor + (1.0 - k * floor) * w


def entropy(weights: np.ndarray) -> float:
    """Shannon entropy in nats; ``log(K)`` for uniform, 0 for one-hot. Used to spot collapse."""
    w = np.asarray(weights, dtype=np.float64)
    w = w[w > 0]
    return float(-(w * np.log(w)).sum()) + 0.0  # + 0.0: a one-hot mixture logs 0, not -0
