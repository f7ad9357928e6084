"""TorchScript weight archives for the loader tests: a tiny CLIP traced and saved as OpenAI saved
theirs, and archives crafted to run code when they are loaded the unsafe way.

OpenAI's files are ``torch.jit.save`` archives of a traced CLIP in half precision whose module also
carries ``input_resolution``, ``context_length`` and ``vocab_size`` as integer buffers (the keys
``clip.model.build_model`` deletes); :func:`save_traced_clip` writes that structure at a tiny size.
"""

import pickle
import warnings
import zipfile
from typing import Tuple

import torch

from tiny_clip import TINY, build_tiny_clip


def save_traced_clip(path, seed: int = 0, half: bool = True, extra=None) -> str:
    """A tiny CLIP, traced and saved with ``torch.jit.save``; ``extra`` modules are attached as
    attributes before tracing (they are saved with it)."""
    from clip.model import convert_weights

    model = build_tiny_clip(seed)
    if half:
        convert_weights(model)
    for name, value in (("input_resolution", TINY["image_resolution"]), ("context_length", TINY["context_length"]),
                        ("vocab_size", TINY["vocab_size"])):
        if hasattr(model, name):
            delattr(model, name)
        model.register_buffer(name, torch.tensor(value))
    for name, module in (extra or {}).items():
        setattr(model, name, module)
    res = TINY["image_resolution"]
    image = torch.randn(1, 3, res, res, dtype=torch.float16 if half else torch.float32)
    text = torch.zeros(1, TINY["context_length"], dtype=torch.long)
    text[0, :3] = torch.tensor([49406, 320, 49407])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(model, (image, text), check_trace=False)
        torch.jit.save(traced, str(path))
    return str(path)


class FileWriter(torch.nn.Module):
    """A module whose TorchScript ``__setstate__`` creates the file ``target``: ``torch.jit.load``
    runs it while loading the archive."""

    def __init__(self, target: str):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(2))
        self.target = target

    def forward(self, x):
        return x * self.weight

    @torch.jit.export
    def __getstate__(self) -> Tuple[torch.Tensor, str, bool]:
        return (self.weight, self.target, self.training)

    @torch.jit.export
    def __setstate__(self, state: Tuple[torch.Tensor, str, bool]) -> None:
        self.target = state[1]
        self.training = state[2]
        self.weight = state[0] + torch.from_file(self.target, True, 2) * 0.0


def scripted_file_writer(target: str):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.jit.script(FileWriter(str(target)))


class Call:
    """Pickles as a call of ``func(*args)`` (what a crafted pickle asks the unpickler to run)."""

    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


def replace_data_pkl(src, dst, payload: bytes) -> str:
    """A copy of archive ``src`` whose ``*/data.pkl`` is ``payload``."""
    with zipfile.ZipFile(src) as a, zipfile.ZipFile(dst, "w") as b:
        for item in a.infolist():
            b.writestr(item, payload if item.filename.endswith("/data.pkl") else a.read(item))
    return str(dst)


def writing_pickle(kind: str, marker) -> bytes:
    """A protocol-2 pickle that creates ``marker`` when unpickled: via ``builtins.exec`` or ``os.system``."""
    import os

    if kind == "exec":
        return pickle.dumps(Call(exec, f"open({str(marker)!r}, 'w').write('ran')"), protocol=2, fix_imports=False)
    return pickle.dumps(Call(os.system, f"touch '{marker}'"), protocol=2, fix_imports=False)
