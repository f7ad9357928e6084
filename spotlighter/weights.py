"""Read the tensors of a TorchScript archive (OpenAI's CLIP files) without running anything in it.

``torch.jit.load`` compiles the archive's ``code/`` and runs it (a class's ``__setstate__`` runs
while loading), so a crafted weight file can write files or worse. :func:`read_torchscript_state`
reads only what a weight file needs:

* ``<archive>/data.pkl`` with a restricted unpickler: tensors are rebuilt by this module from the
  storages below; the only other globals it accepts are plain containers (``OrderedDict``, the
  list builders of ``torch.jit._pickle``) and ``torch.device``. The archive's own classes
  (``__torch__.*``: the module tree) become inert placeholders that keep their pickled attribute
  dict; any other global (``os.system``, ``builtins.exec``, ...) is refused before it is called.
* ``<archive>/data/<key>``: the raw bytes of each storage.
* The ``__parameters__ = [...]`` / ``__buffers__ = [...]`` lines of the class declarations in
  ``code/``, read as text and parsed as literals (never compiled, imported or run), to tell
  parameters and buffers from other tensor attributes.

The result is the flat state dict ``torch.jit.load(path).state_dict()`` gives: the same keys in
the same order, bit-identical tensors. An object whose pickled state is not an attribute dict
(its class restores itself with code, ``__getstate__``/``__setstate__``) is refused: weight files
never need code to be restored.
"""

from __future__ import annotations

import ast
import collections
import io
import pickle
import re
import sys
import zipfile
from typing import Dict, List, NamedTuple, Optional, Tuple

import torch

#: Nesting depth of modules beyond which an archive is refused (CLIPs nest about 6 deep).
MAX_MODULE_DEPTH = 64
#: Largest ``code/`` file read for its parameter declarations (bytes); larger ones are not read.
MAX_DECLARATION_FILE = 16 * 2**20

_JIT_LIST_BUILDERS = ("build_intlist", "build_doublelist", "build_boollist", "build_tensorlist",
                      "build_genericlist")
_KEY = re.compile(r"^[A-Za-z0-9_.]+$")


class ArchiveError(ValueError):
    """A TorchScript archive that cannot be read as weights; the message says why."""


class UnsafeArchiveError(ArchiveError):
    """An archive that asks for something no weight file needs (nothing of it was run)."""


class _ScriptObject:
    """Stands for an object of one of the archive's classes: keeps the state pickled for it."""

    _qualified_name = ""

    def __setstate__(self, state) -> None:
        self.__dict__["_state"] = state


class _StorageType(NamedTuple):
    dtype: torch.dtype


class _Storage(NamedTuple):
    data: torch.UntypedStorage
    dtype: torch.dtype
    numel: int


def _storage_dtype(name: str) -> Optional[torch.dtype]:
    """The dtype of a legacy storage class name (``FloatStorage`` -> torch.float32), or None."""
    try:
        from torch.storage import _get_dtype_from_pickle_storage_type

        return _get_dtype_from_pickle_storage_type(name)
    except (ImportError, KeyError):
        return None


def _as_list(values):
    return list(values)


def _restore_type_tag(value, type_str=None):
    return value


def _device(spec):
    if not isinstance(spec, (str, int)):
        raise UnsafeArchiveError(f"torch.device({spec!r}): not a device name")
    return torch.device(spec)


def _ints(values, what: str) -> Tuple[int, ...]:
    if not isinstance(values, tuple) or not all(type(v) is int and v >= 0 for v in values):
        raise ArchiveError(f"a tensor's {what} is {values!r}, not a tuple of non-negative integers")
    return values


