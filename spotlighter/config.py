"""Every config key this project adds, with its default, in one place.

:func:`default_cfg` is the complete default config every model is built from (``train.py``, the
trainers, :mod:`spotlighter.factory`, the benchmark, the GPU check and the tests): Dassl's defaults
plus this project's keys. ``extend_cfg`` is the ecosystem's hook that adds them (called on Dassl's
defaults before the yaml files); it only needs yacs. Spotlighter's defaults are the ``paper`` preset;
:data:`PRESETS` lists what the ``release`` preset changes. ``apply_preset`` puts a preset's values in
*before* the yaml files and command-line options are merged (see :func:`trainer_cfg` and
``train.py``), so anything set explicitly still wins.
"""

from __future__ import annotations

import copy
import math
import os
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

from yacs.config import CfgNode as CN

PRECISIONS = ("fp16", "fp32", "amp")
LOCAL_LOGITS = ("cosine", "dot")  # TRAINER.SPOTLIGHTER.LOSS.LOCAL_LOGITS
# MODEL.PRUNE.MODE: how a pruning block reduces its patch tokens. drop / merge: this project's EViT /
# ToMe variants; evit / tome: the authors' own rules (docs/efficiency.md says how they differ).
PRUNE_MODES = ("drop", "merge", "evit", "tome")
MERGING_MODES = ("merge", "tome")  # the modes that merge tokens (sizes, proportional attention)
MERGE_MIN_KEEP = 0.5  # merging pairs each merged token with one kept token: at most half can go per block
# The values Dassl (and spotlighter/schedule.py) accept for its keys; anything else fails deep inside
# the run with a traceback, so check_dassl_cfg refuses it first.
OPTIMIZERS = ("adam", "amsgrad", "sgd", "rmsprop", "radam", "adamw")  # dassl.optim.optimizer.AVAI_OPTIMS
LR_SCHEDULERS = ("cosine", "single_step", "multi_step", "constant")  # spotlighter.schedule.SCHEDULERS
WARMUP_TYPES = ("constant", "linear")
SAMPLERS = ("RandomSampler", "SequentialSampler", "RandomDomainSampler", "SeqDomainSampler", "RandomClassSampler")
FINAL_MODELS = ("last_step", "best_val")
TEST_SPLITS = ("val", "test")
COUNT_ITER = ("train_x", "train_u", "smaller_one")
MAX_SEED = 2**32 - 1  # numpy's seed range (Dassl's set_random_seed seeds numpy)
INTERPOLATIONS = ("bilinear", "bicubic", "nearest")  # dassl.data.transforms.INTERPOLATION_MODES
TRANSFORMS = ("random_flip", "random_resized_crop", "normalize", "instance_norm", "random_crop",
              "random_translation", "center_crop", "cutout", "imagenet_policy", "cifar10_policy", "svhn_policy",
              "randaugment", "randaugment_fixmatch", "randaugment2", "gaussian_noise", "colorjitter",
              "randomgrayscale", "gaussian_blur")  # dassl.data.transforms.transforms.AVAI_CHOICES
CLASS_TOKEN_POSITIONS = ("end", "middle", "front")  # spotlighter.prompt.CLASS_TOKEN_POSITIONS


class ConfigError(ValueError):
    """A config value is invalid; the message names the key, the value and what is expected."""


def _prompt_node(n_ctx: int, ctx_init: str, prec: str) -> CN:
    node = CN()
    node.N_CTX = n_ctx  # learnable context tokens (CoOp/CoCoOp/Spotlighter: CTX_INIT's words win)
    node.CTX_INIT = ctx_init  # words that initialise the context ("" = random init)
    node.PREC = prec  # fp16 | fp32 | amp (fp16 on CPU falls back to fp32 with a warning)
    return node


def _ivlp_node(n_ctx: int) -> CN:
    node = CN()
    node.N_CTX_VISION = n_ctx  # visual prompt tokens per prompted vision block
    node.N_CTX_TEXT = n_ctx  # text context tokens (input and each prompted text block)
    node.CTX_INIT = "a photo of a"  # words that initialise the input context (N_CTX_TEXT <= 4); "" = random
    node.PREC = "fp16"  # fp16 | fp32 | amp (fp16 on CPU falls back to fp32 with a warning)
    node.PROMPT_DEPTH_VISION = 9  # vision blocks with prompts (0 = none; J = input + blocks 1..J-1)
    node.PROMPT_DEPTH_TEXT = 9  # text blocks with prompts (>= 1; 1 = the input context only)
    # Round the prompts to fp16 where they enter the encoders, in every precision, as the original
    # code does (its .half()); False: prompts enter in the encoders' precision (docs/method.md).
    node.ROUND_PROMPTS_FP16 = True
    return node


