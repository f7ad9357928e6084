"""Dassl adapters (thin): importing this package registers the five trainers."""

from . import cocoop, coop, maple, spotlighter, zsclip  # noqa: F401