class _Unpickler(pickle.Unpickler):
    """Unpickles ``data.pkl``, calling nothing but this module's tensor and container builders."""

    def __init__(self, file, archive: zipfile.ZipFile, prefix: str):
        super().__init__(file)
        self._archive = archive
        self._prefix = prefix
        self._storages: Dict[str, _Storage] = {}
        self._classes: Dict[str, type] = {}

    def find_class(self, module: str, name: str):
        if module == "__torch__" or module.startswith("__torch__."):
            qualified = f"{module}.{name}"
            if qualified not in self._classes:
                self._classes[qualified] = type(name, (_ScriptObject,), {"_qualified_name": qualified,
                                                                         "__module__": __name__})
            return self._classes[qualified]
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return self._rebuild_tensor
        if (module, name) == ("torch._utils", "_rebuild_parameter"):
            return self._rebuild_parameter
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        if module == "torch" and name.endswith("Storage") and _storage_dtype(name) is not None:
            return _StorageType(_storage_dtype(name))
        if module == "torch.jit._pickle" and name in _JIT_LIST_BUILDERS:
            return _as_list
        if (module, name) == ("torch.jit._pickle", "restore_type_tag"):
            return _restore_type_tag
        if (module, name) == ("torch", "device"):
            return _device
        raise UnsafeArchiveError(f"its data.pkl asks for {module}.{name}, which no weight file needs")

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"
                and isinstance(pid[1], _StorageType) and isinstance(pid[2], str) and _KEY.match(pid[2])
                and type(pid[4]) is int and pid[4] >= 0):
            raise ArchiveError(f"its data.pkl refers to {pid!r}, which is not a tensor storage")
        _, kind, key, _location, numel = pid
        known = self._storages.get(key)
        if known is not None:
            if known.dtype != kind.dtype or known.numel != numel:
                raise ArchiveError(f"its storage data/{key} is used as two different types")
            return known
        record = f"{self._prefix}/data/{key}"
        try:
            raw = self._archive.read(record)
        except KeyError:
            raise ArchiveError(f"its tensor record {record} is missing") from None
        itemsize = torch.empty((), dtype=kind.dtype).element_size()
        if len(raw) != numel * itemsize:
            raise ArchiveError(f"its tensor record {record} holds {len(raw):,} bytes, {numel:,} x {itemsize} "
                               "expected (truncated or damaged)")
        data = torch.UntypedStorage.from_buffer(raw, dtype=torch.uint8) if raw else torch.UntypedStorage(0)
        storage = self._storages[key] = _Storage(data, kind.dtype, numel)
        return storage

    @staticmethod
    def _rebuild_tensor(storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None,
                        metadata=None):
        if not isinstance(storage, _Storage):
            raise ArchiveError("its data.pkl builds a tensor from something that is not one of its storages")
        size, stride = _ints(size, "size"), _ints(stride, "stride")
        if type(storage_offset) is not int or storage_offset < 0 or len(size) != len(stride):
            raise ArchiveError(f"a tensor of size {size} has offset {storage_offset!r} and stride {stride}")
        if all(size):
            last = storage_offset + sum((n - 1) * s for n, s in zip(size, stride))
            if last >= storage.numel:
                raise ArchiveError(f"a tensor of size {size} reaches element {last:,} of a storage of "
                                   f"{storage.numel:,} (truncated or damaged)")
        return torch.empty((0,), dtype=storage.dtype).set_(storage.data, storage_offset, size, stride)

    @staticmethod
    def _rebuild_parameter(data, requires_grad=False, backward_hooks=None):
        if not isinstance(data, torch.Tensor):
            raise ArchiveError("its data.pkl builds a parameter from something that is not a tensor")
        return data


