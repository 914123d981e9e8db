"""Samplers that turn dataflex decisions into the next batches (installed as ``dataflex.samplers``)."""

from dataflex.samplers.mixture import DomainMixtureSampler

__all__ = ["DomainMixtureSampler"]
