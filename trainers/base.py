"""The one Dassl adapter every trainer of this project derives from.

It owns what upstream Dassl gets wrong on current torch (warm-up scheduler, pickled checkpoints)
and what all five trainers share: CLIP loading with the configured precision and device, the
optimiser and LR schedule, the training step with NaN detection, checkpoints that hold only trained
state, and the JSON result record of every test evaluation.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import signal
import time
import warnings
from typing import Dict, Optional

import numpy as np

import torch
import torch.nn as nn
from dassl.data import DataManager
from dassl.data.data_manager import DatasetWrapper
from dassl.engine import TrainerX
from dassl.metrics import compute_accuracy
from dassl.optim import build_optimizer

from datasets.layout import DatasetError
from spotlighter import checkpoint as ckpt
from spotlighter import foreign
from spotlighter.backbone import FrozenCLIP, PruneSpec, load_clip
from spotlighter.config import ConfigError, check_precision, check_prune_cfg
from spotlighter.fileio import atomic_path
from spotlighter.models import count_trainable
from spotlighter.prompt import PromptTooLong
from spotlighter.schedule import build_schedule

logger = logging.getLogger(__name__)

BEST_FILE = "model-best.pth.tar"
LAST_POINTER = "checkpoint"  # Dassl's file naming the last checkpoint of a folder (used to resume)
DTYPES = {"fp16": torch.float16, "fp32": torch.float32, "amp": torch.float32}
#: Test hook: SIGKILL this process right after the checkpoint of this (1-based) epoch is written,
#: as a crash or a cluster's preemption would (tests/test_train_integration.py resumes from it).
KILL_AFTER_EPOCH_ENV = "SPOTLIGHTER_TEST_KILL_AFTER_EPOCH"


def rng_state() -> dict:
    """Every random state the next epoch depends on: torch (CPU and CUDA), numpy, Python."""
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"kind": np_state[0], "keys": torch.from_numpy(np_state[1].astype(np.int64)),
                  "pos": int(np_state[2]), "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "python": {"version": random.getstate()[0], "internal": list(random.getstate()[1]),
                   "gauss_next": random.getstate()[2]},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"].cpu())
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["internal"]), p["gauss_next"]))
    if "cuda" in state and torch.cuda.is_available():
        cuda = state["cuda"]
        if len(cuda) != torch.cuda.device_count():
            logger.warning("The checkpoint holds the CUDA random states of %d GPUs, this run has %d: the "
                           "resumed run restores what matches and may differ from an uninterrupted one",
                           len(cuda), torch.cuda.device_count())
        for i, s in enumerate(cuda[: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(s.cpu(), i)


class TrainingDiverged(FloatingPointError):
    """A non-finite loss; the message names the precision and the step."""


class CheckedDatasetWrapper(DatasetWrapper):
    """Dassl's wrapper, but an image that cannot be read is a DatasetError naming the file; so is
    one over PIL's decompression-bomb limit (which PIL only warns about below twice the limit)."""

    def __getitem__(self, idx):
        from PIL import Image

        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                return super().__getitem__(idx)
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            path = self.data_source[idx].impath
            raise DatasetError(f"image {path} is refused: {exc} (PIL.Image.MAX_IMAGE_PIXELS = "
                               f"{Image.MAX_IMAGE_PIXELS:,}). It is a broken or crafted file, or far larger than "
                               "training needs: replace it with a good copy (see DATASETS.md) or remove it "
                               "from the split file.") from None
        except (OSError, SyntaxError, ValueError) as exc:  # PIL's UnidentifiedImageError is an OSError
            path = self.data_source[idx].impath
            raise DatasetError(f"cannot read image {path} ({type(exc).__name__}: {exc}). Replace it with a "
                               "good copy (see DATASETS.md) or remove it from the split file.") from None


def checkpoint_name(epoch: int) -> str:
    return f"model.pth.tar-{epoch}"


def _last_numbered(folder: str) -> Optional[str]:
    """The highest-epoch ``model.pth.tar-N`` in ``folder`` (None if there is none)."""
    if not os.path.isdir(folder):
        return None
    epochs = [int(n.rsplit("-", 1)[1]) for n in os.listdir(folder)
              if n.startswith("model.pth.tar-") and n.rsplit("-", 1)[1].isdigit()]
    return checkpoint_name(max(epochs)) if epochs else None


