"""Food101: ``$DATA/food-101/images`` + ``split_zhou_Food101.json``."""

from dassl.data.datasets import DATASET_REGISTRY

from .common import SplitJsonDataset


@DATASET_REGISTRY.register()
class Food101(SplitJsonDataset):
    layout_key = "food101"
