"""Train and evaluate every trainer's model for a few steps in fp32, fp16 and amp; one pass/fail line each.

    scripts/gpu_check.sh                       # CUDA, real ViT-B/16 size (random weights)
    scripts/gpu_check.sh --device cpu --size tiny --steps 2

A run builds random CLIP weights of the chosen size once, loads them in each precision exactly as the
trainers do (:func:`spotlighter.backbone.build_clip`: fp16 = OpenAI's ``convert_weights``), builds
each model as the shipped configs do, and per (trainer, precision):

* evaluates the untrained model (logits finite; max |logits - fp32 logits| is printed),
* takes ``--steps`` SGD steps as the trainers do (``autocast`` for amp: fp16 on CUDA, bf16 on CPU;
  a ``GradScaler`` for amp on CUDA): every loss finite, every gradient finite, the trainable tensors
  changed,
* evaluates again (logits finite).

ZeroshotCLIP has nothing to train and is only evaluated. Without CUDA (and without ``--device cpu``)
it prints one SKIP line and exits 0. The exit status is 1 if any line fails. The Dassl trainers add
data loading and logging around these same models and steps; ``PREC fp16`` on a CPU makes them
fall back to fp32, while this check runs fp16 wherever the kernels exist.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import sys
import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from .backbone import FrozenCLIP, PruneSpec, build_clip

PRECISIONS = ("fp32", "fp16", "amp")
#: clip.model.CLIP arguments: OpenAI's ViT-B/16, ViT-L/14 (224 and 336 px), and a tiny model of the
#: same architecture.
_VIT_L14 = dict(embed_dim=768, image_resolution=224, vision_layers=24, vision_width=1024, vision_patch_size=14,
                context_length=77, vocab_size=49408, transformer_width=768, transformer_heads=12,
                transformer_layers=12)
SIZES = {
    "vit_b16": dict(embed_dim=512, image_resolution=224, vision_layers=12, vision_width=768,
                    vision_patch_size=16, context_length=77, vocab_size=49408, transformer_width=512,
                    transformer_heads=8, transformer_layers=12),
    "vit_l14": _VIT_L14,
    "vit_l14_336": {**_VIT_L14, "image_resolution": 336},
    "tiny": dict(embed_dim=64, image_resolution=32, vision_layers=2, vision_width=64, vision_patch_size=8,
                 context_length=77, vocab_size=49408, transformer_width=64, transformer_heads=1,
                 transformer_layers=2),
}
CLASSNAMES = ["red circle", "blue square", "green triangle", "yellow star", "dog house", "cat"]
LR = 0.002  # the shipped configs' SGD learning rate
MOMENTUM = 0.9


def builders(size: str) -> Dict[str, Callable[[FrozenCLIP], nn.Module]]:
    """Trainer -> model, built by :func:`spotlighter.factory.build_model` from each trainer's shipped
    vit_b16 config (tiny: prompt depths 2 and one attention head, for its 2 blocks of width 64)."""
    from .config import trainer_cfg
    from .factory import build_model
    from .registry import trainer as registered

    small = size == "tiny"
    depth = 2 if small else 9
    ivlp = {"N_CTX_TEXT": 4, "N_CTX_VISION": 4, "PROMPT_DEPTH_TEXT": depth, "PROMPT_DEPTH_VISION": depth}

    def cfg(trainer: str, **changes):
        node = f"TRAINER.{registered(trainer).node}."
        return trainer_cfg(trainer, {node + k: v for k, v in changes.items()},
                           config=registered(trainer).default_config)

    def build(trainer: str, **changes):
        return lambda clip: build_model(cfg(trainer, **changes), CLASSNAMES, clip)

    def spot(preset: str):
        heads = {"IRM.HEADS": 1} if small else {}
        return build("spotlighter", PRESET=preset, **heads)

    def distilled(trainer: str, **head):  # the teacher: an (untrained) IVLP on the same CLIP, frozen
        def make(clip):
            teacher = build("ivlp", **ivlp)(clip)
            for p in teacher.parameters():
                p.requires_grad_(False)
            changes = {f"TRAINER.PROMPTKD.{k}": v for k, v in ivlp.items() if "VISION" in k}
            changes.update({f"TRAINER.SPOTLIGHTERKD.{k}": v for k, v in head.items()})
            c = trainer_cfg(trainer, changes, config=registered(trainer).default_config)
            return build_model(c, CLASSNAMES, clip, teacher=teacher.eval())
        return make

    def spot_pruned(clip):  # the shipped token reduction (tiny: its first block only, as it has 2)
        spec = PruneSpec.recommended("paper")
        return spot("paper")(FrozenCLIP(clip.model, dataclasses.replace(spec, layers=(0,)) if small else spec))

    return {
        "ZeroshotCLIP": build("zsclip"),
        "CoOp": build("coop"),
        "CoCoOp": build("cocoop"),
        "MaPLe": build("maple", PROMPT_DEPTH=depth),
        "IVLP": build("ivlp", **ivlp),
        "PromptSRC": build("promptsrc", **ivlp),
        "PromptKD": distilled("promptkd"),
        "Spotlighter-paper": spot("paper"),
        "Spotlighter-release": spot("release"),
        "Spotlighter-paper-prune": spot_pruned,
        "SpotlighterKD-release": distilled("spotlighterkd", PRESET="release"),
        "SpotlighterKD-paper": distilled("spotlighterkd", PRESET="paper"),
        "SpotlighterKD-textrefiner": distilled("spotlighterkd", PRESET="textrefiner"),
    }


def _autocast(precision: str, device: torch.device):
    if precision != "amp":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.float16 if device.type == "cuda" else torch.bfloat16)


def _finite(t: torch.Tensor) -> bool:
    return bool(torch.isfinite(t).all())


def check_one(clip: FrozenCLIP, build: Callable[[FrozenCLIP], nn.Module], precision: str, device: torch.device,
              images: torch.Tensor, labels: torch.Tensor, steps: int,
              reference: Optional[torch.Tensor]) -> Tuple[bool, str, torch.Tensor]:
    """(passed, details, untrained eval logits) for one trainer in one precision."""
    torch.manual_seed(0)  # the same initial prompts/modules in every precision
    model = build(clip).to(device)
    model.eval()
    with torch.no_grad(), _autocast(precision, device):
        logits0 = model(images)[0].float()
    if not _finite(logits0):
        return False, "untrained eval logits are not finite", logits0
    notes = [f"eval {tuple(logits0.shape)}"]
    if reference is not None:
        notes.append(f"max|logits-fp32| {(logits0 - reference).abs().max().item():.3g}")
    params = [p for p in model.parameters() if p.requires_grad]
    if params and steps:
        before = [p.detach().clone() for p in params]
        optim = torch.optim.SGD(params, lr=LR, momentum=MOMENTUM)
        scaler = torch.amp.GradScaler("cuda") if precision == "amp" and device.type == "cuda" else None
        model.train()
        losses = []
        for step in range(steps):
            with _autocast(precision, device):
                _, terms = model(images, labels)
                loss = sum(terms.values())
            if not _finite(loss):
                return False, f"step {step + 1}: loss {loss.item()} ({', '.join(terms)})", logits0
            optim.zero_grad(set_to_none=True)
            if scaler is not None:
                scaler.scale(loss).backward()
                scaler.unscale_(optim)
            else:
                loss.backward()
            bad = [i for i, p in enumerate(params) if p.grad is None or not _finite(p.grad)]
            if bad and scaler is None:
                return False, f"step {step + 1}: {len(bad)} of {len(params)} gradients missing or not finite", logits0
            if scaler is not None:
                scaler.step(optim)
                scaler.update()
            else:
                optim.step()
            losses.append(loss.item())
        moved = sum(not torch.equal(b, p.detach()) for b, p in zip(before, params))
        if moved == 0:
            return False, f"{steps} steps changed no trainable tensor", logits0
        notes.insert(0, f"train {steps} steps loss {losses[0]:.3f}->{losses[-1]:.3f} ({moved}/{len(params)} tensors moved)")
        model.eval()
        with torch.no_grad(), _autocast(precision, device):
            logits1 = model(images)[0].float()
        if not _finite(logits1):
            return False, "trained eval logits are not finite", logits0
    elif not params:
        notes.insert(0, "eval only (nothing to train)")
    return True, "; ".join(notes), logits0


def run(device: str = "cuda", size: str = "vit_b16", steps: int = 3, batch: int = 4,
        precisions: Sequence[str] = PRECISIONS, trainers: Optional[Sequence[str]] = None,
        out=sys.stdout) -> int:
    """Print one line per (trainer, precision); return the number of failures (-1: skipped)."""
    if device == "cuda" and not torch.cuda.is_available():
        print(f"SKIP gpu_check: no CUDA device (torch {torch.__version__}, CUDA available: False). "
              "Run it on a GPU machine, or with --device cpu for what CPU kernels support.", file=out)
        return -1
    dev = torch.device(device)
    from clip.model import CLIP

    torch.manual_seed(0)
    state = CLIP(**SIZES[size]).state_dict()  # random weights, OpenAI's initialisation
    res = SIZES[size]["image_resolution"]
    g = torch.Generator().manual_seed(1)
    images = torch.randn(batch, 3, res, res, generator=g).to(dev)
    labels = torch.randint(len(CLASSNAMES), (batch,), generator=g).to(dev)
    table = builders(size)
    names = list(trainers or table)
    unknown = [n for n in names if n not in table]
    if unknown:
        raise SystemExit(f"unknown trainer(s) {unknown}; choose from {list(table)}")
    what = "GPU " + torch.cuda.get_device_name(dev) if dev.type == "cuda" else "CPU"
    print(f"gpu_check: {size} (random weights), batch {batch}, {steps} steps, on {what} "
          f"(torch {torch.__version__})", file=out)
    failures = 0
    reference: Dict[str, torch.Tensor] = {}
    for precision in precisions:
        try:
            clip = FrozenCLIP(build_clip(state, dev, torch.float16 if precision == "fp16" else torch.float32,
                                         source=f"random {size} weights"))
        except Exception as exc:  # report, keep going
            for name in names:
                failures += 1
                print(f"FAIL {name:26s} {precision:4s}  CLIP build: {type(exc).__name__}: {exc}", file=out)
            continue
        for name in names:
            t0 = time.perf_counter()
            try:
                ok, details, logits0 = check_one(clip, table[name], precision, dev, images, labels, steps,
                                                 reference.get(name))
                if precision == "fp32" and ok:
                    reference[name] = logits0
            except Exception as exc:
                ok, details = False, f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:300]}"
            failures += not ok
            print(f"{'PASS' if ok else 'FAIL'} {name:26s} {precision:4s}  {details}  "
                  f"[{time.perf_counter() - t0:.1f} s]", file=out)
        del clip
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    total = len(names) * len(precisions)
    print(f"gpu_check: {total - failures} passed, {failures} failed; peak memory {_peak_memory(dev)}", file=out)
    return failures


def _peak_memory(dev: torch.device) -> str:
    """The process's peak resident memory (CPU) or the device's peak allocation (CUDA), in GiB."""
    if dev.type == "cuda":
        return f"{torch.cuda.max_memory_allocated(dev) / 2 ** 30:.2f} GiB allocated on the GPU"
    import resource

    return f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20:.2f} GiB resident (CPU)"


def _kind(model: nn.Module, name: str) -> str:
    """The module kind a parameter belongs to (for :func:`dtype_table`)."""
    owner, _, leaf = name.rpartition(".")
    module = model.get_submodule(owner) if owner else model
    if isinstance(module, nn.MultiheadAttention):
        return f"MultiheadAttention.{leaf}"
    if type(module).__name__ in ("Conv2d", "Linear", "NonDynamicallyQuantizableLinear", "LayerNorm", "Embedding"):
        kind = "Linear" if type(module).__name__ == "NonDynamicallyQuantizableLinear" else type(module).__name__
        return f"{kind}.{leaf}" + (" (attention out_proj)" if owner.endswith("out_proj") else "")
    return leaf  # a bare parameter of CLIP or its towers (embeddings, proj, logit_scale)


def dtype_table(size: str = "tiny", out=sys.stdout) -> None:
    """Per parameter kind: dtype when the whole model is cast with ``.to(float16)`` (before) and as
    :func:`~spotlighter.backbone.build_clip` builds fp16 (OpenAI's ``convert_weights``); then whether
    an image and a text forward run on this machine's CPU kernels either way."""
    from clip.model import CLIP

    torch.manual_seed(0)
    state = CLIP(**SIZES[size]).state_dict()
    before = build_clip(state, "cpu", torch.float32, source="random weights").half()
    after = build_clip(state, "cpu", torch.float16, source="random weights")
    rows: Dict[str, Tuple[set, set]] = {}
    for (name, p), q in zip(before.named_parameters(), after.parameters()):
        kind = _kind(after, name)
        a, b = rows.setdefault(kind, (set(), set()))
        a.add(str(p.dtype).replace("torch.", ""))
        b.add(str(q.dtype).replace("torch.", ""))
    print("| parameter kind | whole-model .to(float16) (before) | convert_weights (now) |", file=out)
    print("|---|---|---|", file=out)
    for kind, (a, b) in sorted(rows.items()):
        print(f"| {kind} | {', '.join(sorted(a))} | {', '.join(sorted(b))} |", file=out)
    res = SIZES[size]["image_resolution"]
    x = torch.randn(1, 3, res, res)
    for label, model in (("before", before), ("now", after)):
        clip = FrozenCLIP(model)
        try:
            with torch.no_grad():
                clip.encode_image_tokens(x)
                clip.encode_text(["a photo of a cat."])
            result = "runs"
        except Exception as exc:
            result = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:120]}"
        print(f"CPU image+text forward, {label}: {result}", file=out)


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--size", default="vit_b16", choices=sorted(SIZES))
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--precisions", default=",".join(PRECISIONS),
                   help="comma-separated subset of " + ",".join(PRECISIONS))
    p.add_argument("--trainers", default="", help="comma-separated subset (default: all)")
    p.add_argument("--dtype-table", action="store_true",
                   help="print the fp16 model's dtype per parameter kind, before/after, and exit")
    args = p.parse_args(argv)
    if args.dtype_table:
        dtype_table(args.size)
        return 0
    precisions = [x for x in args.precisions.split(",") if x]
    bad = [x for x in precisions if x not in PRECISIONS]
    if bad:
        p.error(f"unknown precision(s) {bad}; choose from {PRECISIONS}")
    failures = run(args.device, args.size, args.steps, args.batch, precisions,
                   [x for x in args.trainers.split(",") if x] or None)
    return 1 if failures > 0 else 0


if __name__ == "__main__":
    sys.exit(main())
