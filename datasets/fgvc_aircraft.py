"""FGVCAircraft: ``$DATA/fgvc_aircraft/`` = the ``data/`` folder of fgvc-aircraft-2013b: ``images/``,
``variants.txt`` (class names, in label order) and ``images_variant_{train,val,test}.txt`` (lines
``<image id> <variant>``), read as CoOp does (no split json)."""

import os

from dassl.data.datasets import DATASET_REGISTRY

from .common import CoOpDataset, check_images, make_datum
from spotlighter.data_layout import DatasetError, require_dir, require_file


@DATASET_REGISTRY.register()
class FGVCAircraft(CoOpDataset):
    layout_key = "fgvc_aircraft"

    def read_data(self):
        require_dir(self.image_dir, self.layout, "image folder")
        variants = require_file(os.path.join(self.dataset_dir, "variants.txt"), self.layout)
        with open(variants, "r") as f:
            classnames = [line.strip() for line in f.readlines()]
        self.names_source = variants
        dups = sorted({c for c in classnames if classnames.count(c) > 1})
        if dups:
            raise DatasetError(f"{self.layout.name}: {variants} lists the variant(s) {dups} more than once; each "
                               f"line must be a different variant (see {self.layout.doc})")
        cname2lab = {c: i for i, c in enumerate(classnames)}
        return tuple(self.read_list(cname2lab, f"images_variant_{s}.txt") for s in ("train", "val", "test"))

    def read_list(self, cname2lab, split_file):
        filepath = require_file(os.path.join(self.dataset_dir, split_file), self.layout)
        entries = []
        confine = self.confinement()
        with open(filepath, "r") as f:
            for n, line in enumerate(f.readlines(), 1):
                parts = line.strip().split(" ")
                if not parts[0]:
                    continue
                classname = " ".join(parts[1:])
                if classname not in cname2lab:
                    raise DatasetError(
                        f"{self.layout.name}: line {n} of {filepath} names variant '{classname}', "
                        f"which is not in variants.txt (see {self.layout.doc})"
                    )
                impath = os.path.join(self.image_dir, parts[0] + ".jpg")
                if confine is not None:
                    confine.check([(f"line {n}", parts[0], impath)], filepath)
                entries.append((impath, cname2lab[classname], classname))
        check_images([e[0] for e in entries], f"{self.layout.name} {split_file}", doc=self.layout.doc)
        return [make_datum(*e) for e in entries]
