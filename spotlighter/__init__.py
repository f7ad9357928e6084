"""Spotlighter: representative token mining for CLIP prompt tuning (plain-torch core).

Everything in this package is importable without Dassl. The Dassl trainer adapters live in the
top-level ``trainers`` folder of the repository, the Dassl datasets in ``datasets``.
"""

__version__ = "0.1.0"
