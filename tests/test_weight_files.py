"""CLIP weight files are read without running anything in them (spotlighter.weights, backbone loader).

TorchScript archives (OpenAI's format) are read by a restricted reader of their pickled tensors that
must give exactly what ``torch.jit.load(path).state_dict()`` gives; archives crafted to run code
when loaded (by their ``code/`` or by a pickled global) are refused, and nothing of them runs.
"""

import os
import pickle
import struct
import warnings
import zipfile

import pytest
import torch

from spotlighter.backbone import BackboneError, build_clip, load_clip, load_state_dict_file
from spotlighter.weights import read_torchscript_state
from weight_archives import (Call, replace_data_pkl, save_traced_clip, scripted_file_writer,
                             writing_pickle)

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::DeprecationWarning")


def jit_state(path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.jit.load(str(path), map_location="cpu").state_dict()


def assert_same_state(got, want):
    assert list(got) == list(want)  # the same keys, in the same order
    for k in want:
        assert got[k].dtype == want[k].dtype and got[k].shape == want[k].shape, k
        assert got[k].stride() == want[k].stride(), k
        assert torch.equal(got[k], want[k]), k


@pytest.mark.parametrize("half", [True, False], ids=["fp16-like-openai", "fp32"])
def test_traced_clip_reads_bit_identical_to_torch_jit_load(tmp_path, half):
    path = save_traced_clip(tmp_path / "ViT-T-8.pt", seed=3, half=half)
    want = jit_state(path)
    got = load_state_dict_file(path)
    assert_same_state(got, want)
    assert {"input_resolution", "context_length", "vocab_size"} <= set(got)  # OpenAI's integer buffers
    assert got["vocab_size"].dtype == torch.int64 and int(got["vocab_size"]) == 49408
    assert got["visual.conv1.weight"].dtype == (torch.float16 if half else torch.float32)
    # the model built from the archive is the one built from torch.jit.load's state dict, bit for bit
    a, b = load_clip("ViT-B/16", path=path), build_clip(want)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert list(a.state_dict()) == list(b.state_dict())


def test_scripted_module_attributes_that_are_not_state_are_left_out(tmp_path):
    """A scripted module keeps plain tensor attributes in its archive; state_dict() leaves them out."""

    class WithMask(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(3, 2)
            self.register_buffer("scale", torch.tensor([2.0, 3.0]))
            self.mask = torch.ones(2, 2)  # an attribute, neither parameter nor buffer

        def forward(self, x):
            return self.lin(x) * self.scale + self.mask.sum()

    path = tmp_path / "scripted.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.save(torch.jit.script(WithMask()), str(path))
    got = read_torchscript_state(str(path))
    assert_same_state(got, jit_state(path))
    assert list(got) == ["scale", "lin.weight", "lin.bias"]


def test_code_that_runs_on_load_is_not_run(tmp_path):
    """An archive whose code/ writes a file while torch.jit.load restores it: refused, nothing written."""
    marker = tmp_path / "written-by-the-archive"
    path = save_traced_clip(tmp_path / "crafted.pt", extra={"evil": scripted_file_writer(marker)})
    with zipfile.ZipFile(path) as z:  # the payload is in the archive's code/
        assert any("torch.from_file" in z.read(n).decode(errors="replace") for n in z.namelist() if n.endswith(".py"))
    with pytest.raises(BackboneError) as err:
        load_clip("ViT-B/16", path=path)
    assert not marker.exists()
    assert str(err.value).startswith(f"{path} was refused without running any of it: its object evil of class ")
    assert "is restored by code in the archive (__setstate__), which no weight file needs" in str(err.value)
    assert "Use weights from a trusted source" in str(err.value)
    jit_state(path)  # what loading it used to do: the archive's code writes the file
    assert marker.exists()


@pytest.mark.parametrize("kind,global_name", [("exec", "builtins.exec"), ("system", f"{os.name}.system")])
def test_pickled_global_that_would_run_code_is_refused(tmp_path, kind, global_name):
    marker = tmp_path / "written-by-the-pickle"
    payload = writing_pickle(kind, marker)
    path = replace_data_pkl(save_traced_clip(tmp_path / "good.pt"), tmp_path / "crafted.pt", payload)
    with pytest.raises(BackboneError) as err:
        load_state_dict_file(path)
    assert str(err.value).startswith(f"{path} was refused without running any of it: its data.pkl asks for "
                                     f"{global_name}, which no weight file needs.")
    assert not marker.exists()
    pickle.loads(payload)  # an unrestricted unpickler runs it
    assert marker.exists()


def test_global_inside_the_module_tree_is_refused(tmp_path):
    """A harmful call hidden among genuine tensors (a module attribute) is refused too."""
    marker = tmp_path / "m"
    good = save_traced_clip(tmp_path / "good.pt")
    with zipfile.ZipFile(good) as z:
        data = z.read(next(n for n in z.namelist() if n.endswith("/data.pkl")))
    # the first attribute name of the root module is followed by its tensor: put a call there instead
    code = f"open({str(marker)!r}, 'w')".encode()
    # GLOBAL builtins.exec, BINUNICODE code, TUPLE1, REDUCE, POP: exec(code) and drop its result
    hook = b"cbuiltins\nexec\nX" + struct.pack("<I", len(code)) + code + b"\x85R0"
    at = data.index(b"positional_embedding") + len(b"positional_embedding") + 2  # after its BINPUT
    crafted = data[:at] + hook + data[at:]  # the call, then the original tensor
    pickle.loads(hook + b"N.")  # the hook is live: an unrestricted unpickler runs it
    assert marker.exists()
    marker.unlink()
    path = replace_data_pkl(good, tmp_path / "crafted.pt", crafted)
    with pytest.raises(BackboneError, match="asks for builtins.exec"):
        load_state_dict_file(path)
    assert not marker.exists()


def test_plain_pickle_payload_is_refused(tmp_path):
    marker = tmp_path / "m"
    path = tmp_path / "ViT-T.pt"
    torch.save({"visual.proj": Call(exec, f"open({str(marker)!r}, 'w')")}, path)
    with pytest.raises(BackboneError, match="it is a pickle of Python objects"):
        load_state_dict_file(str(path))
    assert not marker.exists()


def test_truncated_tensor_record_is_an_error(tmp_path):
    good = save_traced_clip(tmp_path / "good.pt")
    bad = tmp_path / "bad.pt"
    with zipfile.ZipFile(good) as a, zipfile.ZipFile(bad, "w") as b:
        for item in a.infolist():
            raw = a.read(item)
            b.writestr(item, raw[:-4] if item.filename.endswith("/data/1") else raw)
    with pytest.raises(BackboneError) as err:
        load_state_dict_file(str(bad))
    assert str(err.value).startswith(f"{bad} is a TorchScript archive that cannot be loaded: its tensor record ")
    assert "/data/1 holds" in str(err.value) and "(truncated or damaged)" in str(err.value)
