"""ImageNetV2 (test only): ``$DATA/imagenetv2/imagenetv2-matched-frequency-format-val/<0..999>/`` + ``classnames.txt``."""

from dassl.data.datasets import DATASET_REGISTRY

from .common import ImageNetVariantDataset


@DATASET_REGISTRY.register()
class ImageNetV2(ImageNetVariantDataset):
    layout_key = "imagenetv2"
    label_folders = True  # folders are named by ImageNet label, 0..999
