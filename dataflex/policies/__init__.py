"""Mixing policies: how domain weights are chosen. Import by name: ``from dataflex.policies import ODM``.

Online DoReMi trains a proxy model, so it lives with the proxies: ``from dataflex.proxies.doremi import DoReMiOnline``.
"""

from dataflex.policies.ado import ADO
from dataflex.policies.base import BoundPolicy, MixingPolicy
from dataflex.policies.doremi import doremi_update
from dataflex.policies.law_corrected import LawCorrected
from dataflex.policies.odm import ODM
from dataflex.policies.static import Natural, Piecewise, Static, Temperature, Uniform

__all__ = [
    "ADO",
    "BoundPolicy",
    "LawCorrected",
    "MixingPolicy",
    "ODM",
    "Natural",
    "Piecewise",
    "Static",
    "Temperature",
    "Uniform",
    "doremi_update",
]
