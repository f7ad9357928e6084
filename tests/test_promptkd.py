"""PromptKD (spotlighter.kd) on tiny CLIPs: the distillation loss by hand, what the student holds and
computes, teacher checkpoints (ours, the original repository's, wrong ones) and where they are found."""

import os

import pytest
import torch
import torch.nn.functional as F

from original_ckpt import ivlp_original_state, save_original
from spotlighter import checkpoint as ckpt
from spotlighter import foreign, kd
from spotlighter.backbone import FrozenCLIP, load_clip
from spotlighter.config import ConfigError
from spotlighter.models import IVLP
from tiny_clip import save_tiny_clip

pytestmark = pytest.mark.usefixtures("one_torch_thread")

NAMES = ["cat", "dog_house", "red car", "x"]
TEACHER = dict(n_text=4, n_vision=4, ctx_init="a photo of a", text_depth=2, vision_depth=2)


@pytest.fixture(scope="module")
def teacher_clip(tmp_path_factory):
    """A wider tiny CLIP than the student's (embedding 96 vs 64), as ViT-L/14 is wider than ViT-B/16."""
    path = save_tiny_clip(tmp_path_factory.mktemp("teacher") / "teacher.pt", seed=4, vision_width=128,
                          transformer_width=128, embed_dim=96)
    return FrozenCLIP(load_clip("ViT-L/14", path=path))


def images(batch=3, seed=0):
    return torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def make_teacher(clip, seed=1):
    torch.manual_seed(seed)
    teacher = IVLP(clip, NAMES, **TEACHER)
    with torch.no_grad():
        for p in teacher.parameters():
            p.add_(0.05 * torch.randn_like(p)).copy_(p.half().float())
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher.eval()


def make_student(clip, teacher, **kw):
    torch.manual_seed(0)
    return kd.PromptKD(clip, teacher, **{**dict(n_vision=4, vision_depth=2, kd_weight=1000.0), **kw})


def test_kd_loss_is_the_forward_kl_summed_over_batch_and_classes():
    s, t = torch.randn(3, 5), torch.randn(3, 5)
    for temp in (1.0, 2.0):
        p = (t / temp).softmax(-1)
        want = (p * (p.log() - (s / temp).log_softmax(-1))).sum() / 15 * temp ** 2
        torch.testing.assert_close(kd.kd_loss(s, t, temp), want, rtol=1e-6, atol=1e-7)
    assert kd.kd_loss(t, t, 1.0).abs() < 1e-6


def test_student_holds_only_its_prompts_and_projector(frozen_clip, teacher_clip):
    student = make_student(frozen_clip, make_teacher(teacher_clip))
    trainable = [k for k, p in student.named_parameters() if p.requires_grad]
    assert trainable == ["prompt_learner.visual_prompt", "prompt_learner.visual_prompts.0",
                         "VPT_image_trans.conv1.0.weight", "VPT_image_trans.conv1.0.bias",
                         "VPT_image_trans.conv1.1.weight", "VPT_image_trans.conv1.1.bias",
                         "VPT_image_trans.conv1.3.weight", "VPT_image_trans.conv1.3.bias"]
    assert student.VPT_image_trans.conv1[0].weight.shape == (96, 64, 1, 1)  # student 64 -> teacher 96
    assert not any(k.startswith(("teacher", "_teacher", "clip")) for k in student.state_dict())
    assert "teacher_text" not in student.state_dict()  # class-dependent: recomputed for every run's classes


def test_student_scores_against_the_teacher_text_and_distils_its_logits(frozen_clip, teacher_clip):
    teacher = make_teacher(teacher_clip)
    student = make_student(frozen_clip, teacher, temperature=2.0)
    with torch.no_grad():
        text = teacher.text_features()
        assert torch.equal(student.teacher_text, text) and text.shape == (4, 96)
        torch.testing.assert_close(text.norm(dim=-1), torch.ones(4))
    student.train()
    logits, losses = student(images(), torch.tensor([0, 1, 2]))
    assert list(losses) == ["kd"]
    with torch.no_grad():
        v = student.image_features(images())
        torch.testing.assert_close(logits, frozen_clip.logit_scale.exp() * v @ text.t())
        t_logits = teacher.image_logits(images(), text)
        teacher_v, teacher_t = teacher.features(images())
        torch.testing.assert_close(t_logits, teacher_clip.logit_scale.exp() * teacher_v @ teacher_t.t())
    torch.testing.assert_close(losses["kd"], 1000.0 * kd.kd_loss(logits, t_logits, 2.0))
    losses["kd"].backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in student.parameters())
    assert all(p.grad is None for p in teacher.parameters())
    student.eval()
    assert student(images())[1] == {}


def test_teacher_checkpoints_ours_and_the_originals_load_the_same(teacher_clip, tmp_path):
    trained = make_teacher(teacher_clip)
    state = ckpt.trainable_state(trained)
    ckpt.save(str(tmp_path / "ours" / "VLPromptLearner" / "model.pth.tar-20"),
              {"trainer": "PromptSRC", "preset": None, "signature": {}, "state_dict": state, "epoch": 20})
    with open(tmp_path / "ours" / "VLPromptLearner" / "checkpoint", "w") as f:
        f.write("model.pth.tar-20\n")
    theirs = save_original(tmp_path / "theirs", "VLPromptLearner", ivlp_original_state(trained, True), epoch=20,
                           pointer=False)
    os.rename(theirs, tmp_path / "theirs" / "VLPromptLearner" / "model-best.pth.tar")
    for folder, what in (("ours", "a PromptSRC checkpoint of this project"),
                         ("theirs", "written by the original PromptSRC code")):
        fresh = IVLP(teacher_clip, NAMES, **TEACHER)
        path = kd.teacher_file(str(tmp_path / folder))
        assert kd.load_teacher(fresh, path).endswith(f"({what})")
        assert all(torch.equal(fresh.state_dict()[k], v) for k, v in state.items())
        assert not any(p.requires_grad for p in fresh.parameters()) and not fresh.training


