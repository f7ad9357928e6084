"""MiniBenchSketch: MiniBench's domain-generalisation target: MiniBench's classes as outlines on paper (test-only), generated on first use (DATASETS.md#minibench)."""

from dassl.data.datasets import DATASET_REGISTRY

from .minibench import GeneratedDataset


@DATASET_REGISTRY.register()
class MiniBenchSketch(GeneratedDataset):
    layout_key = "minibench_sketch"
