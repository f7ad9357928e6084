"""Checkpoint format: only trained state, plain containers, readable with ``weights_only=True``.

A checkpoint is a dict of tensors, numbers, strings and lists/dicts of those (never a pickled
object, never the frozen CLIP):

* ``format``: :data:`FORMAT`; ``trainer``: registered trainer name; ``preset``: Spotlighter preset
  (or None); ``signature``: the config values that fix the modules' shapes (compared on load).
* ``state_dict``: the trainable module's parameters and persistent buffers.
* ``class_state``: class-keyed state (Spotlighter's prototypes: ``classnames`` + ``prototypes``),
  mapped by class name on load.
* ``optimizer``, ``scheduler``: state dicts, for resuming; ``epoch``; ``val_result``.
"""

from __future__ import annotations

import os
from typing import Any, Dict, Optional

import torch

from .fileio import atomic_path

FORMAT = "spotlighter-ckpt/1"


class CheckpointError(RuntimeError):
    """The file is not a usable checkpoint for this trainer/config; the message says why."""


def save(path: str, payload: Dict[str, Any]) -> None:
    """Atomic write: an interrupted save never leaves a truncated checkpoint behind."""
    payload = {"format": FORMAT, **payload}
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)


def load(path: str, *, trainer: str, preset: Optional[str] = None,
         signature: Optional[Dict[str, Any]] = None, map_location: Any = "cpu") -> Dict[str, Any]:
    """Read and check a checkpoint written by :func:`save` for ``trainer`` (and ``preset``)."""
    if not os.path.isfile(path):
        raise CheckpointError(f"No checkpoint at {path}.")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:
        raise CheckpointError(
            f"{path} cannot be read safely ({type(exc).__name__}: {str(exc).splitlines()[0]}). It is "
            "not a checkpoint of this project (checkpoints of other codebases pickle whole objects)."
        ) from exc
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a {FORMAT} checkpoint of this project.")
    if ckpt.get("trainer") != trainer:
        raise CheckpointError(
            f"{path} was written by trainer {ckpt.get('trainer')!r}; this run uses {trainer!r}.")
    if preset is not None and ckpt.get("preset") != preset:
        raise CheckpointError(
            f"{path} was trained with TRAINER.SPOTLIGHTER.PRESET = {ckpt.get('preset')!r}; this run "
            f"uses {preset!r}. Evaluate it with the same preset (config file) it was trained with.")
    if signature is not None:
        saved = ckpt.get("signature") or {}
        diff = {k: (saved.get(k), v) for k, v in signature.items() if saved.get(k) != v}
        if diff:
            lines = ", ".join(f"{k}: checkpoint {a!r} vs config {b!r}" for k, (a, b) in sorted(diff.items()))
            raise CheckpointError(f"{path} does not match this config ({lines}).")
    return ckpt


def trainable_state(module: torch.nn.Module) -> Dict[str, torch.Tensor]:
    """Parameters and persistent buffers of ``module`` (class-dependent buffers are non-persistent)."""
    return {k: v.detach().cpu() for k, v in module.state_dict().items()}
