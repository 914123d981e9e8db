"""Per-domain metric names that reach every logger as distinct metrics.

dataflex logs one metric per domain (``dataflex/weight/<domain>``, ``dataflex/selected_share/<domain>``)
through ``Trainer.log``. Most of the Trainer's reporters keep the name as given, but transformers'
``MLflowCallback`` (and ``DagsHubCallback``, built on it) replaces every character MLflow does not accept with
``_`` and builds a dict of the results, so two domains whose names differ only in such characters become one
metric: ``生物`` and ``数学`` both log as ``dataflex/weight/__``, ``q&a`` and ``q?a`` as ``dataflex/weight/q_a``,
and MLflow keeps one domain's value and drops the other's at every step, without a word. That is refused at
train begin, naming the domains; a name MLflow only alters is said once.
"""

from __future__ import annotations

import re
import warnings
from collections import defaultdict
from collections.abc import Iterable, Sequence
from typing import Any

__all__ = ["MLFLOW_REPLACED", "check_domain_metric_names", "mlflow_metric_name"]

# The characters transformers' MLflowCallback.on_log replaces with "_" (transformers 4.x-5.x), MLflow's own
# metric-name rule. tests/test_loggers.py feeds names through the real callback to keep the two in step.
MLFLOW_REPLACED = re.compile(r"[^0-9A-Za-z_\-\.\ :/]")


def mlflow_metric_name(name: str) -> str:
    """The name under which MLflow stores a metric logged through the Trainer as ``name``."""
    return MLFLOW_REPLACED.sub("_", name)


def _renaming_reporters(callbacks: Iterable[Any]) -> list[str]:
    """Class names of the Trainer callbacks that rename metrics the way MLflowCallback does."""
    try:
        from transformers.integrations import MLflowCallback
    except ImportError:  # a transformers without the integration cannot report to MLflow either
        return []
    return [type(cb).__name__ for cb in callbacks if isinstance(cb, MLflowCallback)]


def check_domain_metric_names(domain_names: Sequence[str], callbacks: Iterable[Any]) -> None:
    """Refuse domain names that a reporter among ``callbacks`` would log as one metric; warn of altered ones.

    Raises ``ValueError`` naming the domains that share a metric name and the name they would share.
    """
    reporters = _renaming_reporters(callbacks)
    if not reporters:
        return
    logged_as: dict[str, list[str]] = defaultdict(list)
    for name in domain_names:
        logged_as[mlflow_metric_name(name)].append(name)
    merged = {shared: names for shared, names in logged_as.items() if len(names) > 1}
    if merged:
        shown = "; ".join(f"{', '.join(repr(n) for n in names)} -> {shared!r}" for shared, names in merged.items())
        raise ValueError(
            f"the Trainer reports to MLflow ({', '.join(reporters)}), which replaces every character of a metric name "
            "outside 0-9 A-Z a-z _ - . space : / with '_', so these domains would be logged as one metric and MLflow "
            f"would keep one domain's value and drop the others' at every step: {shown}. Rename the domains so they "
            "differ in characters MLflow keeps (e.g. dataset.map over the label column), or leave mlflow out of "
            "report_to"
        )
    altered = {name: shared for shared, names in logged_as.items() for name in names if name != shared}
    if altered:
        warnings.warn(
            "MLflow will show these domains under other names (it replaces characters outside 0-9 A-Z a-z _ - . "
            f"space : / with '_'): {', '.join(f'{n!r} as {s!r}' for n, s in list(altered.items())[:10])}",
            stacklevel=3,
        )