class _Declarations:
    """Which attributes of the archive's classes are parameters and buffers, and which classes are
    modules, from the declaration lines in ``code/`` (read as text; literals only)."""

    _CLASS = re.compile(r"^class (\w+)\((\w*)\):\s*$")
    _LIST = re.compile(r"^\s+(__parameters__|__buffers__)\s*=\s*(\[.*\])\s*$")

    def __init__(self, archive: zipfile.ZipFile, prefix: str):
        self._archive = archive
        self._prefix = prefix
        self._files: Dict[str, Dict[str, dict]] = {}

    def _parse(self, record: str) -> Dict[str, dict]:
        try:
            info = self._archive.getinfo(record)
        except KeyError:
            return {}
        if info.file_size > MAX_DECLARATION_FILE:
            return {}
        text = self._archive.read(info).decode("utf-8", errors="replace")
        classes: Dict[str, dict] = {}
        current = None
        for line in text.splitlines():
            m = self._CLASS.match(line)
            if m:
                current = classes[m.group(1)] = {"module": m.group(2) == "Module"}
                continue
            if line[:1] not in (" ", "\t"):
                current = None
                continue
            m = self._LIST.match(line)
            if current is not None and m:
                try:
                    names = ast.literal_eval(m.group(2))
                except (ValueError, SyntaxError):
                    continue
                if isinstance(names, list) and all(isinstance(n, str) for n in names):
                    current[m.group(1)] = names
        return classes

    def get(self, qualified: str) -> Optional[dict]:
        """``{"module": bool, "__parameters__": [...], "__buffers__": [...]}`` of a class, or None."""
        module, _, name = qualified.rpartition(".")
        record = f"{self._prefix}/code/{module.replace('.', '/')}.py"
        if record not in self._files:
            self._files[record] = self._parse(record)
        found = self._files[record].get(name)
        if found is None or "__parameters__" not in found or "__buffers__" not in found:
            return None
        return found


def _collect(root, declarations: _Declarations) -> Dict[str, torch.Tensor]:
    """The state dict of the module tree under ``root``: per module its parameters, then its buffers,
    then its submodules, in attribute order (``nn.Module.state_dict``'s order)."""
    if not isinstance(root, _ScriptObject):
        raise ArchiveError(f"its data.pkl holds a {type(root).__name__}, not a TorchScript module")
    state: Dict[str, torch.Tensor] = {}

    def visit(obj: _ScriptObject, prefix: str, path: List[int]) -> None:
        if len(path) > MAX_MODULE_DEPTH or id(obj) in path:
            raise ArchiveError(f"its modules nest deeper than {MAX_MODULE_DEPTH} levels or in a cycle")
        attrs = obj.__dict__.get("_state")
        if not isinstance(attrs, dict) or not all(isinstance(k, str) for k in attrs):
            raise UnsafeArchiveError(f"its object {prefix.rstrip('.') or '(root)'} of class "
                                     f"{obj._qualified_name} is restored by code in the archive "
                                     "(__setstate__), which no weight file needs")
        decl = declarations.get(obj._qualified_name)
        if decl is None:  # undeclared class: every tensor attribute is state
            groups: Tuple[Optional[List[str]], ...] = (None,)
        else:
            groups = (decl["__parameters__"], decl["__buffers__"])
        for names in groups:
            for name, value in attrs.items():
                if (names is None or name in names) and isinstance(value, torch.Tensor):
                    state[prefix + name] = value
        for name, value in attrs.items():
            if isinstance(value, _ScriptObject):
                sub = declarations.get(value._qualified_name)
                if sub is None or sub["module"]:
                    visit(value, f"{prefix}{name}.", path + [id(obj)])

    visit(root, "", [])
    return state


def read_torchscript_state(path: str) -> Dict[str, torch.Tensor]:
    """The state dict of the TorchScript archive at ``path``, read without running any of it.

    Raises :class:`UnsafeArchiveError` when the archive asks for a global or a restore-by-code that
    no weight file needs, :class:`ArchiveError` when it is incomplete, and the underlying error
    (``zipfile.BadZipFile``, ``pickle.UnpicklingError``, ...) when it cannot be parsed."""
    with zipfile.ZipFile(path) as archive:
        pickles = [n for n in archive.namelist() if n.count("/") == 1 and n.endswith("/data.pkl")]
        if len(pickles) != 1:
            raise ArchiveError(f"it holds {len(pickles)} */data.pkl records, one expected")
        prefix = pickles[0][: -len("/data.pkl")]
        try:
            order = archive.read(f"{prefix}/byteorder").decode(errors="replace").strip()
        except KeyError:
            order = "little"  # archives written before torch recorded it are little-endian
        if order != sys.byteorder:
            raise ArchiveError(f"its tensors are {order}-endian, this machine is {sys.byteorder}-endian")
        unpickler = _Unpickler(io.BytesIO(archive.read(pickles[0])), archive, prefix)
        root = unpickler.load()
        return _collect(root, _Declarations(archive, prefix))