def extend_cfg(cfg: CN) -> None:
    """Add this project's keys to a Dassl config (or any yacs node with the same top-level nodes)."""
    cfg.DATASET.SUBSAMPLE_CLASSES = "all"  # all | base | new
    # Image paths of split files and few-shot caches must lie inside the dataset folder (after
    # resolving symlinks; a symlinked dataset or image folder is fine). True: allow paths outside it.
    cfg.DATASET.ALLOW_OUTSIDE_PATHS = False
    cfg.MODEL.BACKBONE.PATH = ""  # local CLIP weight file; overrides NAME's download/cache lookup
    # Token dropping in the frozen image encoder, the same for every trainer that supports it
    # (ZeroshotCLIP, CoOp, CoCoOp, Spotlighter; not MaPLe). See docs/efficiency.md.
    cfg.MODEL.PRUNE = CN()
    cfg.MODEL.PRUNE.LAYERS = []  # 0-based vision blocks that drop tokens (between attention and MLP)
    cfg.MODEL.PRUNE.KEEP = 1.0  # fraction of the patch tokens present at each such block that is kept
    # fuse the dropped tokens into one (drop: CLS-attention-weighted mean; evit: EViT's weighted sum)
    cfg.MODEL.PRUNE.FUSE = True
    cfg.MODEL.PRUNE.IN_TRAINING = True  # drop tokens in training forwards too (test always does)
    # drop: keep the CLS-attended patches (EViT); merge: merge similar patches (ToMe, KEEP >= 0.5);
    # evit / tome: EViT's / ToMe's own rules, token order included (docs/efficiency.md)
    cfg.MODEL.PRUNE.MODE = "drop"
    # MODE tome only: tokens merged at each block of LAYERS (ToMe's constant r, at most half of them);
    # 0 = merge n - ceil(KEEP * n) of the n patch tokens present instead
    cfg.MODEL.PRUNE.R = 0
    # Names recorded in result.json; train.py fills them from the --*config-file stems.
    cfg.DATASET.CONFIG_NAME = ""
    cfg.TRAINER.CONFIG_NAME = ""
    # A resumable checkpoint (model.pth.tar-<epoch>, with optimizer, scheduler and RNG states) at the
    # end of every epoch; only the newest such one is kept besides the final model and the
    # TRAIN.CHECKPOINT_FREQ ones. A killed run resumes from it, bit-identical to an uninterrupted run.
    if "TRAIN" not in cfg:  # Dassl's defaults have it; minimal test configs may not
        cfg.TRAIN = CN()
    cfg.TRAIN.RESUMABLE_EVERY_EPOCH = True

    # CoOp's own defaults (KaiyangZhou/CoOp train.py), so the options of CoOp's scripts mean what they
    # say; the shipped yaml files set the 4-token "a photo of a" init where the papers use it.
    cfg.TRAINER.COOP = _prompt_node(16, "", "fp16")
    cfg.TRAINER.COOP.CSC = False  # class-specific context (ignored when CTX_INIT is set, as in CoOp)
    cfg.TRAINER.COOP.CLASS_TOKEN_POSITION = "end"  # end | middle | front

    cfg.TRAINER.COCOOP = _prompt_node(16, "", "fp16")
    cfg.TRAINER.COCOOP.META_NET_REDUCTION = 16  # hidden width of the meta-net = d // this

    # MaPLe's own defaults; N_CTX > 4 (or > the words of CTX_INIT) initialises randomly, as MaPLe does
    cfg.TRAINER.MAPLE = _prompt_node(2, "a photo of a", "fp16")
    cfg.TRAINER.MAPLE.PROMPT_DEPTH = 9  # layers with learnable prompts (1 = shallow only)

    # IVLP and PromptSRC: the original repository's (muzairkhattak/PromptSRC train.py) names and defaults
    cfg.TRAINER.IVLP = _ivlp_node(n_ctx=2)
    cfg.TRAINER.PROMPTSRC = _ivlp_node(n_ctx=4)
    cfg.TRAINER.PROMPTSRC.TEXT_LOSS_WEIGHT = 25  # L1(prompted text, 60-template frozen text)
    cfg.TRAINER.PROMPTSRC.IMAGE_LOSS_WEIGHT = 10  # L1(prompted image, frozen image feature)
    cfg.TRAINER.PROMPTSRC.GPA_MEAN = 15  # Gaussian prompt aggregation: mean epoch (1-based) ...
    cfg.TRAINER.PROMPTSRC.GPA_STD = 1  # ... and its standard deviation in epochs

    # PromptKD: the original repository's (zhengli97/PromptKD train.py) names and defaults, plus where
    # the teacher comes from. The student uses N_CTX_VISION / PROMPT_DEPTH_VISION (it has no text tower).
    kd = cfg.TRAINER.PROMPTKD = _ivlp_node(n_ctx=4)
    kd.KD_WEIGHT = 1.0  # lambda: loss = KD_WEIGHT * T^2 * KL(teacher || student) (its scripts pass 1000)
    kd.TEMPERATURE = 1.0  # T of the softened distributions
    kd.PROJECT_LAYER = 2  # accepted for the original's yaml files; unused (as in the original)
    kd.CE_WEIGHT = 0.0  # accepted for the original's yaml files; unused (the student sees no label)
    kd.TEACHER_NAME = "ViT-L/14"  # the teacher's CLIP (OpenAI name) ...
    kd.TEACHER_PATH = ""  # ... or a local weight file of it ("{root}/..." = under DATASET.ROOT)
    # The teacher's checkpoint: a file, an output folder or its VLPromptLearner folder; "{dataset}" is
    # replaced by DATASET.NAME ("{root}" by DATASET.ROOT), so PromptKD's published teacher_model/<Name>/ fit.
    kd.TEACHER = "teacher_model/{dataset}"
    kd.TEACHER_N_CTX_TEXT = 4  # the teacher's prompt design (the original hard-codes 4+4, depth 9/9)
    kd.TEACHER_N_CTX_VISION = 4
    kd.TEACHER_CTX_INIT = "a photo of a"
    kd.TEACHER_PROMPT_DEPTH_TEXT = 9
    kd.TEACHER_PROMPT_DEPTH_VISION = 9
    cfg.TRAINER.MODAL = "base2novel"  # accepted for PromptKD's scripts; the classes are the run's subset

    # Spotlighter on PromptKD (trainer SpotlighterKD; its PromptKD keys are TRAINER.PROMPTKD's). The
    # defaults are the ``release`` preset: the authors' released tkmc computation; KD_PRESETS lists the
    # others. Loss weights are multiples of TRAINER.PROMPTKD.KD_WEIGHT (lambda).
    k = cfg.TRAINER.SPOTLIGHTERKD = CN()
    k.PRESET = "release"  # release | paper | textrefiner (see docs/method.md)
    # every attention through nn.MultiheadAttention's explicit-weights path, as the released code's CLIP
    # (bit-exact with it; the fused path differs by ~1e-7 per block)
    k.EXPLICIT_ATTENTION = True
    k.TOP_K = 5  # selected patches per image
    k.LEVEL_SIZES = [2, 3]  # ranks of Level-1, Level-2 (adding up to TOP_K); [] = no levels (TextRefiner)
    k.SCORE = CN()  # selection score = sum of weight * standardised term (attention alone: the raw CLS attention)
    k.SCORE.SAMPLE_WEIGHT = 0.0  # sample-wise term, with the teacher's soft labels
    k.SCORE.SEMANTIC_WEIGHT = 0.0  # semantic-wise term (needs MEMORY.KIND class)
    k.SCORE.ATTN_WEIGHT = 1.0  # last block's CLS->patch attention
    k.SCORE.EPS = 1e-6
    k.MEMORY = CN()
    k.MEMORY.KIND = "shared"  # shared (slots for all classes) | class (prototypes per class)
    k.MEMORY.SLOTS = 25  # KIND shared
    k.MEMORY.PROTOTYPES_PER_CLASS = 4  # KIND class
    k.MEMORY.MOMENTUM = 0.8  # EMA keep-rate
    k.MEMORY.READ_TEMPERATURE = 1.0  # softmax temperature of the reads (1 = none, as released)
    k.MEMORY.WRITE = "all"  # all (every mapped token, as released) | selected
    k.MEMORY.INIT_SEED = 0  # seed of the shared memory's random init
    k.TRM = CN()
    k.TRM.ALPHA = 0.2  # t' = t + ALPHA * W[t ; read(t)]
    k.IRM = CN()
    k.IRM.KIND = "single_key"  # single_key (as released) | tokens (over class prototypes) | none
    k.IRM.HEADS = 8
    k.IRM.DROPOUT = 0.1
    k.FUSION = CN()
    k.FUSION.BETA = 0.05  # f = (1 - BETA) * v + BETA * IRM(v), in training and at test
    k.FUSION.NORMALIZE = False  # fuse normalize(IRM(v)) instead of the raw output
    k.LOSS = CN()  # each a multiple of KD_WEIGHT
    k.LOSS.SEM_WEIGHT = 0.01  # KL of the all-set tokens
    k.LOSS.LEVEL_WEIGHT = 0.001  # KL of each level's tokens
    k.LOSS.MEM_WEIGHT = 0.02  # L1(normalize(t'), t)
    k.LOSS.IMG_WEIGHT = 0.01  # L1(normalize(IRM(v)), v)
    k.LOSS.LEVEL_WEIGHTS = "fixed"  # fixed | dynamic (softmax of the sets' mean selection scores, per image)

    cfg.TRAINER.ZSCLIP = CN()
    cfg.TRAINER.ZSCLIP.PREC = "fp16"
    cfg.TRAINER.ZSCLIP.TEMPLATE = ""  # "" = the dataset's CoOp template; else e.g. "a photo of a {}."

    s = cfg.TRAINER.SPOTLIGHTER = _prompt_node(4, "a photo of a", "fp16")
    s.PRESET = "paper"  # paper | release (see docs/method.md)
    s.CLASS_TOKEN_POSITION = "end"
    s.CSC = False

    s.SCORE = CN()  # token score = sum of weight * standardised term (spec section 4)
    s.SCORE.SAMPLE_WEIGHT = 1.0  # sample-wise term a_n
    s.SCORE.SEMANTIC_WEIGHT = 1.0  # semantic-wise term b_n (needs the class memory)
    s.SCORE.ATTN_WEIGHT = 0.0  # last block's CLS->patch attention A
    s.SCORE.EPS = 1e-6  # standardisation epsilon

    s.TOP_K = 5  # patches kept per image
    s.LEVEL_SIZES = [3, 2]  # Level-1, Level-2 sizes; must add up to TOP_K

    s.MAPPER = CN()  # token mapping g: 1x1-conv MLP d -> hidden -> d with BatchNorm
    s.MAPPER.HIDDEN = 0  # 0 = embedding width d
    s.MAPPER.AT_TEST = True  # use g at test time (release: training only)

    s.MEMORY = CN()
    s.MEMORY.KIND = "class"  # class (m prototypes per class) | shared (slots shared by all classes)
    s.MEMORY.PROTOTYPES_PER_CLASS = 4  # m, used when KIND = class
    s.MEMORY.SHARED_SLOTS = 25  # used when KIND = shared
    s.MEMORY.MOMENTUM = 0.8  # EMA keep-rate mu
    s.MEMORY.READ_TEMPERATURE = 0.1  # softmax temperature of memory reads (cosine similarities)
    s.MEMORY.WRITE = "selected"  # selected (top-k raw tokens, own class) | all_mapped (B x N mapped)
    s.MEMORY.INIT_SEED = 0  # seed of the random init of a shared memory

    s.TRM = CN()  # text refinement: t' = t + ALPHA * W[t ; read(t)]
    s.TRM.ALPHA = 0.2

    s.IRM = CN()  # image refinement
    s.IRM.KIND = "tokens"  # tokens: selected tokens attend over prototypes | global: v attends its read
    s.IRM.HEADS = 8
    s.IRM.DROPOUT = 0.0  # attention dropout

    s.FUSION = CN()  # v' = (1 - beta) * v + beta * o
    s.FUSION.BETA_TRAIN = 0.1
    s.FUSION.BETA_TEST = 0.1
    s.FUSION.NORMALIZE = True  # fuse normalize(o) with the unit-norm v (release: raw o, as released)

    s.LOSS = CN()
    s.LOSS.LEVEL_WEIGHTS = "dynamic"  # dynamic (softmax of level mean scores) | fixed (1 each)
    s.LOSS.LOCAL_WEIGHT = 1.0  # multiplies the (level-weighted) local CE
    s.LOSS.CONSISTENCY_WEIGHT = 20.0  # L1 consistency of refined text / image features
    s.LOSS.LOCAL_TEXT = "refined"  # refined (TRM output) | prompt (prompt-learner output)
    # Local logits of a token u: cosine = s * cos(u, t) | dot = s * u . t (u unnormalised, as released)
    s.LOSS.LOCAL_LOGITS = "cosine"

    s.TEST = CN()
    s.TEST.LOCAL_GAMMA = 0.5  # test logits = global + gamma * level-weighted local (0 = global only)


