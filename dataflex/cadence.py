"""When a run's decisions fall, and the warnings for runs in which they cannot matter.

A decider acts at every multiple of ``update_every`` after ``warmup_steps`` (Trainer and plain loop alike); a
decision at the last step changes nothing. A run in which none falls, or fewer than a policy needs to leave its
starting mixture (ODM's exploration phase, ADO's warmup), is a static mixture or the whole pool under another
name — a comparison with the baseline would show no difference without saying why — so it warns at its start.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np

from dataflex.policies.base import BoundPolicy, MixingPolicy

__all__ = ["count_decisions", "start_policy", "warn_if_never_adaptive", "warn_no_decision"]


def count_decisions(steps: int, update_every: int, warmup_steps: int = 0) -> int:
    """Decisions that change training: at multiples of ``update_every`` after the warmup, before the last step."""
    return max((steps - 1) // update_every - warmup_steps // update_every, 0)


def warn_no_decision(what: str, instead: str, *, steps: int, update_every: int, warmup_steps: int = 0) -> None:
    warnings.warn(
        f"no {what} falls inside this run (update_every={update_every}, warmup_steps={warmup_steps}, "
        f"max_steps={steps}): it trains on {instead} throughout; lower update_every or warmup_steps",
        stacklevel=4,
    )


def start_policy(
    policy: MixingPolicy,
    domain_names: Sequence[str],
    domain_sizes: np.ndarray,
    *,
    steps: int,
    update_every: int,
    warmup_steps: int = 0,
) -> None:
    """Bind ``policy`` for a run of ``steps`` and refuse or warn of a cadence it cannot work with.

    A schedule counted in updates (``Piecewise.check_cadence``) is refused when the run's updates do not come
    where it counts them; an adaptive policy (one that overrides ``update``) warns when no update falls inside
    the run, or when fewer fall than it needs to leave its starting mixture (:func:`warn_if_never_adaptive`).
    """
    policy.bind(domain_names, domain_sizes)
    if hasattr(policy, "check_cadence"):
        policy.check_cadence(update_every, warmup_steps)
    decisions = count_decisions(steps, update_every, warmup_steps)
    if decisions == 0 and type(policy).update is not BoundPolicy.update:  # fixed mixtures never update
        warn_no_decision(
            f"{type(policy).__name__} update",
            "its initial mixture",
            steps=steps,
            update_every=update_every,
            warmup_steps=warmup_steps,
        )
    else:
        warn_if_never_adaptive(policy, decisions, update_every)


def warn_if_never_adaptive(policy: Any, decisions: int, update_every: int) -> None:
    """Warn when a bound policy's mixture cannot leave its initial weights within the run's ``decisions`` updates.

    ODM's exploration keeps the mixture exactly uniform for its first ``floor(K ln K)`` updates (147 for 40
    domains) and ADO keeps its prior until ``warmup_updates``: a run shorter than that is a static mixture under
    another name, and a comparison with one would report no difference without saying why. Policies that
    define ``first_adaptive_update()`` are checked; ``adapting_within(decisions)`` names a setting that would
    move within the run (empty when none would).
    """
    first = getattr(policy, "first_adaptive_update", None)
    if first is None or policy.num_domains < 2:
        return
    needed = first()
    if decisions >= needed:
        return
    hint = policy.adapting_within(decisions) if hasattr(policy, "adapting_within") else ""
    updates = "1 update" if decisions == 1 else f"{decisions} updates"
    warnings.warn(
        f"{type(policy).__name__} over {policy.num_domains} domains keeps its initial mixture until its update "
        f"{needed}, but this run makes {updates} (update_every={update_every}): it will train on the "
        f"initial mixture throughout. Use {hint + ', ' if hint else ''}a smaller update_every, or a longer run",
        stacklevel=4,
    )
