"""SUN397: ``$DATA/sun397/SUN397`` + ``split_zhou_SUN397.json``."""

from dassl.data.datasets import DATASET_REGISTRY

from .common import SplitJsonDataset


@DATASET_REGISTRY.register()
class SUN397(SplitJsonDataset):
    layout_key = "sun397"