#: The keys of Dassl's defaults (``dassl/config/defaults.py``) that building a model and preparing its
#: images read, with Dassl's values. :func:`default_cfg` starts from Dassl's own defaults; only where
#: Dassl is not installed (the plain-torch API) does it start from these (a test compares them).
DASSL_MODEL_DEFAULTS: Dict[str, Any] = {
    "OUTPUT_DIR": "./output", "SEED": -1, "USE_CUDA": True,
    "INPUT.SIZE": (224, 224), "INPUT.INTERPOLATION": "bilinear",
    "INPUT.PIXEL_MEAN": [0.485, 0.456, 0.406], "INPUT.PIXEL_STD": [0.229, 0.224, 0.225],
    "DATASET.ROOT": "", "DATASET.NAME": "", "MODEL.BACKBONE.NAME": "", "TRAINER.NAME": "",
    "OPTIM.MAX_EPOCH": 10,
}


def _without_dassl() -> CN:
    """:data:`DASSL_MODEL_DEFAULTS` as a config whose Dassl nodes accept any other key (a yaml file or a
    saved run config names Dassl's data-loading and optimiser keys, which the model does not read)."""
    cfg = CN(new_allowed=True)
    cfg.TRAIN = CN(new_allowed=True)  # extend_cfg adds a key to it
    for dotted, value in DASSL_MODEL_DEFAULTS.items():
        *parents, leaf = dotted.split(".")
        node = cfg
        for part in parents:
            if part not in node:
                node[part] = CN(new_allowed=True)
            node = node[part]
        node[leaf] = copy.deepcopy(value)
    return cfg


