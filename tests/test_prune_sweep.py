"""scripts/prune_sweep.py: setting syntax, output folder tags, the train.py options it passes and the
ViT-B/16 twin column (no run: the sweep itself is measured, not tested)."""

import importlib.util
import os

import pytest

from spotlighter.backbone import PruneSpec
from spotlighter import bench

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def sweep():
    spec = importlib.util.spec_from_file_location("prune_sweep", os.path.join(ROOT, "scripts", "prune_sweep.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_settings_tags_and_options(sweep):
    assert sweep.parse_setting("none") is None
    assert sweep.parse_setting("1,2:0.7:merge") == PruneSpec((1, 2), 0.7, mode="merge")
    assert sweep.tag("none") == "none" and sweep.tag("1,2:0.5") == "L1-2_k0.5"  # drop settings: no mode suffix
    assert sweep.tag("1,2:0.7:merge") == "L1-2_k0.7_merge"
    assert sweep.prune_opts(sweep.parse_setting("1,2:0.5")) == ["MODEL.PRUNE.LAYERS", "[1,2]", "MODEL.PRUNE.KEEP", "0.5"]
    assert sweep.prune_opts(sweep.parse_setting("0:0.6:merge"))[-2:] == ["MODEL.PRUNE.MODE", "merge"]
    with pytest.raises(SystemExit, match="LAYERS:KEEP"):
        sweep.parse_setting("1-0.5")


def test_twin_is_the_vit_b16_setting_at_the_same_depth(sweep):
    assert sweep.twin("none") == ("none", 1.0)
    label, bound = sweep.twin("0,1,2:0.8:merge")
    assert label == "0,3,6:0.8:merge"
    assert bound == pytest.approx(bench.encoder_macs("ViT-B/16") /
                                  bench.encoder_macs("ViT-B/16", PruneSpec((0, 3, 6), 0.8, mode="merge")))
    assert sweep.twin("2:0.5")[0] == "6:0.5" and round(sweep.twin("2:0.5")[1], 2) == 1.31
