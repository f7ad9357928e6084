"""UCF101: ``$DATA/ucf101/UCF-101-midframes`` + ``split_zhou_UCF101.json``."""

from dassl.data.datasets import DATASET_REGISTRY

from .common import SplitJsonDataset


@DATASET_REGISTRY.register()
class UCF101(SplitJsonDataset):
    layout_key = "ucf101"