def dassl_available() -> bool:
    try:
        import dassl.config  # noqa: F401  (yacs only: dassl/config imports no other part of Dassl)
    except ImportError:
        return False
    return True


def default_cfg() -> CN:
    """The complete default config: Dassl's ``get_cfg_default()`` plus this project's keys
    (:func:`extend_cfg`; Spotlighter's ``paper`` preset). Without Dassl installed, the Dassl part is
    :data:`DASSL_MODEL_DEFAULTS` (enough to build every model)."""
    if dassl_available():
        from dassl.config import get_cfg_default

        cfg = get_cfg_default()
    else:
        cfg = _without_dassl()
    extend_cfg(cfg)
    return cfg


#: What :func:`merge_cfg` accepts as a change of the defaults.
CfgChanges = Union[None, str, CN, Mapping[str, Any], Sequence[Any]]


def merge_cfg(cfg: CN, changes: CfgChanges, what: str = "cfg") -> None:
    """Merge ``changes`` into ``cfg``: a yaml file's path, a (partial) config node, a mapping of dotted
    keys to values (``{"TRAINER.COOP.N_CTX": 16}``) or a ``[KEY, VALUE, ...]`` list. An unknown key or
    a value of the wrong type is a :class:`ConfigError` that names it."""
    if changes is None:
        return
    try:
        if isinstance(changes, (str, os.PathLike)):
            path = os.fspath(changes)
            if not os.path.isfile(path):
                raise ConfigError(f"{what}: the config file {path} does not exist.")
            cfg.merge_from_file(path)
        elif isinstance(changes, CN):
            cfg.merge_from_other_cfg(changes)
        elif isinstance(changes, Mapping):
            cfg.merge_from_list([x for kv in changes.items() for x in kv])
        elif isinstance(changes, Sequence):
            if len(changes) % 2:
                raise ConfigError(f"{what}: expected KEY VALUE pairs, got an odd number of items: {list(changes)}")
            cfg.merge_from_list(list(changes))
        else:
            raise ConfigError(f"{what}: expected a yaml file, a CfgNode, a dict of dotted keys or a "
                              f"[KEY, VALUE, ...] list, got {type(changes).__name__}.")
    except (KeyError, ValueError, AssertionError) as exc:
        if isinstance(exc, ConfigError):
            raise
        message = exc.args[0] if exc.args else exc
        raise ConfigError(f"{what}: {message} (the keys are Dassl's and those of spotlighter/config.py)") from None


