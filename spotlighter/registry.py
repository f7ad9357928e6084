"""The one registry of datasets, trainers and protocols.

Everything that needs to know them reads it from here: the protocol runner (``spotlighter.run``)
and the scripts on top of it, the results tool (``spotlighter.results.constants``), ``train.py``
and ``scripts/check_data.py``. Where each dataset lives under ``$DATA`` and its DATASETS.md section
stay in the per-dataset file-layout table :mod:`spotlighter.data_layout` (``LAYOUTS``), which this
module reads (neither needs Dassl nor torch; plain Python).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

from .data_layout import LAYOUTS

# ------------------------------------------------------------------------------------------------
# protocols
# ------------------------------------------------------------------------------------------------
#: Base-to-novel datasets, in the order of the published tables (CoOp, CoCoOp, MaPLe, Spotlighter).
BASE2NEW_DATASETS: Tuple[str, ...] = (
    "imagenet", "caltech101", "oxford_pets", "stanford_cars", "oxford_flowers", "food101",
    "fgvc_aircraft", "sun397", "dtd", "eurosat", "ucf101",
)
#: The built-in mini-benchmark (generated on first use; runs on a CPU in minutes).
MINIBENCH = "minibench"
#: Datasets the base-to-novel runner accepts: the published ones and the mini-benchmark.
BASE2NEW_RUNNABLE: Tuple[str, ...] = BASE2NEW_DATASETS + (MINIBENCH,)
#: The base-to-novel suites whose average the results tool prints (each dataset's rows, then the average
#: over the suite's datasets found): the published eleven, and MiniBench's one dataset.
BASE2NEW_SUITES: Tuple[Tuple[str, ...], ...] = (BASE2NEW_DATASETS, (MINIBENCH,))

#: Cross-dataset transfer: a source trained on all its classes -> the targets it is evaluated on.
XD_TARGETS: Dict[str, Tuple[str, ...]] = {
    "imagenet": tuple(d for d in BASE2NEW_DATASETS if d != "imagenet"),
    "minibench": ("minibench_glyphs", "minibench_textures", "minibench_objects"),
}

#: Domain generalisation: a source -> its shifted-domain, test-only variants.
DG_TARGETS: Dict[str, Tuple[str, ...]] = {
    "imagenet": ("imagenetv2", "imagenet_sketch", "imagenet_a", "imagenet_r"),
    "minibench": ("minibench_sketch", "minibench_noise", "minibench_palette"),
}
#: The source of the published cross-dataset and DG tables.
DEFAULT_SOURCE = "imagenet"

#: CoOp's few-shot protocol: shot counts trained per dataset (all classes), and the datasets it runs on.
FEWSHOT_SHOTS: Tuple[int, ...] = (1, 2, 4, 8, 16)
FEWSHOT_RUNNABLE: Tuple[str, ...] = BASE2NEW_RUNNABLE


@dataclass(frozen=True)
class Protocol:
    name: str  # CLI name: python -m spotlighter.run <name> ...
    title: str
    script: str  # scripts/<script>


PROTOCOLS: Dict[str, Protocol] = {
    p.name: p for p in (
        Protocol("base2new", "Base-to-novel generalisation", "base2new.sh"),
        Protocol("xd", "Cross-dataset transfer", "xd.sh"),
        Protocol("dg", "Domain generalisation", "dg.sh"),
        Protocol("fewshot", "Few-shot learning (CoOp's protocol)", "fewshot.sh"),
    )
}


class RegistryError(KeyError):
    """An unknown source, dataset, trainer or protocol; the message lists the known ones."""

    def __str__(self) -> str:
        return str(self.args[0])


def _targets(table: Dict[str, Tuple[str, ...]], protocol: str, source: str) -> Tuple[str, ...]:
    if source not in table:
        raise RegistryError(f"{source!r} is not a {protocol} source; known sources: {', '.join(table)}")
    return table[source]


def xd_targets(source: str) -> Tuple[str, ...]:
    return _targets(XD_TARGETS, "cross-dataset", source)


def dg_targets(source: str) -> Tuple[str, ...]:
    return _targets(DG_TARGETS, "domain-generalisation", source)


def protocol(name: str) -> Protocol:
    if name not in PROTOCOLS:
        raise RegistryError(f"unknown protocol {name!r}; known protocols: {', '.join(PROTOCOLS)}")
    return PROTOCOLS[name]


# ------------------------------------------------------------------------------------------------
# datasets
# ------------------------------------------------------------------------------------------------
ROLE_BASE_NEW = "base+new"  # base2new: trained on the base classes, evaluated on the new ones
ROLE_SOURCE = "source"
ROLE_TARGET = "target"
ROLE_ALL_CLASSES = "all classes"  # fewshot: trained and evaluated on every class


def dataset_names() -> Tuple[str, ...]:
    """Every dataset a protocol uses, then any other dataset of LAYOUTS, without repeats."""
    names = list(BASE2NEW_RUNNABLE)
    for table in (XD_TARGETS, DG_TARGETS):
        for source, targets in table.items():
            names += [source, *targets]
    names += list(LAYOUTS)
    return tuple(dict.fromkeys(names))


def dataset_roles(name: str) -> Tuple[Tuple[str, str], ...]:
    """``((protocol, role), ...)`` of a dataset, e.g. dtd: base2new base+new, xd target."""
    roles = []
    if name in BASE2NEW_RUNNABLE:
        roles.append(("base2new", ROLE_BASE_NEW))
    if name in FEWSHOT_RUNNABLE:
        roles.append(("fewshot", ROLE_ALL_CLASSES))
    for proto, table in (("xd", XD_TARGETS), ("dg", DG_TARGETS)):
        if name in table:
            roles.append((proto, ROLE_SOURCE))
        if any(name in t for t in table.values()):
            roles.append((proto, ROLE_TARGET))
    return tuple(roles)


@dataclass(frozen=True)
class Dataset:
    name: str  # config name: configs/datasets/<name>.yaml
    folder: Optional[str]  # folder under $DATA (None: not in data_layout.LAYOUTS)
    section: Optional[str]  # DATASETS.md section
    generated: bool  # made on first use (MiniBench), so never "missing" before a run
    roles: Tuple[Tuple[str, str], ...]

    @property
    def config(self) -> str:
        return f"configs/datasets/{self.name}.yaml"

    @property
    def doc(self) -> str:
        return f"DATASETS.md#{self.section or self.name}"


def dataset(name: str) -> Dataset:
    known = dataset_names()
    if name not in known:
        raise RegistryError(f"unknown dataset {name!r}; known datasets: {' '.join(known)}")
    lay = LAYOUTS.get(name)
    return Dataset(name=name, folder=lay.folder if lay else None, section=lay.section if lay else None,
                   generated=(lay.kind == "generated") if lay else name.startswith(MINIBENCH),
                   roles=dataset_roles(name))


# ------------------------------------------------------------------------------------------------
# trainers
# ------------------------------------------------------------------------------------------------
#: The cost prior (training, evaluation) of a trainer that states none: a CoOp job's.
DEFAULT_COST: Tuple[float, float] = (1.0, 1.0)


@dataclass(frozen=True)
class Trainer:
    cli: str  # name on the command line (case-insensitive)
    name: str  # registered Dassl name (--trainer, configs/trainers/<name>/)
    default_config: str  # configs/trainers/<name>/<default_config>.yaml
    node: str  # its config node, cfg.TRAINER.<node> (N_CTX, PREC, ...)
    module: str  # the checkpoint folder inside an output directory (the original repository's name)
    trains: bool = True  # False: zero-shot, every run is --eval-only
    aliases: Tuple[str, ...] = ()
    published_method: Optional[str] = None  # its method in the shipped published table
    #: Relative cost prior of one job (a CoOp training on the same data = 1.0): (training, evaluation).
    #: The runner's ETA scales it by what the finished jobs measured until a job of the same
    #: (trainer, kind) has run, then uses that mean.
    cost: Tuple[float, float] = DEFAULT_COST
    #: The config the runner uses on MiniBench (base-to-novel dataset or xd/dg source) when CFG is unset.
    minibench_config: Optional[str] = None
    #: Trained on the unlabelled images of all classes of the base-to-novel dataset (PromptKD), then
    #: evaluated on the base and the new classes: a transductive protocol, marked so in the tables.
    transductive: bool = False
    #: A distilling trainer's teacher: (trainer, config, the cfg key that points the student at it).
    teacher: Optional[Tuple[str, str, str]] = None
    #: The teacher's config on MiniBench (its teacher-size CLIP) when ``teacher`` is set.
    minibench_teacher_config: Optional[str] = None

    def job_cost(self, kind: str) -> float:
        """The cost prior of a ``train`` or ``eval`` job of this trainer."""
        return self.cost[0] if kind == "train" else self.cost[1]

    @property
    def config_dir(self) -> str:
        return f"configs/trainers/{self.name}"

    def config_file(self, cfg: Optional[str] = None) -> str:
        return f"{self.config_dir}/{cfg or self.default_config}.yaml"

    def config_for(self, dataset: Optional[str]) -> str:
        """The default config for runs on ``dataset``: the MiniBench one on MiniBench, else the default."""
        if dataset is not None and dataset.startswith(MINIBENCH) and self.minibench_config:
            return self.minibench_config
        return self.default_config

    def teacher_for(self, dataset: Optional[str]) -> Optional[Tuple[str, str, str]]:
        """``teacher`` for runs on ``dataset``, with the MiniBench teacher config on MiniBench."""
        if self.teacher is None:
            return None
        t_trainer, t_cfg, key = self.teacher
        if dataset is not None and dataset.startswith(MINIBENCH) and self.minibench_teacher_config:
            t_cfg = self.minibench_teacher_config
        return t_trainer, t_cfg, key

    def available_configs(self, repo: str) -> List[str]:
        """The config names (``CFG`` values) under ``repo``'s configs/trainers/<name>/, sorted."""
        cdir = os.path.join(repo, self.config_dir)
        return sorted(f[:-5] for f in os.listdir(cdir) if f.endswith(".yaml")) if os.path.isdir(cdir) else []


