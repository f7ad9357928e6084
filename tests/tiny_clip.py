"""A tiny, randomly initialised CLIP of the real architecture (``clip.model.CLIP``).

It is saved as a plain state dict and loaded back through :func:`spotlighter.backbone.load_clip`,
the same path users take for real weights. ``clip.model.build_model`` infers head counts as
width // 64, so every width is a multiple of 64.
"""

import torch

TINY = dict(embed_dim=64, image_resolution=32, vision_layers=2, vision_width=64, vision_patch_size=8,
            context_length=77, vocab_size=49408, transformer_width=64, transformer_heads=1,
            transformer_layers=2)


def build_tiny_clip(seed: int = 0, **overrides):
    from clip.model import CLIP

    torch.manual_seed(seed)
    return CLIP(**{**TINY, **overrides}).float().eval()


def save_tiny_clip(path, seed: int = 0, **overrides) -> str:
    model = build_tiny_clip(seed, **overrides)
    torch.save(model.state_dict(), str(path))
    return str(path)
