"""Train / evaluate a CLIP prompt trainer with Dassl (the ecosystem's train.py command line).

cfg pipeline: default_cfg (Dassl's defaults + this project's keys) -> Spotlighter preset -> dataset
yaml -> trainer yaml -> command-line flags -> trailing ``KEY VALUE`` pairs -> freeze.

Re-running a command into an output folder that holds checkpoints resumes that run; a resume with
other settings (any cfg key that changes the computation) is refused with the differences listed;
``--restart`` starts over instead. SIGTERM / SIGUSR1 stop training after the current step with a
resumable checkpoint. Exit status: 0 done, 2 bad input or a refused run (one ``error:`` line),
75 stopped by a signal with a checkpoint to resume from.
"""

import argparse
import contextlib
import logging
import os
import sys
import warnings

# Dassl imports wilds -> ogb, which checks PyPI for a newer ogb in a background thread and warns
# when it cannot (offline clusters): silence that warning.
os.environ.setdefault("OUTDATED_IGNORE", "1")
# ogb's `outdated` and clip-anytorch import pkg_resources, whose deprecation notice would open every
# run's output; it concerns those packages, not the run (setup.py pins setuptools<82 for them).
warnings.filterwarnings("ignore", message="pkg_resources is deprecated", category=UserWarning)

logger = logging.getLogger("train")

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:  # the checkout's trainers/ and datasets/ come first (not HF `datasets`)
    sys.path.insert(0, HERE)


class UsageError(Exception):
    """Bad command-line input; printed without a traceback."""


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", type=str, default="", help="path to the datasets ($DATA)")
    p.add_argument("--output-dir", type=str, default="", help="output directory")
    p.add_argument("--resume", type=str, default="", help="checkpoint directory to resume from")
    p.add_argument("--restart", action="store_true",
                   help="start over: move what an earlier run left in --output-dir (checkpoints, logs, "
                        "result.json) to <output-dir>/restarted/<time>/ and train from scratch")
    p.add_argument("--seed", type=int, default=-1, help="only positive value enables a fixed seed")
    p.add_argument("--source-domains", type=str, nargs="+", help="source domains for DA/DG")
    p.add_argument("--target-domains", type=str, nargs="+", help="target domains for DA/DG")
    p.add_argument("--transforms", type=str, nargs="+", help="data augmentation methods")
    p.add_argument("--config-file", type=str, default="", help="path to the trainer config file")
    p.add_argument("--dataset-config-file", type=str, default="", help="path to the dataset config file")
    p.add_argument("--trainer", type=str, default="", help="name of trainer")
    p.add_argument("--backbone", type=str, default="", help="name of CNN backbone")
    p.add_argument("--head", type=str, default="", help="name of head")
    p.add_argument("--eval-only", action="store_true", help="evaluation only")
    p.add_argument("--model-dir", type=str, default="", help="load model from this directory for eval-only mode")
    p.add_argument("--load-epoch", type=int, help="load model weights at this epoch for evaluation")
    p.add_argument("--no-train", action="store_true", help="do not call trainer.train()")
    p.add_argument("opts", default=None, nargs=argparse.REMAINDER,
                   help="modify config options using the command-line (KEY VALUE pairs)")
    return p.parse_args(argv)


def _stem(path: str) -> str:
    return os.path.splitext(os.path.basename(path))[0] if path else ""


def reset_cfg(cfg, args) -> None:
    if args.root:
        cfg.DATASET.ROOT = args.root
    if args.output_dir:
        cfg.OUTPUT_DIR = args.output_dir
    if args.resume:
        cfg.RESUME = args.resume
    if args.seed:
        cfg.SEED = args.seed
    if args.source_domains:
        cfg.DATASET.SOURCE_DOMAINS = args.source_domains
    if args.target_domains:
        cfg.DATASET.TARGET_DOMAINS = args.target_domains
    if args.transforms:
        cfg.INPUT.TRANSFORMS = args.transforms
    if args.trainer:
        cfg.TRAINER.NAME = args.trainer
    if args.backbone:
        cfg.MODEL.BACKBONE.NAME = args.backbone
    if args.head:
        cfg.MODEL.HEAD.NAME = args.head


def _merge_file(cfg, path: str, what: str) -> None:
    import yaml

    if not os.path.isfile(path):
        raise UsageError(f"{what} {path!r} does not exist.")
    try:
        cfg.merge_from_file(path)
    except yaml.YAMLError as exc:
        where = getattr(exc, "problem_mark", None)
        line = f" (line {where.line + 1}, column {where.column + 1})" if where is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise UsageError(f"{what} {path} is not valid YAML{line}: {problem}.") from None
    except KeyError as exc:
        raise UsageError(f"{path}: {exc.args[0]}. Only keys declared by Dassl or by "
                         "spotlighter/config.py (extend_cfg) may appear in a config file.") from exc
    except ValueError as exc:
        raise UsageError(f"{path}: {exc}") from exc


