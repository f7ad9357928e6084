"""OpenCLIP backbones (``MODEL.BACKBONE.NAME openclip:<MODEL>[:<TAG>]``).

Models are built by open_clip itself (``pretrained=None``, random weights) from its own configs
(tiny ones registered with ``add_model_config``, and the real ViT-B-16), saved to files and loaded
through the users' path: ``load_clip`` with the name and MODEL.BACKBONE.PATH, and ``train.py`` for
every trainer. FrozenCLIP's features must equal OpenCLIP's ``encode_image`` / ``encode_text``.
"""

import os
import sys

import pytest
import torch
import torch.nn as nn

open_clip = pytest.importorskip("open_clip", reason="open-clip-torch is not installed (pip install -e '.[openclip]')")

from conftest import ROOT, dassl_available, run_in_process as run_train  # noqa: E402
import tiny_openclip  # noqa: E402
from spotlighter import openclip as oc  # noqa: E402
from spotlighter.backbone import BackboneError, FrozenCLIP, load_clip  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TEXTS = ["a photo of a cat.", "A RED CAR, parked &amp; shiny!", "x " * 90]  # upper case, HTML, too long
ATOL = 1e-5


@pytest.fixture(scope="module")
def tiny_files(tmp_path_factory):
    """name -> (OpenCLIP model, its weight file) for every tiny config."""
    folder = tmp_path_factory.mktemp("openclip")
    tiny_openclip.register(folder / "configs")
    return {name: (model, tiny_openclip.save(model, folder / f"{name}.pt"))
            for name, model in ((n, tiny_openclip.build(n, seed=i)) for i, n in enumerate(tiny_openclip.CONFIGS))}


def images(size, batch=3, seed=0):
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def assert_same_features(reference, clip: FrozenCLIP, name: str, size: int, batch: int = 3):
    tokenizer = open_clip.get_tokenizer(name)
    tokens = tokenizer(TEXTS)
    assert torch.equal(clip.tokenize(TEXTS), tokens)  # OpenCLIP's tokenizer, its context, EOT kept
    assert clip.token_count(TEXTS[0]) == int((tokens[0] != 0).sum())
    x = images(size, batch)
    with torch.no_grad():
        want_image, want_text = reference.encode_image(x), reference.encode_text(tokens)
        got_image, got_text = clip.encode_image(x), clip.encode_text(TEXTS)
        got_global = clip.encode_image_tokens(x).global_feat
    assert want_image.abs().max() > 0.1 and want_text.abs().max() > 0.1  # not a degenerate comparison
    torch.testing.assert_close(got_image, want_image, atol=ATOL, rtol=0)
    torch.testing.assert_close(got_global, want_image, atol=ATOL, rtol=0)
    torch.testing.assert_close(got_text, want_text, atol=ATOL, rtol=0)
    assert float(clip.logit_scale) == pytest.approx(float(reference.logit_scale.detach()))


@pytest.mark.parametrize("name", list(tiny_openclip.CONFIGS))
def test_tiny_models_give_openclips_features(name, tiny_files):
    model, path = tiny_files[name]
    clip = FrozenCLIP(load_clip(f"openclip:{name}", path=path))
    assert_same_features(model, clip, name, size=32)
    quick = tiny_openclip.CONFIGS[name].get("quick_gelu", False)
    acts = {type(b.mlp.gelu).__name__ for b in [*clip.model.visual.transformer.resblocks,
                                                 *clip.model.transformer.resblocks]}
    assert acts == {type(model.visual.transformer.resblocks[0].mlp.gelu).__name__}
    assert acts == ({"QuickGELU"} if quick else {"GELU"})
    assert clip.context_length == tiny_openclip.CONFIGS[name]["text_cfg"]["context_length"]
    assert clip.openclip.resolution == clip.input_resolution == 32


