"""spotlighter.models on the tiny CLIP: shapes, what a state dict holds, zero-shot equivalences, autocast."""

import pytest
import torch
import torch.nn.functional as F

from model_helpers import B, KINDS, NAMES, build, head_cfg, images
from spotlighter.models import (CoCoOp, CoOp, MaPLe, Spotlighter, ZeroShotCLIP, count_trainable,
                                zero_shot_text)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


FORBIDDEN = ("visual", "transformer", "token_embedding", "positional_embedding", "ln_final",
             "text_projection", "logit_scale")
CLASS_BUFFERS = ("token_prefix", "token_suffix", "tokenized_prompts")


@pytest.mark.parametrize("kind", KINDS)
def test_logits_shapes_eval_and_train(kind, frozen_clip):
    model = build(kind, frozen_clip)
    model.eval()
    with torch.no_grad():
        logits, losses = model(images())
    assert logits.shape == (B, len(NAMES)) and logits.dtype == torch.float32
    assert torch.isfinite(logits).all() and losses == {}
    if kind == "zsclip":
        return
    model.train()
    labels = torch.tensor([0, 3, 1])
    logits, losses = model(images(), labels)
    assert logits.shape == (B, len(NAMES))
    assert losses and all(torch.isfinite(v) for v in losses.values())
    if kind.startswith("spot"):
        assert set(losses) == {"global", "local", "consistency"}
    else:
        torch.testing.assert_close(losses["ce"], F.cross_entropy(logits, labels))
    sum(losses.values()).backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert grads and all(g is not None for g in grads)
    assert not any(p.grad is not None for p in frozen_clip.parameters())  # CLIP stays frozen


@pytest.mark.parametrize("kind", KINDS)
def test_state_dict_holds_no_clip_and_no_class_buffer(kind, frozen_clip):
    model = build(kind, frozen_clip)
    keys = list(model.state_dict())
    assert not [k for k in keys if any(f in k for f in FORBIDDEN)], keys
    assert not [k for k in keys if any(f in k for f in CLASS_BUFFERS)], keys
    assert not [k for k in keys if "prototypes" in k or k.endswith(".text") or k == "text"], keys
    # every saved tensor is a trainable parameter or a (class-independent) persistent buffer
    n_saved = sum(v.numel() for v in model.state_dict().values())
    n_buffers = sum(b.numel() for n, b in model.named_buffers() if n in model.state_dict())
    assert n_saved == count_trainable(model) + n_buffers
    if kind == "zsclip":
        assert keys == []
    if kind == "coop":
        assert keys == ["prompt_learner.ctx"] and count_trainable(model) == 4 * 64


def test_spotlighter_memory_kinds(frozen_clip):
    paper, release = build("spot-paper", frozen_clip), build("spot-release", frozen_clip)
    assert "head.memory.slots" in release.state_dict()  # shared slots: class-independent, saved
    # class prototypes start from the zero-shot text "a photo of a {class}."
    want = zero_shot_text(frozen_clip, NAMES).unsqueeze(1).expand(-1, 4, -1)
    torch.testing.assert_close(paper.head.memory.prototypes, want)
    assert paper.head.memory.classnames == NAMES


def test_coop_init_equals_zero_shot_text(frozen_clip):
    model = CoOp(frozen_clip, NAMES, n_ctx=4, ctx_init="a photo of a")
    with torch.no_grad():
        got = model.text_features()
        want = frozen_clip.encode_text([f"a photo of a {n.replace('_', ' ')}." for n in NAMES])
    torch.testing.assert_close(got, want)
    zs = ZeroShotCLIP(frozen_clip, NAMES, template="a photo of a {}.")
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(images())[0], zs(images())[0])


def test_coop_prompt_embeddings_are_the_sentence_embeddings(frozen_clip):
    model = CoOp(frozen_clip, NAMES)
    tok = frozen_clip.tokenize([f"a photo of a {n.replace('_', ' ')}." for n in NAMES])
    with torch.no_grad():
        assert torch.equal(model.prompt_learner(), frozen_clip.token_embedding(tok))
    assert torch.equal(model.prompt_learner.tokenized_prompts, tok)


