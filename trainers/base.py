"""The one Dassl adapter every trainer of this project derives from.

It owns what upstream Dassl gets wrong on current torch (warm-up scheduler, pickled checkpoints)
and what all five trainers share: CLIP loading with the configured precision and device, the
optimiser and LR schedule, the training step with NaN detection, checkpoints that hold only trained
state, and the JSON result record of every test evaluation.
"""

from __future__ import annotations

import contextlib
import datetime
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
from dassl.utils import AverageMeter, MetricMeter

from spotlighter.data_layout import DatasetError
from spotlighter import checkpoint as ckpt
from spotlighter import factory, foreign, preempt
from spotlighter.backbone import FrozenCLIP
from spotlighter.config import ConfigError, check_precision, check_prune_cfg
from spotlighter.fileio import atomic_path
from spotlighter.models import count_trainable
from spotlighter.registry import trainer as registered
from spotlighter.schedule import build_schedule

logger = logging.getLogger(__name__)

BEST_FILE, LAST_POINTER, checkpoint_name = ckpt.BEST_FILE, ckpt.LAST_POINTER, ckpt.checkpoint_name
DTYPES = factory.DTYPES
#: The run's config, saved next to its checkpoints: :func:`spotlighter.api.load_trained` rebuilds the model from it.
CONFIG_FILE = "config.yaml"
#: Test hook: SIGKILL this process right after the checkpoint of this (1-based) epoch is written,
#: as a crash or a cluster's preemption would (tests/test_train_integration.py resumes from it).
KILL_AFTER_EPOCH_ENV = "SPOTLIGHTER_TEST_KILL_AFTER_EPOCH"
#: Test hook: "<step>:<SIGNAL>" sends this process SIGNAL right after that (1-based, counted over the
#: whole run) training step, as a cluster's stop signal would.
SIGNAL_AFTER_STEP_ENV = "SPOTLIGHTER_TEST_SIGNAL_AFTER_STEP"
#: Test hook: sleep this many seconds after every training step (a slow run for signal tests).
STEP_SLEEP_ENV = "SPOTLIGHTER_TEST_STEP_SLEEP"
#: Where ``train.py --restart`` moves an earlier run's files (inside the output folder, so nothing
#: that lists seed folders or their logs sees them).
RESTARTED_DIR = "restarted"


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


def step_checkpoint_name(epoch: int, step: int) -> str:
    """A stopped run's checkpoint: ``step`` batches of (1-based) ``epoch`` done."""
    return f"model.pth.tar-{epoch}-step{step}"


def skip_batches(iterator, n: int) -> None:
    """Advance a fresh DataLoader iterator by ``n`` batches as the uninterrupted epoch did. A
    single-process iterator draws only the indices (the images' random transforms would use the
    main process's random states, which the caller restores afterwards); with worker processes the
    batches are made and dropped (each worker's random states advance with every batch it makes)."""
    if getattr(iterator, "_num_workers", None) == 0 and hasattr(iterator, "_next_index"):
        for _ in range(n):
            iterator._next_index()
        iterator._num_yielded += n
    else:
        for _ in range(n):
            next(iterator)


def meters_state(meters: MetricMeter) -> Dict[str, list]:
    return {k: [float(m.val), float(m.sum), int(m.count)] for k, m in meters.meters.items()}


def restore_meters(meters: MetricMeter, state: Dict[str, list]) -> None:
    for k, (val, total, count) in state.items():
        m = meters.meters[k] = AverageMeter()
        m.val, m.sum, m.count = val, total, count
        m.avg = total / count if count else 0.0


