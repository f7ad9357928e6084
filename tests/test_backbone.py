"""spotlighter.backbone: load_clip / FrozenCLIP against the reference ``clip.model.CLIP``, and errors."""

import math
import os

import pytest
import torch

from spotlighter.backbone import (OFFLINE_ENV, WEIGHTS_DIR_ENV, BackboneError, FrozenCLIP, load_clip,
                                  load_state_dict_file, resolve_weights)
from tiny_clip import save_tiny_clip


pytestmark = pytest.mark.usefixtures("one_torch_thread")


TEXTS = ["a photo of a cat.", "a dog", "x"]


def reference_clip(path):
    from clip.model import build_model

    state = torch.load(path, map_location="cpu", weights_only=True)
    ref = build_model(dict(state)).float()
    ref.load_state_dict(state)
    return ref.eval()


def images(batch=3, res=32, seed=0):
    return torch.randn(batch, 3, res, res, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def ref(tiny_clip_path):
    return reference_clip(tiny_clip_path)


@pytest.fixture(scope="module")
def wide_clip_path(tmp_path_factory):
    """A tiny CLIP whose vision transformer has 2 heads (build_model: heads = width // 64)."""
    return save_tiny_clip(tmp_path_factory.mktemp("wide") / "wide.pt", seed=3, vision_width=128)


# ----------------------------------------------------------------------------- against the reference
def test_properties(frozen_clip):
    assert frozen_clip.is_vit
    assert frozen_clip.embed_dim == 64 and frozen_clip.text_width == 64 and frozen_clip.vision_width == 64
    assert frozen_clip.input_resolution == 32 and frozen_clip.context_length == 77
    assert frozen_clip.dtype == torch.float32
    assert not any(p.requires_grad for p in frozen_clip.parameters())


def test_image_tokens_match_reference(frozen_clip, ref):
    x = images()
    with torch.no_grad():
        want = ref.encode_image(x)
        out = frozen_clip.encode_image_tokens(x)
    assert out.tokens.shape == (3, 17, 64)  # 1 CLS + 16 patches, projected to d = 64
    assert out.global_feat.shape == (3, 64)
    torch.testing.assert_close(out.global_feat, want)
    assert torch.equal(out.tokens[:, 0], out.global_feat)
    with torch.no_grad():
        torch.testing.assert_close(frozen_clip.encode_image(x), want)


def test_patch_tokens_match_reference_last_block(frozen_clip, ref):
    """Every token (not only CLS) is the last block's output through ln_post and proj."""
    x = images(2)
    v = ref.visual
    with torch.no_grad():
        h = v.conv1(x).flatten(2).permute(0, 2, 1)
        h = torch.cat([v.class_embedding.expand(2, 1, -1), h], dim=1) + v.positional_embedding
        h = v.transformer(v.ln_pre(h).permute(1, 0, 2)).permute(1, 0, 2)
        want = v.ln_post(h) @ v.proj
        got = frozen_clip.encode_image_tokens(x, need_attn=False)
    torch.testing.assert_close(got.tokens, want)
    assert got.cls_attn is None


def test_text_matches_reference(frozen_clip, ref):
    import clip

    with torch.no_grad():
        want = ref.encode_text(clip.tokenize(TEXTS))
        got = frozen_clip.encode_text(TEXTS)
        batched = frozen_clip.encode_text(TEXTS, batch_size=2)
    assert got.shape == (3, 64)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(batched, got)


def manual_cls_attention(ref, x):
    """Last block's CLS->patch attention averaged over heads, from in_proj weights."""
    v = ref.visual
    blocks = list(v.transformer.resblocks)
    with torch.no_grad():
        h = v.conv1(x).flatten(2).permute(0, 2, 1)
        h = torch.cat([v.class_embedding.expand(x.shape[0], 1, -1), h], dim=1) + v.positional_embedding
        h = v.ln_pre(h).permute(1, 0, 2)  # (N, B, D)
        for block in blocks[:-1]:
            h = block(h)
        last = blocks[-1]
        z = last.ln_1(h).permute(1, 0, 2)  # (B, N, D)
        D = z.shape[-1]
        heads = last.attn.num_heads
        W, b = last.attn.in_proj_weight, last.attn.in_proj_bias
        q = z @ W[:D].t() + b[:D]
        k = z @ W[D:2 * D].t() + b[D:2 * D]
        dh = D // heads
        per_head = []
        for i in range(heads):
            qi, ki = q[..., i * dh:(i + 1) * dh], k[..., i * dh:(i + 1) * dh]
            per_head.append((qi @ ki.transpose(1, 2) / math.sqrt(dh)).softmax(-1))
        attn = torch.stack(per_head).mean(0)  # (B, N, N)
    return attn[:, 0, 1:], heads


@pytest.mark.parametrize("which", ["tiny", "wide"])
def test_cls_attention_matches_manual(which, tiny_clip_path, wide_clip_path):
    path = tiny_clip_path if which == "tiny" else wide_clip_path
    reference = reference_clip(path)
    fc = FrozenCLIP(load_clip("ViT-B/16", path=path))
    x = images(2, seed=5)
    want, heads = manual_cls_attention(reference, x)
    assert heads == (1 if which == "tiny" else 2)
    with torch.no_grad():
        got = fc.encode_image_tokens(x).cls_attn
    assert got.shape == (2, 16)
    torch.testing.assert_close(got, want)
    assert (got >= 0).all()
    sums = got.sum(-1)
    assert (sums <= 1 + 1e-6).all() and (sums < 1).all()  # CLS->CLS is not included


# ----------------------------------------------------------------------------- loading
def test_fp32_weights_survive_bit_for_bit(tiny_clip_path):
    saved = torch.load(tiny_clip_path, weights_only=True)
    model = load_clip("ViT-B/16", path=tiny_clip_path)
    loaded = model.state_dict()
    assert set(loaded) == set(saved)
    for k, v in saved.items():
        assert loaded[k].dtype == v.dtype, k
        assert torch.equal(loaded[k], v), k
    # the tiny weights really are not fp16-representable (so this test can fail on a rounding path)
    w = saved["visual.conv1.weight"]
    assert not torch.equal(w.half().float(), w)


def test_float16_is_openai_half_precision(tiny_clip_path):
    """fp16 = clip.model.build_model's convert_weights: same dtype *and* value per tensor."""
    from clip.model import build_model

    saved = torch.load(tiny_clip_path, weights_only=True)
    model = load_clip("ViT-B/16", path=tiny_clip_path, dtype=torch.float16)
    reference = build_model(dict(saved))  # OpenAI's builder: convert_weights on the fp32 file
    ours = dict(model.named_parameters()) | dict(model.named_buffers())
    theirs = dict(reference.named_parameters()) | dict(reference.named_buffers())
    assert set(ours) == set(theirs)
    for k, v in theirs.items():
        assert ours[k].dtype == v.dtype, k
        assert torch.equal(ours[k], v), k
    kinds = {k: v.dtype for k, v in ours.items()}
    # both kinds are present, so the comparison above can fail either way
    assert kinds["visual.conv1.weight"] == kinds["transformer.resblocks.0.attn.in_proj_weight"] == torch.float16
    assert kinds["visual.proj"] == kinds["text_projection"] == torch.float16
    assert kinds["ln_final.weight"] == kinds["visual.ln_pre.bias"] == torch.float32
    assert kinds["token_embedding.weight"] == kinds["positional_embedding"] == torch.float32
    assert kinds["logit_scale"] == torch.float32
    assert not any(p.requires_grad for p in model.parameters())
    assert not model.training
    assert FrozenCLIP(model).dtype == torch.float16


def test_float16_forward_runs_and_stays_close_to_fp32(tiny_clip_path):
    """The whole-model cast (LayerNorm in fp16) failed here with "mixed dtype (CPU)"."""
    half = FrozenCLIP(load_clip("ViT-B/16", path=tiny_clip_path, dtype=torch.float16))
    full = FrozenCLIP(load_clip("ViT-B/16", path=tiny_clip_path))
    x = images(2, seed=3)
    with torch.no_grad():
        got, want = half.encode_image_tokens(x), full.encode_image_tokens(x)
        text_half, text_full = half.encode_text(["a photo of a cat."]), full.encode_text(["a photo of a cat."])
    assert got.tokens.dtype == text_half.dtype == torch.float16
    torch.testing.assert_close(got.tokens.float(), want.tokens, atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(got.cls_attn.float(), want.cls_attn, atol=2e-3, rtol=2e-2)
    torch.testing.assert_close(text_half.float(), text_full, atol=2e-2, rtol=2e-2)


def test_unsupported_dtype_is_refused(tiny_clip_path):
    with pytest.raises(BackboneError, match="bfloat16"):
        load_clip("ViT-B/16", path=tiny_clip_path, dtype=torch.bfloat16)


def test_frozen_clip_stays_in_eval(frozen_clip):
    frozen_clip.train()
    assert not frozen_clip.training and not frozen_clip.model.training
    assert not any(m.training for m in frozen_clip.modules())


def test_wrapped_state_dict_is_accepted(tiny_clip_path, tmp_path):
    state = torch.load(tiny_clip_path, weights_only=True)
    path = tmp_path / "wrapped.pt"
    torch.save({"state_dict": state}, path)
    model = load_clip("ViT-B/16", path=str(path))
    assert torch.equal(model.visual.proj, state["visual.proj"])


# ----------------------------------------------------------------------------- errors
def test_missing_path(tmp_path):
    missing = str(tmp_path / "nope" / "clip.pt")
    with pytest.raises(BackboneError, match="MODEL.BACKBONE.PATH") as err:
        load_clip("ViT-B/16", path=missing)
    assert missing in str(err.value)


def test_unknown_name(monkeypatch, tmp_path):
    monkeypatch.setenv(WEIGHTS_DIR_ENV, str(tmp_path))
    with pytest.raises(BackboneError) as err:
        resolve_weights("ViT-Z/99")
    msg = str(err.value)
    assert "MODEL.BACKBONE.NAME" in msg and "'ViT-Z/99'" in msg and "ViT-B/16" in msg
    assert os.listdir(tmp_path) == []  # no download attempted


def test_offline_known_name_names_the_file_and_folder(monkeypatch, tmp_path):
    monkeypatch.setenv(OFFLINE_ENV, "1")
    monkeypatch.setenv(WEIGHTS_DIR_ENV, str(tmp_path))
    with pytest.raises(BackboneError) as err:
        load_clip("ViT-B/16")
    msg = str(err.value)
    assert "ViT-B-16.pt" in msg and str(tmp_path) in msg and OFFLINE_ENV in msg
    assert os.listdir(tmp_path) == []


def _pretend_openai_file(monkeypatch, path, name="ViT-B/16"):
    """Make clip's URL for ``name`` carry the SHA-256 of ``path`` (as OpenAI's URLs carry theirs)."""
    import hashlib

    from clip import clip as clip_api

    digest = hashlib.sha256(open(path, "rb").read()).hexdigest()
    url = f"https://openaipublic.azureedge.net/clip/models/{digest}/{os.path.basename(path)}"
    monkeypatch.setitem(clip_api._MODELS, name, url)
    return digest


def test_weights_found_in_weights_dir(monkeypatch, tmp_path, tiny_clip_path):
    monkeypatch.setenv(OFFLINE_ENV, "1")
    monkeypatch.setenv(WEIGHTS_DIR_ENV, str(tmp_path))
    target = tmp_path / "ViT-B-16.pt"
    target.write_bytes(open(tiny_clip_path, "rb").read())
    _pretend_openai_file(monkeypatch, target)
    assert resolve_weights("ViT-B/16") == str(target)
    model = load_clip("ViT-B/16")  # found there, checksum verified, loaded
    assert model.visual.conv1.weight.shape == (64, 3, 8, 8)
    with pytest.raises(BackboneError, match="ViT-B-32.pt"):
        resolve_weights("ViT-B/32")  # another name is not satisfied by that file


def test_cached_weights_are_checked_against_the_url_checksum_every_time(monkeypatch, tmp_path, tiny_clip_path):
    monkeypatch.setenv(OFFLINE_ENV, "1")
    monkeypatch.setenv(WEIGHTS_DIR_ENV, str(tmp_path / "weights"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    target = tmp_path / "weights" / "ViT-B-16.pt"
    target.parent.mkdir()
    target.write_bytes(open(tiny_clip_path, "rb").read())
    with pytest.raises(BackboneError) as err:  # the real URL's checksum: a wrong model named ViT-B-16.pt
        resolve_weights("ViT-B/16")
    assert f"{target} is not OpenAI's ViT-B/16 weight file: its SHA-256 is" in str(err.value)
    assert "5806e77cd80f8b59890b7e101eabd078d9fb84e6937f9e85e4ecb61988df416f" in str(err.value)
    assert "Delete it (it is downloaded again" in str(err.value)
    with pytest.raises(BackboneError, match="not OpenAI's ViT-B-16.pt"):  # also as an explicit path
        resolve_weights("ViT-B/32", path=str(target))

    digest = _pretend_openai_file(monkeypatch, target)
    assert resolve_weights("ViT-B/16") == str(target)
    assert os.listdir(tmp_path / "weights") == ["ViT-B-16.pt"] and not (tmp_path / "cache").exists()  # no records
    # the file is swapped for another of the same size and mtime, and records claiming it was verified
    # are forged beside it and in the user's cache: it is hashed again and refused
    st = target.stat()
    other = open(tiny_clip_path, "rb").read()
    other = other[:-1000] + bytes(b ^ 1 for b in other[-1000:])
    target.write_bytes(other)
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert target.stat().st_size == st.st_size
    record = f"{digest} {st.st_size} {st.st_mtime_ns}\n"
    (tmp_path / "weights" / "ViT-B-16.pt.sha256-verified").write_text(record)
    (tmp_path / "cache" / "spotlighter" / "verified").mkdir(parents=True)
    (tmp_path / "cache" / "spotlighter" / "verified" / "ViT-B-16.pt").write_text(record)
    with pytest.raises(BackboneError, match=f"{target} is not OpenAI's ViT-B/16 weight file"):
        resolve_weights("ViT-B/16")
    with pytest.raises(BackboneError, match="is not OpenAI's ViT-B/16 weight file"):
        load_clip("ViT-B/16")


def test_explicit_path_wins_over_name(tiny_clip_path, monkeypatch, tmp_path):
    monkeypatch.setenv(OFFLINE_ENV, "1")
    monkeypatch.setenv(WEIGHTS_DIR_ENV, str(tmp_path))
    assert resolve_weights("ViT-Z/99", path=tiny_clip_path) == tiny_clip_path


def test_not_clip_weights(tmp_path):
    path = tmp_path / "other.pt"
    torch.save({"a": torch.zeros(3)}, path)
    with pytest.raises(BackboneError, match="does not hold CLIP weights") as err:
        load_clip("ViT-B/16", path=str(path))
    assert str(path) in str(err.value)


def test_garbage_file(tmp_path):
    path = tmp_path / "garbage.pt"
    path.write_bytes(b"this is not a checkpoint")
    with pytest.raises(BackboneError, match="neither a TorchScript archive nor a state dict") as err:
        load_state_dict_file(str(path))
    assert "it is not a torch file" in str(err.value) and "weights_only" not in str(err.value)
    assert "OpenAI TorchScript archive (e.g. ViT-B-16.pt" in str(err.value)


def test_pickled_objects_are_not_weights(tmp_path):
    path = tmp_path / "module.pt"
    torch.save(torch.nn.Linear(2, 2), path)
    with pytest.raises(BackboneError, match="it is a pickle of Python objects") as err:
        load_state_dict_file(str(path))
    assert "weights_only" not in str(err.value)


@pytest.mark.filterwarnings("ignore::FutureWarning")  # torch.jit.script/save are deprecated; OpenAI ships such archives
def test_corrupted_torchscript_archive(tmp_path):
    import zipfile

    scripted = torch.jit.script(torch.nn.Linear(2, 2))
    good = tmp_path / "good.pt"
    torch.jit.save(scripted, str(good))
    assert set(load_state_dict_file(str(good))) == {"weight", "bias"}
    bad = tmp_path / "ViT-B-16-copy.pt"
    with zipfile.ZipFile(good) as src, zipfile.ZipFile(bad, "w") as dst:
        for item in src.infolist():
            data = src.read(item)
            dst.writestr(item, b"garbage" if item.filename.endswith("data.pkl") else data)
    with pytest.raises(BackboneError) as err:
        load_state_dict_file(str(bad))
    assert f"{bad} is a TorchScript archive that cannot be loaded: it is " in str(err.value)
    assert "Traceback" not in str(err.value) and "weights_only" not in str(err.value)


def test_broken_clip_state(tiny_clip_path, tmp_path):
    state = torch.load(tiny_clip_path, weights_only=True)
    del state["ln_final.weight"]
    path = tmp_path / "broken.pt"
    torch.save(state, path)
    with pytest.raises(BackboneError, match="Could not build CLIP"):
        load_clip("ViT-B/16", path=str(path))
