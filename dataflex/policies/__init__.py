"""Mixing policies: how domain weights are chosen. Import by name: ``from dataflex.policies import ODM``."""

from dataflex.policies.base import BoundPolicy, MixingPolicy
from dataflex.policies.odm import ODM
from dataflex.policies.static import Natural, Static, Temperature, Uniform

__all__ = ["BoundPolicy", "MixingPolicy", "ODM", "Natural", "Static", "Temperature", "Uniform"]
