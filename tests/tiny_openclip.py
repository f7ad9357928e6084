"""Tiny OpenCLIP models built by open_clip itself from configs registered with ``add_model_config``.

Each config is written as ``<name>.json`` and registered (OpenCLIP's public way to add a model); the
model is made by ``open_clip.create_model(name, pretrained=None)`` (random weights), its LayerNorm and
LayerScale values perturbed so that they are not the identity, and saved as a plain state dict:
the file a user would give as MODEL.BACKBONE.PATH.
"""

import json
import os

import torch

TINY_VISION = dict(image_size=32, layers=2, width=64, patch_size=8, head_width=32)
TINY_TEXT = dict(context_length=77, vocab_size=49408, width=64, heads=2, layers=2)


def _tiny(vision=None, text=None, **top):
    return dict(embed_dim=48, vision_cfg={**TINY_VISION, **(vision or {})}, text_cfg={**TINY_TEXT, **(text or {})},
                **top)


#: name -> OpenCLIP model config. "odd" sets every option FrozenCLIP converts: LayerScale, no
#: ln_pre, MLP ratios other than 4, a vision head width other than 64, LayerNorm after pooling, a
#: short text context.
CONFIGS = {
    "spotlighter-tiny": _tiny(),
    "spotlighter-tiny-quickgelu": _tiny(quick_gelu=True),
    "spotlighter-tiny-odd": _tiny(vision=dict(ls_init_value=0.1, no_ln_pre=True, mlp_ratio=3.0, head_width=16,
                                              final_ln_after_pool=True),
                                  text=dict(ls_init_value=0.5, mlp_ratio=2.5, context_length=24)),
    "spotlighter-tiny-customtext": _tiny(custom_text=True, init_logit_bias=-10.0),
    # the architecture of tests/tiny_clip.py's OpenAI CLIP (QuickGELU, heads = width // 64)
    "spotlighter-tiny-openai": dict(embed_dim=64, quick_gelu=True,
                                    vision_cfg={**TINY_VISION, "head_width": 64},
                                    text_cfg={**TINY_TEXT, "heads": 1}),
}


def register(folder) -> None:
    """Write the tiny configs to ``folder`` and add them to OpenCLIP's model configs."""
    import open_clip

    os.makedirs(folder, exist_ok=True)
    for name, cfg in CONFIGS.items():
        with open(os.path.join(folder, f"{name}.json"), "w") as f:
            json.dump(cfg, f)
    open_clip.add_model_config(str(folder))


def build(name: str, seed: int = 0):
    import open_clip

    torch.manual_seed(seed)
    model = open_clip.create_model(name, pretrained=None).eval()
    with torch.no_grad():
        for key, p in model.named_parameters():
            if "ln" in key or key.endswith("gamma"):
                p.add_(0.3 * torch.randn_like(p))
    return model


def save(model, path) -> str:
    torch.save(model.state_dict(), str(path))
    return str(path)
