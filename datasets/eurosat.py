"""EuroSAT: ``$DATA/eurosat/2750`` + ``split_zhou_EuroSAT.json``."""

from dassl.data.datasets import DATASET_REGISTRY

from .common import SplitJsonDataset


@DATASET_REGISTRY.register()
class EuroSAT(SplitJsonDataset):
    layout_key = "eurosat"
