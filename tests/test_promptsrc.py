"""IVLP and PromptSRC (spotlighter.models) on the tiny CLIP: prompt injection, the fp16 rounding of
the original code, PromptSRC's loss terms by hand, Gaussian prompt aggregation, config errors."""

import math

import pytest
import torch
import torch.nn.functional as F

from spotlighter.backbone import FrozenCLIP, PruneSpec
from spotlighter.config import ConfigError
from spotlighter.models import (IVLP, GaussianPromptAggregation, PromptSRC, ensemble_text, gpa_weights,
                                zero_shot_text)
from spotlighter.templates import ENSEMBLE_TEMPLATES

pytestmark = pytest.mark.usefixtures("one_torch_thread")

NAMES = ["cat", "dog_house", "red car", "x"]


def images(batch=3, seed=0):
    return torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def ivlp(clip, cls=IVLP, **kw):
    torch.manual_seed(0)
    args = dict(n_text=2, n_vision=2, ctx_init="a photo of a", text_depth=2, vision_depth=2)
    return cls(clip, NAMES, **{**args, **kw})


def fp16_values(model, seed=1):
    """Give every prompt non-initial fp16-representable values (as a checkpoint of an fp16 run has)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g)).copy_(p.half().float())
    return model


def test_trainable_tensors_names_and_shapes(frozen_clip):
    model = ivlp(frozen_clip, n_text=4, n_vision=3, text_depth=2, vision_depth=2)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert shapes == {"prompt_learner.ctx": (4, 64), "prompt_learner.text_prompts.0": (4, 64),
                      "prompt_learner.visual_prompt": (3, 64), "prompt_learner.visual_prompts.0": (3, 64)}
    no_vision = ivlp(frozen_clip, vision_depth=0, text_depth=1)
    assert list(no_vision.state_dict()) == ["prompt_learner.ctx"]


def test_init_prompts_with_depth_one_and_no_vision_equal_zero_shot(frozen_clip):
    """Text depth 1, no visual prompt, context initialised from the template's words: zero-shot CLIP."""
    model = ivlp(frozen_clip, n_text=4, text_depth=1, vision_depth=0).eval()
    with torch.no_grad():
        logits, _ = model(images())
        v = F.normalize(frozen_clip.encode_image(images()).float(), dim=-1)
        ref = frozen_clip.logit_scale.exp() * v @ zero_shot_text(frozen_clip, NAMES).t()
    torch.testing.assert_close(logits, ref, rtol=1e-5, atol=1e-5)


def test_partial_word_init_keeps_the_remaining_words_as_text(frozen_clip):
    """2 tokens from 'a photo of a': 'a photo' is learnable, 'of a <class>.' stays fixed text (as IVLP)."""
    model = ivlp(frozen_clip, n_text=2)
    emb = frozen_clip.token_embedding(frozen_clip.tokenize(["a photo of a cat."]))[0]
    assert torch.equal(model.prompt_learner.ctx.detach(), emb[1:3].float())
    assert torch.equal(model.prompt_learner.classes.token_suffix[0, :3], emb[3:6])


@pytest.mark.parametrize("kw, key, expected", [
    (dict(text_depth=3), "PROMPT_DEPTH_TEXT = 3", "[1, 2]"),
    (dict(text_depth=0), "PROMPT_DEPTH_TEXT = 0", "[1, 2]"),
    (dict(vision_depth=3), "PROMPT_DEPTH_VISION = 3", "[0, 2]"),
    (dict(n_text=3, ctx_init="a photo"), "N_CTX_TEXT / CTX_INIT", "3 context tokens cannot be initialised"),
])
def test_bad_depths_and_context_are_clear_errors(kw, key, expected, frozen_clip):
    with pytest.raises(ConfigError) as err:
        ivlp(frozen_clip, cls=PromptSRC if "text_depth" in kw else IVLP, **kw)
    assert key in str(err.value) and expected in str(err.value)
    if "text_depth" in kw:
        assert "TRAINER.PROMPTSRC." in str(err.value)


