"""MiniBenchPalette: MiniBench's domain-generalisation target: MiniBench's classes on vivid backgrounds (test-only), generated on first use (DATASETS.md#minibench)."""

from dassl.data.datasets import DATASET_REGISTRY

from .minibench import GeneratedDataset


@DATASET_REGISTRY.register()
class MiniBenchPalette(GeneratedDataset):
    layout_key = "minibench_palette"
