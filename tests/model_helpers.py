"""Test models built the one way models are built (:func:`spotlighter.factory.build_model`), from a
trainer's shipped default config (configs/trainers/<name>/<default>.yaml) with test changes on top."""

from spotlighter.config import trainer_cfg
from spotlighter.factory import build_model
from spotlighter.registry import trainer as registered


def shipped_cfg(trainer: str, changes=None):
    """The config of ``trainer``'s shipped default yaml file, with ``changes`` (dotted key -> value)."""
    return trainer_cfg(trainer, changes, config=registered(trainer).default_config)


def make_model(trainer: str, clip, classnames, changes=None, teacher=None):
    """``trainer``'s model on the frozen ``clip`` (see :func:`shipped_cfg`)."""
    return build_model(shipped_cfg(trainer, changes), classnames, clip, teacher=teacher)
