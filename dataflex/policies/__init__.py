"""Mixing policies: how domain weights are chosen. Import by name: ``from dataflex.policies import ODM``."""

from dataflex.policies.ado import ADO
from dataflex.policies.base import BoundPolicy, MixingPolicy
from dataflex.policies.doremi import DoReMiOnline, doremi_update
from dataflex.policies.odm import ODM
from dataflex.policies.static import Natural, Static, Temperature, Uniform

__all__ = [
    "ADO",
    "BoundPolicy",
    "DoReMiOnline",
    "MixingPolicy",
    "ODM",
    "Natural",
    "Static",
    "Temperature",
    "Uniform",
    "doremi_update",
]
