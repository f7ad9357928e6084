"""spotlighter.config: defaults (paper preset), the release preset, validation messages."""

import glob
import os

import pytest
import yaml
from yacs.config import CfgNode as CN

from spotlighter.config import (PRESETS, ConfigError, apply_preset, check_precision,
                                check_spotlighter_cfg, default_cfg)


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def spot(preset: str = "paper") -> CN:
    cfg = default_cfg()
    apply_preset(cfg, preset)
    return cfg.TRAINER.SPOTLIGHTER


def test_paper_defaults_match_the_spec():
    s = default_cfg().TRAINER.SPOTLIGHTER
    assert s.PRESET == "paper"
    assert s.TOP_K == 5
    assert list(s.LEVEL_SIZES) == [3, 2]
    assert s.MEMORY.KIND == "class"
    assert s.MEMORY.PROTOTYPES_PER_CLASS == 4
    assert s.MEMORY.MOMENTUM == 0.8
    assert s.MEMORY.WRITE == "selected"
    assert s.TRM.ALPHA == 0.2
    assert s.LOSS.CONSISTENCY_WEIGHT == 20.0
    assert (s.SCORE.SAMPLE_WEIGHT, s.SCORE.SEMANTIC_WEIGHT, s.SCORE.ATTN_WEIGHT) == (1.0, 1.0, 0.0)
    assert s.LOSS.LEVEL_WEIGHTS == "dynamic"
    assert s.MAPPER.AT_TEST is True
    assert s.IRM.KIND == "tokens"
    assert s.FUSION.BETA_TRAIN == s.FUSION.BETA_TEST  # one beta for train and test (spec row 11)
    assert s.N_CTX == 4 and s.CTX_INIT == "a photo of a"


def test_extend_cfg_adds_the_other_trainers_and_shared_keys():
    cfg = default_cfg()
    assert cfg.DATASET.SUBSAMPLE_CLASSES == "all"
    assert cfg.MODEL.BACKBONE.PATH == ""
    assert cfg.TRAINER.COOP.CLASS_TOKEN_POSITION == "end"
    assert cfg.TRAINER.MAPLE.N_CTX == 2 and cfg.TRAINER.MAPLE.CTX_INIT == "a photo of a"
    assert cfg.TRAINER.MAPLE.PROMPT_DEPTH == 9
    assert cfg.TRAINER.ZSCLIP.TEMPLATE == ""


def test_release_preset_values():
    s = spot("release")
    assert s.PRESET == "release"
    assert list(s.LEVEL_SIZES) == [2, 3]
    assert s.TOP_K == 5
    assert s.MEMORY.KIND == "shared" and s.MEMORY.SHARED_SLOTS == 25
    assert s.MEMORY.WRITE == "all_mapped"
    assert (s.SCORE.SAMPLE_WEIGHT, s.SCORE.SEMANTIC_WEIGHT, s.SCORE.ATTN_WEIGHT) == (0.0, 0.0, 1.0)
    assert s.LOSS.LOCAL_WEIGHT == pytest.approx(1 / 50)
    assert s.LOSS.LEVEL_WEIGHTS == "fixed"
    assert (s.FUSION.BETA_TRAIN, s.FUSION.BETA_TEST) == (0.05, 0.1)
    assert s.TEST.LOCAL_GAMMA == 0.0
    assert s.MAPPER.AT_TEST is False
    assert s.IRM.KIND == "global"
    # what the release preset does not change stays at the paper value
    assert s.TRM.ALPHA == 0.2 and s.MEMORY.MOMENTUM == 0.8 and s.LOSS.CONSISTENCY_WEIGHT == 20.0


def test_paper_preset_changes_nothing():
    assert default_cfg().TRAINER.SPOTLIGHTER == spot("paper")


def test_presets_only_differ_in_the_listed_keys():
    paper, release = spot("paper"), spot("release")

    def flat(node, prefix=""):
        out = {}
        for k, v in node.items():
            if isinstance(v, CN):
                out.update(flat(v, prefix + k + "."))
            else:
                out[prefix + k] = v
        return out

    a, b = flat(paper), flat(release)
    changed = {k for k in a if a[k] != b[k]}
    assert changed == ({k for k, v in PRESETS["release"].items() if a[k] != v} | {"PRESET"})


