"""Flowers102: ``$DATA/oxford_flowers/jpg`` + ``split_zhou_OxfordFlowers.json``."""

from dassl.data.datasets import DATASET_REGISTRY

from .common import SplitJsonDataset


@DATASET_REGISTRY.register()
class OxfordFlowers(SplitJsonDataset):
    layout_key = "oxford_flowers"
