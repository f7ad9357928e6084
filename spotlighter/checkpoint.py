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

import errno
import os
import shutil
from typing import Any, Dict, Optional

import torch

from .fileio import OutputWriteError, atomic_path, describe_unreadable

FORMAT = "spotlighter-ckpt/1"


class CheckpointError(RuntimeError):
    """The file is not a usable checkpoint for this trainer/config; the message says why."""


def save(path: str, payload: Dict[str, Any]) -> None:
    """Atomic write: an interrupted save never leaves a truncated checkpoint behind. A folder that
    cannot take the file (full, read-only) is an :class:`OutputWriteError` naming it."""
    payload = {"format": FORMAT, **payload}
    try:
        with atomic_path(path) as tmp:
            torch.save(payload, tmp)
    except OSError as exc:
        if OutputWriteError.is_write_error(exc):
            raise OutputWriteError.from_os_error(exc, path) from None
        raise
    except RuntimeError as exc:  # torch's zip writer reports a failed write as a RuntimeError
        if _nearly_full(path):  # its message varies ("file write failed", "unexpected pos 64 vs 0")
            reason = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)
        elif "write" in str(exc).lower():
            reason = OSError(errno.EIO, f"write failed: {str(exc).splitlines()[0]}", path)
        else:
            raise
        raise OutputWriteError.from_os_error(reason) from None


def _nearly_full(path: str, margin: int = 1 << 20) -> bool:
    try:
        return shutil.disk_usage(os.path.dirname(path) or ".").free < margin
    except OSError:
        return False


#: What to do about a checkpoint file that cannot be read (ours or an original repository's).
UNREADABLE_FIX = "Delete it and retrain that job, or evaluate another checkpoint (--model-dir, --load-epoch N)."


def load(path: str, *, trainer: str, preset: Optional[str] = None,
         signature: Optional[Dict[str, Any]] = None, map_location: Any = "cpu") -> Dict[str, Any]:
    """Read and check a checkpoint written by :func:`save` for ``trainer`` (and ``preset``)."""
    if not os.path.isfile(path):
        raise CheckpointError(f"No checkpoint at {path}.")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:
        what = describe_unreadable(path, exc)
        if what.startswith("a pickle of Python objects"):
            what += ("; this project's checkpoints hold only tensors and plain values (other "
                     "codebases' checkpoints pickle whole objects)")
        raise CheckpointError(
            f"{path} is {what}. {UNREADABLE_FIX}") from None
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