# Cost priors: ZS-CLIP, CoOp and Spotlighter from the whole-process job times of the idle-machine
# MiniBench demo (CoOp training 11.3 s, evaluations 7.8-9.4 s, Spotlighter training 12.5 s); CoCoOp
# (batch size 1, an image-conditioned prompt per image), MaPLe (deep prompts), IVLP and PromptSRC (deep
# prompts in both towers, 20 epochs at batch 4; PromptSRC adds a frozen image forward per step) from their
# configs' epochs, batch sizes and per-step work relative to CoOp, not measured.
#: PromptKD's teacher on MiniBench: PromptSRC on MiniBench's teacher-size CLIP.
MINIBENCH_TEACHER_CONFIG = "minibench_teacher_ep20_batch4_4+4ctx_depth3"
TRAINERS: Dict[str, Trainer] = {
    t.cli: t for t in (
        Trainer("spotlighter", "Spotlighter", "vit_b16_ep20_paper", "SPOTLIGHTER", "spotlighter",
                published_method="CoOp w/ Spotlighter",
                cost=(1.1, 0.75), minibench_config="minibench_ep10_paper"),
        Trainer("coop", "CoOp", "vit_b16_ep20_ctx4", "COOP", "prompt_learner", published_method="CoOp",
                cost=(1.0, 0.7),
                minibench_config="minibench_ep50_ctx16"),
        Trainer("cocoop", "CoCoOp", "vit_b16_c4_ep10_batch1_ctxv1", "COCOOP", "prompt_learner", cost=(2.5, 1.5),
                minibench_config="minibench_ep2_batch1_ctx4"),
        Trainer("maple", "MaPLe", "vit_b16_c2_ep5_batch4_2ctx", "MAPLE", "MultiModalPromptLearner",
                published_method="MaPLe", cost=(1.2, 0.8),
                minibench_config="minibench_ep5_batch4_2ctx_depth3"),
        Trainer("ivlp", "IVLP", "vit_b16_c2_ep20_batch4_4+4ctx", "IVLP", "VLPromptLearner", cost=(4.0, 0.8),
                minibench_config="minibench_ep20_batch4_4+4ctx_depth3"),
        Trainer("promptsrc", "PromptSRC", "vit_b16_c2_ep20_batch4_4+4ctx", "PROMPTSRC", "VLPromptLearner",
                published_method="PromptSRC",
                cost=(5.0, 0.8), minibench_config="minibench_ep20_batch4_4+4ctx_depth3"),
        Trainer("promptkd", "PromptKD", "vit_b16_c2_ep20_batch8_4+4ctx", "PROMPTKD", "VLPromptLearner",
                published_method="PromptKD",
                cost=(6.0, 1.0), transductive=True, minibench_config="minibench_ep20_batch32_4ctx_depth3",
                teacher=("promptsrc", "vit_l14_c2_ep20_batch8_4+4ctx", "TRAINER.PROMPTKD.TEACHER"),
                minibench_teacher_config=MINIBENCH_TEACHER_CONFIG),
        Trainer("spotlighterkd", "SpotlighterKD", "vit_b16_ep30_batch64_release", "PROMPTKD", "VLPromptLearner",
                published_method="PromptKD w/ Spotlighter", cost=(7.0, 1.0), transductive=True,
                minibench_config="minibench_ep20_batch32_release",
                teacher=("promptsrc", "vit_l14_c2_ep20_batch8_4+4ctx", "TRAINER.PROMPTKD.TEACHER"),
                minibench_teacher_config=MINIBENCH_TEACHER_CONFIG),
        Trainer("zsclip", "ZeroshotCLIP", "vit_b16", "ZSCLIP", "prompt_learner", trains=False,
                aliases=("zeroshotclip", "zeroshot"),
                published_method="CLIP", cost=(0.75, 0.75), minibench_config="minibench"),
    )
}
#: Trainers of other CoOp-style codebases whose output trees the results tool also reads.
OTHER_TRAINERS: Dict[str, str] = {"kgcoop": "KgCoOp"}
#: Display order of trainers in tables (others follow alphabetically).
TRAINER_ORDER: Tuple[str, ...] = ("ZeroshotCLIP", "CoOp", "CoCoOp", "KgCoOp", "MaPLe", "IVLP", "PromptSRC",
                                  "Spotlighter", "PromptKD", "SpotlighterKD")


def trainer_aliases() -> Dict[str, str]:
    """Lower-case name or alias -> registered name, for ours and the other codebases' trainers."""
    out: Dict[str, str] = {}
    for t in TRAINERS.values():
        for alias in (t.cli, t.name.lower(), *t.aliases):
            out[alias] = t.name
    out.update(OTHER_TRAINERS)
    return out


def job_cost(trainer_name: str, kind: str) -> float:
    """Cost prior of a job of a trainer (CLI or registered name); DEFAULT_COST for one not in TRAINERS."""
    try:
        return trainer(trainer_name).job_cost(kind)
    except RegistryError:
        return DEFAULT_COST[0] if kind == "train" else DEFAULT_COST[1]


def trainer(typed: str) -> Trainer:
    """Our trainer by CLI name, registered name or alias (case-insensitive)."""
    key = typed.lower()
    for t in TRAINERS.values():
        if key in (t.cli, t.name.lower(), *t.aliases):
            return t
    raise RegistryError(f"unknown trainer {typed!r}. Valid trainers: {' '.join(TRAINERS)} (case-insensitive)")