def trainer_cfg(trainer: str, changes: CfgChanges = None, config: Optional[str] = None,
                defaults: Optional[Mapping[str, Any]] = None) -> CN:
    """The default config of a registered trainer (:mod:`spotlighter.registry` name or alias) with
    ``defaults`` (dotted key -> value), then ``config`` (a yaml file, or the name of one under
    configs/trainers/<trainer>/ of the checkout), then ``changes`` merged (:func:`merge_cfg`); a
    preset (Spotlighter's, SpotlighterKD's) named by any of them is put in underneath them all, as
    ``train.py`` does."""
    from .registry import trainer as lookup

    spec = lookup(trainer)
    if config and not os.path.isfile(config) and not config.endswith(".yaml"):
        config = os.path.join(REPO, spec.config_file(config))

    def build(presets: Dict[str, str]) -> CN:
        cfg = default_cfg()
        cfg.TRAINER.NAME = spec.name
        for node, preset in presets.items():
            apply_preset(cfg, preset, node)
        merge_cfg(cfg, dict(defaults or {}), "defaults")
        merge_cfg(cfg, config, "config")
        merge_cfg(cfg, changes)
        return cfg

    cfg = build({})
    presets = chosen_presets(cfg)
    return build(presets) if presets else cfg


def chosen_presets(cfg: CN) -> Dict[str, str]:
    """{node: preset} of the preset nodes whose PRESET in ``cfg`` is not their default."""
    return {node: cfg.TRAINER[node].PRESET for node, (_, default) in PRESET_NODES.items()
            if cfg.TRAINER[node].PRESET != default}


#: The checkout's root (configs/ lives there).
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


#: The shipped token-reduction setting for ViT-B/16, per Spotlighter preset
#: (configs/trainers/Spotlighter/vit_b16_ep20_<preset>_prune.yaml hold these values, checked by a test;
#: docs/efficiency.md has the trade-off each was chosen from: the fastest within 1 HM on MiniBench with
#: the shipped reference CLIP).
RECOMMENDED_PRUNE: Dict[str, Dict[str, Any]] = {
    "paper": {"LAYERS": [0, 3, 6], "KEEP": 0.7, "FUSE": True, "MODE": "merge"},
    "release": {"LAYERS": [0, 3, 6], "KEEP": 0.7, "FUSE": True, "MODE": "merge"},
}

#: What each preset changes relative to the defaults above (the ``paper`` preset).
PRESETS: Dict[str, Dict[str, Any]] = {
    "paper": {},
    "release": {
        "SCORE.SAMPLE_WEIGHT": 0.0,
        "SCORE.SEMANTIC_WEIGHT": 0.0,
        "SCORE.ATTN_WEIGHT": 1.0,
        "LEVEL_SIZES": [2, 3],
        "MAPPER.AT_TEST": False,
        "MEMORY.KIND": "shared",
        "MEMORY.WRITE": "all_mapped",
        "MEMORY.READ_TEMPERATURE": 1.0,
        "IRM.KIND": "global",
        "IRM.DROPOUT": 0.1,
        "FUSION.BETA_TRAIN": 0.05,
        "FUSION.BETA_TEST": 0.1,
        "FUSION.NORMALIZE": False,
        "LOSS.LEVEL_WEIGHTS": "fixed",
        "LOSS.LOCAL_WEIGHT": 0.02,
        "LOSS.LOCAL_TEXT": "prompt",
        "LOSS.LOCAL_LOGITS": "dot",
        "TEST.LOCAL_GAMMA": 0.0,
    },
}


#: What each SpotlighterKD preset changes relative to its defaults (the ``release`` preset).
KD_PRESETS: Dict[str, Dict[str, Any]] = {
    "release": {},
    "textrefiner": {  # PromptKD w/ TextRefiner: memory, TRM and the token set; no levels, IRM or fusion
        "LEVEL_SIZES": [],
        "IRM.KIND": "none",
        "FUSION.BETA": 0.0,
        "LOSS.LEVEL_WEIGHT": 0.0,
        "LOSS.IMG_WEIGHT": 0.0,
    },
    "paper": {  # the paper's choices of the CoOp variant where they fit a label-free student
        "EXPLICIT_ATTENTION": False,
        "LEVEL_SIZES": [3, 2],
        "SCORE.SAMPLE_WEIGHT": 1.0,
        "SCORE.SEMANTIC_WEIGHT": 1.0,
        "SCORE.ATTN_WEIGHT": 0.0,
        "MEMORY.KIND": "class",
        "MEMORY.WRITE": "selected",
        "MEMORY.READ_TEMPERATURE": 0.1,
        "IRM.KIND": "tokens",
        "IRM.DROPOUT": 0.0,
        "FUSION.BETA": 0.1,
        "FUSION.NORMALIZE": True,
        "LOSS.LEVEL_WEIGHTS": "dynamic",
    },
}
#: Each preset-carrying node: its presets and the default one (the values extend_cfg writes).
PRESET_NODES: Dict[str, Tuple[Dict[str, Dict[str, Any]], str]] = {
    "SPOTLIGHTER": (PRESETS, "paper"),
    "SPOTLIGHTERKD": (KD_PRESETS, "release"),
}


def apply_preset(cfg: CN, preset: str, node_name: str = "SPOTLIGHTER") -> None:
    """Write ``preset``'s values into ``cfg.TRAINER.<node_name>`` (call before merging files)."""
    table = PRESET_NODES[node_name][0]
    if preset not in table:
        raise ConfigError(
            f"TRAINER.{node_name}.PRESET = {preset!r} is unknown; expected one of {sorted(table)}."
        )
    node = cfg.TRAINER[node_name]
    node.PRESET = preset
    for dotted, value in table[preset].items():
        *parents, leaf = dotted.split(".")
        target = node
        for part in parents:
            target = target[part]
        target[leaf] = copy.deepcopy(value)  # never share the preset table's lists with a cfg


