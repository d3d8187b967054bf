"""Hypothesis profiles of the property suite.

``ci`` (the default): 240 derandomised cases, a few minutes on two cores. ``long``: 2,000.
Select with ``GRADSTATS_PROPERTY_PROFILE=long``. They apply to the property test only:
registering them does not change other tests' hypothesis settings.
"""
from __future__ import annotations

import os

from hypothesis import HealthCheck, Phase, settings

PROFILE_ENV = "GRADSTATS_PROPERTY_PROFILE"
_COMMON = dict(deadline=None, derandomize=True, database=None, print_blob=False,
               phases=(Phase.explicit, Phase.generate), suppress_health_check=list(HealthCheck))
settings.register_profile("ci", max_examples=240, **_COMMON)
settings.register_profile("long", max_examples=2000, **_COMMON)


def profile() -> tuple[str, settings]:
    """The selected profile's name and settings."""
    name = os.environ.get(PROFILE_ENV, "ci")
    if name not in ("ci", "long"):
        raise ValueError(f"{PROFILE_ENV} must be 'ci' or 'long', got {name!r}")
    return name, settings.get_profile(name)
