"""OxfordPets: ``$DATA/oxford_pets/images`` + ``split_zhou_OxfordPets.json``."""

from dassl.data.datasets import DATASET_REGISTRY

from .common import SplitJsonDataset


@DATASET_REGISTRY.register()
class OxfordPets(SplitJsonDataset):
    layout_key = "oxford_pets"