@pytest.mark.parametrize("position, sentence", [
    ("front", "{} a photo of a."),
    ("middle", "a photo {} of a."),
])
def test_coop_class_token_position(position, sentence, frozen_clip):
    model = CoOp(frozen_clip, NAMES, class_token_position=position)
    end = CoOp(frozen_clip, NAMES)
    with torch.no_grad():
        prompts = model.prompt_learner()
        assert prompts.shape == end.prompt_learner().shape == (len(NAMES), 77, 64)
        texts = [sentence.format(n.replace("_", " ")) for n in NAMES]
        tok = frozen_clip.tokenize(texts)
        # the same tokens, re-ordered: "dog house" is 2 tokens, so name lengths matter
        assert model.prompt_learner.classes.name_lens == [1, 2, 2, 1]
        assert torch.equal(prompts, frozen_clip.token_embedding(tok))
        # EOT stays where it was, so the features are those of the reordered sentences
        assert torch.equal(tok.argmax(-1), model.prompt_learner.tokenized_prompts.argmax(-1))
        torch.testing.assert_close(model.text_features(), frozen_clip.encode_text(texts))


def test_coop_random_init_and_csc(frozen_clip):
    model = CoOp(frozen_clip, NAMES, n_ctx=6, ctx_init="", csc=True)
    assert model.prompt_learner.ctx.shape == (len(NAMES), 6, 64)
    assert count_trainable(model) == len(NAMES) * 6 * 64
    with torch.no_grad():
        assert model.prompt_learner().shape == (len(NAMES), 77, 64)
        assert model.text_features().shape == (len(NAMES), 64)


def test_coop_csc_with_ctx_init_is_one_shared_context_as_in_coop(frozen_clip, caplog):
    """CoOp ignores CSC when CTX_INIT is given (one context from the words); so do we, and say so."""
    with caplog.at_level("WARNING", logger="spotlighter.prompt"):
        model = CoOp(frozen_clip, NAMES, n_ctx=16, ctx_init="a photo of a", csc=True)
    assert "CSC = True is ignored because CTX_INIT = 'a photo of a' is set" in caplog.text
    assert model.prompt_learner.ctx.shape == (4, 64) and model.prompt_learner.csc is False
    shared = CoOp(frozen_clip, NAMES, n_ctx=4, ctx_init="a photo of a")
    assert torch.equal(model.prompt_learner.ctx, shared.prompt_learner.ctx)
    with torch.no_grad():
        torch.testing.assert_close(model.text_features(), shared.text_features())


def test_coop_n_ctx_16_without_init_gives_16_random_vectors(frozen_clip):
    """CoOp's defaults (N_CTX 16, CTX_INIT ""): 16 context vectors, prompts "X x16 <class>."."""
    torch.manual_seed(3)
    model = CoOp(frozen_clip, NAMES, n_ctx=16, ctx_init="")
    assert model.prompt_learner.ctx.shape == (16, 64)
    torch.manual_seed(3)
    assert torch.equal(model.prompt_learner.ctx, torch.empty(16, 64).normal_(0, 0.02))  # nn.init.normal_(std=.02)
    tok = frozen_clip.tokenize([" ".join(["X"] * 16) + f" {n.replace('_', ' ')}." for n in NAMES])
    assert torch.equal(model.prompt_learner.tokenized_prompts, tok)


@pytest.mark.parametrize("n_ctx, ctx_init", [(5, "a photo of a"), (8, "a photo of a"), (3, "a photo")])
def test_maple_more_tokens_than_init_words_is_random_init(n_ctx, ctx_init, frozen_clip):
    """MaPLe: N_CTX > 4 (or here, > the words) initialises randomly ("X X ..."), instead of crashing."""
    torch.manual_seed(0)
    model = MaPLe(frozen_clip, NAMES, n_ctx=n_ctx, ctx_init=ctx_init, depth=2)
    pl = model.prompt_learner
    torch.manual_seed(0)
    assert torch.equal(pl.ctx, torch.empty(n_ctx, 64).normal_(0, 0.02))
    tok = frozen_clip.tokenize([" ".join(["X"] * n_ctx) + f" {n.replace('_', ' ')}." for n in NAMES])
    assert torch.equal(pl.tokenized_prompts, tok)
    with torch.no_grad():
        prompts, deep_text, visual, deep_visual = pl()
        assert prompts.shape == (len(NAMES), 77, 64) and visual.shape == (n_ctx, 64)
        logits, _ = model.eval()(images(2))
    assert logits.shape == (2, len(NAMES)) and torch.isfinite(logits).all()


