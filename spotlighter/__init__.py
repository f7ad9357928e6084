"""Spotlighter: representative token mining for CLIP prompt tuning (plain-torch core).

Everything in this package is importable without Dassl. The Dassl trainer adapters live in the
top-level ``trainers`` folder of the repository, the Dassl datasets in ``datasets``.

``spotlighter.create_model`` and ``spotlighter.load_trained`` (:mod:`spotlighter.api`) give a model as
a plain ``nn.Module`` (images -> logits).
"""

__version__ = "0.1.0"
__all__ = ["create_model", "load_trained"]


def __getattr__(name):  # the API imports torch: only when it is used
    if name in __all__:
        from . import api

        return getattr(api, name)
    raise AttributeError(f"module 'spotlighter' has no attribute {name!r}")
