"""spotlighter.config.default_cfg and spotlighter.factory: one config, one builder per registered
trainer, the same with and without Dassl."""

import glob
import os
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, requires_dassl
from spotlighter import factory, registry
from spotlighter.config import DASSL_MODEL_DEFAULTS, ConfigError, default_cfg, trainer_cfg
from spotlighter.method import HeadConfig
from model_helpers import make_model

pytestmark = pytest.mark.usefixtures("one_torch_thread")
NAMES = ["cat", "dog", "red car"]


def _get(cfg, dotted):
    for part in dotted.split("."):
        cfg = cfg[part]
    return cfg


def test_every_registered_trainer_has_one_builder():
    assert set(factory.BUILDERS) == {t.name for t in registry.TRAINERS.values()}


@requires_dassl
def test_the_dassl_keys_used_without_dassl_are_dassls_defaults():
    from dassl.config import get_cfg_default

    dassl = get_cfg_default()
    for key, value in DASSL_MODEL_DEFAULTS.items():
        assert _get(dassl, key) == value, key
    ours = default_cfg()
    assert ours.OPTIM.NAME == dassl.OPTIM.NAME and ours.TRAINER.COOP.N_CTX == 16  # Dassl's + extend_cfg's


@requires_dassl
def test_trainers_take_node_and_folder_from_the_registry():
    import trainers  # noqa: F401  (registers them)
    from dassl.engine import TRAINER_REGISTRY

    for spec in registry.TRAINERS.values():
        cls = TRAINER_REGISTRY.get(spec.name)
        assert (cls.CFG_NODE, cls.MODULE_NAME) == (spec.node, spec.module)


def test_without_dassl_every_shipped_trainer_config_loads_with_the_same_model_keys():
    """The configs/trainers yaml files merge into default_cfg() without Dassl, and give the same
    TRAINER / MODEL / INPUT values as with it (a subprocess where ``import dassl`` fails)."""
    code = ("import sys; sys.modules['dassl'] = None\n"
            "import glob, json, os\n"
            "from spotlighter.config import dassl_available, trainer_cfg\n"
            "assert not dassl_available()\n"
            "out = {}\n"
            "for path in sorted(glob.glob('configs/trainers/*/*.yaml')):\n"
            "    cfg = trainer_cfg(os.path.basename(os.path.dirname(path)), config=path)\n"
            "    out[path] = json.loads(json.dumps({k: cfg[k] for k in ('TRAINER', 'MODEL', 'INPUT')}))\n"
            "print(json.dumps(out))\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": ROOT})
    assert proc.returncode == 0, proc.stderr[-3000:]
    import json

    without = json.loads(proc.stdout)
    paths = sorted(glob.glob("configs/trainers/*/*.yaml", root_dir=ROOT))
    assert sorted(without) == paths and len(paths) >= 20
    try:
        import dassl  # noqa: F401
    except ImportError:
        return
    for path in paths:
        cfg = trainer_cfg(os.path.basename(os.path.dirname(path)), config=os.path.join(ROOT, path))
        node = registry.trainer(cfg.TRAINER.NAME).node
        with_dassl = json.loads(json.dumps({k: cfg[k] for k in ("TRAINER", "MODEL", "INPUT")}))
        assert with_dassl["TRAINER"][node] == without[path]["TRAINER"][node], path
        for key in ("NAME", "PATH"):
            assert with_dassl["MODEL"]["BACKBONE"][key] == without[path]["MODEL"]["BACKBONE"][key], (path, key)
        assert with_dassl["MODEL"]["PRUNE"] == without[path]["MODEL"]["PRUNE"], path
        for key in ("SIZE", "PIXEL_MEAN", "PIXEL_STD", "INTERPOLATION"):
            assert with_dassl["INPUT"][key] == without[path]["INPUT"][key], (path, key)


def test_release_preset_file_puts_the_preset_underneath():
    cfg = trainer_cfg("spotlighter", config="vit_b16_ep20_release")
    s = cfg.TRAINER.SPOTLIGHTER
    assert (s.PRESET, s.MEMORY.KIND, list(s.LEVEL_SIZES), s.N_CTX) == ("release", "shared", [2, 3], 4)
    assert HeadConfig.from_cfg(s) == HeadConfig.default("release")
    changed = trainer_cfg("spotlighter", {"TRAINER.SPOTLIGHTER.LEVEL_SIZES": [4, 1]}, config="vit_b16_ep20_release")
    assert list(changed.TRAINER.SPOTLIGHTER.LEVEL_SIZES) == [4, 1]  # an explicit change still wins


def test_head_config_defaults_are_the_configs():
    paper = HeadConfig.default("paper")
    node = default_cfg().TRAINER.SPOTLIGHTER
    assert (paper.top_k, paper.level_sizes, paper.alpha, paper.score.eps) == (
        node.TOP_K, tuple(node.LEVEL_SIZES), node.TRM.ALPHA, node.SCORE.EPS)


def test_factory_models_are_the_trainers_classes_with_the_configs_values(frozen_clip):
    coop = make_model("coop", frozen_clip, NAMES, {"TRAINER.COOP.N_CTX": 3, "TRAINER.COOP.CTX_INIT": ""})
    assert coop.prompt_learner.ctx.shape == (3, 64)
    spot = make_model("spotlighter", frozen_clip, NAMES, {"TRAINER.SPOTLIGHTER.IRM.HEADS": 2,
                                                          "TRAINER.SPOTLIGHTER.TOP_K": 3,
                                                          "TRAINER.SPOTLIGHTER.LEVEL_SIZES": [2, 1]})
    assert (spot.head.cfg.irm_heads, spot.head.cfg.top_k) == (2, 3)
    # an invalid value is the config key's error, also when built without a trainer
    with pytest.raises(ConfigError, match="TRAINER.SPOTLIGHTER.IRM.HEADS = 3 is invalid: expected a divisor"):
        make_model("spotlighter", frozen_clip, NAMES, {"TRAINER.SPOTLIGHTER.IRM.HEADS": 3})
    with pytest.raises(ConfigError, match=r"TRAINER.NAME = 'Nope': unknown trainer 'Nope'"):
        cfg = default_cfg()
        cfg.TRAINER.NAME = "Nope"
        factory.build_model(cfg, NAMES, frozen_clip)


def test_training_forward_reports_the_selected_tokens(frozen_clip):
    model = make_model("spotlighter", frozen_clip, NAMES, {"TRAINER.SPOTLIGHTER.IRM.HEADS": 1}).train()
    torch.manual_seed(0)
    model(torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 0]))
    assert set(model.stats) == {"sel_score", "sel_level1_weight"}
    assert 0 < float(model.stats["sel_level1_weight"]) < 1
    model.eval()
    with torch.no_grad():
        model(torch.randn(2, 3, 32, 32))
    assert model.stats == {}