def test_maple_init_from_words_up_to_four_tokens(frozen_clip):
    from spotlighter.prompt import maple_inits_from_words

    assert [maple_inits_from_words(n, "a photo of a") for n in (1, 2, 4, 5)] == [True, True, True, False]
    assert not maple_inits_from_words(2, "") and not maple_inits_from_words(3, "a photo")
    model = MaPLe(frozen_clip, NAMES, n_ctx=4, ctx_init="a photo of a", depth=1)
    tok = frozen_clip.tokenize(["a photo of a"])
    with torch.no_grad():
        assert torch.equal(model.prompt_learner.ctx, frozen_clip.token_embedding(tok)[0, 1:5].float())


def test_maple_depth1_init_text_equals_zero_shot(frozen_clip):
    model = MaPLe(frozen_clip, NAMES, n_ctx=2, ctx_init="a photo of a", depth=1)
    assert len(model.prompt_learner.compound_prompts_text) == 0
    with torch.no_grad():
        prompts, deep_text, visual, deep_visual = model.prompt_learner()
        assert deep_text == [] and deep_visual == [] and visual.shape == (2, 64)
        got = model.text_encoder(prompts, model.prompt_learner.tokenized_prompts, deep_text)
        want = frozen_clip.encode_text([f"a photo of a {n.replace('_', ' ')}." for n in NAMES])
    torch.testing.assert_close(got, want)


def test_maple_deep_prompts_change_features(frozen_clip):
    """With depth 2, layer-1 text prompts replace tokens 1..n_ctx: changing them changes the text.

    The change is a random direction, not a constant: a constant added to a token is removed by every
    LayerNorm that reads it, so it would change the features only by rounding (~5e-7), and the test
    would pass or fail with the RNG state other tests leave behind."""
    model = MaPLe(frozen_clip, NAMES, depth=2)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        prompts, deep_text, visual, deep_visual = model.prompt_learner()
        assert len(deep_text) == 1 and deep_text[0].shape == (2, 64) and deep_visual[0].shape == (2, 64)
        tok = model.prompt_learner.tokenized_prompts
        a = model.text_encoder(prompts, tok, deep_text)
        b = model.text_encoder(prompts, tok, [deep_text[0] + torch.randn(2, 64, generator=g)])
        c = model.text_encoder(prompts, tok)
        assert (a - b).abs().max() > 1e-3 and (a - c).abs().max() > 1e-3
        # visual deep prompts: without a shallow prompt they are ignored, with one they matter
        x = images(2)
        v0 = frozen_clip.encode_image(x)
        v1 = frozen_clip.encode_image(x, visual, deep_visual)
        v2 = frozen_clip.encode_image(x, visual, [deep_visual[0] + torch.randn(2, 64, generator=g)])
        assert (v0 - v1).abs().max() > 1e-3 and (v1 - v2).abs().max() > 1e-3


def test_zero_shot_logits_value(frozen_clip):
    zs = ZeroShotCLIP(frozen_clip, NAMES, template="itap of a {}.")
    x = images()
    with torch.no_grad():
        v = F.normalize(frozen_clip.encode_image(x), dim=-1)
        t = F.normalize(frozen_clip.encode_text([f"itap of a {n.replace('_', ' ')}." for n in NAMES]), dim=-1)
        want = frozen_clip.logit_scale.exp() * v @ t.t()
        torch.testing.assert_close(zs(x)[0], want)
    assert count_trainable(zs) == 0


def test_cocoop_zero_meta_net_equals_coop(frozen_clip):
    """With the meta-net's output layer zeroed, CoCoOp's prompts are CoOp's for every image."""
    cocoop, coop = CoCoOp(frozen_clip, NAMES), CoOp(frozen_clip, NAMES)
    with torch.no_grad():
        cocoop.prompt_learner.meta_net[2].weight.zero_()
        cocoop.prompt_learner.meta_net[2].bias.zero_()
        torch.testing.assert_close(cocoop.eval()(images())[0], coop.eval()(images())[0])


