"""MiniBench: the project's small generated benchmark, ``$DATA/minibench/images`` +
``split_zhou_MiniBench.json`` (CoOp split format). The folder is generated on first use by
``spotlighter.benchmark.data.ensure``."""

import logging
import os

from dassl.data.datasets import DATASET_REGISTRY

from .common import SplitJsonDataset
from .layout import DatasetError

logger = logging.getLogger(__name__)


@DATASET_REGISTRY.register()
class MiniBench(SplitJsonDataset):
    layout_key = "minibench"

    def locate(self, dataset_dir):
        split = os.path.join(dataset_dir, self.layout.split_file)
        if not os.path.isdir(dataset_dir) or not os.path.isfile(split):
            try:
                from spotlighter.benchmark.data import ensure
            except ImportError as e:
                raise DatasetError(
                    f"MiniBench: {dataset_dir} is missing and cannot be generated: "
                    f"spotlighter.benchmark.data is not importable ({e}). Install the project "
                    f"(pip install -e .) or generate the folder as described in {self.layout.doc}"
                ) from None
            logger.info("Generating the mini-benchmark in %s", dataset_dir)
            try:
                ensure(dataset_dir)
            except (ValueError, OSError) as e:
                raise DatasetError(f"MiniBench: cannot generate {dataset_dir}: {e}") from None
        return super().locate(dataset_dir)