def test_layer_scale_and_no_ln_pre_are_converted(tiny_files):
    model, path = tiny_files["spotlighter-tiny-odd"]
    clip = FrozenCLIP(load_clip("openclip:spotlighter-tiny-odd", path=path))
    assert isinstance(clip.model.visual.ln_pre, nn.Identity)
    block, ref = clip.model.visual.transformer.resblocks[0], model.visual.transformer.resblocks[0]
    assert block.mlp.c_fc.out_features == 3 * 64 and block.attn.num_heads == 64 // 16
    torch.testing.assert_close(block.attn.out_proj.bias, ref.attn.out_proj.bias * ref.ls_1.gamma)
    assert not any(k.endswith("gamma") for k in clip.model.state_dict())


def test_real_vit_b16_forward(tmp_path):
    """OpenCLIP's ViT-B-16 config at full size (random weights): 224 px, 12 + 12 blocks, GELU."""
    torch.manual_seed(0)
    model = open_clip.create_model("ViT-B-16", pretrained=None).eval()
    path = str(tmp_path / "vit_b16.safetensors")
    from safetensors.torch import save_file

    save_file(model.state_dict(), path)
    clip = FrozenCLIP(load_clip("openclip:ViT-B-16", path=path))
    os.remove(path)
    assert (clip.input_resolution, clip.num_patches, clip.embed_dim, clip.vision_width) == (224, 196, 512, 768)
    assert_same_features(model, clip, "ViT-B-16", size=224, batch=1)


@pytest.mark.parametrize("model, why", [
    ("ViT-B-16-SigLIP", "its image tower is the timm model 'vit_base_patch16_siglip_224' (SigLIP: no class token, "
                        "attention-pooled), not OpenCLIP's VisionTransformer with a class token"),
    ("convnext_base", "its image tower is the timm model 'convnext_base'"),
    ("EVA02-B-16", "its image tower is the timm model 'eva02_base_patch16_clip_224'"),
    ("RN50", "its image tower is a ResNet (ModifiedResNet): no ViT tokens"),
    ("coca_ViT-B-32", "it is a CoCa model"),
    ("ViT-L-14-CLIPA", "its image tower pools 'avg' (mean of the patch tokens), not the class token"),
    ("xlm-roberta-base-ViT-B-32", "its text tower is the Hugging Face model 'xlm-roberta-base'"),
    ("ViT-H-14-worldwide", "its tokenizer (facebook/xlm-v-base) is not CLIP's BPE"),
])
def test_towers_that_do_not_fit_are_refused_by_name(model, why, tmp_path):
    with pytest.raises(BackboneError) as err:  # refused before any weight file is looked at
        load_clip(f"openclip:{model}", path=str(tmp_path / "absent.pt"))
    message = str(err.value)
    assert message.startswith(f"OpenCLIP model {model!r} cannot be used as a backbone: ")
    assert why in message and oc.WHAT_FITS in message


@pytest.mark.parametrize("name, message", [
    ("openclip:ViT-B-16:openai", "The weights of OpenCLIP tag 'openai' were trained with QuickGELU, but model "
                                 "'ViT-B-16' uses GELU: its features would be wrong. Use MODEL.BACKBONE.NAME "
                                 "openclip:ViT-B-16-quickgelu:openai."),
    ("openclip:ViT-B-16:laion9000", "OpenCLIP has no pretrained tag 'laion9000' for ViT-B-16 (its tags: openai, "),
    ("openclip:ViT-B-61:laion2b_s34b_b88k", "OpenCLIP has no model named 'ViT-B-61'"),
    ("openclip:", "is not an OpenCLIP name: expected MODEL.BACKBONE.NAME openclip:<MODEL>:<PRETRAINED_TAG>"),
    ("openclip:ViT-B-16:a:b", "is not an OpenCLIP name"),
])
def test_bad_names_are_clear_errors(name, message):
    with pytest.raises(BackboneError, match="^") as err:
        load_clip(name)
    assert message in str(err.value)


