"""ImageNet-Sketch (test only): ``$DATA/imagenet-sketch/images/<wnid>/`` + ``classnames.txt``."""

from dassl.data.datasets import DATASET_REGISTRY

from .common import ImageNetVariantDataset


@DATASET_REGISTRY.register()
class ImageNetSketch(ImageNetVariantDataset):
    layout_key = "imagenet_sketch"