class PromptTrainer(TrainerX):
    """Base of the CLIP prompt trainers: one per trainer of :data:`spotlighter.registry.TRAINERS`,
    named as registered there. The model comes from :func:`spotlighter.factory.build_model`."""

    CFG_NODE = ""  # cfg.TRAINER.<CFG_NODE> holds PREC and the method's keys (from the registry)
    MODULE_NAME = ""  # folder of the checkpoints inside OUTPUT_DIR (from the registry)
    #: The keys of cfg.TRAINER.<CFG_NODE> that fix the shapes of a checkpoint's tensors (error messages)
    CHECKPOINT_KEYS = "N_CTX / CTX_INIT (and CSC or PROMPT_DEPTH)"

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        spec = registered(cls.__name__)
        cls.CFG_NODE, cls.MODULE_NAME = spec.node, spec.module

    def __init__(self, cfg):
        self._start_time = time.time()
        self.loaded_epoch: Optional[int] = None
        self._resume_in_epoch: Optional[dict] = None  # a step checkpoint's position, for run_epoch
        self._updated = False  # an optimizer step was taken (in this process or before a resume)
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
        return factory.resolve_precision(self.cfg, self.device)

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
        return factory.build_model(self.cfg, classnames, clip)

    def build_model(self) -> None:
        cfg = self.cfg
        self.warn_if_selecting_on_test()
        self.precision = self.resolve_precision()
        self.clip = factory.load_frozen_clip(cfg, self.device, self.precision)
        prune = self.clip.prune
        if prune.active:
            amount = f"merge {prune.r} tokens" if prune.r else f"keep {prune.keep:.3g} of the patch tokens"
            logger.info("Token reduction (%s): blocks %s %s (fuse %s, in training %s): %d of %d patches reach the "
                        "last block", prune.mode, list(prune.layers), amount, prune.fuse, prune.in_training,
                        prune.remaining(self.clip.num_patches), self.clip.num_patches)
        size = list(cfg.INPUT.SIZE)
        if self.clip.openclip is not None:  # train.py sets INPUT.* to the model's; other callers may not
            from spotlighter.openclip import check_input

            problem = check_input(cfg, self.clip.openclip)
            if problem:
                raise ConfigError(problem)
        if size != [self.clip.input_resolution] * 2:
            raise ConfigError(f"INPUT.SIZE = {tuple(size)} does not match the CLIP input resolution "
                              f"{self.clip.input_resolution}; set INPUT.SIZE ({self.clip.input_resolution}, "
                              f"{self.clip.input_resolution}).")
        classnames = self.dm.dataset.classnames
        self.model = self.build_custom_model(self.clip, classnames).to(self.device)
        n_trainable = count_trainable(self.model)
        n_tensors = sum(1 for p in self.model.parameters() if p.requires_grad)
        logger.info("Trainable scalars: %s in %d tensors (frozen CLIP excluded); precision %s on %s",
                    f"{n_trainable:,}", n_tensors, self.precision, self.device)
        self.log_trainable()
        optim = sched = None
        if n_trainable:
            optim = build_optimizer(self.model, cfg.OPTIM)
            sched = build_schedule(optim, cfg.OPTIM)
        self.optim, self.sched = optim, sched
        self.register_model(self.MODULE_NAME, self.model, optim, sched)
        self.scaler = torch.amp.GradScaler("cuda") if self.precision == "amp" and self.device.type == "cuda" else None

    def log_trainable(self) -> None:
        """Log a breakdown of the trainable tensors, where a trainer has one."""

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
        self.save_config()
        super().train()

    def save_config(self) -> None:
        """The run's complete config as ``OUTPUT_DIR/config.yaml``, what
        :func:`spotlighter.api.load_trained` rebuilds the model from."""
        path = os.path.join(self.output_dir, CONFIG_FILE)
        with atomic_path(path) as tmp, open(tmp, "w") as f:
            f.write(self.cfg.dump())

    def run_epoch(self):
        """Dassl's TrainerX loop (same operations in the same order, same log lines), plus: the
        random states at the start of the epoch are kept (a step checkpoint records them), a run
        resumed from a step checkpoint continues after its last batch, and a stop signal
        (:mod:`spotlighter.preempt`) ends the epoch after the current step with a step checkpoint."""
        self.set_model_mode("train")
        losses = MetricMeter()
        batch_time = AverageMeter()
        data_time = AverageMeter()
        self.num_batches = len(self.train_loader_x)
        resume, self._resume_in_epoch = self._resume_in_epoch, None
        if resume is not None:
            set_rng_state(resume["epoch_rng"])
        self._epoch_rng, self._meters = rng_state(), losses
        batches = iter(self.train_loader_x)  # the sampler's order and the workers' seeds: from epoch_rng
        first = 0
        if resume is not None:
            first = resume["step"]
            skip_batches(batches, first)
            restore_meters(losses, resume["meters"])
            set_rng_state(resume["rng"])  # where the stopped run was after its last step
        signal_after = os.environ.get(SIGNAL_AFTER_STEP_ENV, "")
        sleep_s = float(os.environ.get(STEP_SLEEP_ENV) or 0)

        end = time.time()
        for self.batch_idx, batch in enumerate(batches, start=first):
            data_time.update(time.time() - end)
            loss_summary = self.forward_backward(batch)
            self._updated = True
            batch_time.update(time.time() - end)
            losses.update(loss_summary)

            meet_freq = (self.batch_idx + 1) % self.cfg.TRAIN.PRINT_FREQ == 0
            only_few_batches = self.num_batches < self.cfg.TRAIN.PRINT_FREQ
            if meet_freq or only_few_batches:
                nb_remain = self.num_batches - self.batch_idx - 1
                nb_remain += (self.max_epoch - self.epoch - 1) * self.num_batches
                eta = str(datetime.timedelta(seconds=int(batch_time.avg * nb_remain)))
                print(" ".join([f"epoch [{self.epoch + 1}/{self.max_epoch}]",
                                f"batch [{self.batch_idx + 1}/{self.num_batches}]",
                                f"time {batch_time.val:.3f} ({batch_time.avg:.3f})",
                                f"data {data_time.val:.3f} ({data_time.avg:.3f})",
                                f"{losses}", f"lr {self.get_current_lr():.4e}", f"eta {eta}"]))

            n_iter = self.epoch * self.num_batches + self.batch_idx
            for name, meter in losses.meters.items():
                self.write_scalar("train/" + name, meter.avg, n_iter)
            self.write_scalar("train/lr", self.get_current_lr(), n_iter)

            if sleep_s:
                time.sleep(sleep_s)
            if signal_after and signal_after.split(":")[0] == str(n_iter + 1):
                logger.info("%s=%s: signalling this process (test hook)", SIGNAL_AFTER_STEP_ENV, signal_after)
                os.kill(os.getpid(), getattr(signal, signal_after.split(":")[1]))
            if preempt.requested() is not None and self.batch_idx + 1 < self.num_batches:
                self.stop(step=self.batch_idx + 1)  # the epoch's last step: after_epoch saves it as usual
            end = time.time()

    def before_epoch(self):
        if preempt.requested() is not None:  # arrived during the last step or the val test of an epoch
            self.stop(done=self.epoch)

    def after_train(self):
        if preempt.requested() is not None:  # the last epoch's checkpoint is written: test after the resume
            self.stop(done=self.max_epoch)
        super().after_train()

    def stop(self, step: Optional[int] = None, done: Optional[int] = None) -> None:
        """Write what a resume continues from (``step``: batches of the current epoch done; ``done``:
        between epochs, the epochs done) and raise :class:`spotlighter.preempt.Stopped`."""
        name = preempt.signal_name(preempt.requested())
        if step is None and done <= self.start_epoch and preempt.requested() == preempt.REQUEUE_SIGNAL:
            logger.warning("%s before this process trained a step: ignored (a job requeued on it would make no "
                           "progress); training goes on", name)
            preempt.clear()
            return
        if step is not None:
            self.save_model(self.epoch, self.output_dir, intermediate=True, step=step)
            where = f"after batch {step}/{self.num_batches} of epoch {self.epoch + 1}"
        elif done > self.start_epoch:
            pointed = [self._pointed(os.path.join(self.output_dir, n)) for n in self.get_model_names()]
            if any(p is None or os.path.basename(p) != checkpoint_name(done) for p in pointed):
                self.save_model(done - 1, self.output_dir, intermediate=not self.is_kept_epoch(done))
            where = f"after epoch {done}"
        else:
            where = "before this process trained a step"
        raise preempt.Stopped(
            f"by {name} {where}; the checkpoint to resume from is named by "
            f"{os.path.join(self.output_dir, self.get_model_names()[0], LAST_POINTER)}. Re-run the same command "
            "to resume (scripts/*.sh skip finished jobs and resume this one).")

    def parse_batch_train(self, batch):
        return batch["img"].to(self.device), batch["label"].to(self.device)

    def forward_backward(self, batch) -> Dict[str, float]:
        images, labels = self.parse_batch_train(batch)
        with self.autocast():
            logits, losses = self.model(images, labels)
            loss = sum(losses.values())
        if not torch.isfinite(loss):
            raise TrainingDiverged(
                f"The loss is {loss.item()} at {self._where()} with precision {self.precision} "
                f"({'; '.join(f'{k}={v.item():.4g}' for k, v in losses.items())}). "
                + self.divergence_cause(images) + " " + self.AFTER_DIVERGENCE)
        self.optim.zero_grad(set_to_none=True)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optim)
            self.scaler.update()
        else:
            loss.backward()
            self.optim.step()
        self._updated = True
        bad = self.non_finite_parameters()
        if bad:  # caught here, so no checkpoint ever holds them
            raise TrainingDiverged(
                f"The optimizer step at {self._where()} made {len(bad)} trainable tensor(s) non-finite "
                f"({', '.join(bad[:3])}{', ...' if len(bad) > 3 else ''}) although the loss was finite "
                f"({loss.item():.4g}): the update overflowed. Lower OPTIM.LR (now {self.cfg.OPTIM.LR:g})"
                + (f" or leave half precision (TRAINER.{self.CFG_NODE}.PREC fp32)" if self.precision == "fp16" else "")
                + ". " + self.AFTER_DIVERGENCE)
        summary = {"loss": loss.item(), **{k: v.item() for k, v in losses.items()}}
        summary.update({k: float(v) for k, v in (getattr(self.model, "stats", None) or {}).items()})
        summary["acc"] = compute_accuracy(logits.detach(), labels)[0].item()
        if (self.batch_idx + 1) == self.num_batches:
            self.update_lr()
        return summary

    #: The last sentence of every divergence message: what the checkpoints hold and what a re-run does.
    AFTER_DIVERGENCE = ("Checkpoints written before this step hold finite values only, and a resume is deterministic: "
                        "the same settings diverge again at the same step. Change the setting in another "
                        "--output-dir, or start over in this one with --restart (scripts/*.sh: FORCE=1).")

    def _where(self) -> str:
        step = self.epoch * self.num_batches + self.batch_idx + 1
        return f"epoch {self.epoch + 1}, batch {self.batch_idx + 1} (step {step})"

    def non_finite_parameters(self) -> list:
        """Names of the trainable parameters holding a NaN or an infinity (one device sync if none)."""
        params = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
        if not params or bool(torch.stack([torch.isfinite(p).all() for _, p in params]).all()):
            return []
        return [n for n, p in params if not bool(torch.isfinite(p).all())]

    def divergence_advice(self) -> str:
        """:meth:`divergence_cause` without the batch (for trainers with their own training step)."""
        return self.divergence_cause(None) + " " + self.AFTER_DIVERGENCE

    def divergence_cause(self, images=None) -> str:
        """What a non-finite loss can come from, given what is known at that step."""
        if images is not None and not bool(torch.isfinite(images).all()):
            return ("The input batch itself holds NaN or infinite values: check the images and "
                    "INPUT.PIXEL_MEAN / INPUT.PIXEL_STD (a zero std divides by zero).")
        bad = self.non_finite_parameters()
        if bad:
            return (f"The trainable parameters hold non-finite values ({', '.join(bad[:3])}) before this "
                    "step: the checkpoint this run resumed from is damaged.")
        precision = ""
        if self.precision == "fp16":
            precision = f"Half precision overflows easily: rerun with TRAINER.{self.CFG_NODE}.PREC fp32 (or amp)"
        elif self.precision == "amp":
            precision = f"Mixed precision can overflow: rerun with TRAINER.{self.CFG_NODE}.PREC fp32"
        if not self._updated:  # the model as built (or as loaded), before any update
            return ("This is the first step, before any update, so OPTIM.LR is not the cause: the model as "
                    "built already gives a non-finite loss on this batch. "
                    + (precision + ", or check" if precision else "The run is in full precision (fp32): check")
                    + " the CLIP weights (MODEL.BACKBONE.NAME / PATH) and the method's config values.")
        lr = f"lower OPTIM.LR (now {self.cfg.OPTIM.LR:g})"
        if precision:
            return f"{precision}, or {lr}."
        return (f"The run is already in full precision (fp32), so this is not a rounding problem: the updates "
                f"so far drove the model there: {lr}, or check the config values of this run.")

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

    def run_settings(self) -> dict:
        """The cfg values that define this run (recorded in every checkpoint, checked on resume)."""
        return ckpt.run_settings(self.cfg, self.CFG_NODE)

    def save_model(self, epoch, directory, is_best=False, val_result=None, model_name="", intermediate=False,
                   step=None):
        """A periodic/last checkpoint (``model.pth.tar-<epoch>``, named by the ``checkpoint`` file,
        what a resume continues from), the best-val one (``model_name``), the resumable
        ``intermediate`` one of an epoch, which replaces the previous intermediate one, or (``step``:
        batches of the 0-based ``epoch`` done) the step checkpoint of a stopped run, resumable too."""
        for name in self.get_model_names():
            folder = os.path.join(directory, name)
            if step is not None:
                fname, done = step_checkpoint_name(epoch + 1, step), epoch
            else:
                fname, done = model_name or checkpoint_name(epoch + 1), epoch + 1
            optim, sched = self._optims[name], self._scheds[name]
            payload = {
                "trainer": self.cfg.TRAINER.NAME, "preset": self.preset, "signature": self.signature(),
                "settings": self.run_settings(),
                "state_dict": ckpt.trainable_state(self._models[name]), "class_state": self.class_state(),
                "optimizer": optim.state_dict() if optim is not None else None,
                "scheduler": sched.state_dict() if sched is not None else None,
                "epoch": done, "val_result": None if val_result is None else float(val_result),
                # what the next epoch depends on besides the model: a resume is bit-identical
                "rng": rng_state(), "best_result": float(self.best_result), "intermediate": bool(intermediate),
                "scaler": self.scaler.state_dict() if self.scaler is not None else None,
                "trainer_state": self.trainer_state(),
            }
            if step is not None:
                payload.update(step=int(step), epoch_rng=self._epoch_rng, meters=meters_state(self._meters))
            bad = ckpt.non_finite({**payload["state_dict"], **{f"class_state.{k}": v for k, v in
                                                                (payload["class_state"] or {}).items()}})
            if bad:  # never write a checkpoint a resume would continue a diverged run from
                raise TrainingDiverged(f"The trained state holds non-finite values ({', '.join(bad[:3])}) at the end "
                                       f"of epoch {done}; no checkpoint was written. " + self.AFTER_DIVERGENCE)
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

    def settings_changed(self, exc: ckpt.SettingsChanged, directory: str) -> ckpt.CheckpointError:
        """The error of a resume whose settings differ from the checkpoint's: every difference, and
        the two ways on."""
        lines = "\n".join(f"  {k}: {a!r} -> {b!r}" for k, (a, b) in exc.diff.items())
        if self.cfg.RESUME:
            ways = (f"Resume with the settings it was trained with, or train from scratch without --resume "
                    f"in another --output-dir.")
        else:
            ways = (f"Either give this run another --output-dir (scripts/*.sh: another OUTPUT), or start over "
                    f"in this one with --restart (scripts/*.sh: FORCE=1), which moves the earlier run's files "
                    f"to {os.path.join(directory, RESTARTED_DIR)}/<time>/ (scripts/*.sh: to $OUTPUT/backup/).")
        return ckpt.CheckpointError(
            f"{directory} holds a run (checkpoint {exc.path}, {exc.epoch} epoch(s) done) with other settings "
            f"than this command; resuming it would mix two runs. Differences (checkpoint -> now):\n{lines}\n{ways}")

    def resume_model_if_exist(self, directory):
        names = self.get_model_names()
        pointers = [os.path.join(directory, n, LAST_POINTER) for n in names]
        if not all(os.path.isfile(p) for p in pointers):
            if self.cfg.RESUME:  # asked for explicitly: never "from scratch" in silence
                raise ckpt.CheckpointError(
                    f"--resume {directory}: no checkpoint to resume from (expected "
                    f"{' and '.join(os.path.join(directory, n, LAST_POINTER) for n in names)}, written by "
                    "a training of this trainer).")
            logger.info("No checkpoint found in %s, training from scratch", directory)
            return 0
        start, rng = 0, None
        for name, pointer in zip(names, pointers):
            with open(pointer) as f:
                path = os.path.join(directory, name, f.read().strip())
            try:
                data = ckpt.load(path, trainer=self.cfg.TRAINER.NAME, preset=self.preset,
                                 signature=self.signature(), map_location=self.device, settings=self.run_settings())
            except ckpt.SettingsChanged as exc:
                raise self.settings_changed(exc, directory) from None
            if "settings" not in data:
                logger.warning("%s records no run settings (written by an older version): cannot check that "
                               "this command continues the same run", path)
            bad = ckpt.non_finite({**data["state_dict"], **{f"class_state.{k}": v for k, v in
                                                            (data.get("class_state") or {}).items()}})
            if bad:
                raise ckpt.CheckpointError(
                    f"{path} holds non-finite values ({', '.join(bad[:3])}): the run diverged before it was "
                    "written, and resuming would continue from there. Start over with --restart "
                    "(scripts/*.sh: FORCE=1), or give another --output-dir.")
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
            if data.get("step") is not None:
                self._resume_in_epoch = {"step": int(data["step"]), "epoch_rng": data["epoch_rng"],
                                         "rng": rng, "meters": data.get("meters") or {}}
                logger.info("Resumed from %s (epoch %d, then %d batch(es) of epoch %d)", path, start,
                            int(data["step"]), start + 1)
            else:
                logger.info("Resumed from %s (epoch %d)", path, start)
        self._updated = start > 0 or self._resume_in_epoch is not None
        if self._resume_in_epoch is not None:
            pass  # run_epoch restores the random states of the interrupted epoch
        elif rng is not None:  # last: nothing may draw a random number between here and the next epoch
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
            path, guessed = ckpt.find_checkpoint(folder, epoch)
            if guessed:
                logger.info("No %s or '%s' file in %s: loading the last epoch's %s", BEST_FILE, LAST_POINTER,
                            folder, os.path.basename(path))
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
