"""What a mixing policy is: a small object that maps per-domain statistics to new weights."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch

from dataflex.store import DomainStats

__all__ = ["BatchObserver", "BoundPolicy", "MixingPolicy", "NeedsPreparation"]


@runtime_checkable
class MixingPolicy(Protocol):
    """Decides domain weights.

    ``bind`` is called once with the domain names and sizes; ``initial_weights`` gives the mixture
    for the first samples; ``update`` is called every ``update_every`` steps with statistics that
    are identical on every rank and returns the next weights (finite, >= 0, summing to 1).
    """

    def bind(self, domain_names: Sequence[str], domain_sizes: np.ndarray) -> None: ...

    def initial_weights(self) -> np.ndarray: ...

    def update(self, stats: DomainStats, current: np.ndarray) -> np.ndarray: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


@runtime_checkable
class BatchObserver(Protocol):
    """A policy that learns from every training micro-batch itself (online DoReMi steps its proxy).

    ``batch`` holds ``input_ids``, ``attention_mask`` (if any) and ``labels``; ``row_domain`` is each
    row's domain id, on the batch's device.
    """

    def observe(self, batch: dict[str, torch.Tensor], row_domain: torch.Tensor) -> None: ...


@runtime_checkable
class NeedsPreparation(Protocol):
    """A policy that must run stages before the main run (offline DoReMi's reference and proxy).

    ``prepare`` trains or reuses its stage models in ``work_dir`` with the plain loop (``loop_kwargs`` are
    :func:`~dataflex.proxies.loop.train_mixture`'s); a recipe calls it before training.
    """

    def prepare(
        self,
        make_model: Any,
        train_ds: Any,
        domain_ids: np.ndarray,
        domain_names: Sequence[str],
        work_dir: Any,
        loop_kwargs: dict[str, Any],
    ) -> None: ...


class BoundPolicy:
    """Shared bookkeeping for policies: the bound domain names and sizes."""

    domain_names: list[str]
    domain_sizes: np.ndarray

    def bind(self, domain_names: Sequence[str], domain_sizes: np.ndarray) -> None:
        sizes = np.asarray(domain_sizes, dtype=np.float64)
        if len(domain_names) != sizes.shape[0]:
            raise ValueError(f"{len(domain_names)} domain names but {sizes.shape[0]} sizes")
        if len(domain_names) == 0:
            raise ValueError("need at least one domain")
        self.domain_names = list(domain_names)
        self.domain_sizes = sizes

    @property
    def num_domains(self) -> int:
        return len(self.domain_names)

    def _require_bound(self) -> None:
        if not hasattr(self, "domain_names"):
            raise RuntimeError(f"{type(self).__name__} is not bound to domains yet; call bind() first")

    def update(self, stats: DomainStats, current: np.ndarray) -> np.ndarray:
        return current

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        return None