def _expect(cond: bool, key: str, value: Any, expected: str) -> None:
    if not cond:
        raise ConfigError(f"{key} = {value!r} is invalid: expected {expected}.")


def _one_of(key: str, value: Any, options) -> None:
    _expect(value in options, key, value, f"one of {list(options)}")


def check_precision(key: str, value: str) -> None:
    _one_of(key, value, PRECISIONS)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def check_dassl_cfg(cfg: CN) -> None:
    """Validate the Dassl keys a run reads (optimiser, schedule, data loading, seed, test), so that a
    bad value is one :class:`ConfigError` line before any data or model is loaded."""
    o = cfg.OPTIM
    _one_of("OPTIM.NAME", o.NAME, OPTIMIZERS)
    _expect(_is_number(o.LR) and o.LR > 0, "OPTIM.LR", o.LR, "a finite number > 0")
    _expect(_is_int(o.MAX_EPOCH) and o.MAX_EPOCH >= 1, "OPTIM.MAX_EPOCH", o.MAX_EPOCH, "an integer >= 1")
    _expect(_is_number(o.WEIGHT_DECAY) and o.WEIGHT_DECAY >= 0, "OPTIM.WEIGHT_DECAY", o.WEIGHT_DECAY,
            "a finite number >= 0")
    _expect(_is_number(o.MOMENTUM) and 0 <= o.MOMENTUM < 1, "OPTIM.MOMENTUM", o.MOMENTUM, "a number in [0, 1)")
    _one_of("OPTIM.LR_SCHEDULER", o.LR_SCHEDULER, LR_SCHEDULERS)
    _expect(_is_number(o.GAMMA) and o.GAMMA > 0, "OPTIM.GAMMA", o.GAMMA, "a finite number > 0")
    steps = list(o.STEPSIZE) if isinstance(o.STEPSIZE, (list, tuple)) else [o.STEPSIZE]
    if o.LR_SCHEDULER == "multi_step":
        _expect(bool(steps) and all(_is_int(v) and v >= 1 for v in steps), "OPTIM.STEPSIZE", o.STEPSIZE,
                "epochs >= 1 with OPTIM.LR_SCHEDULER multi_step")
    elif o.LR_SCHEDULER == "single_step":
        _expect(bool(steps) and _is_int(steps[-1]), "OPTIM.STEPSIZE", o.STEPSIZE,
                "an epoch count with OPTIM.LR_SCHEDULER single_step (<= 0: OPTIM.MAX_EPOCH)")
    _expect(_is_int(o.WARMUP_EPOCH), "OPTIM.WARMUP_EPOCH", o.WARMUP_EPOCH, "an integer (<= 0: no warm-up)")
    _expect(o.WARMUP_EPOCH <= o.MAX_EPOCH, "OPTIM.WARMUP_EPOCH", o.WARMUP_EPOCH,
            f"at most OPTIM.MAX_EPOCH = {o.MAX_EPOCH} (the warm-up epochs are part of the training epochs)")
    if o.WARMUP_EPOCH > 0:
        _one_of("OPTIM.WARMUP_TYPE", o.WARMUP_TYPE, WARMUP_TYPES)
        for name in ("WARMUP_CONS_LR", "WARMUP_MIN_LR"):
            _expect(_is_number(o[name]) and o[name] > 0, "OPTIM." + name, o[name], "a finite number > 0")

    d = cfg.DATALOADER
    for loader in ("TRAIN_X", "TEST"):
        node = d[loader]
        _expect(_is_int(node.BATCH_SIZE) and node.BATCH_SIZE >= 1, f"DATALOADER.{loader}.BATCH_SIZE",
                node.BATCH_SIZE, "an integer >= 1")
        _one_of(f"DATALOADER.{loader}.SAMPLER", node.SAMPLER, SAMPLERS)
    _expect(_is_int(d.NUM_WORKERS) and d.NUM_WORKERS >= 0, "DATALOADER.NUM_WORKERS", d.NUM_WORKERS,
            "an integer >= 0 (0 = load in the main process)")

    t = cfg.TRAIN
    _expect(_is_int(t.PRINT_FREQ) and t.PRINT_FREQ >= 1, "TRAIN.PRINT_FREQ", t.PRINT_FREQ,
            "an integer >= 1 (log every that many batches)")
    _expect(_is_int(t.CHECKPOINT_FREQ) and t.CHECKPOINT_FREQ >= 0, "TRAIN.CHECKPOINT_FREQ", t.CHECKPOINT_FREQ,
            "an integer >= 0 (0 = only the final and the resumable checkpoints)")
    _one_of("TRAIN.COUNT_ITER", t.COUNT_ITER, COUNT_ITER)

    _one_of("TEST.FINAL_MODEL", cfg.TEST.FINAL_MODEL, FINAL_MODELS)
    _one_of("TEST.SPLIT", cfg.TEST.SPLIT, TEST_SPLITS)

    ds = cfg.DATASET
    _expect(_is_int(ds.NUM_SHOTS) and (ds.NUM_SHOTS >= 1 or ds.NUM_SHOTS == -1), "DATASET.NUM_SHOTS",
            ds.NUM_SHOTS, "an integer >= 1 (images per class), or -1 for every image")
    if "SUBSAMPLE_CLASSES" in ds:
        _one_of("DATASET.SUBSAMPLE_CLASSES", ds.SUBSAMPLE_CLASSES, ("all", "base", "new"))
    if "ALLOW_OUTSIDE_PATHS" in ds:
        _expect(isinstance(ds.ALLOW_OUTSIDE_PATHS, bool), "DATASET.ALLOW_OUTSIDE_PATHS",
                ds.ALLOW_OUTSIDE_PATHS, "True or False")

    _expect(_is_int(cfg.SEED) and cfg.SEED <= MAX_SEED, "SEED (--seed)", cfg.SEED,
            f"an integer in [0, {MAX_SEED}], or negative for no fixed seed")

    _one_of("INPUT.INTERPOLATION", cfg.INPUT.INTERPOLATION, INTERPOLATIONS)
    unknown = [t for t in cfg.INPUT.TRANSFORMS if t not in TRANSFORMS]
    _expect(not unknown, "INPUT.TRANSFORMS", list(cfg.INPUT.TRANSFORMS), f"names from {list(TRANSFORMS)}")
    check_prompt_nodes(cfg.TRAINER)