def test_missing_weights_say_which_file_and_where(monkeypatch, tmp_path):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("SPOTLIGHTER_OFFLINE", "1")
    with pytest.raises(BackboneError) as err:
        load_clip("openclip:ViT-B-16:laion2b_s34b_b88k")
    assert str(err.value) == (
        "The weights of openclip:ViT-B-16:laion2b_s34b_b88k are not in OpenCLIP's cache and downloads are off "
        "(SPOTLIGHTER_OFFLINE or HF_HUB_OFFLINE is set). Download open_clip_pytorch_model.bin from "
        "https://huggingface.co/laion/CLIP-ViT-B-16-laion2B-s34B-b88K on a machine with internet and set "
        "MODEL.BACKBONE.PATH to the file, or fill OpenCLIP's cache there (python -c \"import open_clip; "
        "open_clip.create_model('ViT-B-16', pretrained='laion2b_s34b_b88k')\") and copy it to this machine "
        "(Hugging Face's cache: $HF_HOME/hub, default ~/.cache/huggingface/hub; URL downloads: ~/.cache/clip).")
    with pytest.raises(BackboneError, match="names no pretrained tag and MODEL.BACKBONE.PATH is empty"):
        load_clip("openclip:ViT-B-16")
    with pytest.raises(BackboneError, match="MODEL.BACKBONE.PATH points to .*absent.pt'?, which is not a file"):
        load_clip("openclip:ViT-B-16:laion2b_s34b_b88k", path=str(tmp_path / "absent.pt"))


@pytest.fixture
def tiny_tag(monkeypatch, tiny_files):
    """A pretrained tag of spotlighter-tiny in OpenCLIP's registry (Hugging Face repo, its own mean/std)."""
    from open_clip import pretrained

    tag = dict(url="", hf_hub="someone/tiny-clip/", mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25),
               interpolation="bilinear", resize_mode="shortest")
    monkeypatch.setitem(pretrained._PRETRAINED, "spotlighter-tiny", {"tinytag": tag})
    return "openclip:spotlighter-tiny:tinytag"


def test_weights_come_from_openclips_cache(tiny_tag, tiny_files, monkeypatch, tmp_path):
    import shutil

    import huggingface_hub.constants

    hub = tmp_path / "hub"
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(hub))
    monkeypatch.setenv("SPOTLIGHTER_OFFLINE", "1")
    with pytest.raises(BackboneError, match="Download open_clip_pytorch_model.bin from https://huggingface.co/"
                                            "someone/tiny-clip on a machine"):
        load_clip(tiny_tag)
    repo = hub / "models--someone--tiny-clip"  # the layout huggingface_hub writes
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("abc123")
    (repo / "snapshots" / "abc123").mkdir(parents=True)
    shutil.copy(tiny_files["spotlighter-tiny"][1], repo / "snapshots" / "abc123" / "open_clip_pytorch_model.bin")
    clip = FrozenCLIP(load_clip(tiny_tag))
    assert_same_features(tiny_files["spotlighter-tiny"][0], clip, "spotlighter-tiny", size=32)
    assert (clip.openclip.mean, clip.openclip.std) == ((0.5,) * 3, (0.25,) * 3)


def test_input_keys_become_the_models_own(tiny_tag):
    from yacs.config import CfgNode as CN

    cfg = CN()
    cfg.MODEL = CN({"BACKBONE": CN({"NAME": tiny_tag})})
    cfg.INPUT = CN({"SIZE": (224, 224), "PIXEL_MEAN": [0.48145466, 0.4578275, 0.40821073],
                    "PIXEL_STD": [0.26862954, 0.26130258, 0.27577711], "INTERPOLATION": "bicubic"})
    changed = oc.adopt_input(cfg)
    assert changed[0] == "INPUT.SIZE (224, 224) -> (32, 32)" and len(changed) == 4
    assert (cfg.INPUT.SIZE, cfg.INPUT.PIXEL_MEAN, cfg.INPUT.PIXEL_STD, cfg.INPUT.INTERPOLATION) == \
        ((32, 32), [0.5] * 3, [0.25] * 3, "bilinear")
    assert oc.adopt_input(cfg) == []
    assert oc.check_input(cfg, oc.describe(tiny_tag)) is None
    cfg.INPUT.PIXEL_STD = [0.3] * 3
    assert oc.check_input(cfg, oc.describe(tiny_tag)).startswith(
        "INPUT.PIXEL_STD = [0.3, 0.3, 0.3] (the model's: [0.25, 0.25, 0.25]) for openclip:spotlighter-tiny:tinytag")


