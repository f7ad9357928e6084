"""Dassl adapters (thin): importing this package registers every trainer."""

from . import cocoop, coop, ivlp, maple, promptkd, promptsrc, spotlighter, spotlighterkd, zsclip  # noqa: F401
