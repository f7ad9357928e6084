"""The shipped reference MiniBench CLIP: export/install round trip, recipe matching, digests, errors."""

import json
import os
import shutil

import pytest
import torch

from spotlighter.benchmark import cli, data, pretrain, reference

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
    assert state[reference.SPARSE_KEY].shape == (pretrain.DEFAULT_CLIP_PARAMS["vocab_size"],
                                                 pretrain.DEFAULT_CLIP_PARAMS["embed_dim"])
    z = meta["zeroshot"]
    assert z["chance_base"] == pytest.approx(100 / data.NUM_BASE, abs=0.01)
    assert z["base"] >= 3 * z["chance_base"] and z["new"] >= 3 * z["chance_new"]
    assert os.path.getsize(reference.weights_file()) < 12 * 2**20


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
    assert meta["digest"] == reference.file_digest(cli.clip_path(root))
    assert cli.main(["export-reference", "--root", str(tmp_path / "empty")]) == 2
    assert "no complete MiniBench CLIP" in capsys.readouterr().err
