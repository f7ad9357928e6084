"""What the fast launcher's fork server imports once (spotlighter.run.fast): train.py's heavy
imports, with the two settings train.py makes before importing them. A module that cannot be
imported here is left to the job, which imports it itself (and reports its error in its own log).
"""

import importlib
import os
import sys
import warnings

# the checkout first, as for `python train.py` there: its datasets/ and trainers/, not HuggingFace's
_CHECKOUT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if sys.path[:1] != [_CHECKOUT]:
    sys.path.insert(0, _CHECKOUT)

# as train.py does first: no PyPI check by ogb (imported by Dassl through wilds), no pkg_resources notice
os.environ.setdefault("OUTDATED_IGNORE", "1")
warnings.filterwarnings("ignore", message="pkg_resources is deprecated", category=UserWarning)

#: train.py's imports that cost seconds: torch, Dassl (with wilds, tensorboard, sklearn), the
#: checkout's dataset and trainer registrations (CLIP with them).
MODULES = ("torch", "torchvision", "dassl.config", "dassl.engine", "dassl.utils", "dassl.data.datasets",
           "spotlighter.config", "datasets", "trainers")

for _name in MODULES:
    try:
        importlib.import_module(_name)
    except Exception:  # noqa: BLE001  (the job imports it again and reports the error)
        pass
