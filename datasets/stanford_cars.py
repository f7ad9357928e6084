"""StanfordCars: ``$DATA/stanford_cars/cars_{train,test}`` + ``split_zhou_StanfordCars.json``
(paths relative to the dataset folder, as in CoOp)."""

from dassl.data.datasets import DATASET_REGISTRY

from .common import SplitJsonDataset


@DATASET_REGISTRY.register()
class StanfordCars(SplitJsonDataset):
    layout_key = "stanford_cars"