def test_file_of_another_model_is_named(tiny_files):
    with pytest.raises(BackboneError) as err:
        load_clip("openclip:spotlighter-tiny-odd", path=tiny_files["spotlighter-tiny"][1])
    message = str(err.value)
    assert message.startswith(f"{tiny_files['spotlighter-tiny'][1]} does not hold the weights of OpenCLIP model "
                              "'spotlighter-tiny-odd' (unexpected: visual.ln_pre.weight, visual.ln_pre.bias; "
                              "other shapes: positional_embedding (77, 64) (expected (24, 64)), ")
    assert message.endswith(" ...). Give the file of that model (or name the model the file holds).")


# ---------------------------------------------------------------------------------- trainers
CONFIGS = {
    "ZeroshotCLIP": "ZeroshotCLIP/vit_b16.yaml",
    "CoOp": "CoOp/vit_b16_ep20_ctx4.yaml",
    "CoCoOp": "CoCoOp/vit_b16_c4_ep10_batch1_ctxv1.yaml",
    "MaPLe": "MaPLe/vit_b16_c2_ep5_batch4_2ctx.yaml",
    "Spotlighter": "Spotlighter/vit_b16_ep20_paper.yaml",
    "Spotlighter-release": "Spotlighter/vit_b16_ep20_release.yaml",
    "IVLP": "IVLP/vit_b16_c2_ep20_batch4_4+4ctx.yaml",
    "PromptSRC": "PromptSRC/vit_b16_c2_ep20_batch4_4+4ctx.yaml",
    "PromptKD": "PromptKD/vit_b16_c2_ep20_batch8_4+4ctx.yaml",
}
DEPTH2 = {
    "Spotlighter": ["TRAINER.SPOTLIGHTER.IRM.HEADS", "1"],
    "Spotlighter-release": ["TRAINER.SPOTLIGHTER.IRM.HEADS", "1"],
    "MaPLe": ["TRAINER.MAPLE.PROMPT_DEPTH", "2"],
    "IVLP": ["TRAINER.IVLP.PROMPT_DEPTH_TEXT", "2", "TRAINER.IVLP.PROMPT_DEPTH_VISION", "2"],
    "PromptSRC": ["TRAINER.PROMPTSRC.PROMPT_DEPTH_TEXT", "2", "TRAINER.PROMPTSRC.PROMPT_DEPTH_VISION", "2",
                  "TRAINER.PROMPTSRC.GPA_MEAN", "1"],
    "PromptKD": ["TRAINER.PROMPTKD.PROMPT_DEPTH_VISION", "2", "TRAINER.PROMPTKD.TEACHER_PROMPT_DEPTH_TEXT", "2",
                 "TRAINER.PROMPTKD.TEACHER_PROMPT_DEPTH_VISION", "2"],
}
#: 12 base classes x 1 shot in one batch: one training step. INPUT.SIZE and the mean/std are left at
#: the configs' ViT-B/16 values: train.py sets them to the model's.
ONE_STEP = ["OPTIM.MAX_EPOCH", "1", "DATASET.NUM_SHOTS", "1", "DATALOADER.TRAIN_X.BATCH_SIZE", "12",
            "DATALOADER.TEST.BATCH_SIZE", "36", "DATALOADER.NUM_WORKERS", "0", "TRAINER.COCOOP.PREC", "fp32",
            "DATASET.SUBSAMPLE_CLASSES", "base"]


requires_dassl = pytest.mark.skipif(not dassl_available(), reason="upstream Dassl.pytorch is not installed")


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    from tiny_data import make_tiny_minibench

    root = tmp_path_factory.mktemp("data")
    make_tiny_minibench(str(root))
    return str(root)


def argv_for(trainer, data_root, out, name, path, extra=()):
    return (["--root", data_root, "--seed", "1", "--trainer", trainer.split("-")[0],
             "--dataset-config-file", os.path.join(ROOT, "configs/datasets/minibench.yaml"),
             "--config-file", os.path.join(ROOT, "configs/trainers", CONFIGS[trainer]), "--output-dir", str(out)]
            + (["--eval-only"] if trainer == "ZeroshotCLIP" else [])
            + ONE_STEP + DEPTH2.get(trainer, []) + ["MODEL.BACKBONE.NAME", name, "MODEL.BACKBONE.PATH", path]
            + list(extra))


