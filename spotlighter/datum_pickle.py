"""Read the pickled ``{key: [Datum, ...]}`` files of a ``$DATA`` folder without running code.

CoOp-layout datasets cache their few-shot samples (``split_fewshot/shot_<K>-seed_<S>.pkl``) and
ImageNet's parsed folders (``preprocessed.pkl``) as pickles of Dassl ``Datum`` objects; the files
are shared with the other repositories of the ecosystem, so their format stays. ``pickle.load``
would call whatever a crafted file names (``os.system`` ...): :class:`DatumUnpickler` resolves only
the globals such files contain (Dassl's ``Datum``, and for protocols 0/1 ``copyreg._reconstructor``
and ``object``) and refuses anything else before it is called. Loaded items are then checked
field by field (strings and integers only).

Plain Python: no torch; Dassl only when no stand-in ``Datum`` class is given.
"""

from __future__ import annotations

import copyreg
import io
import pickle
from typing import Optional

#: (module, name) of the classes a Datum pickle may name. Dassl defines Datum in base_dataset.
DATUM_GLOBALS = frozenset({("dassl.data.datasets.base_dataset", "Datum"), ("dassl.data.datasets", "Datum")})
#: What pickle protocols 0 and 1 use to rebuild a plain object (harmless with Datum as the class).
#: (Protocols below 3 write Python 2's names: find_class sees them unmapped.)
PROTOCOL0_GLOBALS = {("copyreg", "_reconstructor"): copyreg._reconstructor, ("builtins", "object"): object,
                     ("copy_reg", "_reconstructor"): copyreg._reconstructor, ("__builtin__", "object"): object}
#: The attributes of a Datum and their types.
DATUM_FIELDS = {"_impath": str, "_label": int, "_domain": int, "_classname": str}


class UnsafePickleError(pickle.UnpicklingError):
    """The file names a global that a Datum pickle never contains; nothing was called."""

    def __init__(self, module: str, name: str):
        self.module, self.name = module, name
        super().__init__(f"it refers to {module}.{name}, which a file of Dassl Datum objects never "
                         "contains (refused; nothing in the file was run)")


class DatumUnpickler(pickle.Unpickler):
    """An unpickler that admits only :data:`DATUM_GLOBALS` (as ``datum_class``) and
    :data:`PROTOCOL0_GLOBALS`."""

    def __init__(self, file, datum_class: Optional[type] = None):
        super().__init__(file)
        self._datum_class = datum_class

    def find_class(self, module, name):
        if (module, name) in DATUM_GLOBALS:
            if self._datum_class is None:
                from dassl.data.datasets import Datum

                self._datum_class = Datum
            return self._datum_class
        if (module, name) in PROTOCOL0_GLOBALS:
            return PROTOCOL0_GLOBALS[(module, name)]
        raise UnsafePickleError(module, name)

    def persistent_load(self, pid):
        raise pickle.UnpicklingError("it holds persistent references, which a Datum pickle never does")


def loads(data: bytes, datum_class: Optional[type] = None):
    return DatumUnpickler(io.BytesIO(data), datum_class).load()


def load(path: str, datum_class: Optional[type] = None):
    """Unpickle ``path`` with :class:`DatumUnpickler` (errors propagate: the caller names the file)."""
    with open(path, "rb") as f:
        return DatumUnpickler(f, datum_class).load()


def datum_problem(item, datum_class: type) -> Optional[str]:
    """Why ``item`` is not a well-formed Datum (wrong class, unknown or mistyped field), or None."""
    if type(item) is not datum_class:
        return f"an item is a {type(item).__name__}, not a Datum"
    state = vars(item)
    unknown = sorted(set(state) - set(DATUM_FIELDS))
    if unknown:
        return f"a Datum has unexpected fields {unknown}"
    for field, kind in DATUM_FIELDS.items():
        if field in state and (not isinstance(state[field], kind) or isinstance(state[field], bool)):
            return f"a Datum's {field} is a {type(state[field]).__name__}, expected {kind.__name__}"
    if not isinstance(state.get("_impath"), str):
        return "a Datum has no image path"
    return None
