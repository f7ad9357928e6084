"""Pictures of the spotlight: per image, one PNG with four panels on the patch grid.

Panels, left to right: the image, the sample-wise score a_n, the semantic-wise score b_n and the
last block's CLS attention A (each map min-max scaled per image, dark = low). In every panel the
Level-1 tokens are outlined in :data:`LEVEL1_COLOUR`, the Level-2 tokens in :data:`LEVEL2_COLOUR`,
and the patches dropped by MODEL.PRUNE are grey (a lighter grey for each later pruning block; on the
image only dimmed, so the object stays visible); with a merging mode those are the patches merged into
another token there (the token a merge keeps is shown at the position of the patch it was merged
into). A legend under the panels names the colours.
Plain torch + PIL; the command line (model dir or config, images) is ``scripts/pictures.py``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from .backbone import FUSED_INDEX
from .config import MERGING_MODES
from .method import ClassMemory, sample_wise_score, semantic_wise_score

LEVEL1_COLOUR = (255, 0, 255)  # magenta
LEVEL2_COLOUR = (0, 255, 255)  # cyan
DROPPED_GREYS = ((96, 96, 96), (128, 128, 128), (160, 160, 160), (192, 192, 192))
MISSING_COLOUR = (255, 255, 255)  # a map that the model cannot compute (e.g. semantic without class memory)
BACKGROUND = (255, 255, 255)
TITLES = ("image", "sample-wise", "semantic-wise", "CLS attention")
TITLE_HEIGHT = 14
LEGEND_HEIGHT = 14
SWATCH = 10  # legend swatch side, pixels
DIM = 0.6  # on the image, a reduced patch is this much its grey (the rest its own colours)
GAP = 4
OUTLINE = 2  # outline width in pixels, drawn inside the cell


@dataclass
class Spotlight:
    """What one image's picture shows; patch indices are row-major on the ``grid`` x ``grid`` grid
    (a selected fused token, ``MODEL.PRUNE.MODE evit``, is ``backbone.FUSED_INDEX`` and has no cell)."""

    grid: int
    level1: List[int]
    level2: List[int]
    dropped: List[List[int]] = field(default_factory=list)  # per pruning block, patches dropped there
    maps: Tuple[Optional[np.ndarray], ...] = ()  # sample, semantic, attention: (grid*grid,), NaN = dropped
    blocks: List[int] = field(default_factory=list)  # the pruning blocks (0-based), for the legend
    merged: bool = False  # the patches were merged into other tokens (ToMe modes), not dropped


def _full_map(values: torch.Tensor, patch_index: Optional[torch.Tensor], num_patches: int) -> np.ndarray:
    out = np.full(num_patches, np.nan, dtype=np.float64)
    idx = np.arange(num_patches) if patch_index is None else patch_index.cpu().numpy()
    real = idx >= 0  # a fused token (MODEL.PRUNE.MODE evit) has no cell
    out[idx[real]] = values.detach().float().cpu().numpy()[real]
    return out


@torch.no_grad()
def spotlight(model, images: torch.Tensor) -> List[Spotlight]:
    """Run a :class:`spotlighter.models.Spotlighter` (eval mode) on ``images`` and collect what it keeps."""
    was_training = model.training
    model.eval()
    try:
        clip = model.clip
        img = clip.encode_image_tokens(images, need_attn=True)
        text = model.text_features()
        head = model.head
        out = head(img, text, clip.logit_scale)
        s = clip.logit_scale.exp().float()
        v_hat = F.normalize(img.global_feat.float(), dim=-1)
        t_hat = F.normalize(text.float(), dim=-1)
        probs = (s * v_hat @ t_hat.t()).softmax(dim=-1)
        patches = F.normalize(img.tokens.float()[:, 1:], dim=-1)
        sample = sample_wise_score(patches, probs, t_hat)
        semantic = (semantic_wise_score(patches, probs, head.memory.prototypes)
                    if isinstance(head.memory, ClassMemory) else None)
        attn = img.cls_attn.float()
    finally:
        model.train(was_training)
    P = clip.num_patches
    grid = int(round(math.sqrt(P)))
    n1 = head.cfg.level_sizes[0]
    result = []
    for b in range(images.shape[0]):
        pidx = None if img.patch_index is None else img.patch_index[b]
        dropped, prev = [], set(range(P))
        for kept in img.kept_index:
            now = set(kept[b].tolist()) - {FUSED_INDEX}
            dropped.append(sorted(prev - now))
            prev = now
        sel = out.patch_idx[b].tolist()
        maps = (_full_map(sample[b], pidx, P), None if semantic is None else _full_map(semantic[b], pidx, P),
                _full_map(attn[b], pidx, P))
        result.append(Spotlight(grid, sel[:n1], sel[n1:], dropped, maps, blocks=list(clip.prune.layers),
                                merged=clip.prune.mode in MERGING_MODES))
    return result


def picture_size(grid: int, cell: int) -> Tuple[int, int]:
    """(width, height) in pixels of :func:`render`'s picture."""
    panel = grid * cell
    return len(TITLES) * panel + (len(TITLES) + 1) * GAP, TITLE_HEIGHT + panel + LEGEND_HEIGHT + 3 * GAP


def legend(spot: Spotlight) -> List[Tuple[Tuple[int, int, int], str]]:
    """(colour, text) of each legend entry of ``spot``'s picture."""
    n1, n2 = len(spot.level1), len(spot.level2)
    items = [(LEVEL1_COLOUR, f"Level-1 ({n1} tokens)"), (LEVEL2_COLOUR, f"Level-2 ({n2} tokens)")]
    verb = "merged" if spot.merged else "dropped"
    for level, patches in enumerate(spot.dropped):
        block = spot.blocks[level] if level < len(spot.blocks) else level
        items.append((DROPPED_GREYS[min(level, len(DROPPED_GREYS) - 1)], f"{verb} at block {block}"))
    return items


