"""Checkpoint format: only trained state, plain containers, readable with ``weights_only=True``.

A checkpoint is a dict of tensors, numbers, strings and lists/dicts of those (never a pickled
object, never the frozen CLIP):

* ``format``: :data:`FORMAT`; ``trainer``: registered trainer name; ``preset``: Spotlighter preset
  (or None); ``signature``: the config values that fix the modules' shapes (compared on load).
* ``state_dict``: the trainable module's parameters and persistent buffers.
* ``class_state``: class-keyed state (Spotlighter's prototypes: ``classnames`` + ``prototypes``),
  mapped by class name on load.
* ``optimizer``, ``scheduler``: state dicts, for resuming; ``epoch``; ``val_result``.
* ``settings``: :func:`run_settings` of the run that wrote it; a resume with other settings is
  refused (:func:`settings_diff`), so a resumed run is the run it continues.
* ``step`` (step-granular checkpoints of a stopped run only): batches of epoch ``epoch + 1`` done,
  with ``epoch_rng`` (the random states when that epoch began) and ``meters`` (its running averages).
"""

from __future__ import annotations

import errno
import os
import shutil
from typing import Any, Dict, Optional, Tuple

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


class SettingsChanged(CheckpointError):
    """The checkpoint was written by a run with other :func:`run_settings` (``diff``: key -> (saved,
    now)); the resuming trainer words the advice."""

    def __init__(self, path: str, diff: Dict[str, Tuple[Any, Any]], epoch: Any):
        self.path, self.diff, self.epoch = path, diff, epoch
        super().__init__(f"{path} was written by a run with other settings: " + "; ".join(
            f"{k}: {a!r} -> {b!r}" for k, (a, b) in diff.items()))


def load(path: str, *, trainer: str, preset: Optional[str] = None,
         signature: Optional[Dict[str, Any]] = None, map_location: Any = "cpu",
         settings: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """Read and check a checkpoint written by :func:`save` for ``trainer`` (and ``preset``);
    ``settings`` (a resume): the :func:`run_settings` it must have been written with, checked first
    (:class:`SettingsChanged` lists every difference)."""
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
    if settings is not None and isinstance(ckpt.get("settings"), dict):
        diff = settings_diff(ckpt["settings"], settings)
        if diff:
            raise SettingsChanged(path, diff, ckpt.get("epoch"))
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


BEST_FILE = "model-best.pth.tar"
LAST_POINTER = "checkpoint"  # Dassl's file naming the last checkpoint of a folder (used to resume)


def checkpoint_name(epoch: int) -> str:
    return f"model.pth.tar-{epoch}"


def last_numbered(folder: str) -> Optional[str]:
    """The highest-epoch ``model.pth.tar-N`` in ``folder`` (None if there is none)."""
    if not os.path.isdir(folder):
        return None
    epochs = [int(n.rsplit("-", 1)[1]) for n in os.listdir(folder)
              if n.startswith("model.pth.tar-") and n.rsplit("-", 1)[1].isdigit()]
    return checkpoint_name(max(epochs)) if epochs else None


def find_checkpoint(folder: str, epoch: Optional[int] = None,
                    epoch_hint: str = "give --load-epoch N for model.pth.tar-N") -> Tuple[str, bool]:
    """(the checkpoint file to evaluate in a module ``folder``, whether it is the last epoch's file found
    without a pointer): ``model.pth.tar-<epoch>``, else the best-val one, else the one the
    ``checkpoint`` pointer names, else the last ``model.pth.tar-N`` (an original repository's folder
    copied without its pointer). None of them: a :class:`CheckpointError` saying what is expected."""
    guessed = False
    if epoch is not None:
        path = os.path.join(folder, checkpoint_name(epoch))
    elif os.path.isfile(os.path.join(folder, BEST_FILE)):
        path = os.path.join(folder, BEST_FILE)
    elif os.path.isfile(os.path.join(folder, LAST_POINTER)):
        with open(os.path.join(folder, LAST_POINTER)) as f:
            path = os.path.join(folder, f.read().strip())
    elif last_numbered(folder):
        path, guessed = os.path.join(folder, last_numbered(folder)), True
    else:
        raise CheckpointError(f"No checkpoint in {folder} (expected {BEST_FILE} or a '{LAST_POINTER}' file; "
                              f"{epoch_hint}).")
    if not os.path.isfile(path):
        have = sorted(os.listdir(folder)) if os.path.isdir(folder) else []
        raise CheckpointError(f"No checkpoint at {path}. Present in {folder}: {have or 'nothing'}.")
    return path, guessed


#: cfg keys that do not change what a run computes (where it reads and writes, how often it prints,
#: which extra checkpoints it keeps, what it prints about the test): a resume may change them.
#: Every other key does (seed, data, shots, subsample, model, optimiser, schedule, input, loaders,
#: test protocol, the trainer's own node), and a resume with another value is refused.
UNCHECKED_KEYS = frozenset({
    "OUTPUT_DIR", "RESUME", "VERBOSE", "DATASET.ROOT", "TRAIN.PRINT_FREQ", "TRAIN.CHECKPOINT_FREQ",
    "TRAIN.RESUMABLE_EVERY_EPOCH", "TEST.PER_CLASS_RESULT", "TEST.COMPUTE_CMAT",
})
#: Of ``TRAINER``, only these keys and the running trainer's own node (``TRAINER.<CFG_NODE>``) count:
#: the other trainers' nodes are not read by this run.
TRAINER_KEYS = ("TRAINER.NAME", "TRAINER.CONFIG_NAME")


def _plain(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _flatten(node: Any, prefix: str, out: Dict[str, Any]) -> None:
    for key, value in node.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            _flatten(value, name + ".", out)
        else:
            out[name] = _plain(value)


def run_settings(cfg: Any, trainer_node: str) -> Dict[str, Any]:
    """``{dotted key: value}`` of every cfg key that defines the run (not :data:`UNCHECKED_KEYS`;
    of ``TRAINER``: :data:`TRAINER_KEYS` and ``TRAINER.<trainer_node>``)."""
    flat: Dict[str, Any] = {}
    _flatten(cfg, "", flat)
    node = f"TRAINER.{trainer_node}." if trainer_node else None
    return {k: v for k, v in sorted(flat.items()) if k not in UNCHECKED_KEYS and (
        not k.startswith("TRAINER.") or k in TRAINER_KEYS or (node is not None and k.startswith(node)))}


def settings_diff(saved: Dict[str, Any], now: Dict[str, Any]) -> Dict[str, Tuple[Any, Any]]:
    """``{key: (saved, now)}`` for the keys both know whose values differ (a key only one side has
    was added or removed by another version of this code; it is not a difference of the run)."""
    return {k: (saved[k], now[k]) for k in sorted(set(saved) & set(now)) if saved[k] != now[k]}


def non_finite(tensors: Dict[str, torch.Tensor]) -> list:
    """Names of the floating-point tensors of ``tensors`` that hold a NaN or an infinity."""
    return [k for k, v in tensors.items()
            if isinstance(v, torch.Tensor) and v.is_floating_point() and not bool(torch.isfinite(v).all())]


def trainable_state(module: torch.nn.Module) -> Dict[str, torch.Tensor]:
    """Parameters and persistent buffers of ``module`` (class-dependent buffers are non-persistent)."""
    return {k: v.detach().cpu() for k, v in module.state_dict().items()}
