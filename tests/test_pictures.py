"""spotlighter.pictures on the tiny CLIP: PNG size, outlined cells read back from the pixels are
exactly the selected tokens, dropped patches greyed, maps on the remaining patches."""

import io

import numpy as np
import pytest
import torch
from PIL import Image

from spotlighter import pictures
from spotlighter.backbone import FrozenCLIP, PruneSpec
from model_helpers import make_model
from tiny_clip import build_tiny_clip

NAMES = ["cat", "dog_house", "red car", "x"]

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def deep_clip():
    return build_tiny_clip(seed=5, vision_layers=4, vision_width=128)  # 4 x 4 patch grid


def _model(clip_model, prune=None, preset="paper"):
    torch.manual_seed(0)
    return make_model("spotlighter", FrozenCLIP(clip_model, prune), NAMES, {
        "TRAINER.SPOTLIGHTER.PRESET": preset, "TRAINER.SPOTLIGHTER.IRM.HEADS": 8 if preset == "paper" else 1})


def _views(n=2, size=32, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (size, size, 3), dtype=np.uint8) for _ in range(n)]


def _tensor(views):
    return torch.stack([torch.from_numpy(v.astype(np.float32) / 255).permute(2, 0, 1) for v in views])


@pytest.mark.parametrize("prune", [None, PruneSpec((0,), 0.5), PruneSpec((0, 1), 0.6),
                                   PruneSpec((0, 1), 0.6, mode="merge")])
def test_outlined_cells_are_exactly_the_selected_tokens(deep_clip, prune):
    model = _model(deep_clip, prune)
    views = _views()
    x = _tensor(views)
    spots = pictures.spotlight(model, x)
    with torch.no_grad():
        out = model.head(model.clip.encode_image_tokens(x, need_attn=False), model.text_features(),
                         model.clip.logit_scale)
    cell = 9
    for b, (view, spot) in enumerate(zip(views, spots)):
        png = io.BytesIO()
        pictures.render(view, spot, cell).save(png, format="PNG")
        pic = Image.open(io.BytesIO(png.getvalue()))
        assert pic.format == "PNG" and pic.size == pictures.picture_size(4, cell)
        assert pic.size == (4 * 36 + 5 * pictures.GAP,
                            pictures.TITLE_HEIGHT + 36 + pictures.LEGEND_HEIGHT + 3 * pictures.GAP)
        expect1, expect2 = out.patch_idx[b, :3].tolist(), out.patch_idx[b, 3:].tolist()
        assert spot.level1 == expect1 and spot.level2 == expect2
        for panel in range(4):
            assert pictures.outlined_cells(pic, 4, cell, pictures.LEVEL1_COLOUR, panel) == sorted(expect1)
            assert pictures.outlined_cells(pic, 4, cell, pictures.LEVEL2_COLOUR, panel) == sorted(expect2)
        arr = np.asarray(pic.convert("RGB"))
        dropped_all = [p for d in spot.dropped for p in d]
        if prune is None:
            assert spot.dropped == [] and all(not np.isnan(m).any() for m in spot.maps)
        else:
            assert len(spot.dropped) == len(prune.layers)
            assert len(dropped_all) == 16 - prune.remaining(16) and not set(dropped_all) & set(expect1 + expect2)
            for m in spot.maps:  # maps are defined exactly on the patches that reached the last block
                assert sorted(np.flatnonzero(np.isnan(m)).tolist()) == sorted(dropped_all)
        photo = np.asarray(Image.fromarray(view).resize((36, 36), Image.BICUBIC)).astype(np.float64)
        for level, patches in enumerate(spot.dropped):  # grey in the maps, dimmed towards grey on the image
            grey = np.array(pictures.DROPPED_GREYS[level], dtype=np.float64)
            for p in patches:
                r, c = divmod(p, 4)
                for panel in range(4):
                    x0 = pictures.GAP + panel * (36 + pictures.GAP) + c * cell
                    y0 = pictures.GAP + pictures.TITLE_HEIGHT + r * cell
                    got = arr[y0 + 3:y0 + cell - 3, x0 + 3:x0 + cell - 3]
                    if panel:
                        assert (got == grey).all()
                    else:
                        own = photo[r * cell + 3:(r + 1) * cell - 3, c * cell + 3:(c + 1) * cell - 3]
                        assert (got == (pictures.DIM * grey + (1 - pictures.DIM) * own).round()).all()
        items = pictures.legend(spot)
        assert items[:2] == [(pictures.LEVEL1_COLOUR, "Level-1 (3 tokens)"), (pictures.LEVEL2_COLOUR, "Level-2 (2 tokens)")]
        if prune is not None:
            verb = "merged" if prune.mode == "merge" else "dropped"
            assert [t for _, t in items[2:]] == [f"{verb} at block {b}" for b in prune.layers]


def test_maps_are_the_model_scores(deep_clip):
    """The sample-wise + semantic-wise maps, standardised and summed, are the scores the head ranked."""
    from spotlighter.method import standardize

    model = _model(deep_clip, PruneSpec((1,), 0.5))
    x = _tensor(_views(1))
    spot = pictures.spotlight(model, x)[0]
    with torch.no_grad():
        img = model.clip.encode_image_tokens(x, need_attn=False)
        out = model.head(img, model.text_features(), model.clip.logit_scale)
    idx = img.patch_index[0].numpy()
    a = torch.tensor(spot.maps[0][idx])[None]
    b = torch.tensor(spot.maps[1][idx])[None]
    assert torch.allclose((standardize(a, 1e-6) + standardize(b, 1e-6)).float(), out.scores, atol=1e-4)


def test_release_preset_has_no_semantic_map(deep_clip):
    model = _model(deep_clip, None, preset="release")
    view = _views(1)[0]
    spot = pictures.spotlight(model, _tensor([view]))[0]
    assert spot.maps[1] is None and spot.level1 and len(spot.level1) == 2
    pic = pictures.render(view, spot, 8)
    assert pic.size == pictures.picture_size(4, 8)
    assert pictures.outlined_cells(pic, 4, 8, pictures.LEVEL1_COLOUR, 2) == sorted(spot.level1)


def test_load_image_resizes_and_centre_crops(tmp_path):
    im = np.zeros((40, 80, 3), dtype=np.uint8)
    im[:, 20:60] = 255  # the centre square is white
    path = tmp_path / "wide.png"
    Image.fromarray(im).save(path)
    x, view = pictures.load_image(str(path), 32, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    assert x.shape == (3, 32, 32) and view.shape == (32, 32, 3)
    assert view[4:-4, 4:-4].min() > 240 and torch.allclose(x[:, 16, 16], torch.ones(3), atol=0.05)
    with pytest.raises(ValueError, match="cannot read image"):
        (tmp_path / "bad.png").write_text("no")
        pictures.load_image(str(tmp_path / "bad.png"), 32, (0, 0, 0), (1, 1, 1))
