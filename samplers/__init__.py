"""Samplers that turn dataflex decisions into the next batches (installed as ``dataflex.samplers``)."""

from dataflex.samplers.base import ScheduledSampler
from dataflex.samplers.curriculum import CurriculumSampler
from dataflex.samplers.mixture import DomainMixtureSampler
from dataflex.samplers.subset import SubsetSampler

__all__ = ["CurriculumSampler", "DomainMixtureSampler", "ScheduledSampler", "SubsetSampler"]
