"""MiniBench and its transfer targets: the project's generated benchmarks, ``$DATA/<key>/images`` +
``split_zhou_<Name>.json`` (CoOp split format). Each folder is generated on first use by
``spotlighter.benchmark.data.ensure(folder, key)``; the contents are described in DATASETS.md
(#minibench) and ``spotlighter.benchmark.data``."""

import logging
import os

from dassl.data.datasets import DATASET_REGISTRY

from .common import SplitJsonDataset, read_split
from spotlighter.data_layout import DatasetError, regenerate_hint, require_dir

logger = logging.getLogger(__name__)


class GeneratedDataset(SplitJsonDataset):
    """A split-json dataset whose folder is generated when it is missing."""

    def locate(self, dataset_dir):
        split = os.path.join(dataset_dir, self.layout.split_file)
        if not os.path.isdir(dataset_dir) or not os.path.isfile(split):
            try:
                from spotlighter.benchmark.data import ensure
            except ImportError as e:
                raise DatasetError(
                    f"{self.layout.name}: {dataset_dir} is missing and cannot be generated: "
                    f"spotlighter.benchmark.data is not importable ({e}). Install the project "
                    f"(pip install -e .) or generate the folder as described in {self.layout.doc}"
                ) from None
            logger.info("Generating %s in %s", self.layout.name, dataset_dir)
            try:
                ensure(dataset_dir, self.layout.key)
            except (ValueError, OSError) as e:
                raise DatasetError(f"{self.layout.name}: cannot generate {dataset_dir}: {e}") from None
        return super().locate(dataset_dir)

    def read_data(self):
        self.split_path = os.path.join(self.dataset_dir, self.layout.split_file)
        require_dir(self.image_dir, self.layout, "image folder")
        return read_split(self.split_path, self.image_dir, doc=self.layout.doc,
                          fix=regenerate_hint(self.layout, self.root), confine=self.confinement())


@DATASET_REGISTRY.register()
class MiniBench(GeneratedDataset):
    layout_key = "minibench"