def test_more_than_four_tokens_is_random_init(frozen_clip):
    model = ivlp(frozen_clip, n_text=5)
    assert model.prompt_learner.classes.token_prefix.shape[1] == 1
    emb = frozen_clip.token_embedding(frozen_clip.tokenize(["a"]))[0, 1]
    assert not torch.equal(model.prompt_learner.ctx[0].detach(), emb.float())
    assert model.prompt_learner.ctx.std().item() == pytest.approx(0.02, rel=0.3)


def test_token_reduction_is_refused_with_visual_prompts(tiny_clip_path):
    from spotlighter.backbone import load_clip

    clip = FrozenCLIP(load_clip("ViT-B/16", path=tiny_clip_path),
                      PruneSpec(layers=(0,), keep=0.5, mode="drop"))
    with pytest.raises(ConfigError, match="MODEL.PRUNE.LAYERS = \\[0\\]: IVLP's visual prompts"):
        ivlp(clip)
    ivlp(clip, vision_depth=0).eval()(images())  # without visual prompts it reduces tokens


def test_deep_prompts_replace_tokens_block_by_block(frozen_clip):
    """A deep visual prompt changes the image feature; its effect equals injecting it by hand."""
    model = fp16_values(ivlp(frozen_clip, round_prompts=False)).eval()
    pl = model.prompt_learner
    with torch.no_grad():
        v, _ = model.features(images())
        clip = frozen_clip.model.visual
        x = frozen_clip._embed_patches(images())
        x = torch.cat([x, pl.visual_prompt.expand(3, -1, -1)], dim=1)
        x = clip.ln_pre(x).permute(1, 0, 2)
        x = clip.transformer.resblocks[0](x)
        x = torch.cat([x[:-2], pl.visual_prompts[0].unsqueeze(1).expand(-1, 3, -1)], dim=0)
        x = clip.transformer.resblocks[1](x)
        ref = F.normalize((clip.ln_post(x[0]) @ clip.proj).float(), dim=-1)
    torch.testing.assert_close(v, ref, rtol=1e-5, atol=1e-6)


def test_rounding_rounds_prompt_values_and_gradients_to_fp16(frozen_clip):
    """ROUND_PROMPTS_FP16: forward = prompts rounded to fp16 first; with fp16-representable prompts the
    forward is unchanged, a visual prompt's gradient (one image) is the unrounded gradient rounded to
    fp16, and a deep text prompt's is a sum of rounded per-class slices (close, not equal)."""
    model = ivlp(frozen_clip, round_prompts=True)
    plain = ivlp(frozen_clip, round_prompts=False)
    plain.load_state_dict({k: v if k == "prompt_learner.ctx" else v.half().float()  # the input context is
                           for k, v in model.state_dict().items()})  # not rounded, as in the original
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(images())[0], plain.eval()(images())[0], rtol=0, atol=0)
    fp16_values(model)
    plain.load_state_dict(model.state_dict())
    for m in (model, plain):
        m.train()
        m(images(1), torch.tensor([2]))[1]["ce"].backward()
    for (name, a), (_, b) in zip(model.named_parameters(), plain.named_parameters()):
        if name == "prompt_learner.ctx":  # the input context enters unrounded, as in the original
            assert torch.equal(a.grad, b.grad)
            continue
        assert not torch.equal(a.grad, b.grad), name  # the rounding did something
        if name.startswith("prompt_learner.visual"):
            assert torch.equal(a.grad, b.grad.half().float()), name
        else:  # expanded over the 4 classes: 4 rounded slices summed
            torch.testing.assert_close(a.grad, b.grad, rtol=0, atol=2e-3 * b.grad.abs().max().item())


def test_ensemble_text_is_the_mean_of_sixty_unnormalised_template_features(frozen_clip):
    assert len(ENSEMBLE_TEMPLATES) == 60 and ENSEMBLE_TEMPLATES[0] == "a photo of a {}."
    got = ensemble_text(frozen_clip, NAMES, ENSEMBLE_TEMPLATES[:3])
    feats = [frozen_clip.encode_text([t.format(n.replace("_", " ")) for n in NAMES]).float()
             for t in ENSEMBLE_TEMPLATES[:3]]
    torch.testing.assert_close(got, sum(feats) / 3, rtol=1e-6, atol=1e-6)
    assert got.norm(dim=-1).sub(1).abs().max() > 1e-3  # not normalised


