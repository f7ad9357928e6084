"""Caltech101: ``$DATA/caltech-101/101_ObjectCategories`` + ``split_zhou_Caltech101.json``."""

from dassl.data.datasets import DATASET_REGISTRY

from .common import SplitJsonDataset


@DATASET_REGISTRY.register()
class Caltech101(SplitJsonDataset):
    layout_key = "caltech101"
