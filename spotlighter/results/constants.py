"""Names shared by the results tool: datasets, protocols, trainers, presentation, exit codes.

The output tree (folder and file names, log signals) is in :mod:`spotlighter.output_tree`."""

from __future__ import annotations

from .. import registry

# Protocols, datasets and trainers come from the one registry (spotlighter/registry.py).
PROTOCOLS: tuple[str, ...] = tuple(registry.PROTOCOLS)
PROTOCOL_TITLES: dict[str, str] = {p.name: p.title for p in registry.PROTOCOLS.values()}

# Datasets in the order of the base-to-novel tables of CoOp/CoCoOp/MaPLe/Spotlighter.
BASE2NEW_DATASETS: tuple[str, ...] = registry.BASE2NEW_DATASETS
# The base-to-novel suites a table averages over (the published 11 datasets, MiniBench's suite).
BASE2NEW_SUITES: tuple[tuple[str, ...], ...] = registry.BASE2NEW_SUITES
# The two ways of averaging base-to-novel over datasets, as the average rows name them: the published
# tables' (the HM of the mean Base and the mean New) and the mean of the per-dataset HMs.
AVERAGE_HM_OF_MEANS = "HM of mean Base and mean New"
AVERAGE_MEAN_OF_HMS = "mean of per-dataset HMs"
XD_SOURCE = registry.DEFAULT_SOURCE
XD_TARGETS: tuple[str, ...] = registry.xd_targets(XD_SOURCE)
DG_TARGETS: tuple[str, ...] = registry.dg_targets(XD_SOURCE)
# Every source -> its targets (spotlighter.registry: imagenet, and the generated MiniBench).
XD_TARGETS_BY_SOURCE: dict[str, tuple[str, ...]] = dict(registry.XD_TARGETS)
DG_TARGETS_BY_SOURCE: dict[str, tuple[str, ...]] = dict(registry.DG_TARGETS)


# Trainer names: CLI aliases (lower case) -> registered Dassl class name.
TRAINER_ALIASES: dict[str, str] = registry.trainer_aliases()
# Display order of trainers (others follow alphabetically).
TRAINER_ORDER: tuple[str, ...] = registry.TRAINER_ORDER

# Methods of the shipped published table compared with our trainers by default.
PUBLISHED_METHOD_FOR_TRAINER: dict[str, str] = {
    t.name: t.published_method for t in registry.TRAINERS.values() if t.published_method}
PUBLISHED_FILE = "base2new_published.csv"
# Published cross-dataset and DG tables (source ImageNet): method,dataset,accuracy,source.
TRANSFER_PUBLISHED_FILES: dict[str, str] = {"xd": "xd_published.csv", "dg": "dg_published.csv"}
PUBLISHED_AVERAGE_ROW = "average"
# Published few-shot accuracies (CoOp's protocol): method,dataset,shots,accuracy,backbone,source.
FEWSHOT_PUBLISHED_FILE = "fewshot_published.csv"
#: CSV rows of the few-shot table: one per method × shot count (and per published method × shot count).
FEWSHOT_CSV_COLUMNS: list[str] = [
    "protocol", "dataset", "shots", "trainer", "config", "acc_mean", "acc_std", "acc_n", "seeds_expected",
    "complete", "zero_shot", "published_method", "pub_acc", "pub_backbone", "notes",
]

# Presentation.
DECIMALS = 2
MISSING_MARK = "—"
LATEX_MISSING_MARK = "--"
PUBLISHED_MARK = r"$^{\dagger}$"  # LaTeX: marks a published row
FORMATS = ("markdown", "csv", "latex")
DEFAULT_FORMAT = "markdown"
# CSV cells (strings only) starting with one of these are prefixed with CSV_ESCAPE_PREFIX (OWASP, CSV injection).
CSV_FORMULA_PREFIXES = ("=", "+", "-", "@", "\t", "\r")
CSV_ESCAPE_PREFIX = "'"
PLOT_HINT = "--plot needs matplotlib: pip install matplotlib (or pip install -e .[plot])"

# CLI exit codes.
EXIT_OK = 0
EXIT_NOTHING_FOUND = 1
EXIT_PLOT_UNAVAILABLE = 2
EXIT_UNWRITABLE = 2  # --csv / --plot to a path that cannot be written

#: Trainers whose base-to-novel protocol is transductive (they see the new classes' unlabelled images),
#: and the published methods that are: their rows are marked in every table.
TRANSDUCTIVE_TRAINERS: frozenset[str] = frozenset(t.name for t in registry.TRAINERS.values() if t.transductive)
TRANSDUCTIVE_MARK = " [transductive]"


def is_transductive(name: str) -> bool:
    """A registered transductive trainer, or a published method built on one (e.g. "PromptKD w/ Spotlighter")."""
    return any(name == t or name.startswith(t + " ") for t in TRANSDUCTIVE_TRAINERS)


# Paired comparison of two methods (compare.py): confidence level, interval methods, bootstrap settings.
CONFIDENCE = 0.95
INTERVAL_T = "t"  # paired Student t interval over the (dataset, seed) pairs
INTERVAL_BOOTSTRAP = "bootstrap"  # percentile bootstrap over the pairs
INTERVAL_METHODS = (INTERVAL_T, INTERVAL_BOOTSTRAP)
DEFAULT_INTERVAL = INTERVAL_T
BOOTSTRAP_RESAMPLES = 10_000
BOOTSTRAP_SEED = 0