def test_promptsrc_loss_terms_by_hand(frozen_clip):
    model = fp16_values(ivlp(frozen_clip, cls=PromptSRC, text_weight=25, image_weight=10)).train()
    labels = torch.tensor([0, 3, 1])
    logits, losses = model(images(), labels)
    assert sorted(losses) == ["ce", "scl_image", "scl_logits", "scl_text"]
    with torch.no_grad():
        v, t = model.features(images())
        zs = F.normalize(frozen_clip.encode_image(images()).float(), dim=-1)
        fixed = F.normalize(model.fixed_embeddings, dim=-1)
        s = frozen_clip.logit_scale.exp()
        p_zs, p = (s * zs @ fixed.t()).softmax(-1), (s * v @ t.t()).softmax(-1)
        kl = (p_zs * (p_zs.log() - p.log())).sum() / p.numel()  # forward KL(zero-shot || prompted), sum / (B*C)
    torch.testing.assert_close(losses["scl_logits"], kl, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(losses["scl_text"], 25 * (t - fixed).abs().mean(), rtol=1e-6, atol=0)
    torch.testing.assert_close(losses["scl_image"], 10 * (v - zs).abs().mean(), rtol=1e-6, atol=0)
    torch.testing.assert_close(losses["ce"], F.cross_entropy(logits, labels))
    assert losses["scl_logits"] > 0
    model.eval()
    assert model(images())[1] == {}


def test_gpa_weights_are_the_normalised_gaussian():
    w = gpa_weights(15, 1, 20)
    assert len(w) == 20 and sum(w) == pytest.approx(1, abs=1e-12)
    assert max(range(20), key=w.__getitem__) == 14  # epoch 15
    dens = [math.exp(-0.5 * (e - 15) ** 2) for e in range(1, 21)]
    assert w == pytest.approx([d / sum(dens) for d in dens], rel=1e-12)
    assert gpa_weights(6, 10, 20)[0] > 0.03  # the cross-dataset setting is broad


def test_gpa_sums_weighted_states_and_round_trips():
    gpa = GaussianPromptAggregation(2, 1, 3)
    states = [{"a": torch.full((2,), float(e)), "b": torch.tensor([e * 2.0])} for e in (1, 2, 3)]
    for e, st in enumerate(states, 1):
        gpa.add(st, e)
    w = gpa.weights
    assert torch.equal(gpa.sum["a"], (states[0]["a"] * w[0] + states[1]["a"] * w[1]) + states[2]["a"] * w[2])
    assert gpa.sum["a"][0].item() == pytest.approx(2.0, abs=1e-6)  # symmetric weights around epoch 2
    resumed = GaussianPromptAggregation(2, 1, 3)
    half = GaussianPromptAggregation(2, 1, 3)
    half.add(states[0], 1)
    resumed.load_state_dict(half.state_dict())
    resumed.add(states[1], 2)
    resumed.add(states[2], 3)
    assert torch.equal(resumed.sum["b"], gpa.sum["b"])
    with pytest.raises(RuntimeError, match="epoch 3 added after epoch 1"):
        half.add(states[2], 3)


@pytest.mark.parametrize("mean, std, message", [(15, 0, "GPA_STD = 0"), (5000, 1, "every epoch of 1..20")])
def test_gpa_bad_settings_are_clear_errors(mean, std, message):
    with pytest.raises(ConfigError, match=message):
        GaussianPromptAggregation(mean, std, 20)


def test_text_features_are_cached_at_evaluation_and_follow_a_step(frozen_clip):
    model = ivlp(frozen_clip).eval()
    with torch.no_grad():
        first = model.text_features()
        assert model.text_features() is first  # no re-encoding per batch
        assert torch.equal(first, model._encode_text())
    with torch.no_grad():
        model.prompt_learner.text_prompts[0].add_(0.1)  # an optimizer step bumps the version
        second = model.text_features()
    assert second is not first and not torch.equal(second, first)
    assert model.text_features().requires_grad  # with gradients: computed, never cached
