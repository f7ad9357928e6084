"""DTD: ``$DATA/dtd/images`` + ``split_zhou_DescribableTextures.json``."""

from dassl.data.datasets import DATASET_REGISTRY

from .common import SplitJsonDataset


@DATASET_REGISTRY.register()
class DescribableTextures(SplitJsonDataset):
    layout_key = "dtd"


DTD = DescribableTextures  # CoOp's modules import it under this alias