class PromptTrainer(TrainerX):
    """Base of the CLIP prompt trainers. Subclasses set ``CFG_NODE`` and ``MODULE_NAME`` and
    implement :meth:`build_custom_model` (a plain model from :mod:`spotlighter.models`)."""

    CFG_NODE = ""  # cfg.TRAINER.<CFG_NODE> holds PREC and the method's keys
    MODULE_NAME = "prompt_learner"  # folder of the checkpoints inside OUTPUT_DIR
    #: The keys of cfg.TRAINER.<CFG_NODE> that fix the shapes of a checkpoint's tensors (error messages)
    CHECKPOINT_KEYS = "N_CTX / CTX_INIT (and CSC or PROMPT_DEPTH)"

    def __init__(self, cfg):
        self._start_time = time.time()
        self.loaded_epoch: Optional[int] = None
        super().__init__(cfg)
        self._last_results: Dict[str, float] = {}
        evaluate = self.evaluator.evaluate

        def evaluate_and_keep():
            self._last_results = dict(evaluate())
            return self._last_results

        self.evaluator.evaluate = evaluate_and_keep

    # ------------------------------------------------------------------ config
    @property
    def node(self):
        return self.cfg.TRAINER[self.CFG_NODE]

    @property
    def preset(self) -> Optional[str]:
        return None

    def check_cfg(self, cfg) -> None:
        check_precision(f"TRAINER.{self.CFG_NODE}.PREC", cfg.TRAINER[self.CFG_NODE].PREC)
        check_prune_cfg(cfg.MODEL.PRUNE)

    def resolve_precision(self) -> str:
        prec = self.node.PREC
        if prec == "fp16" and self.device.type == "cpu":
            logger.warning("TRAINER.%s.PREC = fp16 is not supported on CPU (about 20x slower, and "
                           "half-precision CPU kernels are incomplete): falling back to fp32.", self.CFG_NODE)
            return "fp32"
        return prec

    # ------------------------------------------------------------------ data
    def build_data_loader(self) -> None:
        """Dassl's, with :class:`CheckedDatasetWrapper` (same attributes as Dassl sets)."""
        dm = DataManager(self.cfg, dataset_wrapper=CheckedDatasetWrapper)
        self.train_loader_x, self.train_loader_u = dm.train_loader_x, dm.train_loader_u
        self.val_loader, self.test_loader = dm.val_loader, dm.test_loader
        self.num_classes, self.num_source_domains = dm.num_classes, dm.num_source_domains
        self.lab2cname = dm.lab2cname
        self.dm = dm

    # ------------------------------------------------------------------ model
    def build_custom_model(self, clip: FrozenCLIP, classnames) -> nn.Module:
        raise NotImplementedError

    def build_model(self) -> None:
        cfg = self.cfg
        self.warn_if_selecting_on_test()
        self.precision = self.resolve_precision()
        backbone = cfg.MODEL.BACKBONE
        path = backbone.PATH.replace("{root}", cfg.DATASET.ROOT)  # "{root}/..." = under DATASET.ROOT
        clip_model = load_clip(backbone.NAME, path, self.device, DTYPES[self.precision])
        prune = PruneSpec.from_cfg(cfg.MODEL.PRUNE)
        self.clip = FrozenCLIP(clip_model, prune)
        if prune.active:
            logger.info("Token reduction (%s): blocks %s keep %.3g of the patch tokens (fuse %s, in training %s): "
                        "%d of %d patches reach the last block", prune.mode, list(prune.layers), prune.keep,
                        prune.fuse, prune.in_training, prune.remaining(self.clip.num_patches), self.clip.num_patches)
        size = list(cfg.INPUT.SIZE)
        if size != [self.clip.input_resolution] * 2:
            raise ConfigError(f"INPUT.SIZE = {tuple(size)} does not match the CLIP input resolution "
                              f"{self.clip.input_resolution}; set INPUT.SIZE ({self.clip.input_resolution}, "
                              f"{self.clip.input_resolution}).")
        classnames = self.dm.dataset.classnames
        try:
            self.model = self.build_custom_model(self.clip, classnames).to(self.device)
        except PromptTooLong as exc:  # name this trainer's CTX_INIT key
            raise exc.for_node(f"TRAINER.{self.CFG_NODE}") from None
        n_trainable = count_trainable(self.model)
        logger.info("Trainable scalars: %s (frozen CLIP excluded); precision %s on %s",
                    f"{n_trainable:,}", self.precision, self.device)
        optim = sched = None
        if n_trainable:
            optim = build_optimizer(self.model, cfg.OPTIM)
            sched = build_schedule(optim, cfg.OPTIM)
        self.optim, self.sched = optim, sched
        self.register_model(self.MODULE_NAME, self.model, optim, sched)
        self.scaler = torch.amp.GradScaler("cuda") if self.precision == "amp" and self.device.type == "cuda" else None

    def warn_if_selecting_on_test(self) -> None:
        """CoOp's ImageNet (and its variants) use the test images as the val split: choosing the
        model on "val" would then select it on the test set (a defect of the released code)."""
        ds = self.dm.dataset
        if self.cfg.TEST.FINAL_MODEL != "best_val" or not ds.val or not ds.test:
            return
        if {d.impath for d in ds.val} & {d.impath for d in ds.test}:
            logger.warning("TEST.FINAL_MODEL = best_val, but %s's val split shares images with its test "
                           "split: the model would be selected on the test set. Use TEST.FINAL_MODEL "
                           "last_step (the shipped configs do).", self.cfg.DATASET.NAME)

    def autocast(self):
        if self.precision != "amp":
            return contextlib.nullcontext()
        dtype = torch.float16 if self.device.type == "cuda" else torch.bfloat16
        return torch.autocast(self.device.type, dtype=dtype)

    # ------------------------------------------------------------------ steps
    def train(self):
        if self.optim is None:
            raise ConfigError(f"{self.cfg.TRAINER.NAME} has no trainable parameters: run it with --eval-only.")
        super().train()

    def parse_batch_train(self, batch):
        return batch["img"].to(self.device), batch["label"].to(self.device)

    def forward_backward(self, batch) -> Dict[str, float]:
        images, labels = self.parse_batch_train(batch)
        with self.autocast():
            logits, losses = self.model(images, labels)
            loss = sum(losses.values())
        if not torch.isfinite(loss):
            step = self.epoch * self.num_batches + self.batch_idx + 1
            raise TrainingDiverged(
                f"The loss is {loss.item()} at epoch {self.epoch + 1}, batch {self.batch_idx + 1} (step {step}) "
                f"with precision {self.precision} ({'; '.join(f'{k}={v.item():.4g}' for k, v in losses.items())}). "
                + self.divergence_advice())
        self.optim.zero_grad(set_to_none=True)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optim)
            self.scaler.update()
        else:
            loss.backward()
            self.optim.step()
        summary = {"loss": loss.item(), **{k: v.item() for k, v in losses.items()}}
        summary["acc"] = compute_accuracy(logits.detach(), labels)[0].item()
        if (self.batch_idx + 1) == self.num_batches:
            self.update_lr()
        return summary

    def divergence_advice(self) -> str:
        lr = f"lower OPTIM.LR (now {self.cfg.OPTIM.LR:g})"
        if self.precision == "fp16":
            return f"Half precision overflows easily: rerun with TRAINER.{self.CFG_NODE}.PREC fp32 (or amp), or {lr}."
        if self.precision == "amp":
            return f"Mixed precision can overflow: rerun with TRAINER.{self.CFG_NODE}.PREC fp32, or {lr}."
        return (f"The run is already in full precision (fp32), so this is not a rounding problem: {lr}, "
                "or check the images and the config values of this run.")

    def model_inference(self, images):
        with self.autocast():
            return self.model(images)[0].float()

    # ------------------------------------------------------------------ checkpoints
    def signature(self) -> Dict[str, list]:
        """Shapes of every saved tensor: a checkpoint must match them exactly."""
        return {k: list(v.shape) for k, v in self.model.state_dict().items()}

    def class_state(self) -> Optional[dict]:
        return None

    def load_class_state(self, state: dict) -> None:
        pass

    def trainer_state(self) -> Optional[dict]:
        """State of the training procedure beyond the model, optimizer and schedule that a resume
        needs (e.g. PromptSRC's running prompt aggregate); tensors and plain containers only."""
        return None

    def load_trainer_state(self, state: dict) -> None:
        pass

    def after_epoch(self):
        """Dassl's (best-val test, TRAIN.CHECKPOINT_FREQ and last-epoch checkpoints), plus the
        resumable checkpoint of every epoch (TRAIN.RESUMABLE_EVERY_EPOCH)."""
        super().after_epoch()
        done = self.epoch + 1
        if self.cfg.TRAIN.RESUMABLE_EVERY_EPOCH and not self.is_kept_epoch(done):
            self.save_model(self.epoch, self.output_dir, intermediate=True)
        if os.environ.get(KILL_AFTER_EPOCH_ENV) == str(done):
            logger.info("%s=%d: killing this process (test hook)", KILL_AFTER_EPOCH_ENV, done)
            logging.shutdown()
            os.kill(os.getpid(), signal.SIGKILL)

    def is_kept_epoch(self, epoch: int) -> bool:
        """Checkpoints Dassl keeps: the last epoch and every TRAIN.CHECKPOINT_FREQ-th (1-based)."""
        freq = self.cfg.TRAIN.CHECKPOINT_FREQ
        return epoch == self.max_epoch or (freq > 0 and epoch % freq == 0)

    def save_model(self, epoch, directory, is_best=False, val_result=None, model_name="", intermediate=False):
        """A periodic/last checkpoint (``model.pth.tar-<epoch>``, named by the ``checkpoint`` file,
        what a resume continues from), the best-val one (``model_name``), or the resumable
        ``intermediate`` one of an epoch, which replaces the previous intermediate one."""
        for name in self.get_model_names():
            folder = os.path.join(directory, name)
            fname = model_name or checkpoint_name(epoch + 1)
            optim, sched = self._optims[name], self._scheds[name]
            payload = {
                "trainer": self.cfg.TRAINER.NAME, "preset": self.preset, "signature": self.signature(),
                "state_dict": ckpt.trainable_state(self._models[name]), "class_state": self.class_state(),
                "optimizer": optim.state_dict() if optim is not None else None,
                "scheduler": sched.state_dict() if sched is not None else None,
                "epoch": epoch + 1, "val_result": None if val_result is None else float(val_result),
                # what the next epoch depends on besides the model: a resume is bit-identical
                "rng": rng_state(), "best_result": float(self.best_result), "intermediate": bool(intermediate),
                "scaler": self.scaler.state_dict() if self.scaler is not None else None,
                "trainer_state": self.trainer_state(),
            }
            path = os.path.join(folder, fname)
            ckpt.save(path, payload)
            if not model_name:  # periodic/last checkpoints are what a resume continues from
                previous = self._pointed(folder)
                with atomic_path(os.path.join(folder, LAST_POINTER)) as tmp, open(tmp, "w") as f:
                    f.write(fname + "\n")
                if previous and previous != path:
                    self._drop_if_intermediate(previous)
            logger.info("Checkpoint saved to %s", path)

    @staticmethod
    def _pointed(folder: str) -> Optional[str]:
        try:
            with open(os.path.join(folder, LAST_POINTER)) as f:
                name = f.read().strip()
        except OSError:
            return None
        return os.path.join(folder, name) if name else None

    def _drop_if_intermediate(self, path: str) -> None:
        """Delete ``path`` if it is a resumable intermediate checkpoint (superseded by a newer one)."""
        try:
            old = torch.load(path, map_location="cpu", weights_only=True)
        except Exception:  # not ours, unreadable, already gone: leave it
            return
        if isinstance(old, dict) and old.get("format") == ckpt.FORMAT and old.get("intermediate"):
            os.remove(path)
            logger.info("Removed the superseded resumable checkpoint %s", path)

    def _read(self, path: str) -> dict:
        return ckpt.load(path, trainer=self.cfg.TRAINER.NAME, preset=self.preset, signature=self.signature(),
                         map_location=self.device)

    def _restore(self, name: str, data: dict, path: str) -> None:
        try:
            self._models[name].load_state_dict(data["state_dict"], strict=True)
        except RuntimeError as exc:
            raise ckpt.CheckpointError(f"{path} does not fit this model: {exc}") from exc
        if data.get("class_state") is not None:
            try:
                self.load_class_state(data["class_state"])
            except (ValueError, KeyError, TypeError) as exc:
                raise ckpt.CheckpointError(f"{path}: {exc}.") from None

    def resume_model_if_exist(self, directory):
        names = self.get_model_names()
        pointers = [os.path.join(directory, n, LAST_POINTER) for n in names]
        if not all(os.path.isfile(p) for p in pointers):
            logger.info("No checkpoint found in %s, training from scratch", directory)
            return 0
        start, rng = 0, None
        for name, pointer in zip(names, pointers):
            with open(pointer) as f:
                path = os.path.join(directory, name, f.read().strip())
            data = self._read(path)
            self._restore(name, data, path)
            if self._optims[name] is not None and data.get("optimizer"):
                self._optims[name].load_state_dict(data["optimizer"])
            if self._scheds[name] is not None and data.get("scheduler"):
                self._scheds[name].load_state_dict(data["scheduler"])
            if self.scaler is not None and data.get("scaler"):
                self.scaler.load_state_dict(data["scaler"])
            if data.get("best_result") is not None:
                self.best_result = float(data["best_result"])
            if data.get("trainer_state") is not None:
                self.load_trainer_state(data["trainer_state"])
            start = int(data["epoch"])
            rng = data.get("rng")
            logger.info("Resumed from %s (epoch %d)", path, start)
        if rng is not None:  # last: nothing may draw a random number between here and the next epoch
            set_rng_state(rng)
        else:
            logger.warning("The checkpoint holds no random states (written by an older version): the "
                           "resumed run continues correctly but not bit-identically to an uninterrupted one")
        return start

    def load_model(self, directory, epoch=None):
        if not directory:
            logger.info("No model directory given: evaluating the model as built")
            return
        for name in self.get_model_names():
            folder = os.path.join(directory, name)
            if epoch is not None:
                path = os.path.join(folder, checkpoint_name(epoch))
            elif os.path.isfile(os.path.join(folder, BEST_FILE)):
                path = os.path.join(folder, BEST_FILE)
            elif os.path.isfile(os.path.join(folder, LAST_POINTER)):
                with open(os.path.join(folder, LAST_POINTER)) as f:
                    path = os.path.join(folder, f.read().strip())
            elif _last_numbered(folder):  # e.g. an original-repo folder copied without its pointer file
                path = os.path.join(folder, _last_numbered(folder))
                logger.info("No %s or '%s' file in %s: loading the last epoch's %s", BEST_FILE, LAST_POINTER,
                            folder, os.path.basename(path))
            else:
                raise ckpt.CheckpointError(f"No checkpoint in {folder} (expected {BEST_FILE} or a "
                                           f"'{LAST_POINTER}' file; give --load-epoch N for model.pth.tar-N).")
            if not os.path.isfile(path):
                have = sorted(os.listdir(folder)) if os.path.isdir(folder) else []
                raise ckpt.CheckpointError(f"No checkpoint at {path}. Present in {folder}: {have or 'nothing'}.")
            data = self._read_for_eval(path)
            self._restore(name, data, path)
            self.loaded_epoch = int(data["epoch"])
            logger.info("Loaded %s (epoch %d)", path, self.loaded_epoch)

    def _read_for_eval(self, path: str) -> dict:
        """One of our checkpoints, or one the original repository of this trainer wrote (CoOp, CoCoOp:
        ``prompt_learner/``; MaPLe: ``MultiModalPromptLearner/``), converted by :mod:`spotlighter.foreign`."""
        raw = foreign.read(path)
        if not foreign.is_original(raw):
            return self._read(path)
        trainer = self.cfg.TRAINER.NAME
        state, epoch = foreign.convert(raw, trainer, path)
        want = self.signature()
        have = {k: list(v.shape) for k, v in state.items()}
        diff = {k: (have.get(k), want.get(k)) for k in sorted(set(have) | set(want)) if have.get(k) != want.get(k)}
        if diff:
            lines = ", ".join(f"{k}: checkpoint {a} vs config {b}" for k, (a, b) in diff.items())
            raise ckpt.CheckpointError(
                f"{path} (a checkpoint of the original {trainer} code) does not fit this config ({lines}). "
                f"Set TRAINER.{self.CFG_NODE}.{self.CHECKPOINT_KEYS} as in the run that trained it.")
        logger.info("%s was written by the original %s code: converted (%s)", path, trainer, ", ".join(state))
        return {"state_dict": state, "epoch": epoch}

    # ------------------------------------------------------------------ evaluation
    def test(self, split=None):
        split = split or self.cfg.TEST.SPLIT
        result = super().test(split)
        if split != "val" or self.val_loader is None:  # Dassl falls back to test without a val set
            self.write_result_record()
        return result

    def write_result_record(self) -> None:
        from spotlighter.results.record import make_record, write_record

        ev, cfg = self.evaluator, self.cfg
        trained_here = getattr(self, "time_start", None) is not None  # set by Dassl's before_train
        # a resume that starts at the last epoch runs no epoch loop (self.epoch stays 0)
        last = max(self.start_epoch, self.epoch + 1)
        epoch = self.loaded_epoch if self.loaded_epoch is not None else (last if trained_here else None)
        record = make_record(
            trainer=cfg.TRAINER.NAME, config=cfg.TRAINER.CONFIG_NAME or "default", preset=self.preset,
            dataset=cfg.DATASET.CONFIG_NAME or cfg.DATASET.NAME, subset=cfg.DATASET.SUBSAMPLE_CLASSES,
            shots=int(cfg.DATASET.NUM_SHOTS) if cfg.DATASET.NUM_SHOTS >= 1 else None, seed=int(cfg.SEED), split="test", correct=int(ev._correct),
            total=int(ev._total), accuracy=100.0 * ev._correct / max(ev._total, 1),
            macro_f1=float(self._last_results["macro_f1"]), epoch=epoch,
            wall_time_s=round(time.time() - self._start_time, 3), output_dir=os.path.abspath(cfg.OUTPUT_DIR),
        )
        path = write_record(cfg.OUTPUT_DIR, record)
        logger.info("Result record written to %s", path)