def test_explicit_values_win_over_the_preset():
    cfg = default_cfg()
    apply_preset(cfg, "release")
    cfg.merge_from_list(["TRAINER.SPOTLIGHTER.TOP_K", 6, "TRAINER.SPOTLIGHTER.LEVEL_SIZES", [3, 3]])
    assert cfg.TRAINER.SPOTLIGHTER.TOP_K == 6
    assert list(cfg.TRAINER.SPOTLIGHTER.LEVEL_SIZES) == [3, 3]
    assert cfg.TRAINER.SPOTLIGHTER.MEMORY.KIND == "shared"  # rest of the preset kept
    check_spotlighter_cfg(cfg.TRAINER.SPOTLIGHTER, num_patches=196)


def test_preset_lists_are_not_shared_between_configs():
    original = list(PRESETS["release"]["LEVEL_SIZES"])
    try:
        s1 = spot("release")
        s1.LEVEL_SIZES[0] = 4  # edit one config in place
        assert list(spot("release").LEVEL_SIZES) == [2, 3]  # a fresh config must not see it
    finally:
        PRESETS["release"]["LEVEL_SIZES"][:] = original  # undo the leak for the other tests


def test_unknown_preset():
    cfg = default_cfg()
    with pytest.raises(ConfigError) as err:
        apply_preset(cfg, "fancy")
    msg = str(err.value)
    assert "TRAINER.SPOTLIGHTER.PRESET" in msg and "'fancy'" in msg
    assert "paper" in msg and "release" in msg
    assert cfg.TRAINER.SPOTLIGHTER.PRESET == "paper"  # nothing was written


@pytest.mark.parametrize("preset", ["paper", "release"])
def test_presets_are_valid(preset):
    check_spotlighter_cfg(spot(preset), num_patches=196)
    check_spotlighter_cfg(spot(preset), num_patches=5)  # k = 5 fits exactly


def _set(node, dotted, value):
    *parents, leaf = dotted.split(".")
    for p in parents:
        node = node[p]
    node[leaf] = value


@pytest.mark.parametrize("changes, key", [
    ({"TOP_K": 17, "LEVEL_SIZES": [9, 8]}, "TRAINER.SPOTLIGHTER.TOP_K"),
    ({"TOP_K": 0}, "TRAINER.SPOTLIGHTER.TOP_K"),
    ({"LEVEL_SIZES": [3, 3]}, "TRAINER.SPOTLIGHTER.LEVEL_SIZES"),
    ({"LEVEL_SIZES": [5]}, "TRAINER.SPOTLIGHTER.LEVEL_SIZES"),
    ({"MEMORY.PROTOTYPES_PER_CLASS": 0}, "TRAINER.SPOTLIGHTER.MEMORY.PROTOTYPES_PER_CLASS"),
    ({"MEMORY.KIND": "shared", "SCORE.SEMANTIC_WEIGHT": 0.0, "MEMORY.SHARED_SLOTS": 0},
     "TRAINER.SPOTLIGHTER.MEMORY.SHARED_SLOTS"),
    ({"MEMORY.KIND": "shared"}, "TRAINER.SPOTLIGHTER.SCORE.SEMANTIC_WEIGHT"),
    ({"PREC": "bf16"}, "TRAINER.SPOTLIGHTER.PREC"),
    ({"SCORE.SAMPLE_WEIGHT": 0.0, "SCORE.SEMANTIC_WEIGHT": 0.0, "SCORE.ATTN_WEIGHT": 0.0},
     "TRAINER.SPOTLIGHTER.SCORE"),
    ({"SCORE.ATTN_WEIGHT": -1.0}, "TRAINER.SPOTLIGHTER.SCORE.ATTN_WEIGHT"),
    ({"MEMORY.MOMENTUM": 1.0}, "TRAINER.SPOTLIGHTER.MEMORY.MOMENTUM"),
    ({"MEMORY.READ_TEMPERATURE": 0.0}, "TRAINER.SPOTLIGHTER.MEMORY.READ_TEMPERATURE"),
    ({"FUSION.BETA_TEST": 1.5}, "TRAINER.SPOTLIGHTER.FUSION.BETA_TEST"),
    ({"LOSS.LEVEL_WEIGHTS": "learned"}, "TRAINER.SPOTLIGHTER.LOSS.LEVEL_WEIGHTS"),
    ({"LOSS.LOCAL_WEIGHT": float("inf")}, "TRAINER.SPOTLIGHTER.LOSS.LOCAL_WEIGHT"),
    ({"IRM.KIND": "both"}, "TRAINER.SPOTLIGHTER.IRM.KIND"),
])
def test_invalid_values_name_their_key(changes, key):
    node = spot("paper")
    for dotted, value in changes.items():
        _set(node, dotted, value)
    with pytest.raises(ConfigError) as err:
        check_spotlighter_cfg(node, num_patches=16)
    msg = str(err.value)
    assert msg.startswith(key + " = "), msg