def check_prompt_nodes(trainer: CN) -> None:
    """The context keys of the prompt trainers' nodes (those present in ``trainer``)."""
    for name in ("COOP", "COCOOP", "MAPLE", "SPOTLIGHTER"):
        if name not in trainer:
            continue
        node, p = trainer[name], f"TRAINER.{name}."
        if not node.CTX_INIT:
            _expect(_is_int(node.N_CTX) and node.N_CTX >= 1, p + "N_CTX", node.N_CTX,
                    "an integer >= 1 (learnable context tokens) when CTX_INIT is empty")
        if "CLASS_TOKEN_POSITION" in node:
            _one_of(p + "CLASS_TOKEN_POSITION", node.CLASS_TOKEN_POSITION, CLASS_TOKEN_POSITIONS)
    if "COCOOP" in trainer:
        r = trainer.COCOOP.META_NET_REDUCTION
        _expect(_is_int(r) and r >= 1, "TRAINER.COCOOP.META_NET_REDUCTION", r, "an integer >= 1")
    if "MAPLE" in trainer:
        d = trainer.MAPLE.PROMPT_DEPTH
        _expect(_is_int(d) and d >= 1, "TRAINER.MAPLE.PROMPT_DEPTH", d, "an integer >= 1 (1 = the input only)")
    for name in ("IVLP", "PROMPTSRC", "PROMPTKD"):  # IVLP's prompt design (depths are checked against the CLIP)
        if name not in trainer:
            continue
        node, p = trainer[name], f"TRAINER.{name}."
        keys = ("", "TEACHER_") if name == "PROMPTKD" else ("",)
        for pre in keys:
            for key in ("N_CTX_TEXT", "N_CTX_VISION"):
                v = node[pre + key]
                _expect(_is_int(v) and v >= 1, p + pre + key, v, "an integer >= 1 (prompt tokens)")
            for key, low in (("PROMPT_DEPTH_TEXT", 1), ("PROMPT_DEPTH_VISION", 0)):
                v = node[pre + key]
                _expect(_is_int(v) and v >= low, p + pre + key, v, f"an integer >= {low}")
    if "PROMPTSRC" in trainer:
        node, p = trainer.PROMPTSRC, "TRAINER.PROMPTSRC."
        for key in ("TEXT_LOSS_WEIGHT", "IMAGE_LOSS_WEIGHT"):
            _expect(isinstance(node[key], (int, float)) and node[key] >= 0 and math.isfinite(node[key]), p + key,
                    node[key], "a finite number >= 0")
        _expect(isinstance(node.GPA_STD, (int, float)) and node.GPA_STD > 0, p + "GPA_STD", node.GPA_STD,
                "a number > 0 (epochs)")
    if "PROMPTKD" in trainer:
        node, p = trainer.PROMPTKD, "TRAINER.PROMPTKD."
        _expect(isinstance(node.KD_WEIGHT, (int, float)) and node.KD_WEIGHT > 0 and math.isfinite(node.KD_WEIGHT),
                p + "KD_WEIGHT", node.KD_WEIGHT, "a finite number > 0")
        _expect(isinstance(node.TEMPERATURE, (int, float)) and node.TEMPERATURE > 0, p + "TEMPERATURE",
                node.TEMPERATURE, "a number > 0")


def check_prune_cfg(node: CN) -> None:
    """Validate ``cfg.MODEL.PRUNE`` (block indices are checked against the CLIP when it is built)."""
    p = "MODEL.PRUNE."
    layers = list(node.LAYERS)
    _expect(all(isinstance(i, int) and i >= 0 for i in layers) and layers == sorted(set(layers)),
            p + "LAYERS", layers, "a list of increasing 0-based block indices (e.g. [3, 6]; [] = no dropping)")
    keep = node.KEEP
    _expect(isinstance(keep, (int, float)) and 0 < keep <= 1, p + "KEEP", keep,
            "a fraction in (0, 1] of the patch tokens kept at each block of LAYERS")
    for name in ("FUSE", "IN_TRAINING"):
        _expect(isinstance(node[name], bool), p + name, node[name], "True or False")
    mode = node.get("MODE", "drop")
    _one_of(p + "MODE", mode, PRUNE_MODES)
    r = node.get("R", 0)
    _expect(isinstance(r, int) and not isinstance(r, bool) and r >= 0, p + "R", r,
            "an integer >= 0 (tokens merged per block with MODEL.PRUNE.MODE tome; 0 = use KEEP)")
    if r > 0:
        _expect(mode == "tome", p + "R", r,
                f"0 with MODEL.PRUNE.MODE {mode} (a constant number of tokens per block is ToMe's rule: "
                "set MODEL.PRUNE.MODE tome, or R 0 and a KEEP fraction)")
    if mode in MERGING_MODES and layers and r == 0:
        _expect(keep >= MERGE_MIN_KEEP, p + "KEEP", keep,
                f"a fraction in [{MERGE_MIN_KEEP}, 1] with MODEL.PRUNE.MODE {mode} "
                "(each block merges at most half of its tokens)")


