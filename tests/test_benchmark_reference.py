"""The shipped reference MiniBench CLIP: export/install round trip, recipe matching, digests, errors."""

import json
import os
import shutil

import pytest
import torch

from conftest import ROOT, requires_dassl
from spotlighter.benchmark import cli, data, paths, pretrain, recipe, reference

TINY = dict(embed_dim=64, vision_width=64, vision_layers=1, transformer_width=64, transformer_layers=1,
            steps=2, batch_size=16, warmup_steps=1)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A tiny CLIP pretrained here and exported as a reference into its own folder."""
    root = tmp_path_factory.mktemp("ref")
    path = str(root / "built" / "clip.pt")
    side = pretrain.ensure_clip(path, use_reference=False, **TINY)
    refdir = str(root / "reference")
    meta = reference.export(path, refdir)
    return path, side, refdir, meta


def test_export_is_sparse_and_round_trips_bit_exactly(exported):
    path, side, refdir, meta = exported
    built = torch.load(path, weights_only=True)
    emb = built[reference.SPARSE_KEY]
    # a 2-step pretraining touches the caption tokens' rows only; the rest keep their seeded values
    assert 0 < meta["sparse_rows"] < emb.shape[0] // 10
    payload = torch.load(reference.weights_file(refdir), weights_only=True)
    assert payload["sparse_values"].shape == (meta["sparse_rows"], emb.shape[1])
    assert reference.SPARSE_KEY not in payload["dense"]
    full = reference.reconstruct(refdir)
    assert set(full) == set(built) and all(torch.equal(full[k], built[k]) for k in built)
    assert meta["digest"] == side["digest"] == reference.file_digest(path)
    assert meta["params"] == side["params"] and meta["cpu"] == side["cpu"]
    assert side["origin"] == "pretrained here"


def test_digest_sees_one_bit():
    a = {"w": torch.zeros(3), "b": torch.ones(2)}
    b = {"w": torch.zeros(3), "b": torch.ones(2)}
    assert reference.state_digest(a) == reference.state_digest(b)
    b["b"][1] = torch.nextafter(torch.tensor(1.0), torch.tensor(2.0))
    assert reference.state_digest(a) != reference.state_digest(b)
    assert reference.state_digest({"w": torch.zeros(3)}) != reference.state_digest({"v": torch.zeros(3)})


def test_ensure_clip_installs_the_reference_without_pretraining(exported, tmp_path, monkeypatch):
    path, side, refdir, meta = exported
    monkeypatch.setattr(reference, "REFERENCE_DIR", refdir)
    monkeypatch.setattr(pretrain, "pretrain", lambda *a, **k: pytest.fail("pretrained instead of installing"))
    out = str(tmp_path / "clip.pt")
    got = pretrain.ensure_clip(out, **TINY)
    assert got["origin"] == "reference" and got["digest"] == meta["digest"]
    assert reference.file_digest(out) == meta["digest"]
    with open(out, "rb") as a, open(path, "rb") as b:  # the very bytes pretraining wrote
        assert a.read() == b.read()
    assert got["params"] == side["params"] and got["cpu"] == side["cpu"]
    assert pretrain.ensure_clip(out, **TINY) == got  # cached: nothing to do
    # another recipe has no reference: it is pretrained here
    assert reference.matches(dict(TINY, steps=3), refdir) is None
    assert reference.matches(TINY, refdir)["digest"] == meta["digest"]


def test_teacher_size_reference_beside_the_students(exported, tmp_path, monkeypatch):
    """A teacher-size CLIP (the same recipe, CLIP_SIZES' wider and deeper image tower) is exported to its
    own files next to the student's; the recipe finds each reference by its params, ensure_clip installs
    the teacher's bits, and a teacher installed where prepare puts it is checked against its reference."""
    path, side, refdir, meta = exported
    tparams = recipe.size_params(recipe.TEACHER, TINY)
    assert tparams["vision_width"] > TINY["vision_width"] and tparams["vision_layers"] > TINY["vision_layers"]
    tpath = str(tmp_path / "built" / "teacher.pt")
    tside = pretrain.ensure_clip(tpath, use_reference=False, **tparams)
    tmeta = reference.export(tpath, refdir, size=recipe.TEACHER)
    assert os.path.basename(reference.weights_file(refdir, recipe.TEACHER)) == (
        f"minibench_clip_teacher_v{recipe.PRETRAIN_VERSION}.pt")
    assert reference.weights_file(refdir, recipe.TEACHER) != reference.weights_file(refdir)
    assert reference.matches(TINY, refdir)["size"] == recipe.STUDENT
    found = reference.matches(tparams, refdir)
    assert found["size"] == recipe.TEACHER and found["digest"] == tmeta["digest"] == tside["digest"] != meta["digest"]
    monkeypatch.setattr(reference, "REFERENCE_DIR", refdir)
    monkeypatch.setattr(pretrain, "pretrain", lambda *a, **k: pytest.fail("pretrained instead of installing"))
    root = str(tmp_path / "data")
    out = paths.clip_path(root, recipe.TEACHER)
    assert out.endswith(os.path.join("minibench", "clip", "minibench_clip_teacher.pt"))
    got = pretrain.ensure_clip(out, **tparams)
    assert got["origin"] == "reference" and got["reference"] == os.path.basename(reference.weights_file(refdir, "teacher"))
    assert reference.file_digest(out) == tmeta["digest"]
    assert paths.data_root(out) == root and reference.claims_minibench(out)
    assert reference.check_clip(out)["digest"] == tmeta["digest"]
    torch.save(recipe.build_clip(dict(tparams, seed=7)).state_dict(), out)  # same shapes, other weights
    with pytest.raises(reference.ClipMismatch, match="minibench_clip_teacher_v"):
        reference.check_clip(out)
    with pytest.raises(ValueError, match="MiniBench CLIP size 'huge': expected one of student, teacher"):
        recipe.size_params("huge")


def test_prepare_builds_the_teacher_size_clip_beside_the_student(tmp_path, capsys):
    """prepare(sizes=(student, teacher)) writes both CLIPs where the configs read them, each with its own
    recipe (the teacher's architecture over the same params) and its zero-shot accuracy; --sizes is checked."""
    root = str(tmp_path / "root")
    s = cli.prepare(root, seed=0, dataset_params=dict(train_per_class=1, val_per_class=1, test_per_class=2),
                    clip_params=TINY, keys=("minibench",), use_reference=False,
                    sizes=(recipe.STUDENT, recipe.TEACHER))
    assert set(s["clips"]) == {recipe.STUDENT, recipe.TEACHER}
    teacher = s["clips"][recipe.TEACHER]
    assert teacher["path"] == os.path.abspath(paths.clip_path(root, recipe.TEACHER)) and teacher["built"]
    assert teacher["clip"]["params"] == recipe.normalise_params(recipe.size_params(recipe.TEACHER, dict(TINY, seed=0)))
    assert teacher["clip"]["digest"] == reference.file_digest(teacher["path"]) != s["clip"]["digest"]
    assert "zeroshot" in teacher["clip"] and s["clips"][recipe.STUDENT]["clip"] == s["clip"]
    state = torch.load(teacher["path"], weights_only=True)
    assert state["visual.conv1.weight"].shape[0] == recipe.CLIP_SIZES[recipe.TEACHER]["vision_width"]
    again = cli.prepare(root, seed=0, dataset_params=dict(train_per_class=1, val_per_class=1, test_per_class=2),
                        clip_params=TINY, keys=("minibench",), use_reference=False,
                        sizes=(recipe.STUDENT, recipe.TEACHER))
    assert not any(c["built"] for c in again["clips"].values())  # cached, digests checked
    assert cli.main(["prepare", "--root", root, "--sizes", "student,huge"]) == 2
    assert "--sizes 'student,huge': huge is not a MiniBench CLIP size; valid: student, teacher" in capsys.readouterr().err


def test_use_reference_false_pretrains_here(exported, tmp_path, monkeypatch):
    _, _, refdir, meta = exported
    monkeypatch.setattr(reference, "REFERENCE_DIR", refdir)
    got = pretrain.ensure_clip(str(tmp_path / "clip.pt"), use_reference=False, **TINY)
    assert got["origin"] == "pretrained here"
    # same CPU, same threads, same recipe: the same bits as the exported reference
    assert got["digest"] == meta["digest"]
    assert "bit-identical to the shipped reference" in cli.describe_origin(got)
    other = dict(got, digest="0" * 64)
    assert "differs from the shipped reference" in cli.describe_origin(other)


def test_damaged_reference_gives_a_clear_error(exported, tmp_path):
    _, _, refdir, _ = exported
    bad = str(tmp_path / "bad")
    shutil.copytree(refdir, bad)
    payload = torch.load(reference.weights_file(bad), weights_only=True)
    payload["dense"]["visual.conv1.weight"][0, 0, 0, 0] += 1.0
    torch.save(payload, reference.weights_file(bad))
    with pytest.raises(ValueError, match="digest .* records .*prepare --pretrain"):
        reference.reconstruct(bad)
    with open(reference.weights_file(bad), "wb") as f:
        f.write(b"not a torch file")
    with pytest.raises(ValueError, match="not a readable reference CLIP"):
        reference.reconstruct(bad)
    with pytest.raises(ValueError, match="no reference MiniBench CLIP"):
        reference.reconstruct(str(tmp_path / "missing"))


def test_export_refuses_an_incomplete_clip(tmp_path):
    with pytest.raises(ValueError, match="no complete MiniBench CLIP"):
        reference.export(str(tmp_path / "nothing.pt"), str(tmp_path / "ref"))


def test_shipped_reference_is_the_current_recipe_and_reconstructs():
    """Fails when the recipe, the generator or the defaults change without a new reference
    (`python -m spotlighter.benchmark prepare --pretrain` then `export-reference`), and when this
    machine cannot rebuild the reference's bits."""
    meta = reference.read_meta()
    assert meta is not None, f"no reference CLIP at {reference.weights_file()}"
    assert reference.matches({}) is not None, "the shipped reference CLIP is not of the current recipe"
    assert meta["params"]["generator_version"] == data.GENERATOR_VERSION
    state = reference.reconstruct()  # raises on a digest mismatch
    assert state[reference.SPARSE_KEY].shape == (recipe.DEFAULT_CLIP_PARAMS["vocab_size"],
                                                 recipe.DEFAULT_CLIP_PARAMS["embed_dim"])
    z = meta["zeroshot"]
    assert z["chance_base"] == pytest.approx(100 / data.NUM_BASE, abs=0.01)
    assert z["base"] >= 3 * z["chance_base"] and z["new"] >= 3 * z["chance_new"]
    assert os.path.getsize(reference.weights_file()) < 12 * 2**20


def test_shipped_teacher_size_reference_is_the_current_recipe_and_wider_and_deeper():
    """The teacher-size reference: the current recipe with CLIP_SIZES' teacher architecture, rebuilt to its
    digest here, with a wider and deeper image tower and joint space than the student reference, and a
    zero-shot accuracy of at least 3x chance on both halves."""
    meta = reference.read_meta(size=recipe.TEACHER)
    assert meta is not None, f"no teacher-size reference CLIP at {reference.weights_file(size=recipe.TEACHER)}"
    found = reference.matches(recipe.size_params(recipe.TEACHER))
    assert found is not None and found["size"] == recipe.TEACHER and found["digest"] == meta["digest"]
    teacher = reference.reconstruct(size=recipe.TEACHER)  # raises on a digest mismatch
    student = reference.reconstruct()
    blocks = lambda st: len({k.split(".")[3] for k in st if k.startswith("visual.transformer.resblocks.")})  # noqa: E731
    assert blocks(teacher) > blocks(student) and teacher["visual.proj"].shape[0] > student["visual.proj"].shape[0]
    assert teacher["text_projection"].shape[1] == teacher["visual.proj"].shape[1] > student["visual.proj"].shape[1]
    z = meta["zeroshot"]
    assert z["base"] >= 3 * z["chance_base"] and z["new"] >= 3 * z["chance_new"]
    assert os.path.getsize(reference.weights_file(size=recipe.TEACHER)) < 16 * 2**20


def test_cli_prepare_pretrain_flag_and_export(tmp_path, monkeypatch, capsys):
    calls = []
    real = cli.prepare

    def spy(root, **kw):
        calls.append(kw["use_reference"])
        return real(root, seed=kw["seed"], dataset_params=dict(train_per_class=1, val_per_class=1, test_per_class=2),
                    clip_params=TINY, keys=("minibench",), use_reference=kw["use_reference"])

    monkeypatch.setattr(cli, "prepare", spy)
    root = str(tmp_path / "root")
    assert cli.main(["prepare", "--root", root, "--pretrain"]) == 0
    assert "CLIP:     pretrained here" in capsys.readouterr().out
    assert cli.main(["prepare", "--root", root]) == 0  # cached: the flag only matters when building
    assert calls == [False, True]
    monkeypatch.setattr(reference, "REFERENCE_DIR", str(tmp_path / "newref"))
    assert cli.main(["export-reference", "--root", root]) == 0
    assert "trained token-embedding rows" in capsys.readouterr().out
    meta = json.load(open(reference.meta_file(str(tmp_path / "newref"))))
    assert meta["digest"] == reference.file_digest(paths.clip_path(root))
    assert cli.main(["export-reference", "--root", str(tmp_path / "empty")]) == 2
    assert "no complete MiniBench CLIP" in capsys.readouterr().err


# ----------------------------------------------------------------- an installed MiniBench CLIP is what it claims


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """The shipped reference CLIP installed where prepare puts it; its weights' and sidecar's bytes."""
    root = str(tmp_path_factory.mktemp("data"))
    path = paths.clip_path(root)
    side = pretrain.ensure_clip(path)  # the default recipe is the reference's: installed, not pretrained
    assert side["origin"] == "reference"
    with open(path, "rb") as w, open(paths.sidecar_path(path), "rb") as s:
        return w.read(), s.read()


def install_copy(installed, root) -> str:
    """The installed reference CLIP copied to ``root`` (tests damage their copy)."""
    path = paths.clip_path(str(root))
    os.makedirs(os.path.dirname(path))
    with open(path, "wb") as w, open(paths.sidecar_path(path), "wb") as s:
        w.write(installed[0])
        s.write(installed[1])
    return path


def swap_weights(path):
    torch.save(recipe.build_clip({"seed": 7}).state_dict(), path)  # random weights of the same shapes


def remove_block(path):
    state = torch.load(path, weights_only=True)
    state = {k: v for k, v in state.items() if not k.startswith("visual.transformer.resblocks.3.")}
    from spotlighter.backbone import build_clip

    assert len(build_clip(state).visual.transformer.resblocks) == 3  # builds fine: only the digest sees it
    torch.save(state, path)


def flip_byte(path):
    import struct
    import zipfile

    with zipfile.ZipFile(path) as z:  # the largest tensor record (the token embedding)
        item = max((i for i in z.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    with open(path, "r+b") as f:
        f.seek(item.header_offset + 26)
        name_len, extra_len = struct.unpack("<HH", f.read(4))
        at = item.header_offset + 30 + name_len + extra_len + item.file_size // 2
        f.seek(at)
        byte = f.read(1)
        f.seek(at)
        f.write(bytes([byte[0] ^ 0x01]))


def expect_refused(path, root):
    from spotlighter.backbone import BackboneError, load_clip

    ref = reference.read_meta()
    with pytest.raises(BackboneError) as err:
        load_clip("MiniBench-ViT", path=path)
    msg = str(err.value)
    assert msg.startswith(f"{path} is not the MiniBench CLIP it claims to be: its weights have digest ")
    assert f"the shipped reference CLIP's ({reference.meta_file()}) is {ref['digest'][:16]}..." in msg
    assert "(weights replaced, damaged or cut short)" in msg
    assert f"Restore it with `python -m spotlighter.benchmark prepare --root {root}`" in msg
    return msg


def test_installed_reference_clip_loads_and_is_checked(installed, tmp_path):
    path = install_copy(installed, tmp_path)
    model = pretrain.load_clip(path)
    want = reference.reconstruct()
    assert all(torch.equal(model.state_dict()[k], want[k]) for k in want)
    assert reference.check_clip(path)["origin"] == "reference"


@pytest.mark.parametrize("damage", [swap_weights, remove_block, flip_byte], ids=["random", "block-removed", "flipped-byte"])
def test_swapped_or_damaged_minibench_clip_is_refused_and_prepare_restores_it(installed, tmp_path, damage, caplog):
    path = install_copy(installed, tmp_path)
    damage(path)
    expect_refused(path, str(tmp_path))
    with caplog.at_level("WARNING"):
        side = pretrain.ensure_clip(path)  # what prepare does with it: installed again
    assert f"MiniBench CLIP at {path} is not the one its sidecar describes: its weights have digest" in caplog.text
    assert side["origin"] == "reference"
    with open(path, "rb") as f:
        assert f.read() == installed[0]
    pretrain.load_clip(path)


def test_a_sidecar_cannot_vouch_for_swapped_weights(installed, tmp_path):
    path = install_copy(installed, tmp_path)
    swap_weights(path)
    side = json.load(open(paths.sidecar_path(path)))
    side["digest"] = reference.file_digest(path)  # the sidecar rewritten for the swapped weights
    json.dump(side, open(paths.sidecar_path(path), "w"))
    expect_refused(path, str(tmp_path))
    # said honestly (pretrained here), they load, and prepare does not call them the reference
    side["origin"] = "pretrained here"
    json.dump(side, open(paths.sidecar_path(path), "w"))
    pretrain.load_clip(path)
    assert "differs from the shipped reference CLIP" in cli.describe_origin(side)
    # damaged after pretraining: checked against the digest recorded then
    flip_byte(path)
    from spotlighter.backbone import BackboneError

    with pytest.raises(BackboneError, match="the one recorded when it was pretrained"):
        pretrain.load_clip(path)


def test_minibench_clip_without_its_sidecar_is_refused(installed, tmp_path):
    from spotlighter.backbone import BackboneError

    path = install_copy(installed, tmp_path)
    os.remove(paths.sidecar_path(path))
    with pytest.raises(BackboneError) as err:
        pretrain.load_clip(path)
    assert str(err.value).startswith(f"{path} is not the MiniBench CLIP it claims to be: no sidecar "
                                     f"{paths.sidecar_path(path)} says which MiniBench CLIP it is")
    # a sidecar that says it is the reference of another recipe
    side = json.loads(installed[1])
    side["pretrain_version"] = recipe.PRETRAIN_VERSION - 1
    json.dump(side, open(paths.sidecar_path(path), "w"))
    with pytest.raises(BackboneError, match="no shipped reference CLIP has its recipe"):
        pretrain.load_clip(path)
    # unreadable weights where a MiniBench CLIP should be: the same advice
    with open(path, "wb") as f:
        f.write(b"garbage")
    with pytest.raises(BackboneError, match=r"not a torch file .*Restore it with `python -m spotlighter.benchmark prepare"):
        pretrain.load_clip(path)


def test_prepare_verifies_before_it_reports_the_reference(tmp_path, monkeypatch, capsys, caplog):
    real = cli.prepare

    def small(root, **kw):
        return real(root, seed=kw["seed"], dataset_params=dict(train_per_class=1, val_per_class=1, test_per_class=1),
                    keys=("minibench",), use_reference=kw["use_reference"])

    monkeypatch.setattr(cli, "prepare", small)
    root = str(tmp_path / "data")
    assert cli.main(["prepare", "--root", root]) == 0
    assert "CLIP:     the shipped reference CLIP" in capsys.readouterr().out
    path = paths.clip_path(root)
    swap_weights(path)
    assert cli.main(["zeroshot", "--root", root]) == 2
    assert capsys.readouterr().err.startswith(f"error: {path} is not the MiniBench CLIP it claims to be")
    with caplog.at_level("WARNING"):
        assert cli.main(["prepare", "--root", root]) == 0
    out = capsys.readouterr().out
    assert "not the one its sidecar describes" in caplog.text
    assert f"weights:  {path}  (built;" in out and "CLIP:     the shipped reference CLIP" in out
    assert reference.file_digest(path) == reference.read_meta()["digest"]


@requires_dassl
def test_train_refuses_a_swapped_minibench_clip_from_the_configs_path(installed, tmp_path):
    """The MiniBench trainer configs read MODEL.BACKBONE.PATH "{root}/minibench/clip/minibench_clip.pt"."""
    import subprocess
    import sys

    from tiny_data import make_tiny_minibench

    make_tiny_minibench(str(tmp_path), train=1, val=1, test=1)
    path = install_copy(installed, tmp_path)
    swap_weights(path)
    proc = subprocess.run([sys.executable, "train.py", "--root", str(tmp_path), "--seed", "1", "--trainer", "ZeroshotCLIP",
                           "--dataset-config-file", "configs/datasets/minibench.yaml",
                           "--config-file", "configs/trainers/ZeroshotCLIP/minibench.yaml",
                           "--output-dir", str(tmp_path / "out"), "--eval-only", "DATALOADER.NUM_WORKERS", "0"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert f"{path} is not the MiniBench CLIP it claims to be: its weights have digest" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_a_missing_minibench_clip_names_the_command_that_installs_it(tmp_path):
    """A $DATA prepared before the teacher-size CLIP existed: the error names the file and `prepare`."""
    from spotlighter.backbone import BackboneError, resolve_weights

    root = str(tmp_path / "data")
    for size in recipe.CLIP_SIZES:
        path = paths.clip_path(root, size)
        with pytest.raises(BackboneError) as e:
            resolve_weights("MiniBench-ViT", path)
        assert f"it is MiniBench's {os.path.basename(path)}" in str(e.value)
        assert f"python -m spotlighter.benchmark prepare --root {root}" in str(e.value)
    with pytest.raises(BackboneError, match="which is not a file. Give the path of a CLIP weight file"):
        resolve_weights("MiniBench-ViT", str(tmp_path / "elsewhere.pt"))