def _heat(values: np.ndarray) -> np.ndarray:
    """(P,) -> (P, 3) uint8 on a dark-blue -> yellow ramp; NaN stays NaN-marked by the caller."""
    v = values.copy()
    ok = ~np.isnan(v)
    if ok.any():
        lo, hi = v[ok].min(), v[ok].max()
        v[ok] = (v[ok] - lo) / (hi - lo) if hi > lo else 0.5
    t = np.clip(np.nan_to_num(v), 0, 1)[:, None]
    low, high = np.array([20, 20, 90.0]), np.array([250, 230, 40.0])
    return (low + t * (high - low)).round().astype(np.uint8)


def render(image: np.ndarray, spot: Spotlight, cell: int):
    """The picture (a PIL image). ``image``: (H, W, 3) uint8, the model's input view of the image."""
    from PIL import Image, ImageDraw

    g, panel = spot.grid, spot.grid * cell
    canvas = Image.new("RGB", picture_size(g, cell), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    photo = np.asarray(Image.fromarray(image).convert("RGB").resize((panel, panel), Image.BICUBIC))
    panels = [photo]
    for values in spot.maps:
        if values is None:
            panels.append(np.full((panel, panel, 3), MISSING_COLOUR, dtype=np.uint8))
            continue
        rgb = _heat(values).reshape(g, g, 3)
        panels.append(np.kron(rgb, np.ones((cell, cell, 1), dtype=np.uint8)))
    for i, (title, arr) in enumerate(zip(TITLES, panels)):
        x0 = GAP + i * (panel + GAP)
        y0 = GAP + TITLE_HEIGHT
        arr = arr.copy()
        for level, patches in enumerate(spot.dropped):
            grey = np.array(DROPPED_GREYS[min(level, len(DROPPED_GREYS) - 1)], dtype=np.float64)
            for p in patches:
                r, c = divmod(p, g)
                cells = arr[r * cell:(r + 1) * cell, c * cell:(c + 1) * cell]
                # the image dimmed towards the grey; the maps have no value there: plain grey
                cells[...] = (DIM * grey + (1 - DIM) * cells).round() if i == 0 else grey
        canvas.paste(Image.fromarray(arr), (x0, y0))
        draw.text((x0, 1), title, fill=(0, 0, 0))
        for colour, patches in ((LEVEL1_COLOUR, spot.level1), (LEVEL2_COLOUR, spot.level2)):
            for p in patches:
                if p < 0:  # a fused token was selected (MODE evit): it has no cell to outline
                    continue
                r, c = divmod(p, g)
                box = (x0 + c * cell, y0 + r * cell, x0 + (c + 1) * cell - 1, y0 + (r + 1) * cell - 1)
                draw.rectangle(box, outline=colour, width=OUTLINE)
    x, y = GAP, 2 * GAP + TITLE_HEIGHT + panel + (LEGEND_HEIGHT - SWATCH) // 2
    for colour, text in legend(spot):
        if colour in (LEVEL1_COLOUR, LEVEL2_COLOUR):
            draw.rectangle((x, y, x + SWATCH - 1, y + SWATCH - 1), outline=colour, width=OUTLINE)
        else:
            draw.rectangle((x, y, x + SWATCH - 1, y + SWATCH - 1), fill=colour)
        x += SWATCH + GAP
        draw.text((x, y - 1), text, fill=(0, 0, 0))
        x += int(draw.textlength(text)) + 3 * GAP
    return canvas


def outlined_cells(picture, grid: int, cell: int, colour: Sequence[int], panel: int = 0) -> List[int]:
    """Patches whose cell in ``panel`` has a full ``colour`` outline (read back from the pixels)."""
    arr = np.asarray(picture.convert("RGB"))
    x0 = GAP + panel * (grid * cell + GAP)
    y0 = GAP + TITLE_HEIGHT
    found = []
    for p in range(grid * grid):
        r, c = divmod(p, grid)
        block = arr[y0 + r * cell:y0 + (r + 1) * cell, x0 + c * cell:x0 + (c + 1) * cell]
        ring = np.concatenate([block[0], block[-1], block[:, 0], block[:, -1]])
        if (ring == np.array(colour, dtype=np.uint8)).all():
            found.append(p)
    return found


def load_image(path, size: int, mean: Sequence[float], std: Sequence[float]):
    """(tensor (3, size, size) normalised, uint8 view (size, size, 3)) of an image file or a PIL image:
    resize the shorter side to ``size`` (bicubic) and centre-crop, as the trainers' test transform does."""
    from PIL import Image

    if isinstance(path, Image.Image):
        im = path.convert("RGB")
    else:
        try:
            im = Image.open(path).convert("RGB")
        except OSError as exc:
            raise ValueError(f"cannot read image {path}: {exc}") from None
    w, h = im.size
    scale = size / min(w, h)
    im = im.resize((max(size, round(w * scale)), max(size, round(h * scale))), Image.BICUBIC)
    w, h = im.size
    left, top = (w - size) // 2, (h - size) // 2
    im = im.crop((left, top, left + size, top + size))
    view = np.asarray(im, dtype=np.uint8)
    x = torch.from_numpy(view.astype(np.float32) / 255.0).permute(2, 0, 1)
    x = (x - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)
    return x, view


def default_cell(grid: int, target: int = 224) -> int:
    return max(8, math.ceil(target / grid))
