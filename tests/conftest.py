"""Shared pytest configuration: hypothesis profiles that keep the suite fast and deterministic.

``mtl`` (default): no deadline (CPU timings vary), a modest number of examples.
``thorough``: many more examples, for a local stress run
(``pytest --hypothesis-profile=thorough`` or ``HYPOTHESIS_PROFILE=thorough``).
"""

from __future__ import annotations

import os

from hypothesis import settings

settings.register_profile("mtl", deadline=None, max_examples=40, print_blob=True)
settings.register_profile("thorough", deadline=None, max_examples=2000, print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "mtl"))