def test_teacher_of_another_design_or_trainer_is_refused(teacher_clip, frozen_clip, tmp_path):
    trained = make_teacher(teacher_clip)
    path = str(tmp_path / "t.pth")
    ckpt.save(path, {"trainer": "PromptSRC", "preset": None, "signature": {},
                     "state_dict": ckpt.trainable_state(trained), "epoch": 1})
    shallow = IVLP(teacher_clip, NAMES, **{**TEACHER, "vision_depth": 1})
    with pytest.raises(ckpt.CheckpointError) as err:
        kd.load_teacher(shallow, path)
    assert "prompt_learner.visual_prompts.0: checkpoint [4, 128] vs config None" in str(err.value)
    assert "TEACHER_PROMPT_DEPTH_VISION" in str(err.value)
    narrow = IVLP(frozen_clip, NAMES, **TEACHER)  # a teacher built on the student-sized CLIP
    with pytest.raises(ckpt.CheckpointError, match="prompt_learner.ctx: checkpoint \\[4, 128\\] vs config \\[4, 64\\]"):
        kd.load_teacher(narrow, path)
    ckpt.save(path, {"trainer": "CoOp", "preset": None, "signature": {}, "state_dict": {}, "epoch": 1})
    with pytest.raises(ckpt.CheckpointError, match="is not a PromptSRC or IVLP checkpoint \\(trainer 'CoOp'\\)"):
        kd.load_teacher(narrow, path)


def test_teacher_file_is_found_or_the_error_says_where_to_get_one(tmp_path):
    folder = tmp_path / "out" / "VLPromptLearner"
    folder.mkdir(parents=True)
    with pytest.raises(ConfigError) as err:
        kd.teacher_file(str(tmp_path / "out"))
    assert "no teacher checkpoint in" in str(err.value) and "PromptKD publishes PromptSRC-trained" in str(err.value)
    with pytest.raises(ConfigError, match="is not a checkpoint file or folder"):
        kd.teacher_file(str(tmp_path / "missing"))
    for n in (3, 20):
        (folder / f"model.pth.tar-{n}").write_bytes(b"x")
    assert kd.teacher_file(str(tmp_path / "out")) == str(folder / "model.pth.tar-20")
    (folder / "checkpoint").write_text("model.pth.tar-3\n")
    assert kd.teacher_file(str(folder)) == str(folder / "model.pth.tar-3")
    (folder / "model-best.pth.tar").write_bytes(b"x")
    assert kd.teacher_file(str(tmp_path / "out")) == str(folder / "model-best.pth.tar")
    # a pointer to a file that is gone is an error, as for evaluations (never another epoch in silence)
    os.remove(folder / "model-best.pth.tar")
    (folder / "checkpoint").write_text("model.pth.tar-7\n")
    with pytest.raises(ConfigError) as err:
        kd.teacher_file(str(folder))
    assert "No checkpoint at" in str(err.value) and "model.pth.tar-7" in str(err.value)


def test_original_student_checkpoint_converts(frozen_clip, teacher_clip):
    student = make_student(frozen_clip, make_teacher(teacher_clip))
    ours = student.state_dict()
    theirs = {"image_encoder.VPT": ours["prompt_learner.visual_prompt"].clone(),
              "image_encoder.transformer.resblocks.1.VPT_shallow": ours["prompt_learner.visual_prompts.0"].clone(),
              "image_encoder.conv1.weight": torch.zeros(1), "logit_scale": torch.zeros(())}
    theirs.update({k: v.clone() for k, v in ours.items() if k.startswith("VPT_image_trans.")})
    converted = foreign.convert({"state_dict": theirs, "epoch": 20}, "PromptKD", "x.pth")[0]
    assert converted.keys() == ours.keys() and all(torch.equal(converted[k], ours[k]) for k in ours)
    with pytest.raises(ckpt.CheckpointError, match="key 'prompt_learner.ctx' is not part of a PromptKD student"):
        foreign.from_promptkd({**theirs, "prompt_learner.ctx": torch.zeros(1)}, "x.pth")


def test_bad_settings_are_clear_errors(frozen_clip, teacher_clip, tiny_clip_path):
    teacher = make_teacher(teacher_clip)
    with pytest.raises(ConfigError, match="TEMPERATURE = 0"):
        make_student(frozen_clip, teacher, temperature=0)
    with pytest.raises(ConfigError, match="PROMPT_DEPTH_VISION = 5 is invalid"):
        make_student(frozen_clip, teacher, vision_depth=5)
    big = FrozenCLIP(load_clip("ViT-B/16", path=save_tiny_clip(
        os.path.join(os.path.dirname(tiny_clip_path), "big.pt"), image_resolution=64)))
    with pytest.raises(ConfigError, match="the teacher CLIP \\(32 px\\) and the student CLIP \\(64 px\\)"):
        make_student(big, teacher)
