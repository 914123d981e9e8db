"""Proxy and reference models for DoReMi and RHO-LOSS (installed as ``dataflex.proxies``).

Nothing is implemented here yet: proxy-model DoReMi is tracked in issue 3 and the holdout model for
RHO-LOSS in issue 4. The package exists so the installed layout is stable.
"""

__all__: list[str] = []
