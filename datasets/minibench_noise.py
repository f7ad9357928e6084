"""MiniBenchNoise: MiniBench's domain-generalisation target: MiniBench's classes under heavy noise and blur (test-only), generated on first use (DATASETS.md#minibench)."""

from dassl.data.datasets import DATASET_REGISTRY

from .minibench import GeneratedDataset


@DATASET_REGISTRY.register()
class MiniBenchNoise(GeneratedDataset):
    layout_key = "minibench_noise"
