"""Samplers that turn dataflex decisions into the next batches (installed as ``dataflex.samplers``)."""

from dataflex.samplers.base import ScheduledSampler
from dataflex.samplers.curriculum import CurriculumSampler, difficulty_order
from dataflex.samplers.mixture import DomainMixtureSampler
from dataflex.samplers.subset import SubsetSampler

__all__ = ["CurriculumSampler", "DomainMixtureSampler", "ScheduledSampler", "SubsetSampler", "difficulty_order"]
