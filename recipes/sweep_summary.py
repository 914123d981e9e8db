"""The Hydra callback that ends a recipe's multirun with its comparison table and plot (:mod:`dataflex.sweep`).

Registered in ``configs/trainer.yaml``, ``configs/mixture.yaml``, ``configs/instruct.yaml`` (compared with
its ``detector=none`` runs) and ``configs/vlm.yaml`` (on clean test accuracy) under ``hydra.callbacks.sweep_summary``
(``~hydra.callbacks.sweep_summary`` on the command line turns it off). It lives with the recipes because it is
Hydra's: the core ``dataflex`` modules import neither Hydra nor transformers.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback

from dataflex.sweep import REFERENCE, summarize_sweep

__all__ = ["SweepSummary"]


class SweepSummary(Callback):
    """When a multirun ends, print :func:`dataflex.sweep.summarize_sweep` of its sweep folder (which writes
    ``sweep_summary.md`` and ``.png`` there). A failed job ends the multirun before this runs;
    ``python -m dataflex.sweep <sweep folder>`` then summarises the jobs that finished."""

    def __init__(self, reference: str = REFERENCE) -> None:
        self.reference = reference  # the arm every other is compared with, seed by seed

    def on_multirun_end(self, config: Any, **kwargs: Any) -> None:
        root = Path(str(config.hydra.sweep.dir))
        try:
            print(summarize_sweep(root, self.reference))
        except (ValueError, OSError) as error:  # every job has finished: no summary must not fail the sweep
            warnings.warn(f"no sweep summary for {root}: {error}", stacklevel=2)
            return
        print(f"written: {root / 'sweep_summary.md'}, {root / 'sweep_summary.png'}")
