"""MiniBenchGlyphs: MiniBench's cross-dataset target: 12 letters, generated on first use (DATASETS.md#minibench)."""

from dassl.data.datasets import DATASET_REGISTRY

from .minibench import GeneratedDataset


@DATASET_REGISTRY.register()
class MiniBenchGlyphs(GeneratedDataset):
    layout_key = "minibench_glyphs"