def build_cfg(args, presets=None):
    """The run's cfg; ``presets``: {node: preset} written underneath the files and options."""
    from spotlighter.config import apply_preset, default_cfg

    cfg = default_cfg()
    for node, preset in (presets or {}).items():
        apply_preset(cfg, preset, node)
    if args.dataset_config_file:
        _merge_file(cfg, args.dataset_config_file, "--dataset-config-file")
    if args.config_file:
        _merge_file(cfg, args.config_file, "--config-file")
    reset_cfg(cfg, args)
    opts = args.opts or []
    if len(opts) % 2:
        raise UsageError(f"trailing options must be KEY VALUE pairs; got an odd number: {opts}")
    try:
        cfg.merge_from_list(opts)
    except (KeyError, ValueError, AssertionError) as exc:
        raise UsageError(f"command-line option: {exc.args[0] if exc.args else exc}") from exc
    return cfg


def setup_cfg(args):
    from spotlighter.config import chosen_presets

    cfg = build_cfg(args)
    presets = chosen_presets(cfg)
    if presets:  # rebuild with the presets underneath the files and options
        cfg = build_cfg(args, presets)
    if not cfg.TRAINER.CONFIG_NAME:
        cfg.TRAINER.CONFIG_NAME = _stem(args.config_file)
    if not cfg.DATASET.CONFIG_NAME:
        cfg.DATASET.CONFIG_NAME = _stem(args.dataset_config_file)
    from spotlighter.openclip import adopt_input

    args.adopted_input = adopt_input(cfg)  # an OpenCLIP model's own image size, mean and std
    cfg.freeze()
    return cfg


def check_registered(cfg) -> None:
    from dassl.data.datasets import DATASET_REGISTRY
    from dassl.engine import TRAINER_REGISTRY

    from spotlighter.registry import TRAINERS

    trainers = [n for n in TRAINER_REGISTRY.registered_names()]
    ours = [t.name for t in TRAINERS.values()]
    if cfg.TRAINER.NAME not in trainers:
        raise UsageError(f"unknown trainer {cfg.TRAINER.NAME!r} (--trainer); this project's trainers: "
                         f"{', '.join(ours)}.")
    if cfg.DATASET.NAME not in DATASET_REGISTRY.registered_names():
        raise UsageError(f"unknown dataset {cfg.DATASET.NAME!r} (DATASET.NAME, from --dataset-config-file); "
                         "see configs/datasets/ and DATASETS.md.")


class _CurrentStdoutHandler(logging.StreamHandler):
    """Writes to whatever sys.stdout is at the time (Dassl's log.txt tee), never a stale stream.

    A full disk or a read-only log is raised (main prints it as one line and stops) instead of
    logging's "--- Logging error ---" traceback for every message that follows."""

    def emit(self, record):
        self.stream = sys.stdout
        super().emit(record)

    def handleError(self, record):
        from spotlighter.fileio import OutputWriteError

        exc = sys.exc_info()[1]
        if OutputWriteError.is_write_error(exc):
            raise exc
        super().handleError(record)


