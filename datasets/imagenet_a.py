"""ImageNet-A (test only, 200 classes): ``$DATA/imagenet-adversarial/imagenet-a/<wnid>/`` + ``classnames.txt``."""

from dassl.data.datasets import DATASET_REGISTRY

from .common import ImageNetVariantDataset


@DATASET_REGISTRY.register()
class ImageNetA(ImageNetVariantDataset):
    layout_key = "imagenet_a"