def check_spotlighter_cfg(node: CN, num_patches: int | None = None, width: int | None = None) -> None:
    """Validate ``cfg.TRAINER.SPOTLIGHTER``; ``num_patches`` (when known) bounds TOP_K, ``width``
    (the CLIP's embedding width, when known) must be a multiple of IRM.HEADS."""
    p = "TRAINER.SPOTLIGHTER."
    _one_of(p + "PRESET", node.PRESET, PRESETS)
    check_precision(p + "PREC", node.PREC)
    k = node.TOP_K
    _expect(isinstance(k, int) and k >= 1, p + "TOP_K", k, "an integer >= 1")
    if num_patches is not None:
        _expect(k <= num_patches, p + "TOP_K", k, f"at most the number of patches ({num_patches})")
    sizes: List[int] = list(node.LEVEL_SIZES)
    _expect(len(sizes) == 2 and all(isinstance(v, int) and v >= 1 for v in sizes),
            p + "LEVEL_SIZES", sizes, "two integers >= 1 (Level-1, Level-2)")
    _expect(sum(sizes) == k, p + "LEVEL_SIZES", sizes, f"sizes that add up to TOP_K = {k}")
    for name in ("SAMPLE_WEIGHT", "SEMANTIC_WEIGHT", "ATTN_WEIGHT"):
        v = node.SCORE[name]
        _expect(isinstance(v, (int, float)) and v >= 0, p + "SCORE." + name, v, "a number >= 0")
    _expect(node.SCORE.SAMPLE_WEIGHT + node.SCORE.SEMANTIC_WEIGHT + node.SCORE.ATTN_WEIGHT > 0,
            p + "SCORE", dict(node.SCORE), "at least one positive score weight")
    m = node.MEMORY
    _one_of(p + "MEMORY.KIND", m.KIND, ("class", "shared"))
    _one_of(p + "MEMORY.WRITE", m.WRITE, ("selected", "all_mapped"))
    size_key = "PROTOTYPES_PER_CLASS" if m.KIND == "class" else "SHARED_SLOTS"
    _expect(isinstance(m[size_key], int) and m[size_key] >= 1, p + "MEMORY." + size_key,
            m[size_key], "an integer >= 1 (the memory cannot be empty)")
    _expect(0.0 <= m.MOMENTUM < 1.0, p + "MEMORY.MOMENTUM", m.MOMENTUM, "a number in [0, 1)")
    _expect(m.READ_TEMPERATURE > 0, p + "MEMORY.READ_TEMPERATURE", m.READ_TEMPERATURE, "a number > 0")
    if node.SCORE.SEMANTIC_WEIGHT > 0:
        _expect(m.KIND == "class", p + "SCORE.SEMANTIC_WEIGHT", node.SCORE.SEMANTIC_WEIGHT,
                "0 unless MEMORY.KIND = class (the semantic score reads class prototypes)")
    _one_of(p + "IRM.KIND", node.IRM.KIND, ("tokens", "global"))
    _expect(isinstance(node.IRM.HEADS, int) and node.IRM.HEADS >= 1, p + "IRM.HEADS",
            node.IRM.HEADS, "an integer >= 1")
    if width is not None:
        _expect(width % node.IRM.HEADS == 0, p + "IRM.HEADS", node.IRM.HEADS,
                f"a divisor of the CLIP's embedding width {width} (each head gets width / HEADS channels)")
    _expect(0.0 <= node.IRM.DROPOUT < 1.0, p + "IRM.DROPOUT", node.IRM.DROPOUT, "a number in [0, 1)")
    for name in ("BETA_TRAIN", "BETA_TEST"):
        v = node.FUSION[name]
        _expect(0.0 <= v <= 1.0, p + "FUSION." + name, v, "a number in [0, 1]")
    _one_of(p + "LOSS.LEVEL_WEIGHTS", node.LOSS.LEVEL_WEIGHTS, ("dynamic", "fixed"))
    _one_of(p + "LOSS.LOCAL_TEXT", node.LOSS.LOCAL_TEXT, ("refined", "prompt"))
    _one_of(p + "LOSS.LOCAL_LOGITS", node.LOSS.LOCAL_LOGITS, LOCAL_LOGITS)
    for name in ("LOCAL_WEIGHT", "CONSISTENCY_WEIGHT"):
        v = node.LOSS[name]
        _expect(isinstance(v, (int, float)) and v >= 0 and math.isfinite(v), p + "LOSS." + name, v,
                "a finite number >= 0")
    _expect(node.TEST.LOCAL_GAMMA >= 0, p + "TEST.LOCAL_GAMMA", node.TEST.LOCAL_GAMMA, "a number >= 0")
    _expect(node.MAPPER.HIDDEN >= 0, p + "MAPPER.HIDDEN", node.MAPPER.HIDDEN, "0 (= d) or a width >= 1")
    _expect(node.TRM.ALPHA >= 0, p + "TRM.ALPHA", node.TRM.ALPHA, "a number >= 0")
