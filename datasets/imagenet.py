"""ImageNet: ``$DATA/imagenet/images/{train,val}/<wnid>/`` + ``classnames.txt`` (+ ``preprocessed.pkl``)."""

from dassl.data.datasets import DATASET_REGISTRY

from .common import ImageNetFolderDataset
from spotlighter.data_layout import read_classnames


@DATASET_REGISTRY.register()
class ImageNet(ImageNetFolderDataset):
    layout_key = "imagenet"
    read_classnames = staticmethod(read_classnames)  # CoOp's ImageNet.read_classnames
