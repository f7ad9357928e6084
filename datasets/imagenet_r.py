"""ImageNet-R (test only, 200 classes): ``$DATA/imagenet-rendition/imagenet-r/<wnid>/`` + ``classnames.txt``."""

from dassl.data.datasets import DATASET_REGISTRY

from .common import ImageNetVariantDataset


@DATASET_REGISTRY.register()
class ImageNetR(ImageNetVariantDataset):
    layout_key = "imagenet_r"
