"""MiniBenchTextures: MiniBench's cross-dataset target: 10 patterns, generated on first use (DATASETS.md#minibench)."""

from dassl.data.datasets import DATASET_REGISTRY

from .minibench import GeneratedDataset


@DATASET_REGISTRY.register()
class MiniBenchTextures(GeneratedDataset):
    layout_key = "minibench_textures"
