"""A swarm of small proxy runs on mixtures drawn around a prior: the data a mixture law is fitted on.

Run ``i`` trains on ``mixture(i)``, a Dirichlet draw with mean ``prior`` and concentration ``concentration``
(higher = closer to the prior) from the seed sequence ``(seed, i)``: a pure function of the swarm's settings
and the index, so runs can go in any order, in several processes or as the jobs of a Hydra multirun, and a
rerun after a crash skips every run whose result file exists (RegMix, arXiv 2407.01492, trains its swarm the
same way: many small models on random mixtures, each independent of the others).

The folder holds ``swarm.json`` (the settings; a folder made with other settings is refused, naming the
difference) and one ``run-<i>.json`` per finished run, written atomically: the mixture, the validation loss
per evaluated domain, the tokens trained per training domain and, when the proxy evaluated along the way,
``losses_at``: the validation losses at fractions of the run (a law fitted on those proposes a schedule,
:func:`dataflex.mixture_search.propose_schedule`).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from dataflex.mixture_law import SwarmRuns
from dataflex.state import read_json, write_json_atomic

__all__ = ["Swarm", "swarm_mixture"]

#: ``train(weights, index) -> {"losses": {eval domain: loss}, "tokens": {train domain: count}}``, optionally
#: with ``"losses_at": [{"fraction": f, "losses": {eval domain: loss}}, ...]`` for fractions ``0 < f < 1``.
TrainFn = Callable[[np.ndarray, int], Mapping[str, Any]]


def swarm_mixture(prior: np.ndarray, concentration: float, seed: int, index: int) -> np.ndarray:
    """Run ``index``'s mixture: Dirichlet(``concentration * prior``), seeded by ``(seed, index)``."""
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), int(index), 0x5E]))
    return rng.dirichlet(concentration * np.asarray(prior, dtype=np.float64))