def train_one_step(trainer, data_root, out, tiny_files, capsys, model="spotlighter-tiny", extra=()):
    code, err = run_train(argv_for(trainer, data_root, out, f"openclip:{model}", tiny_files[model][1], extra), capsys)
    assert code == 0, err
    import json

    with open(os.path.join(out, "result.json")) as f:
        rec = json.load(f)
    log = open(os.path.join(out, "log.txt")).read()
    assert rec["trainer"] == trainer.split("-")[0] and rec["total"] == 36 and 0 <= rec["accuracy"] <= 100
    assert f"OpenCLIP openclip:{model} from {tiny_files[model][1]}:" in log
    assert "INPUT.SIZE (224, 224) -> (32, 32)" in log  # the model's own resolution
    if trainer != "ZeroshotCLIP":
        assert rec["epoch"] == 1 and "batch [1/1]" in log  # one step
    return rec, log


@requires_dassl
@pytest.mark.parametrize("trainer", ["ZeroshotCLIP", "CoOp", "CoCoOp", "MaPLe", "Spotlighter", "Spotlighter-release",
                                     "IVLP"])
def test_every_trainer_runs_on_an_openclip_model(trainer, data_root, tiny_files, tmp_path, capsys):
    model = "spotlighter-tiny-odd" if trainer in ("MaPLe", "Spotlighter-release") else "spotlighter-tiny"
    train_one_step(trainer, data_root, tmp_path / trainer, tiny_files, capsys, model=model)


@requires_dassl
def test_promptsrc_then_promptkd_with_an_openclip_teacher(data_root, tiny_files, tmp_path, capsys):
    teacher = tmp_path / "PromptSRC"
    train_one_step("PromptSRC", data_root, teacher, tiny_files, capsys, model="spotlighter-tiny-quickgelu")
    name, path = "openclip:spotlighter-tiny-quickgelu", tiny_files["spotlighter-tiny-quickgelu"][1]
    _, log = train_one_step("PromptKD", data_root, tmp_path / "PromptKD", tiny_files, capsys,
                            extra=["TRAINER.PROMPTKD.TEACHER", str(teacher), "TRAINER.PROMPTKD.TEACHER_NAME", name,
                                   "TRAINER.PROMPTKD.TEACHER_PATH", path])
    assert f"OpenCLIP {name} from {path}:" in log and "Teacher: " in log


@requires_dassl
@pytest.mark.parametrize("mode", ["drop", "merge"])
def test_token_reduction_runs_on_an_openclip_model(mode, data_root, tiny_files, tmp_path, capsys):
    _, log = train_one_step("Spotlighter", data_root, tmp_path / mode, tiny_files, capsys,
                            extra=["MODEL.PRUNE.LAYERS", "[0]", "MODEL.PRUNE.KEEP", "0.75", "MODEL.PRUNE.MODE", mode])
    assert f"Token reduction ({mode}): blocks [0] keep 0.75 of the patch tokens" in log
    assert "12 of 16 patches reach the last block" in log


@requires_dassl
def test_a_refused_model_is_one_error_line(data_root, tiny_files, tmp_path, capsys):
    code, err = run_train(argv_for("CoOp", data_root, tmp_path / "siglip", "openclip:ViT-B-16-SigLIP:webli",
                                   tiny_files["spotlighter-tiny"][1]), capsys)
    assert code == 2
    assert err.startswith("error: OpenCLIP model 'ViT-B-16-SigLIP' cannot be used as a backbone: its image tower "
                          "is the timm model 'vit_base_patch16_siglip_224' (SigLIP: no class token")
    assert len(err.strip().splitlines()) == 1


