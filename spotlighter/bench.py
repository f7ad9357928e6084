"""``python -m spotlighter.bench``: speed, memory and size of every model, side by side.

For zero-shot CLIP, CoOp, CoCoOp, MaPLe and Spotlighter (``paper``, ``release`` and with token
dropping, MODEL.PRUNE), on one device and precision, with random weights of the real CLIP shape
(ViT-B/16 by default; nothing is downloaded):

* evaluation images/s at ``--classes`` classes, batch ``--batch`` (class text features computed once
  before timing, as the trainers cache them; CoCoOp and MaPLe re-encode their prompts per batch, so
  they are timed with the full text encoder, on CPU at ``--slow-classes`` classes);
* one training step (forward, backward, SGD step) at ``--train-batch`` images and ``--train-classes``;
* peak memory: CUDA max allocated, or on CPU the peak RSS of a fresh process that builds the frozen CLIP
  and the model and runs one evaluation batch and one training step, counted from the built CLIP on
  (Linux: the transient of building CLIP itself is reset away; the JSON gives the RSS with the CLIP
  alone as ``clip_only_peak_mb`` and says whether the reset was possible);
* trainable scalars and checkpoint size (trained state + class prototypes + SGD momentum, as the
  trainers save it, at ``--classes`` classes).

Repetitions are interleaved (rep 1 of every model, then rep 2, ...; each rep starts one model later,
so every model is timed first equally often), so a noisy machine slows all models alike; every
evaluation rep runs before the first training rep (a training step's memory churn slows the next
evaluations unequally); each rep's
ratio is taken within the rep (eval: to zero-shot CLIP; training: to CoOp) and the table shows the
median and the min-max of the reps. ``--json`` writes every figure.
"""

from __future__ import annotations

import argparse
import functools
import gc
import io
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from .backbone import FrozenCLIP, PruneSpec
from .config import MERGING_MODES, RECOMMENDED_PRUNE
from .machine import cpu_name

#: ``clip.model.CLIP`` arguments of the OpenAI ViTs.
ARCHS: Dict[str, dict] = {
    "ViT-B/16": dict(embed_dim=512, image_resolution=224, vision_layers=12, vision_width=768, vision_patch_size=16,
                     transformer_width=512, transformer_layers=12),
    "ViT-B/32": dict(embed_dim=512, image_resolution=224, vision_layers=12, vision_width=768, vision_patch_size=32,
                     transformer_width=512, transformer_layers=12),
    "ViT-L/14": dict(embed_dim=768, image_resolution=224, vision_layers=24, vision_width=1024, vision_patch_size=14,
                     transformer_width=768, transformer_layers=12),
    # not a real CLIP: a 4-block toy for smoke runs and tests of the command itself
    "tiny": dict(embed_dim=64, image_resolution=32, vision_layers=4, vision_width=128, vision_patch_size=8,
                 transformer_width=64, transformer_layers=2),
}
TEXT = dict(context_length=77, vocab_size=49408)
#: clip.model builds width // 64 heads, so every head has 64 dimensions.
CLIP_HEAD_DIM = 64
#: Optimiser of the training step (the shipped configs' SGD).
SGD = dict(lr=0.002, momentum=0.9, weight_decay=5e-4)
BASELINE_EVAL = "zsclip"
BASELINE_TRAIN = "coop"
#: Models whose text side runs in every forward (so their evaluation cost grows with the classes).
TEXT_PER_BATCH = ("cocoop", "maple")


