"""MiniBench CLIP: plain state dict loadable by clip.model.build_model, caching rules, loss, CLI."""

import json
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from spotlighter import machine
from spotlighter.benchmark import cli, data, pretrain, recipe

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
    assert side["params"]["steps"] == 2 and side["pretrain_version"] == recipe.PRETRAIN_VERSION
    # which CPU kind and torch made these weights (another CPU's kernels give other weights)
    assert side["cpu"] == machine.cpu_name() and side["torch"] == torch.__version__


def test_contrastive_loss_decreases():
    p = recipe.normalise_params(dict(TINY, batch_size=32))
    torch.manual_seed(0)
    model = recipe.build_clip(p)
    bank = pretrain._CaptionBank(p["context_length"])
    batch = pretrain.sample_batch(0, 32, p, bank)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(6):
        loss = pretrain.contrastive_loss(model, *batch[:3], bank, batch[3], p["cross_domain_captions"])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.05, losses


def test_pretraining_stream_is_deterministic_and_disjoint():
    p = recipe.normalise_params(TINY)
    bank = pretrain._CaptionBank(77)
    x1, l1, c1, d1 = pretrain.sample_batch(3, 64, p, bank)
    x2, l2, c2, d2 = pretrain.sample_batch(3, 64, p, bank)
    assert torch.equal(x1, x2) and torch.equal(l1, l2) and torch.equal(c1, c2) and torch.equal(d1, d2)
    assert not torch.equal(x1, pretrain.sample_batch(4, 64, p, bank)[0])
    # a caption always describes its image's class, and a scene's caption is of the scene's domain
    assert bank.positive[l1, c1].all()
    assert torch.equal(bank.domain[c1], d1)
    scene = l1 < data.NUM_CLASSES
    assert (d1[scene] > 0).all() and (d1[~scene] == 0).all() and len(set(d1[scene].tolist())) == 2
    assert bank.train_len <= 77


def test_benchmark_like_scenes_are_rendered_as_the_benchmark():
    """Scene-domain images are the benchmark's renders (SCENE_RENDER), photo-domain ones the clean
    pretraining renders: same seed stream, re-rendered by hand."""
    p = recipe.normalise_params(TINY)
    bank = pretrain._CaptionBank(77)
    x, labels, caps, doms = pretrain.sample_batch(2, 24, p, bank)
    rng = data.image_rng(p["seed"], data.DOMAIN_PRETRAIN, 2)
    concepts = pretrain.sample_concepts(rng, 24, p, bank)
    assert torch.equal(torch.as_tensor(concepts), labels)
    for i, c in enumerate(concepts):
        key, label = bank.concepts[int(c)]
        if key == "scenes":
            scene = rng.random() < p["benchmark_like_share"]
            assert int(doms[i]) == 1 + data.CAPTION_DOMAINS.index("scene" if scene else "photo")
            im = data.render(label, rng, data.SCENE_RENDER if scene else p["render"]["scenes"])
        else:
            im = data.VOCABULARIES[key].render(label, rng, p["render"][key])
        assert torch.equal(pretrain.to_tensor([im])[0], x[i]), i
        bank.caption(int(c), rng, p["attribute_only_prob"], ("scene" if scene else "photo") if key == "scenes" else None)


class _FixedFeatures(torch.nn.Module):
    """Stands in for CLIP in the loss: given image and caption features."""

    def __init__(self, img, txt_by_id):
        super().__init__()
        self.img, self.txt_by_id = img, txt_by_id
        self.logit_scale = torch.nn.Parameter(torch.tensor(0.0))

    def encode_image(self, images):
        return self.img

    def encode_text(self, tokens):
        return self.txt_by_id(tokens)