def test_top_k_bound_only_checked_when_num_patches_known():
    node = spot("paper")
    node.TOP_K, node.LEVEL_SIZES = 17, [9, 8]
    check_spotlighter_cfg(node)  # no patch count: fine
    check_spotlighter_cfg(node, num_patches=17)
    with pytest.raises(ConfigError, match="at most the number of patches \\(16\\)"):
        check_spotlighter_cfg(node, num_patches=16)


@pytest.mark.parametrize("prec", ["fp16", "fp32", "amp"])
def test_valid_precisions(prec):
    check_precision("TRAINER.COOP.PREC", prec)
    node = spot("paper")
    node.PREC = prec
    check_spotlighter_cfg(node)


def test_invalid_precision_message():
    with pytest.raises(ConfigError) as err:
        check_precision("TRAINER.COOP.PREC", "fp64")
    assert str(err.value) == ("TRAINER.COOP.PREC = 'fp64' is invalid: expected one of "
                              "['fp16', 'fp32', 'amp'].")


@pytest.mark.parametrize("node", ["COOP", "COCOOP"])
def test_coop_and_cocoop_defaults_are_coops_own(node):
    """KaiyangZhou/CoOp train.py: N_CTX 16, CTX_INIT "", CSC False, CLASS_TOKEN_POSITION end, PREC fp16."""
    n = default_cfg().TRAINER[node]
    assert (n.N_CTX, n.CTX_INIT, n.PREC) == (16, "", "fp16")
    if node == "COOP":
        assert (n.CSC, n.CLASS_TOKEN_POSITION) == (False, "end")


CALIBRATED_MINIBENCH_COOP = os.path.join(ROOT, "configs/trainers/CoOp/minibench_ep50_ctx16.yaml")


@pytest.mark.parametrize("path", sorted(p for p in glob.glob(os.path.join(ROOT, "configs/trainers/Co*Op/*.yaml"))
                                        if p != CALIBRATED_MINIBENCH_COOP))
def test_shipped_coop_yaml_files_keep_the_four_token_init(path):
    node = "COCOOP" if "/CoCoOp/" in path else "COOP"
    with open(path) as f:
        data = yaml.safe_load(f)
    assert data["TRAINER"][node]["CTX_INIT"] == "a photo of a" and data["TRAINER"][node]["N_CTX"] == 4


def test_minibench_coop_is_coops_own_random_16_token_context():
    """The demo's MiniBench CoOp (calibrated on zero-shot CLIP and CoOp, docs/minibench.md): CoOp's own
    context and learning rate, 50 epochs."""
    with open(CALIBRATED_MINIBENCH_COOP) as f:
        data = yaml.safe_load(f)
    assert (data["TRAINER"]["COOP"]["N_CTX"], data["TRAINER"]["COOP"]["CTX_INIT"]) == (16, "")
    assert (data["OPTIM"]["LR"], data["OPTIM"]["MAX_EPOCH"]) == (0.002, 50)


MINIBENCH_TRAINER_CONFIGS = sorted(glob.glob(os.path.join(ROOT, "configs/trainers/*/minibench*.yaml")))


def test_every_minibench_trainer_config_has_the_benchmarks_one_input_block():
    """Input size, normalisation and augmentation are a property of the benchmark, as on real data: every
    trainer sees MiniBench the same way. Flips only: a class is the biggest object of a 64 px scene, which
    a random resized crop can cut or let a distractor outgrow (calibrated on ZS-CLIP and CoOp, docs/minibench.md)."""
    assert len(MINIBENCH_TRAINER_CONFIGS) >= 6
    blocks = {}
    for path in MINIBENCH_TRAINER_CONFIGS:
        with open(path) as f:
            blocks[os.path.relpath(path, ROOT)] = yaml.safe_load(f)["INPUT"]
    first = next(iter(blocks.values()))
    assert first["TRANSFORMS"] == ["random_flip", "normalize"]
    assert "RRCROP_SCALE" not in first
    assert {k: v for k, v in blocks.items() if v != first} == {}


def dassl_cfg():
    pytest.importorskip("dassl")
    return default_cfg()