def test_half_precision_is_openais_conversion_of_the_same_weights(tiny_files):
    path = tiny_files["spotlighter-tiny-odd"][1]
    full = load_clip("openclip:spotlighter-tiny-odd", path=path)
    half = load_clip("openclip:spotlighter-tiny-odd", path=path, dtype=torch.float16)
    assert half.visual.conv1.weight.dtype == torch.float16 and half.visual.ln_post.weight.dtype == torch.float32
    block, ref = half.visual.transformer.resblocks[1], full.visual.transformer.resblocks[1]
    assert torch.equal(block.mlp.c_fc.weight, ref.mlp.c_fc.weight.half()) and isinstance(block.mlp.gelu, nn.GELU)
    assert torch.equal(half.text_projection, full.text_projection.half())


def test_a_promptkd_teacher_must_expect_the_students_images(tiny_tag, tiny_files, frozen_clip):
    path = tiny_files["spotlighter-tiny"][1]
    student = FrozenCLIP(load_clip("openclip:spotlighter-tiny", path=path))
    assert oc.check_same_images(student, frozen_clip, "openclip:spotlighter-tiny", "ViT-B/16") is None
    teacher = FrozenCLIP(load_clip(tiny_tag, path=path))
    assert oc.check_same_images(student, teacher, "openclip:spotlighter-tiny", tiny_tag) == (
        "the teacher's CLIP openclip:spotlighter-tiny:tinytag expects images at 32 px, mean (0.5, 0.5, 0.5), std "
        "(0.25, 0.25, 0.25); the student's openclip:spotlighter-tiny at 32 px, mean (0.48145466, 0.4578275, "
        "0.40821073), std (0.26862954, 0.26130258, 0.27577711). PromptKD gives both the same images: choose a "
        "teacher (TRAINER.PROMPTKD.TEACHER_NAME) with the student's resolution and normalisation.")


@requires_dassl
def test_trained_prompts_evaluate_on_new_classes(data_root, tiny_files, tmp_path, capsys):
    """Base-to-novel's second half: --eval-only --model-dir on the new classes, same backbone."""
    out = tmp_path / "base"
    train_one_step("CoOp", data_root, out, tiny_files, capsys)
    name, path = "openclip:spotlighter-tiny", tiny_files["spotlighter-tiny"][1]
    new = tmp_path / "new"
    argv = argv_for("CoOp", data_root, new, name, path, ["DATASET.SUBSAMPLE_CLASSES", "new"])
    code, err = run_train(["--eval-only", "--model-dir", str(out), "--load-epoch", "1"] + argv, capsys)
    assert code == 0, err
    import json

    rec = json.load(open(new / "result.json"))
    assert (rec["subset"], rec["epoch"], rec["total"]) == ("new", 1, 36)


def test_an_openai_archive_loads_as_its_openclip_model(tiny_files, tmp_path):
    """OpenAI's TorchScript archive read through the OpenCLIP path gives what the OpenAI path gives."""
    from weight_archives import save_traced_clip

    path = save_traced_clip(tmp_path / "ViT-tiny.pt", seed=3, half=False)
    ours = FrozenCLIP(load_clip("openclip:spotlighter-tiny-openai", path=path))
    openai = FrozenCLIP(load_clip("ViT-B/16", path=path))
    x = images(32)
    with torch.no_grad():
        assert torch.equal(ours.encode_image(x), openai.encode_image(x))
        assert torch.equal(ours.encode_text(TEXTS), openai.encode_text(TEXTS))


def test_an_unreachable_host_is_said_at_once(monkeypatch, tmp_path):
    """Without a connection the error comes before Hugging Face's client retries for a minute."""
    import socket

    import huggingface_hub.constants

    def no_network(*args, **kwargs):
        raise OSError("no route")

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    for key in ("SPOTLIGHTER_OFFLINE", "HF_HUB_OFFLINE", "HF_ENDPOINT", *oc.PROXY_ENVS):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setattr(socket, "create_connection", no_network)
    with pytest.raises(BackboneError) as err:
        load_clip("openclip:ViT-B-16:laion2b_s34b_b88k")
    assert str(err.value).startswith("The weights of openclip:ViT-B-16:laion2b_s34b_b88k are not in OpenCLIP's "
                                     "cache and huggingface.co cannot be reached from this machine. Download "
                                     "open_clip_pytorch_model.bin from https://huggingface.co/laion/")
