"""MiniBench CLIP: plain state dict loadable by clip.model.build_model, caching rules, loss, CLI."""

import json
import os

import numpy as np
import pytest
import torch

from spotlighter.benchmark import cli, data, pretrain

TINY = dict(
    embed_dim=64,
    vision_width=64,
    vision_layers=1,
    transformer_width=64,
    transformer_layers=1,
    steps=2,
    batch_size=16,
    warmup_steps=1,
)
SMALL = dict(train_per_class=1, val_per_class=1, test_per_class=2)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("mbclip")
    ddir = str(root / "minibench")
    data.ensure(ddir, seed=0, **SMALL)
    path = str(root / "clip" / "tiny.pt")
    meta = pretrain.ensure_clip(path, dataset_dir=ddir, **TINY)
    return ddir, path, meta


def test_weights_load_through_build_model(tiny):
    from clip.model import build_model

    _, path, meta = tiny
    sd = torch.load(path, weights_only=True)
    assert all(isinstance(v, torch.Tensor) and v.dtype == torch.float32 for v in sd.values())
    assert sd["visual.conv1.weight"].shape == (64, 3, 8, 8)
    assert sd["visual.positional_embedding"].shape == (65, 64)  # 8x8 patches + CLS
    assert sd["token_embedding.weight"].shape == (49408, 64)
    assert sd["positional_embedding"].shape == (77, 64)
    assert sd["text_projection"].shape == (64, 64)
    model = build_model(sd).float()
    assert model.visual.input_resolution == 64 and model.context_length == 77
    assert model.visual.transformer.resblocks[0].attn.num_heads == 1
    import clip

    with torch.no_grad():
        img = model.encode_image(torch.zeros(2, 3, 64, 64))
        txt = model.encode_text(clip.tokenize(["a photo of a red circle.", "a blue star"]))
    assert img.shape == (2, 64) and txt.shape == (2, 64)
    # clip.load on a local state-dict file (the path users take for real CLIP weights)
    m2, _ = clip.load(path, device="cpu", jit=False)
    assert m2.visual.conv1.weight.shape == (64, 3, 8, 8)
    z = meta["zeroshot"]
    assert 0 <= z["base"] <= 100 and 0 <= z["new"] <= 100
    assert z["chance_base"] == pytest.approx(100 / data.NUM_BASE, abs=0.01)


def test_ensure_clip_noop_and_mismatch(tiny):
    ddir, path, meta = tiny
    mtime = os.stat(path).st_mtime_ns
    assert pretrain.ensure_clip(path, dataset_dir=ddir, **TINY) == meta
    assert os.stat(path).st_mtime_ns == mtime
    with pytest.raises(ValueError) as e:
        pretrain.ensure_clip(path, **dict(TINY, steps=3))
    assert "steps" in str(e.value) and "Delete" in str(e.value)
    with open(path + ".json") as f:
        side = json.load(f)
    assert side["params"]["steps"] == 2 and side["pretrain_version"] == pretrain.PRETRAIN_VERSION


def test_contrastive_loss_decreases():
    p = pretrain._normalise(dict(TINY, batch_size=32))
    torch.manual_seed(0)
    model = pretrain.build_clip(p)
    bank = pretrain._CaptionBank(p["context_length"])
    batch = pretrain.sample_batch(0, 32, p, bank)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(6):
        loss = pretrain.contrastive_loss(model, *batch, bank)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.05, losses


def test_pretraining_stream_is_deterministic_and_disjoint():
    p = pretrain._normalise(TINY)
    bank = pretrain._CaptionBank(77)
    x1, l1, c1 = pretrain.sample_batch(3, 8, p, bank)
    x2, l2, c2 = pretrain.sample_batch(3, 8, p, bank)
    assert torch.equal(x1, x2) and torch.equal(l1, l2) and torch.equal(c1, c2)
    assert not torch.equal(x1, pretrain.sample_batch(4, 8, p, bank)[0])
    # a caption always describes its image's class
    assert bank.positive[l1, c1].all()
    assert bank.train_len <= 77


def test_cli_prepare_idempotent_and_zeroshot(tmp_path, capsys, monkeypatch):
    # Tiny architecture through the CLI's Python entry point (the CLI itself uses the defaults).
    root = str(tmp_path)
    s = cli.prepare(root, seed=0, dataset_params=SMALL, clip_params=TINY, target_params=SMALL)
    assert s["built_dataset"] and s["built_clip"] and all(s["built"].values()) and len(s["built"]) == 7
    assert set(s["clip"]["zeroshot_targets"]) == set(data.SPECS) - {"minibench"}
    assert os.path.isfile(os.path.join(root, "minibench", data.SPLIT_FILENAME))
    assert s["clip_path"] == os.path.abspath(os.path.join(root, "minibench", "clip", "minibench_clip.pt"))
    s2 = cli.prepare(root, seed=0, dataset_params=SMALL, clip_params=TINY, target_params=SMALL)
    assert not s2["built_dataset"] and not s2["built_clip"] and not any(s2["built"].values())
    assert cli.main(["zeroshot", "--root", root]) == 0
    out = capsys.readouterr().out
    assert "zero-shot" in out and "chance" in out
    assert cli.main(["prepare", "--root", root, "--seed", "1"]) == 2  # mismatch -> clear error
    assert "Delete" in capsys.readouterr().err