def test_dassl_defaults_and_shipped_configs_pass_check_dassl_cfg():
    from spotlighter.config import check_dassl_cfg

    check_dassl_cfg(dassl_cfg())
    for path in sorted(glob.glob(os.path.join(ROOT, "configs", "**", "*.yaml"), recursive=True)):
        cfg = dassl_cfg()
        cfg.merge_from_file(path)
        check_dassl_cfg(cfg)


@pytest.mark.parametrize("key, value, expected", [
    ("OPTIM.MAX_EPOCH", -3, "OPTIM.MAX_EPOCH = -3 is invalid: expected an integer >= 1."),
    ("OPTIM.MAX_EPOCH", 0, "OPTIM.MAX_EPOCH = 0 is invalid: expected an integer >= 1."),
    ("OPTIM.LR", -0.5, "OPTIM.LR = -0.5 is invalid: expected a finite number > 0."),
    ("OPTIM.LR", float("nan"), "OPTIM.LR = nan is invalid: expected a finite number > 0."),
    ("DATALOADER.TRAIN_X.BATCH_SIZE", 0, "DATALOADER.TRAIN_X.BATCH_SIZE = 0 is invalid: expected an integer >= 1."),
    ("DATALOADER.TEST.BATCH_SIZE", -1, "DATALOADER.TEST.BATCH_SIZE = -1 is invalid: expected an integer >= 1."),
    ("TRAIN.PRINT_FREQ", 0, "TRAIN.PRINT_FREQ = 0 is invalid: expected an integer >= 1 (log every that many "
                            "batches)."),
    ("OPTIM.NAME", "sgdd", "OPTIM.NAME = 'sgdd' is invalid: expected one of ['adam', 'amsgrad', 'sgd', "
                           "'rmsprop', 'radam', 'adamw']."),
    ("SEED", 4294967296, "SEED (--seed) = 4294967296 is invalid: expected an integer in [0, 4294967295], or "
                         "negative for no fixed seed."),
    ("DATASET.NUM_SHOTS", -3, "DATASET.NUM_SHOTS = -3 is invalid: expected an integer >= 1 (images per class), "
                              "or -1 for every image."),
    ("DATASET.NUM_SHOTS", 0, "DATASET.NUM_SHOTS = 0 is invalid"),
    ("OPTIM.WARMUP_EPOCH", 11, "OPTIM.WARMUP_EPOCH = 11 is invalid: expected at most OPTIM.MAX_EPOCH = 10 (the "
                               "warm-up epochs are part of the training epochs)."),
    ("TEST.FINAL_MODEL", "bogus", "TEST.FINAL_MODEL = 'bogus' is invalid: expected one of ['last_step', "
                                  "'best_val']."),
    ("OPTIM.LR_SCHEDULER", "bogus", "OPTIM.LR_SCHEDULER = 'bogus' is invalid: expected one of ['cosine', "
                                    "'single_step', 'multi_step', 'constant']."),
    ("DATALOADER.NUM_WORKERS", -1, "DATALOADER.NUM_WORKERS = -1 is invalid: expected an integer >= 0 (0 = load "
                                   "in the main process)."),
    ("OPTIM.WEIGHT_DECAY", -1.0, "OPTIM.WEIGHT_DECAY = -1.0 is invalid"),
    ("OPTIM.MOMENTUM", 1.5, "OPTIM.MOMENTUM = 1.5 is invalid"),
    ("OPTIM.GAMMA", 0.0, "OPTIM.GAMMA = 0.0 is invalid"),
    ("OPTIM.WARMUP_TYPE", "cubic", "OPTIM.WARMUP_TYPE = 'cubic' is invalid"),
    ("OPTIM.WARMUP_CONS_LR", -1e-5, "OPTIM.WARMUP_CONS_LR = -1e-05 is invalid"),
    ("DATALOADER.TRAIN_X.SAMPLER", "Randomly", "DATALOADER.TRAIN_X.SAMPLER = 'Randomly' is invalid"),
    ("TRAIN.CHECKPOINT_FREQ", -1, "TRAIN.CHECKPOINT_FREQ = -1 is invalid"),
    ("TRAIN.COUNT_ITER", "all", "TRAIN.COUNT_ITER = 'all' is invalid"),
    ("TEST.SPLIT", "train", "TEST.SPLIT = 'train' is invalid"),
    ("DATASET.SUBSAMPLE_CLASSES", "half", "DATASET.SUBSAMPLE_CLASSES = 'half' is invalid"),
    ("DATASET.ALLOW_OUTSIDE_PATHS", "yes", "DATASET.ALLOW_OUTSIDE_PATHS = 'yes' is invalid: expected True or "
                                           "False."),
    ("INPUT.INTERPOLATION", "cubic", "INPUT.INTERPOLATION = 'cubic' is invalid: expected one of ['bilinear', "
                                     "'bicubic', 'nearest']."),
    ("INPUT.TRANSFORMS", ["random_flip", "flipme"], "INPUT.TRANSFORMS = ['random_flip', 'flipme'] is invalid: "
                                                    "expected names from ['random_flip', "),
    ("TRAINER.COOP.N_CTX", 0, "TRAINER.COOP.N_CTX = 0 is invalid: expected an integer >= 1 (learnable context "
                              "tokens) when CTX_INIT is empty."),
    ("TRAINER.COOP.CLASS_TOKEN_POSITION", "top", "TRAINER.COOP.CLASS_TOKEN_POSITION = 'top' is invalid"),
    ("TRAINER.COCOOP.META_NET_REDUCTION", 0, "TRAINER.COCOOP.META_NET_REDUCTION = 0 is invalid"),
    ("TRAINER.MAPLE.PROMPT_DEPTH", 0, "TRAINER.MAPLE.PROMPT_DEPTH = 0 is invalid"),
    ("TRAINER.IVLP.N_CTX_VISION", 0, "TRAINER.IVLP.N_CTX_VISION = 0 is invalid: expected an integer >= 1"),
    ("TRAINER.PROMPTSRC.PROMPT_DEPTH_TEXT", 0, "TRAINER.PROMPTSRC.PROMPT_DEPTH_TEXT = 0 is invalid: expected an "
                                               "integer >= 1."),
    ("TRAINER.PROMPTSRC.GPA_STD", 0, "TRAINER.PROMPTSRC.GPA_STD = 0 is invalid: expected a number > 0"),
    ("TRAINER.PROMPTSRC.TEXT_LOSS_WEIGHT", -25, "TRAINER.PROMPTSRC.TEXT_LOSS_WEIGHT = -25 is invalid"),
    ("TRAINER.PROMPTKD.TEACHER_PROMPT_DEPTH_VISION", -1, "TRAINER.PROMPTKD.TEACHER_PROMPT_DEPTH_VISION = -1 is "
                                                         "invalid: expected an integer >= 0."),
    ("TRAINER.PROMPTKD.KD_WEIGHT", 0.0, "TRAINER.PROMPTKD.KD_WEIGHT = 0.0 is invalid: expected a finite number > 0"),
    ("TRAINER.PROMPTKD.TEMPERATURE", -1.0, "TRAINER.PROMPTKD.TEMPERATURE = -1.0 is invalid"),
])
def test_check_dassl_cfg_names_key_value_and_expectation(key, value, expected):
    from spotlighter.config import check_dassl_cfg

    cfg = dassl_cfg()
    *parents, leaf = key.split(".")
    node = cfg
    for part in parents:
        node = node[part]
    node[leaf] = value
    if key == "OPTIM.WARMUP_EPOCH":
        cfg.OPTIM.MAX_EPOCH = 10
    if key in ("OPTIM.WARMUP_TYPE", "OPTIM.WARMUP_CONS_LR"):
        cfg.OPTIM.WARMUP_EPOCH = 1
    with pytest.raises(ConfigError) as info:
        check_dassl_cfg(cfg)
    assert str(info.value).startswith(expected)


def test_check_dassl_cfg_accepts_the_edges():
    from spotlighter.config import check_dassl_cfg

    cfg = dassl_cfg()
    cfg.OPTIM.MAX_EPOCH, cfg.OPTIM.WARMUP_EPOCH = 1, 1  # all warm-up: allowed (short test configs)
    cfg.DATASET.NUM_SHOTS, cfg.SEED = -1, 4294967295
    cfg.DATALOADER.NUM_WORKERS = 0
    check_dassl_cfg(cfg)
    cfg.SEED = -7  # negative: no fixed seed
    check_dassl_cfg(cfg)


def test_irm_heads_must_divide_the_width():
    s = spot()
    s.IRM.HEADS = 7
    check_spotlighter_cfg(s)  # width unknown: not checked yet
    with pytest.raises(ConfigError) as info:
        check_spotlighter_cfg(s, width=512)
    assert str(info.value) == ("TRAINER.SPOTLIGHTER.IRM.HEADS = 7 is invalid: expected a divisor of the CLIP's "
                               "embedding width 512 (each head gets width / HEADS channels).")
    s.IRM.HEADS = 8
    check_spotlighter_cfg(s, width=512)
