"""The one table of protocols: which datasets each protocol uses, in which role.

Everything that needs to know a protocol's datasets (the protocol scripts and runner, the results
tool, the data checker) reads it from here. Plain Python (no torch, no Dassl).
"""

from __future__ import annotations

from typing import Dict, Tuple

#: Base-to-novel datasets, in the order of the published tables (CoOp, CoCoOp, MaPLe, Spotlighter).
BASE2NEW_DATASETS: Tuple[str, ...] = (
    "imagenet", "caltech101", "oxford_pets", "stanford_cars", "oxford_flowers", "food101",
    "fgvc_aircraft", "sun397", "dtd", "eurosat", "ucf101",
)

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


class RegistryError(KeyError):
    """An unknown source or protocol; the message lists the known ones."""

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