class Swarm:
    """``size`` proxy runs on mixtures around ``prior`` over ``domains``; results kept under ``folder``."""

    def __init__(
        self,
        folder: str | os.PathLike[str],
        domains: Sequence[str],
        *,
        prior: Sequence[float] | np.ndarray | None = None,
        size: int = 16,
        concentration: float = 8.0,
        seed: int = 0,
        extra: Mapping[str, Any] | None = None,
    ) -> None:
        self.folder = Path(folder)
        self.domains = list(domains)
        d = len(self.domains)
        if d < 2 or len(set(self.domains)) != d:
            raise ValueError(f"domains must be at least 2 distinct names; got {self.domains}")
        self.prior = np.full(d, 1.0 / d) if prior is None else np.asarray(prior, dtype=np.float64)
        if self.prior.shape != (d,) or not np.isfinite(self.prior).all() or (self.prior <= 0).any():
            raise ValueError(f"prior must be {d} weights > 0 (a Dirichlet mean); got {np.asarray(prior).tolist()}")
        if abs(self.prior.sum() - 1) > 1e-6:
            raise ValueError(f"prior must sum to 1; got {self.prior.sum():.6g}")
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ValueError(f"size must be a positive integer; got {size!r}")
        if not (isinstance(concentration, (int, float)) and concentration > 0):
            raise ValueError(f"concentration must be > 0; got {concentration!r}")
        self.size, self.concentration, self.seed = size, float(concentration), int(seed)
        self.settings = {
            "domains": self.domains,
            "prior": self.prior.tolist(),
            "concentration": self.concentration,
            "seed": self.seed,
            **(dict(extra) if extra else {}),  # e.g. the proxy's steps and model: runs made otherwise differ
        }
        self._check_folder()

    def _check_folder(self) -> None:
        path = self.folder / "swarm.json"
        if path.is_file():
            saved = read_json(path)
            differ = sorted(k for k in set(saved) | set(self.settings) if saved.get(k) != self.settings.get(k))
            if differ:
                shown = {k: (saved.get(k), self.settings.get(k)) for k in differ}
                raise ValueError(
                    f"{self.folder} holds a swarm made with other settings (saved, now): {shown}; use another folder"
                )
        else:
            self.folder.mkdir(parents=True, exist_ok=True)
            write_json_atomic(path, self.settings, digest=True)

    def mixture(self, index: int) -> np.ndarray:
        return swarm_mixture(self.prior, self.concentration, self.seed, index)

    def result_path(self, index: int) -> Path:
        return self.folder / f"run-{index:05d}.json"

    def pending(self, indices: Iterable[int] | None = None) -> list[int]:
        """The runs of ``indices`` (default: all ``size``) without a result yet."""
        chosen = range(self.size) if indices is None else indices
        out = []
        for i in chosen:
            if not 0 <= int(i) < self.size:
                raise ValueError(f"run index {i} is outside the swarm's 0..{self.size - 1}")
            if not self.result_path(int(i)).is_file():
                out.append(int(i))
        return out

    def run(self, train: TrainFn, indices: Iterable[int] | None = None, progress: bool = True) -> list[int]:
        """Train every pending run of ``indices`` with ``train``; returns the indices trained now."""
        from tqdm.auto import tqdm

        todo = self.pending(indices)
        for i in tqdm(todo, desc="swarm", disable=not progress or not todo):
            weights = self.mixture(i)
            result = dict(train(weights, i))
            self._check_result(i, result)
            record = {"index": i, "weights": weights.tolist(), **result}
            write_json_atomic(self.result_path(i), record, digest=True)
        return todo

    def _check_result(self, index: int, result: Mapping[str, Any]) -> None:
        losses, tokens = result.get("losses"), result.get("tokens")
        if not isinstance(losses, Mapping) or not losses:
            raise ValueError(f"run {index}: train must return 'losses' as {{evaluated domain: loss}}; got {losses!r}")
        bad = {k: v for k, v in losses.items() if not (isinstance(v, (int, float)) and np.isfinite(v))}
        if bad:
            raise ValueError(f"run {index}: non-finite validation losses {bad}; the proxy diverged")
        if not isinstance(tokens, Mapping) or set(tokens) != set(self.domains):
            raise ValueError(f"run {index}: train must return 'tokens' for exactly the domains {self.domains}")
        for point in result.get("losses_at", []):
            f, at = point.get("fraction"), point.get("losses")
            if not (isinstance(f, float) and 0 < f < 1) or not isinstance(at, Mapping) or set(at) != set(losses):
                raise ValueError(
                    f"run {index}: each 'losses_at' entry needs a fraction in (0, 1) and losses for the domains "
                    f"{sorted(losses)}; got {point!r:.160}"
                )
            if not all(isinstance(v, (int, float)) and np.isfinite(v) for v in at.values()):
                raise ValueError(f"run {index}: non-finite validation losses at fraction {f}; the proxy diverged")

    def fractions(self) -> list[float]:
        """The fractions of the runs every finished run was evaluated at (besides the end)."""
        records = self._records()
        shared = set.intersection(*({p["fraction"] for p in r.get("losses_at", [])} for r in records))
        return sorted(shared)

    def _records(self) -> list[dict[str, Any]]:
        records = [read_json(self.result_path(i)) for i in range(self.size) if self.result_path(i).is_file()]
        if not records:
            raise ValueError(f"{self.folder}: no finished run to collect")
        return records

    def collect(self, at: float | None = None) -> SwarmRuns:
        """The finished runs (in index order) as :class:`~dataflex.mixture_law.SwarmRuns`: their final losses,
        or those at fraction ``at`` of the run (one of :meth:`fractions`)."""
        records = self._records()
        if at is not None:
            if at not in self.fractions():
                raise ValueError(
                    f"the swarm's runs were not all evaluated at fraction {at}; they were at {self.fractions()}"
                )
            records = [
                {**r, "losses": next(p["losses"] for p in r["losses_at"] if p["fraction"] == at)} for r in records
            ]
        evaluated = sorted(records[0]["losses"])
        for r in records:
            if sorted(r["losses"]) != evaluated:
                raise ValueError(
                    f"run {r['index']} evaluated {sorted(r['losses'])}, run {records[0]['index']} {evaluated}: "
                    "the swarm's runs must share their validation domains"
                )
        weights = np.array([r["weights"] for r in records])
        losses = np.array([[r["losses"][d] for d in evaluated] for r in records])
        return SwarmRuns(weights, losses, self.domains, evaluated)

    def tokens(self) -> np.ndarray:
        """Tokens trained per domain, ``(finished runs, domains)``: the swarm's cost and its repetition."""
        return np.array([[float(r["tokens"][d]) for d in self.domains] for r in self._records()])
