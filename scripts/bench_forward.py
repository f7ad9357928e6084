"""Time the frozen-CLIP image forward that Spotlighter needs, at real ViT size (random weights).

Compares, per batch of images:
  clip       CLIP's own encode_image (global feature only; the floor)
  ours       FrozenCLIP.encode_image_tokens: global feature + last block's projected tokens + its
             CLS->patch attention (the only attention map materialised)
  per-layer  what the released code computes: every block's tokens through ln_post/proj and every
             block's attention map (need_weights in all blocks)

    python scripts/bench_forward.py [--arch ViT-B/16] [--batch 16] [--reps 5] [--device cpu]
"""

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from spotlighter.backbone import FrozenCLIP, _run_block  # noqa: E402

ARCHS = {  # clip.model.CLIP arguments of the OpenAI ViTs (vision part matters here)
    "ViT-B/16": dict(embed_dim=512, image_resolution=224, vision_layers=12, vision_width=768, vision_patch_size=16),
    "ViT-B/32": dict(embed_dim=512, image_resolution=224, vision_layers=12, vision_width=768, vision_patch_size=32),
    "ViT-L/14": dict(embed_dim=768, image_resolution=224, vision_layers=24, vision_width=1024, vision_patch_size=14),
}
TEXT = dict(context_length=77, vocab_size=49408, transformer_width=512, transformer_heads=8, transformer_layers=1)


def per_layer(clip: FrozenCLIP, images: torch.Tensor):
    v = clip.model.visual
    x = v.ln_pre(clip._embed_patches(images)).permute(1, 0, 2)
    outs = []
    for block in v.transformer.resblocks:
        x, w = _run_block(block, x, need_weights=True)
        outs.append((v.ln_post(x.permute(1, 0, 2)) @ v.proj, w[:, 0, 1:]))
    return outs


def timeit(fn, reps: int, device: torch.device) -> float:
    fn()  # warm-up
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="ViT-B/16", choices=sorted(ARCHS))
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "fp16"])
    args = p.parse_args(argv)

    from clip.model import CLIP, convert_weights

    device = torch.device(args.device)
    dtype = torch.float16 if args.dtype == "fp16" else torch.float32
    torch.manual_seed(0)
    model = CLIP(**ARCHS[args.arch], **TEXT).eval()
    if dtype == torch.float16:
        convert_weights(model)  # OpenAI's half precision, as load_clip builds it (LayerNorm stays fp32)
    clip = FrozenCLIP(model.to(device))
    res = clip.input_resolution
    images = torch.randn(args.batch, 3, res, res, device=device, dtype=dtype)
    runs = {
        "clip encode_image": lambda: clip.model.encode_image(images),
        "ours (tokens + last attention)": lambda: clip.encode_image_tokens(images),
        "per-layer (released code)": lambda: per_layer(clip, images),
    }
    print(f"{args.arch}, batch {args.batch}, {args.dtype} on {device} (torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads), median of {args.reps}")
    base = None
    with torch.no_grad():
        for name, fn in runs.items():
            t = timeit(fn, args.reps, device)
            base = base or t
            print(f"  {name:32s} {t * 1000:9.1f} ms/batch  {args.batch / t:8.1f} img/s  x{t / base:.2f}")


if __name__ == "__main__":
    main()
