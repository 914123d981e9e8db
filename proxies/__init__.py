"""Models trained beside or before the main run (installed as ``dataflex.proxies``).

* :mod:`~dataflex.proxies.loop` — a plain, resumable PyTorch training loop over a domain mixture.
* :mod:`~dataflex.proxies.doremi` — DoReMi's reference and Group-DRO proxy training, offline (three
  stages) and online (:class:`~dataflex.proxies.doremi.DoReMiOnline`).
* :mod:`~dataflex.proxies.irreducible` — RHO-LOSS's holdout model and its per-example losses on a pool.
"""

__all__: list[str] = []