@pytest.mark.parametrize("mode", recipe.CROSS_DOMAIN_CAPTIONS)
def test_contrastive_loss_cross_domain_hand_computed(mode):
    """Two scene images of class 0 (domains photo, scene), captioned "a photo of a red circle." and
    "a red circle among clutter."; the loss by hand for each treatment of the cross-domain pairs."""
    bank = pretrain._CaptionBank(77)
    name = data.CLASSNAMES[0]
    u_photo, u_scene = bank.index[f"a photo of a {name}."], bank.index[f"a {name} among clutter."]
    photo, scene = (1 + data.CAPTION_DOMAINS.index(d) for d in ("photo", "scene"))
    g = torch.Generator().manual_seed(0)
    img, txt = torch.randn(2, 8, generator=g), torch.randn(2, 8, generator=g)
    rows = {u_photo: 0, u_scene: 1}
    order = sorted(rows)  # the loss's caption columns: torch.unique order
    model = _FixedFeatures(img, lambda tok: txt[[rows[u] for u in order]])
    labels, caps, doms = torch.tensor([0, 0]), torch.tensor([u_photo, u_scene]), torch.tensor([photo, scene])
    got = pretrain.contrastive_loss(model, None, labels, caps, bank, doms, mode)
    sims = F.normalize(img, dim=-1) @ F.normalize(txt, dim=-1).t()  # [image, caption], own pairs on the diagonal
    if mode == "positive":  # both captions fit both images: targets uniform over the two
        i2t = -0.5 * sims.log_softmax(1).sum(1).mean()
        t2i = -0.5 * sims.log_softmax(0).sum(0).mean()
    elif mode == "negative":  # own pair positive, the other a negative
        i2t = -sims.log_softmax(1).diag().mean()
        t2i = -sims.log_softmax(0).diag().mean()
    else:  # only the own pair is in each softmax: -log(1) = 0
        i2t = t2i = torch.tensor(0.0)
    torch.testing.assert_close(got, 0.5 * (i2t + t2i))
    # without image domains (or recipe 2) every mode is the plain multi-positive loss
    plain = pretrain.contrastive_loss(model, None, labels, caps, bank)
    torch.testing.assert_close(plain, 0.5 * (-0.5 * sims.log_softmax(1).sum(1).mean()
                                             - 0.5 * sims.log_softmax(0).sum(0).mean()))


def test_recipe_parameters_are_checked():
    with pytest.raises(ValueError, match="cross_domain_captions = 'maybe'"):
        recipe.normalise_params({"cross_domain_captions": "maybe"})
    with pytest.raises(ValueError, match="benchmark_like_share = 1.5"):
        recipe.normalise_params({"benchmark_like_share": 1.5})
    assert recipe.normalise_params({"benchmark_like_share": None})["benchmark_like_share"] is None


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
        side["pretrain_version"] = recipe.PRETRAIN_VERSION - 1
    else:
        side["params"]["generator_version"] = data.GENERATOR_VERSION - 1
    json.dump(side, open(side_path, "w"))
    torch.save({"stale": torch.zeros(1)}, path)
    meta = pretrain.ensure_clip(path, **TINY)  # no ValueError: a stale cache is rebuilt
    assert meta["pretrain_version"] == recipe.PRETRAIN_VERSION
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
    p = recipe.normalise_params(TINY)
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


def test_calibrate_follows_the_demos_coop_config(tmp_path):
    """The proxy's default schedule is read from the CoOp config the demo runs (one place)."""
    from spotlighter.benchmark.calibrate import DEFAULT_COOP_CONFIG, proxy_settings
    from spotlighter.run import demo

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    coop_cfg = dict(demo.parse_runs(None))["coop"]
    assert DEFAULT_COOP_CONFIG == os.path.join("configs", "trainers", "CoOp", f"{coop_cfg}.yaml")
    s = proxy_settings(os.path.join(repo, DEFAULT_COOP_CONFIG))
    assert s == dict(n_ctx=16, ctx_init="", epochs=50, lr=0.002, momentum=0.9, weight_decay=5e-4, batch_size=32)
    bad = tmp_path / "bad.yaml"
    bad.write_text("OPTIM:\n  LR: 0.1\n")
    with pytest.raises(ValueError, match=r"bad.yaml: key TRAINER.COOP.N_CTX is missing"):
        proxy_settings(str(bad))
    with pytest.raises(ValueError, match="cannot read it"):
        proxy_settings(str(tmp_path / "none.yaml"))


def test_cli_root_that_is_a_file_or_unwritable_is_one_line(tmp_path, capsys, monkeypatch):
    afile = tmp_path / "data.tar"
    afile.write_text("x")
    for cmd in ("prepare", "zeroshot", "calibrate", "export-reference"):
        assert cli.main([cmd, "--root", str(afile)]) == 2
        assert capsys.readouterr().err == (f"error: --root {afile} is a file, not a folder: give the data folder "
                                           "($DATA) that holds (or will hold) minibench/\n")
    import errno

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp_path / "d" / "minibench" / "images"))

    monkeypatch.setattr(data, "generate", full)
    assert cli.main(["prepare", "--root", str(tmp_path / "d")]) == 2
    err = capsys.readouterr().err
    assert err.endswith(f"error: cannot write {tmp_path}/d/minibench/images (No space left on device): give a "
                        "--root on a writable file system with free space\n") and "Traceback" not in err
