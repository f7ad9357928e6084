"""MiniBenchObjects: MiniBench's cross-dataset target: 10 drawn objects, generated on first use (DATASETS.md#minibench)."""

from dassl.data.datasets import DATASET_REGISTRY

from .minibench import GeneratedDataset


@DATASET_REGISTRY.register()
class MiniBenchObjects(GeneratedDataset):
    layout_key = "minibench_objects"