def test_pretraining_is_seeded():
    a = pretrain.pretrain(dict(TINY, batch_size=8)).state_dict()
    b = pretrain.pretrain(dict(TINY, batch_size=8)).state_dict()
    c = pretrain.pretrain(dict(TINY, batch_size=8, seed=1)).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["visual.conv1.weight"], c["visual.conv1.weight"])


@pytest.mark.parametrize("field", ["pretrain_version", "generator_version"])
def test_clip_cache_rebuilt_when_recipe_or_generator_version_changes(tmp_path, field):
    path = str(tmp_path / "clip.pt")
    pretrain.ensure_clip(path, **TINY)
    side_path = path + ".json"
    side = json.load(open(side_path))
    if field == "pretrain_version":
        side["pretrain_version"] = pretrain.PRETRAIN_VERSION - 1
    else:
        side["params"]["generator_version"] = data.GENERATOR_VERSION - 1
    json.dump(side, open(side_path, "w"))
    torch.save({"stale": torch.zeros(1)}, path)
    meta = pretrain.ensure_clip(path, **TINY)  # no ValueError: a stale cache is rebuilt
    assert meta["pretrain_version"] == pretrain.PRETRAIN_VERSION
    assert meta["params"]["generator_version"] == data.GENERATOR_VERSION
    assert "visual.conv1.weight" in torch.load(path, weights_only=True)


def test_caption_bank_covers_every_vocabulary():
    """The small CLIP sees every concept of every generated dataset (xd targets included)."""
    bank = pretrain._CaptionBank(77)
    for key, vocab in data.VOCABULARIES.items():
        for label, name in enumerate(vocab.classnames):
            c = bank.concept_index[(key, label)]
            texts = [bank.texts[u] for u in bank.positive[c].nonzero().flatten().tolist()]
            assert any(name in t for t in texts), (key, name)
            if key != "scenes":  # other vocabularies: a caption fits exactly its own concept
                assert all(name in t for t in texts)
                assert bank.positive[:, bank.index[f"a photo of a {name}."]].sum() == 1
    p = pretrain._normalise(TINY)
    rng = np.random.default_rng(0)
    concepts = pretrain.sample_concepts(rng, 4000, p, bank)
    share = (concepts < data.NUM_CLASSES).mean()
    assert abs(share - p["scene_share"]) < 0.03 and len(set(concepts.tolist())) == len(bank.concepts)


def test_calibrate_coop_proxy_starts_from_zero_shot(tiny):
    """The calibration probe: with lr 0 the CoOp proxy (context 'a photo of a') is the zero-shot
    classifier, so its accuracies equal zero-shot's exactly; zero-shot matches pretrain's own."""
    from spotlighter.benchmark.calibrate import coop_proxy

    ddir, path, meta = tiny
    still = coop_proxy(path, ddir, shots=1, seed=1, epochs=2, lr=0.0, n_ctx=4, ctx_init="a photo of a")
    assert (still["coop_base"], still["coop_new"]) == (still["zs_base"], still["zs_new"])
    z = pretrain.zeroshot_accuracy(pretrain.load_clip(path), ddir)
    assert (still["zs_base"], still["zs_new"]) == (z["base"], z["new"])
    assert still["chance"] == round(100 / data.NUM_BASE, 2) and still["num_test"] == 2 * data.NUM_CLASSES
    moved = coop_proxy(path, ddir, shots=1, seed=1, epochs=3, lr=5.0, n_ctx=2, ctx_init="")
    assert set(moved) == set(still)
    assert 0.0 <= moved["coop_base"] <= 100.0 and 0.0 <= moved["probe_base"] <= 100.0


def test_calibrate_cli_prints_the_headroom_line(tiny, capsys):
    ddir, path, _ = tiny
    root = os.path.dirname(ddir)
    assert cli.main(["calibrate", "--root", root, "--weights", path, "--shots", "1", "--seeds", "1,2",
                     "--epochs", "2", "--lr", "0", "--n-ctx", "4", "--ctx-init", "a photo of a"]) == 0
    out = capsys.readouterr().out
    assert out.count('"zs_base"') == 3  # one line per seed + the mean
    assert "CoOp base - ZS base = +0.00; CoOp new - ZS new = +0.00" in out