def _autocast_dtypes():
    out = []
    for dtype in (torch.bfloat16, torch.float16):
        try:
            with torch.autocast("cpu", dtype=dtype):
                torch.ones(2, 2) @ torch.ones(2, 2)
            out.append(dtype)
        except Exception:  # pragma: no cover - depends on the CPU / torch build
            pass
    return out


@pytest.mark.parametrize("dtype", _autocast_dtypes(), ids=str)
def test_coop_autocast_close_to_fp32(dtype, frozen_clip):
    model = CoOp(frozen_clip, NAMES).eval()
    x = images()
    with torch.no_grad():
        ref = model(x)[0]
        with torch.autocast("cpu", dtype=dtype):
            low = model(x)[0]
    low = low.float()
    assert torch.isfinite(low).all()
    # logits here are O(1) (tiny random CLIP); bf16 keeps ~3 significant digits, fp16 ~4
    tol = 0.1 if dtype == torch.bfloat16 else 0.02
    torch.testing.assert_close(low, ref, atol=tol, rtol=0.05)
    assert (low - ref).abs().max() > 0  # autocast really ran in lower precision


def test_coop_text_features_are_encoded_once_at_inference_until_the_prompt_changes(frozen_clip, monkeypatch):
    model = CoOp(frozen_clip, ["cat", "dog"]).eval()
    calls = []
    encode = model._encode_text
    monkeypatch.setattr(model, "_encode_text", lambda: calls.append(1) or encode())
    with torch.no_grad():
        first = model.text_features()
        assert torch.equal(model.text_features(), first) and len(calls) == 1
        model.prompt_learner.ctx.add_(0.5)  # like an optimizer step
        changed = model.text_features()
        assert len(calls) == 2 and not torch.equal(changed, first)
        model.load_state_dict({"prompt_learner.ctx": model.prompt_learner.ctx - 0.5})  # like a checkpoint load
        torch.testing.assert_close(model.text_features(), first)
        assert len(calls) == 3
    model.text_features()  # with gradients: always encoded, never cached
    assert len(calls) == 4


LONG_NAME = " ".join(["very"] * 80) + " long name"  # 82 tokens on its own


@pytest.mark.parametrize("kind", ["zsclip", "coop", "cocoop", "maple", "spot-paper"])
def test_class_name_longer_than_the_context_is_named(kind, frozen_clip):
    from spotlighter.prompt import PromptTooLong, token_count

    names = ["cat", LONG_NAME]
    with pytest.raises(PromptTooLong) as info:
        {"zsclip": lambda: ZeroShotCLIP(frozen_clip, names), "coop": lambda: CoOp(frozen_clip, names),
         "cocoop": lambda: CoCoOp(frozen_clip, names), "maple": lambda: MaPLe(frozen_clip, names, depth=2),
         "spot-paper": lambda: Spotlighter(frozen_clip, names, head_cfg("paper", 8))}[kind]()
    msg = str(info.value)
    text = "a photo of a " + LONG_NAME
    assert msg.startswith(f"the prompt of class '{LONG_NAME[:57]}...' has {token_count(text.strip() + '.')} "
                          "tokens (")
    assert "more than the text encoder's context of 77: CLIP would cut it off. Shorten the class name" in msg


def test_a_prompt_that_just_fits_is_accepted(frozen_clip):
    from spotlighter.prompt import token_count

    name = " ".join(["very"] * (77 - token_count("a photo of a .")))
    assert token_count(f"a photo of a {name}.") == 77
    model = CoOp(frozen_clip, ["cat", name], n_ctx=4, ctx_init="a photo of a")
    assert model.prompt_learner.tokenized_prompts.shape == (2, 77)
    with pytest.raises(Exception, match="has 78 tokens"):
        CoOp(frozen_clip, ["cat", name + " x"], n_ctx=4, ctx_init="a photo of a")


def test_ctx_init_longer_than_the_context_names_the_key(frozen_clip):
    from spotlighter.prompt import PromptTooLong

    words = " ".join(["photo"] * 80)
    with pytest.raises(PromptTooLong) as info:
        CoOp(frozen_clip, NAMES, ctx_init=words)
    assert str(info.value.for_node("TRAINER.COOP")) == (
        f"TRAINER.COOP.CTX_INIT = '{words[:57]}...' has 82 "
        "tokens, which leaves no room for the class name in the text encoder's context of 77 tokens: use fewer "
        "words.")