def prune_arg(text: str) -> PruneSpec:
    """``LAYERS:KEEP[:MODE]`` (e.g. ``3:0.5``, ``3,6:0.5`` or ``3,6:0.7:merge``) -> PruneSpec."""
    try:
        return PruneSpec.parse(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def default_prunes() -> List[PruneSpec]:
    """The shipped settings (one per Spotlighter preset, each once)."""
    out: List[PruneSpec] = []
    for preset in RECOMMENDED_PRUNE:
        if PruneSpec.recommended(preset) not in out:
            out.append(PruneSpec.recommended(preset))
    return out


def encoder_macs(arch: str, prune: Optional[PruneSpec] = None) -> float:
    """Multiply-adds of one image through the vision transformer: per block 4·N·D² (QKV, output
    projection) + 2·N²·D (attention) on the tokens entering it and 8·N'·D² (MLP) on the tokens leaving
    its attention (N' < N only at a pruning block); the fused token counts as a token. Merging's
    matching (an (n/2 x n/2) similarity of head-dim keys) is counted at the blocks that merge
    (``merge``, ``tome``); with ``evit`` an earlier fused token is one of the candidates kept."""
    a = ARCHS[arch]
    D, grid = a["vision_width"], a["image_resolution"] // a["vision_patch_size"]
    patches, fused = grid * grid, 0
    total = 0.0
    for i in range(a["vision_layers"]):
        n = 1 + patches + fused
        total += 4 * n * D * D + 2 * n * n * D
        if prune is not None and prune.active and i in prune.layers and prune.kept(patches) < patches:
            if prune.mode in MERGING_MODES:
                total += (patches // 2) * ((patches + 1) // 2) * CLIP_HEAD_DIM
            if prune.mode == "evit":  # an earlier fused token competes with the patches and may be kept
                kept = prune.kept(patches + fused)
                patches, fused = kept, prune.extra_tokens
            else:
                patches, fused = prune.kept(patches), prune.extra_tokens
        total += 8 * (1 + patches + fused) * D * D
    return total


@dataclass
class Entry:
    """One row: a model name, how to build it, and its measurements."""

    name: str
    kind: str  # a key of KINDS
    prune: Optional[PruneSpec] = None
    eval_times: List[float] = field(default_factory=list)
    train_times: List[float] = field(default_factory=list)
    info: dict = field(default_factory=dict)


#: The row ``--noise-floor`` adds: a second zero-shot CLIP, timed like every other model.
NOISE_FLOOR = f"{BASELINE_EVAL} (noise floor)"


def entries(models: Sequence[str], prunes: Sequence[PruneSpec], noise_floor: bool = False) -> List[Entry]:
    out = []
    for m in models:
        kind, _, pruned = m.partition("+")
        if pruned:
            out += [Entry(f"{kind} prune {p.label}", kind, p) for p in prunes]
        else:
            out.append(Entry(kind, kind))
    if noise_floor:
        out.append(Entry(NOISE_FLOOR, BASELINE_EVAL))
    return out


# --------------------------------------------------------------------------- building
def build_clips(arch: str, device: torch.device, dtype: torch.dtype, seed: int = 0):
    """(full, light): random CLIP of ``arch``; ``light`` shares its vision tower with ``full`` but has a
    one-block text transformer (for models whose text features are computed once, outside timing)."""
    from clip.model import CLIP, convert_weights

    a = dict(ARCHS[arch])
    heads = a["transformer_width"] // 64
    torch.manual_seed(seed)
    full = CLIP(**a, **TEXT, transformer_heads=heads)
    light = CLIP(**{**a, "transformer_layers": 1}, **TEXT, transformer_heads=heads)
    light.visual = full.visual
    for model in (full, light):
        if dtype == torch.float16:  # OpenAI's half precision, as load_clip builds it (LayerNorms stay fp32)
            convert_weights(model)
        model.to(device=device).eval()
    for p in list(full.parameters()) + list(light.parameters()):
        p.requires_grad_(False)
    return full, light


#: Model kind -> (trainer, its config under configs/trainers/<trainer>/; None: the registry's default):
#: every model is built from the config its trainer trains with.
KINDS: Dict[str, Tuple[str, Optional[str]]] = {
    "zsclip": ("zsclip", None), "coop": ("coop", None), "cocoop": ("cocoop", None), "maple": ("maple", None),
    "paper": ("spotlighter", "vit_b16_ep20_paper"), "release": ("spotlighter", "vit_b16_ep20_release"),
    "promptkd": ("promptkd", None), "spotlighterkd": ("spotlighterkd", "vit_b16_ep30_batch64_release"),
    "textrefiner": ("spotlighterkd", "vit_b16_ep30_batch64_textrefiner"),
    "spotlighterkd_paper": ("spotlighterkd", "vit_b16_ep30_batch64_paper"),
}
#: The distilled students: built with a frozen (random) IVLP teacher on a ``--teacher-arch`` CLIP, whose
#: image tower runs in every training step (its text features are computed once).
KD_KINDS = ("promptkd", "spotlighterkd", "textrefiner", "spotlighterkd_paper")


def model_cfg(kind: str, clip_model, teacher_clip=None):
    """The config of model ``kind`` (:data:`KINDS`); MaPLe's and the distilled students' prompt depths are
    capped by the CLIP's depth (the tiny CLIPs of the tests)."""
    from .config import trainer_cfg
    from .registry import trainer as registered

    if kind not in KINDS:
        raise ValueError(f"unknown model {kind!r}; known: {', '.join(KINDS)}")
    trainer, config = KINDS[kind]
    cfg = trainer_cfg(trainer, config=config or registered(trainer).default_config)
    depth = min(len(clip_model.transformer.resblocks), len(clip_model.visual.transformer.resblocks))
    if kind == "maple":
        cfg.TRAINER.MAPLE.PROMPT_DEPTH = min(cfg.TRAINER.MAPLE.PROMPT_DEPTH, depth)
    if kind in KD_KINDS:  # the student has no text tower; the teacher's depths are capped by its CLIP's
        n = cfg.TRAINER.PROMPTKD
        n.PROMPT_DEPTH_VISION = min(n.PROMPT_DEPTH_VISION, len(clip_model.visual.transformer.resblocks))
        if teacher_clip is not None:
            n.TEACHER_PROMPT_DEPTH_TEXT = min(n.TEACHER_PROMPT_DEPTH_TEXT, len(teacher_clip.transformer.resblocks))
            n.TEACHER_PROMPT_DEPTH_VISION = min(n.TEACHER_PROMPT_DEPTH_VISION,
                                                len(teacher_clip.visual.transformer.resblocks))
    return cfg


def build_model(kind: str, clip_model, prune: Optional[PruneSpec], classes: int, device, teacher_clip=None):
    """Model ``kind`` for ``classes`` classes through :func:`spotlighter.factory.build_model`; the
    distilled students (:data:`KD_KINDS`) get a frozen IVLP teacher of their config's design on
    ``teacher_clip``."""
    from . import factory, models

    cfg = model_cfg(kind, clip_model, teacher_clip)
    clip = FrozenCLIP(clip_model, prune)
    names = [f"class {i}" for i in range(classes)]
    torch.manual_seed(0)
    teacher = None
    if kind in KD_KINDS:
        explicit = kind != "promptkd" and bool(cfg.TRAINER.SPOTLIGHTERKD.EXPLICIT_ATTENTION)
        tclip = FrozenCLIP(teacher_clip, explicit_attention=explicit)
        teacher = models.IVLP(tclip, names, **factory.ivlp_kwargs(cfg.TRAINER.PROMPTKD, "TEACHER_")).to(device)
        for p in teacher.parameters():
            p.requires_grad_(False)
        teacher.eval()
    return factory.build_model(cfg, names, clip, teacher=teacher).to(device)


@functools.lru_cache(maxsize=2)
def teacher_clips(arch: str, device: torch.device, dtype: torch.dtype):
    """The distilled students' teacher CLIP (built once per run)."""
    return build_clips(arch, device, dtype, seed=1)[0]


def checkpoint_bytes(model) -> int:
    """Size of what a trainer saves: trained state, class prototypes, SGD momentum buffers."""
    from .checkpoint import trainable_state
    from .method import ClassMemory

    head = getattr(model, "head", None)
    memory = getattr(head, "memory", None)
    payload = {"state_dict": trainable_state(model),
               "class_state": memory.class_state() if isinstance(memory, ClassMemory) else None,
               "optimizer": {"state": {i: {"momentum_buffer": torch.zeros_like(p).cpu()}
                                       for i, p in enumerate(p for p in model.parameters() if p.requires_grad)}}}
    buf = io.BytesIO()
    torch.save(payload, buf)
    return buf.tell()


# --------------------------------------------------------------------------- timing
def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn: Callable[[], None], device, batches: int = 1) -> float:
    """Mean seconds of ``batches`` back-to-back calls of ``fn``."""
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(batches):
        fn()
    _sync(device)
    return (time.perf_counter() - t0) / batches


class EntrySteps:
    """Eval and train closures for one entry (models built once, reused by every rep)."""

    def __init__(self, e: Entry, clips, args, device, autocast):
        full, light = clips
        self.device, self.autocast = device, autocast
        self.eval_classes = args.slow_classes if (e.kind in TEXT_PER_BATCH and device.type == "cpu") else args.classes
        dtype = next(full.visual.parameters()).dtype
        teacher = teacher_clips(args.teacher_arch, device, dtype) if e.kind in KD_KINDS else None
        self.eval_model = build_model(e.kind, full if e.kind in TEXT_PER_BATCH else light, e.prune,
                                      self.eval_classes, device, teacher).eval()
        self.train_model = None
        self.do_eval = not args.no_eval
        if e.kind != "zsclip" and not args.no_train:
            self.train_model = build_model(e.kind, full, e.prune, args.train_classes, device, teacher).train()
            params = [p for p in self.train_model.parameters() if p.requires_grad]
            self.optim = torch.optim.SGD(params, **SGD)
        res = full.visual.input_resolution
        g = torch.Generator().manual_seed(1)
        dtype = next(full.visual.parameters()).dtype
        self.images = torch.randn(args.batch, 3, res, res, generator=g).to(device, dtype)
        self.train_images = torch.randn(args.train_batch, 3, res, res, generator=g).to(device, dtype)
        self.labels = torch.randint(0, args.train_classes, (args.train_batch,), generator=g).to(device)
        e.info.update(classes=self.eval_classes, trainable=sum(p.numel() for p in self.eval_model.parameters()
                                                               if p.requires_grad),
                      checkpoint_bytes=checkpoint_bytes(self.eval_model))
        if e.prune is not None:
            e.info["patches_left"] = e.prune.remaining(FrozenCLIP(full).num_patches)

    def eval_step(self):
        if not self.do_eval:
            return
        with torch.no_grad(), self.autocast():
            self.eval_model(self.images)

    def train_step(self):
        with self.autocast():
            _, losses = self.train_model(self.train_images, self.labels)
            loss = sum(losses.values())
        self.optim.zero_grad(set_to_none=True)
        loss.backward()
        self.optim.step()


def peak_rss_mb() -> float:
    """This process's peak RSS (MiB): VmHWM (Linux, resettable by :func:`reset_peak_rss`), else ru_maxrss."""
    return _proc_status_mb("VmHWM") or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def rss_mb() -> float:
    """This process's current RSS (MiB); the peak where /proc is not available."""
    return _proc_status_mb("VmRSS") or peak_rss_mb()


def _proc_status_mb(field: str) -> Optional[float]:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024.0  # kB
    except (OSError, ValueError, IndexError):
        pass
    return None


def reset_peak_rss() -> bool:
    """Reset the peak RSS to the current RSS (Linux ``clear_refs`` 5); False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def hardware_name(device: torch.device) -> str:
    """The GPU's name on CUDA, else the CPU's (every figure says which hardware it came from)."""
    return torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name()


def cuda_peak(fn, device) -> float:
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) / 2 ** 20


# --------------------------------------------------------------------------- main
def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m spotlighter.bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="ViT-B/16", choices=sorted(ARCHS))
    p.add_argument("--teacher-arch", default="ViT-L/14", choices=sorted(ARCHS),
                   help="the teacher CLIP of the distilled students (promptkd, spotlighterkd, textrefiner)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--precision", default=None, choices=["fp32", "fp16", "amp"],
                   help="default: fp32 on CPU, fp16 on CUDA (fp16 and amp need CUDA)")
    p.add_argument("--classes", type=int, default=1000, help="classes at evaluation (default 1000)")
    p.add_argument("--slow-classes", type=int, default=10,
                   help="on CPU, classes at which CoCoOp and MaPLe (text per batch) are evaluated")
    p.add_argument("--batch", type=int, default=16, help="evaluation batch")
    p.add_argument("--train-batch", type=int, default=8)
    p.add_argument("--train-classes", type=int, default=50)
    p.add_argument("--reps", type=int, default=5, help="interleaved repetitions (after one warm-up)")
    p.add_argument("--batches", type=int, default=1,
                   help="evaluation batches and training steps per timed sample (its time is their mean): more "
                        "batches per sample average out a noisy machine's per-batch jitter")
    p.add_argument("--noise-floor", action="store_true",
                   help="also time a second, identical zero-shot CLIP as its own row: its ratio to the first is what "
                        "this machine's noise alone makes of a 1.00x model")
    p.add_argument("--models", nargs="+",
                   default=["zsclip", "coop", "cocoop", "maple", "paper", "release", "zsclip+prune", "paper+prune"],
                   help="zsclip coop cocoop maple paper release; NAME+prune = NAME with each --prune setting")
    p.add_argument("--prune", type=prune_arg, nargs="+", default=None,
                   help="LAYERS:KEEP[:MODE] settings for the +prune models (e.g. 3,6:0.7:merge; default: the shipped "
                        f"{' '.join(p.label for p in default_prunes())}, config.RECOMMENDED_PRUNE)")
    p.add_argument("--no-train", action="store_true", help="evaluation only")
    p.add_argument("--no-eval", action="store_true", help="training steps only")
    p.add_argument("--flops-only", action="store_true",
                   help="print the image encoder's multiply-adds per image for each --prune setting; time nothing")
    p.add_argument("--no-memory", action="store_true", help="skip the CPU peak-RSS probes")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    p.add_argument("--json", default="", help="also write every figure to this file")
    p.add_argument("--_probe", default="", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.prune = args.prune or default_prunes()
    args.precision = args.precision or ("fp16" if args.device.startswith("cuda") else "fp32")
    if args.precision != "fp32" and not args.device.startswith("cuda"):
        p.error(f"--precision {args.precision} needs a CUDA device (CPU runs fp32)")
    known = tuple(KINDS)
    for m in args.models:
        if m.partition("+")[0] not in known or m.partition("+")[2] not in ("", "prune"):
            p.error(f"--models: {m!r} is not one of {', '.join(known)} (optionally NAME+prune)")
    if args.no_train and args.no_eval:
        p.error("--no-train and --no-eval leave nothing to measure")
    if args.classes < 1 or args.batch < 1 or args.reps < 1 or args.batches < 1:
        p.error("--classes, --batch, --reps and --batches must be >= 1")
    return args


def setup(args):
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = torch.float16 if args.precision == "fp16" else torch.float32
    import contextlib

    def autocast():
        if args.precision == "amp":
            return torch.autocast(device.type, dtype=torch.float16)
        return contextlib.nullcontext()

    return device, dtype, autocast


def probe(args) -> int:
    """Child process: peak RSS of building one model + one eval batch + one train step (CPU)."""
    device, dtype, autocast = setup(args)
    clips = build_clips(args.arch, device, dtype)
    gc.collect()
    # Building CLIP from random weights has a transient peak of its own (about 6 GB at ViT-B/16 here)
    # that would hide every model's; measure from the built CLIP on, where Linux lets us.
    reset = reset_peak_rss()
    base = rss_mb() if reset else peak_rss_mb()
    e = entries([args._probe], args.prune)[0]
    r = EntrySteps(e, clips, args, device, autocast)
    r.eval_step()
    if r.train_model is not None:
        r.train_step()
    print(json.dumps({"base_mb": base, "peak_mb": peak_rss_mb(), "peak_from_built_clip": reset}))
    return 0


def cpu_memory(args, rows: List[Entry]) -> None:
    """Each entry's peak RSS in a fresh process (and that process's peak with the frozen CLIP only)."""
    for e in rows:
        cmd = [sys.executable, "-m", "spotlighter.bench", "--_probe", e.kind + ("+prune" if e.prune else ""),
               "--arch", args.arch, "--teacher-arch", args.teacher_arch, "--device", "cpu",
               "--classes", str(args.classes),
               "--slow-classes", str(args.slow_classes), "--batch", str(args.batch),
               "--train-batch", str(args.train_batch), "--train-classes", str(args.train_classes),
               "--threads", str(args.threads)]
        if e.prune is not None:
            cmd += ["--prune", e.prune.label]
        if args.no_train:
            cmd.append("--no-train")
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        r = json.loads(out.strip().splitlines()[-1])
        e.info["peak_mb"], e.info["clip_only_peak_mb"] = r["peak_mb"], r["base_mb"]
        e.info["peak_from_built_clip"] = r.get("peak_from_built_clip", False)


def median_range(values: Sequence[float]) -> dict:
    """Median, min, max and count of repeated timings."""
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def main(argv=None) -> int:
    args = parse_args(argv)
    if args._probe:
        return probe(args)
    if args.flops_only:
        base = encoder_macs(args.arch)
        print(f"| {args.arch} MODEL.PRUNE | encoder GMAC / image | speed-up bound vs unpruned |")
        print("|---|---:|---:|")
        for spec in [None] + list(args.prune):
            macs = encoder_macs(args.arch, spec)
            print(f"| {'none' if spec is None else spec.label} | {macs / 1e9:.2f} | {base / macs:.2f}× |")
        return 0
    device, dtype, autocast = setup(args)
    t0 = time.time()
    clips = build_clips(args.arch, device, dtype)
    rows = entries(args.models, args.prune, args.noise_floor)
    steps = {e.name: EntrySteps(e, clips, args, device, autocast) for e in rows}
    print(f"# {args.arch} random weights, {args.precision} on {device} ({hardware_name(device)}; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads); eval batch {args.batch} at {args.classes} classes, train step "
          f"batch {args.train_batch} at {args.train_classes} classes; {args.reps} interleaved reps of "
          f"{args.batches} batch(es) each (set-up {time.time() - t0:.0f}s)", flush=True)
    for e in rows:  # warm-up (and the one-time text features)
        steps[e.name].eval_step()
        if steps[e.name].train_model is not None:
            steps[e.name].train_step()
    # Evaluation first, then training, each phase with its own interleaved reps: a training step
    # between two evaluations (CoCoOp's peaks at ~17 GB at ViT-B/16 on CPU) leaves the allocator's
    # memory cold, which slowed the evaluations timed after it by up to 40 %, unequally per model.
    for rep in range(args.reps):
        for e in rep_order(rows, rep):
            if steps[e.name].do_eval:
                e.eval_times.append(timed(steps[e.name].eval_step, device, args.batches))
    for rep in range(args.reps):
        for e in rep_order(rows, rep):
            if steps[e.name].train_model is not None:
                e.train_times.append(timed(steps[e.name].train_step, device, args.batches))
    if device.type == "cuda":
        for e in rows:
            r = steps[e.name]
            e.info["peak_mb"] = cuda_peak(r.eval_step, device)
            if r.train_model is not None:
                e.info["peak_train_mb"] = cuda_peak(r.train_step, device)
    elif not args.no_memory:
        del steps
        cpu_memory(args, rows)
    report = make_report(args, rows)
    print_table(report)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    return 0


def rep_order(rows: Sequence, rep: int) -> list:
    """The models in the order repetition ``rep`` times them: rotated by one per repetition, so each
    model is first (and last) equally often and a machine whose load drifts during a repetition
    does not always favour the models timed late in it."""
    k = rep % len(rows) if rows else 0
    return list(rows[k:]) + list(rows[:k])


def make_report(args, rows: List[Entry]) -> dict:
    base = next((e for e in rows if e.kind == BASELINE_EVAL and e.prune is None), None)
    tbase = next((e for e in rows if e.kind == BASELINE_TRAIN and e.prune is None), None)
    out = []
    for e in rows:
        row = {"model": e.name, **e.info}
        if e.eval_times:
            row["eval_images_per_s"] = median_range([args.batch / t for t in e.eval_times])
        if base is not None and base.eval_times and e.eval_times:
            row["eval_ratio_to_zsclip"] = median_range([b / t for b, t in zip(base.eval_times, e.eval_times)])
        if e.train_times:
            row["train_step_s"] = median_range(e.train_times)
            if tbase is not None and tbase.train_times:
                row["train_ratio_to_coop"] = median_range([b / t for b, t in zip(tbase.train_times, e.train_times)])
        out.append(row)
    return {"arch": args.arch, "device": args.device, "precision": args.precision, "batch": args.batch,
            "classes": args.classes, "train_batch": args.train_batch, "train_classes": args.train_classes,
            "reps": args.reps, "batches_per_rep": args.batches, "threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "hardware": hardware_name(torch.device(args.device)),
            "rows": out}


def _ratio(s: Optional[dict]) -> str:
    return "—" if not s else f"{s['median']:.2f}× [{s['min']:.2f}–{s['max']:.2f}]"


def print_table(report: dict) -> None:
    print("| model | classes | eval img/s | eval vs ZS-CLIP | train step s | train speed vs CoOp | peak MB | "
          "trainable | checkpoint MB |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in report["rows"]:
        step = r.get("train_step_s")
        peak = r.get("peak_mb")
        peak_s = "—" if peak is None else f"{peak:.0f}" + (f" / {r['peak_train_mb']:.0f}" if "peak_train_mb" in r else "")
        ips = r.get("eval_images_per_s")
        print(f"| {r['model']} | {r['classes']} | {'—' if not ips else '%.2f' % ips['median']} | "
              f"{_ratio(r.get('eval_ratio_to_zsclip'))} | {'—' if not step else '%.2f' % step['median']} | "
              f"{_ratio(r.get('train_ratio_to_coop'))} | {peak_s} | {r['trainable']:,} | "
              f"{r['checkpoint_bytes'] / 2 ** 20:.2f} |")


if __name__ == "__main__":
    sys.exit(main())
