"""Dassl datasets in the ``$DATA`` layout of CoOp's DATASETS.md (imported by ``train.py``).

Importing this package registers every dataset with Dassl's ``DATASET_REGISTRY``. The shared logic
lives in ``common.py`` (splits, few-shot caches, base/new subsampling) and ``spotlighter/data_layout.py``
(folder layout, :class:`DatasetError`; free of Dassl); each other module only declares a layout.
"""

from spotlighter.data_layout import DatasetError, LAYOUTS  # noqa: F401  (no Dassl needed)

from . import (  # noqa: F401  (import registers the datasets)
    caltech101,
    dtd,
    eurosat,
    fgvc_aircraft,
    food101,
    imagenet,
    imagenet_a,
    imagenet_r,
    imagenet_sketch,
    imagenetv2,
    minibench,
    minibench_glyphs,
    minibench_noise,
    minibench_objects,
    minibench_palette,
    minibench_sketch,
    minibench_textures,
    oxford_flowers,
    oxford_pets,
    stanford_cars,
    sun397,
    ucf101,
)