def configure_logging() -> None:
    """Route the package loggers to sys.stdout, which Dassl's setup_logger tees into log.txt."""
    # Importing Dassl runs logging.disable(logging.WARNING) (dassl/data/datasets/dg/wilds), which
    # would silently drop every INFO and WARNING message of this project: undo it.
    logging.disable(logging.NOTSET)
    handler = _CurrentStdoutHandler()
    handler.setFormatter(logging.Formatter("%(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO)
    for noisy in ("PIL", "matplotlib", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def run(args) -> None:
    import datasets  # noqa: F401  registers the datasets
    import trainers  # noqa: F401  registers the trainers

    from spotlighter.config import check_dassl_cfg

    def no_such_resume(path: str) -> UsageError:  # Dassl would start from scratch without a word
        return UsageError(f"--resume {path}: no such folder. Give the output folder of the run to resume "
                          "(a run started again with the same --output-dir resumes by itself).")

    if args.resume and not os.path.isdir(args.resume):
        raise no_such_resume(args.resume)
    cfg = setup_cfg(args)
    check_dassl_cfg(cfg)  # a bad value is one line now, not a traceback after the data is loaded
    check_registered(cfg)
    if cfg.RESUME and not os.path.isdir(cfg.RESUME):  # RESUME given as a trailing KEY VALUE
        raise no_such_resume(cfg.RESUME)
    if args.restart and cfg.RESUME:
        raise UsageError("--restart starts over in --output-dir and --resume continues another run: give one of them.")
    # One process per output folder, for its whole life: taken before Dassl opens log.txt or a
    # checkpoint is read, released (by the kernel, however the process ends) when it exits.
    lock = lock_output_dir(cfg.OUTPUT_DIR)
    try:
        run_locked(args, cfg, lock)
    finally:
        lock.release()


def lock_output_dir(directory: str):
    """The acquired :class:`~spotlighter.runlock.OutputLock` of ``directory`` (created if needed)."""
    from spotlighter.fileio import OutputWriteError
    from spotlighter.runlock import OutputLock

    lock = OutputLock(directory, announce=False)
    try:
        lock.acquire()
    except OSError as exc:
        raise OutputWriteError.from_os_error(exc, "the output folder (--output-dir)") from None
    return lock


def run_locked(args, cfg, lock) -> None:
    import torch
    from dassl.engine import build_trainer
    from dassl.utils import set_random_seed, setup_logger

    moved = move_earlier_run(cfg.OUTPUT_DIR) if args.restart else None
    if cfg.SEED >= 0:
        set_random_seed(cfg.SEED)
    setup_logger(cfg.OUTPUT_DIR)
    configure_logging()
    if getattr(args, "adopted_input", None):
        logger.info("%s: %s (the model's own preprocessing)", cfg.MODEL.BACKBONE.NAME, "; ".join(args.adopted_input))
    if moved:
        logger.info("--restart: moved the earlier run's files (%s) to %s", ", ".join(moved[1]), moved[0])
    if lock.taken_over is not None:
        logger.warning("Took over the lock of %s left by a process that is no longer running (%s)",
                       cfg.OUTPUT_DIR, lock.taken_over.describe())
    if torch.cuda.is_available() and cfg.USE_CUDA:
        torch.backends.cudnn.benchmark = True
    print("Command: python " + " ".join(sys.argv))
    print(f"torch {torch.__version__}; CUDA available: {torch.cuda.is_available()}")
    print("** Config **")
    print(cfg)

    trainer = build_trainer(cfg)
    if args.eval_only:
        trainer.load_model(args.model_dir, epoch=args.load_epoch)
        trainer.test()
        return
    if not args.no_train:
        trainer.train()


#: What ``--restart`` leaves in place: the lock this process holds.
KEPT_ON_RESTART = (".lock", ".lock.json")


def move_earlier_run(directory: str):
    """``--restart``: move everything an earlier run left in ``directory`` to
    ``<directory>/restarted/<time>/``; returns (that folder, the names moved), or None if none."""
    import shutil
    import time

    from trainers.base import RESTARTED_DIR

    names = sorted(n for n in os.listdir(directory) if n not in KEPT_ON_RESTART and n != RESTARTED_DIR)
    if not names:
        return None
    dst = os.path.join(directory, RESTARTED_DIR, time.strftime("%Y-%m-%d-%H-%M-%S"))
    if os.path.exists(dst):
        dst = f"{dst}-{os.getpid()}"
    os.makedirs(dst)
    for name in names:
        shutil.move(os.path.join(directory, name), os.path.join(dst, name))
    return dst, names


def known_errors():
    from spotlighter.backbone import BackboneError
    from spotlighter.checkpoint import CheckpointError
    from spotlighter.config import ConfigError
    from spotlighter.fileio import OutputWriteError
    from spotlighter.runlock import OutputLocked
    from spotlighter.data_layout import DatasetError
    from trainers.base import TrainingDiverged

    return (UsageError, ConfigError, BackboneError, CheckpointError, TrainingDiverged, DatasetError,
            OutputLocked, OutputWriteError)


def report_error(message: str, prefix: str = "error") -> None:
    """One line on stderr; also into log.txt when Dassl's logger tees stdout there (written to the
    file only: the terminal shows it once)."""
    print(f"{prefix}: {message}", file=sys.stderr)
    log_file = getattr(sys.stdout, "file", None)
    if log_file is not None and sys.stdout is not sys.__stdout__:
        try:
            log_file.write(f"{prefix}: {message}\n")
            log_file.flush()
        except (OSError, ValueError):  # a full disk or a closed log: stderr has it
            pass


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        import dassl  # noqa: F401
    except ImportError as exc:
        print(f"error: Dassl is not importable ({exc}). Install it as the README says "
              "(Install > Dassl.pytorch).", file=sys.stderr)
        return 2
    try:
        import dassl.engine  # noqa: F401  (imports wilds, tensorboard, sklearn, gdown)
    except ImportError as exc:
        print(f"error: Dassl is installed but cannot be imported: {exc}. Its import-time "
              "dependencies: pip install gdown tensorboard scikit-learn wilds", file=sys.stderr)
        return 2
    from spotlighter import preempt
    from spotlighter.fileio import OutputWriteError

    errors = known_errors()
    # training only (from the start, so an early signal never kills it): an evaluation has nothing
    # to save and stops at once
    stops = preempt.handling() if not (args.eval_only or args.no_train) else contextlib.nullcontext()
    try:
        with stops:
            run(args)
    except preempt.Stopped as exc:
        report_error(str(exc), prefix="stopped")
        return preempt.EXIT_RESUMABLE
    except errors as exc:
        message = str(exc).strip()
        if "Original Traceback" in message:  # re-raised from a DataLoader worker: keep our message
            message = message.splitlines()[-1].split(": ", 1)[-1]
        report_error(message)
        return 2
    except OSError as exc:  # a full disk or a read-only folder while writing logs/checkpoints/results
        if not OutputWriteError.is_write_error(exc):
            raise
        report_error(str(OutputWriteError.from_os_error(exc)))
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
