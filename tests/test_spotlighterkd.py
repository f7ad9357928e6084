"""Spotlighter on PromptKD (spotlighter.kd_spotlighter) on tiny CLIPs: the presets, the released memory
write and single-key IRM by hand, the token sets, every loss term, the parameter counts, the memory in
checkpoints, the CLIP's explicit-attention path and clear errors for bad settings."""

import copy
import hashlib
import os

import pytest
import torch
import torch.nn.functional as F

from spotlighter import kd_spotlighter as ks
from spotlighter.backbone import FrozenCLIP, ImageTokens, load_clip
from spotlighter.config import ConfigError, KD_PRESETS, apply_preset, default_cfg, merge_cfg
from spotlighter.machine import cpu_name
from spotlighter.models import IVLP
from tiny_clip import save_tiny_clip

pytestmark = pytest.mark.usefixtures("one_torch_thread")

NAMES = ["cat", "dog_house", "red car", "x", "owl"]
LAMBDA = 1000.0


def kd_node(preset="release", **changes):
    """TRAINER.SPOTLIGHTERKD of ``preset`` with ``changes`` (``IRM__HEADS=1``: TRAINER.SPOTLIGHTERKD.IRM.HEADS)."""
    cfg = default_cfg()
    apply_preset(cfg, preset, "SPOTLIGHTERKD")
    merge_cfg(cfg, {f"TRAINER.SPOTLIGHTERKD.{k.replace('__', '.')}": v for k, v in changes.items()})
    return cfg.TRAINER.SPOTLIGHTERKD


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    """(student, teacher) tiny CLIPs; the teacher wider (embedding 96 vs 64), as ViT-L/14 is wider."""
    folder = tmp_path_factory.mktemp("kdclips")
    student = save_tiny_clip(folder / "student.pt", seed=3)
    teacher = save_tiny_clip(folder / "teacher.pt", seed=4, vision_width=128, transformer_width=128, embed_dim=96)
    return student, teacher


def build(clips, preset="release", explicit=True, vision_depth=2, seed=0, **changes):
    student_path, teacher_path = clips
    sclip = FrozenCLIP(load_clip("ViT-B/16", path=student_path), explicit_attention=explicit)
    tclip = FrozenCLIP(load_clip("ViT-L/14", path=teacher_path), explicit_attention=explicit)
    torch.manual_seed(1)
    teacher = IVLP(tclip, NAMES, n_text=4, n_vision=4, ctx_init="a photo of a", text_depth=2, vision_depth=2)
    with torch.no_grad():
        for p in teacher.parameters():
            p.add_(0.05 * torch.randn_like(p))
    for p in teacher.parameters():
        p.requires_grad_(False)
    torch.manual_seed(seed)
    head = ks.KDHeadConfig.from_cfg(kd_node(preset, **changes))
    return ks.SpotlighterKD(sclip, teacher.eval(), NAMES, head, n_vision=4, vision_depth=vision_depth,
                            kd_weight=LAMBDA)


def images(batch=3, seed=0):
    return torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------ presets
def test_presets_are_the_released_computation_textrefiner_and_the_papers_choices():
    release = kd_node("release")
    assert (release.PRESET, release.TOP_K, list(release.LEVEL_SIZES), release.MEMORY.KIND, release.MEMORY.SLOTS,
            release.IRM.KIND, release.FUSION.BETA, release.EXPLICIT_ATTENTION) == \
        ("release", 5, [2, 3], "shared", 25, "single_key", 0.05, True)
    # lambda, lambda/100, lambda/1000 (each level), lambda/50, lambda/100
    assert [LAMBDA * w for w in (release.LOSS.SEM_WEIGHT, release.LOSS.LEVEL_WEIGHT, release.LOSS.MEM_WEIGHT,
                                 release.LOSS.IMG_WEIGHT)] == [10.0, 1.0, 20.0, 10.0]
    tr = kd_node("textrefiner")
    assert (list(tr.LEVEL_SIZES), tr.IRM.KIND, tr.FUSION.BETA, tr.LOSS.IMG_WEIGHT, tr.MEMORY.KIND) == \
        ([], "none", 0.0, 0.0, "shared")
    paper = kd_node("paper")
    assert (paper.MEMORY.KIND, paper.IRM.KIND, paper.LOSS.LEVEL_WEIGHTS, paper.SCORE.SAMPLE_WEIGHT) == \
        ("class", "tokens", "dynamic", 1.0)
    assert sorted(KD_PRESETS) == ["paper", "release", "textrefiner"]
    with pytest.raises(ConfigError, match=r"TRAINER.SPOTLIGHTERKD.PRESET = 'fancy' is unknown; expected one of "
                                          r"\['paper', 'release', 'textrefiner'\]"):
        kd_node("fancy")


# ------------------------------------------------------------------ memory and IRM by hand
def test_slot_memory_write_is_the_released_rule():
    torch.manual_seed(0)
    mem = ks.SlotMemory(slots=3, dim=4, momentum=0.8, temperature=1.0, seed=5)
    before = mem.slots.clone()
    tokens = torch.randn(7, 4)
    mem.write(tokens)
    x = F.normalize(tokens, dim=-1)
    score = x @ before.t()
    q = score.softmax(dim=0)
    nearest = score.argmax(dim=1)
    want = before.clone()
    for i in range(3):
        members = [j for j in range(7) if nearest[j] == i]
        if members:
            agg = sum(q[j, i] / q[:, i].max() * x[j] for j in members)  # a sum, not a mean
            want[i] = 0.8 * before[i] + 0.2 * agg
    torch.testing.assert_close(mem.slots, F.normalize(want, dim=-1))
    torch.testing.assert_close(mem.slots.norm(dim=-1), torch.ones(3))
    assert "slots" in mem.state_dict()  # saved in checkpoints, restored on resume


def test_slot_memory_reads_softmax_over_slots_without_temperature():
    mem = ks.SlotMemory(slots=4, dim=3, momentum=0.8, temperature=1.0, seed=1)
    x = torch.randn(2, 3) * 3
    torch.testing.assert_close(mem.read(x), (x @ mem.slots.t()).softmax(-1) @ mem.slots)
    torch.testing.assert_close(mem.read_normalized(x), mem.read(F.normalize(x, dim=-1)))


def test_single_key_irm_is_an_affine_map_whose_query_and_key_get_no_gradient():
    torch.manual_seed(0)
    irm = ks.SingleKeyRefiner(dim=16, heads=4, dropout=0.5).eval()
    v, key = torch.randn(3, 16), torch.randn(3, 16)
    with torch.no_grad():
        want = irm.out(irm.value(v))
        torch.testing.assert_close(irm(v, key), want)
        torch.testing.assert_close(irm(v, 100 * torch.randn(3, 16)), want)  # the key has no effect
    irm.train()
    torch.manual_seed(3)
    out = irm(v.requires_grad_(), key.requires_grad_())
    out.sum().backward()
    assert irm.query.weight.grad.abs().max() == 0 and irm.key.weight.grad.abs().max() == 0
    assert key.grad.abs().max() == 0 and irm.value.weight.grad.abs().max() > 0
    # dropout acts on whole heads: each head of each image is 0 or 1/(1-p) times its value
    with torch.no_grad():
        vals = irm.value(v).view(3, 4, 4)
        torch.manual_seed(3)
        mask = F.dropout(torch.ones(3, 4, 1, 1), 0.5, True).view(3, 4, 1)
        torch.testing.assert_close(out, irm.out((mask * vals).view(3, 16)))


# ------------------------------------------------------------------ the model
def test_token_sets_are_cls_the_top_k_by_attention_and_the_mean(clips):
    model = build(clips).train()
    B, N, w = 2, 17, 64
    tokens = torch.randn(B, N, w)
    attn = torch.rand(B, N - 1)
    img = ImageTokens(global_feat=tokens[:, 0], tokens=tokens, cls_attn=attn)
    branch = model._token_branch(img, None)
    mapped = branch.mapped
    order = attn.argsort(dim=1, descending=True)[:, :5] + 1  # patch n is token n + 1
    assert [s.shape[1] for s in branch.sets] == [7, 4, 5]
    for b in range(B):
        for members, ranks in zip(branch.sets, ([0, 1, 2, 3, 4], [0, 1], [2, 3, 4])):
            want = torch.cat([mapped[b, :1], mapped[b, order[b, ranks]], mapped[b].mean(0, keepdim=True)])
            torch.testing.assert_close(members[b], want)
    assert mapped.shape == (B, N, 96)  # to the teacher's width


def test_release_losses_and_logits_by_hand(clips):
    model = build(clips).train()
    x = images()
    torch.manual_seed(7)
    logits, losses = model(x)
    assert list(losses) == ["kd", "sem", "level1", "level2", "mem", "img"]
    t, s = model.teacher_text, model.clip.logit_scale.exp()
    with torch.no_grad():
        p = model.teacher.image_logits(x, t).softmax(dim=1)
    torch.testing.assert_close(losses["kd"], LAMBDA * ks.kl_to(logits, p, 1.0))
    assert losses["mem"] > 0 and losses["img"] > 0
    total = sum(losses.values())
    assert total.requires_grad
    total.backward()
    groups = model.trainable_groups()
    assert all(q.grad is not None for q in groups["student"].parameters())
    assert model.irm.query.weight.grad.abs().max() == 0  # dead as released
    model.eval()
    with torch.no_grad():
        logits, losses = model(x)
        _, v = model._tokens(x)
        refined = model.trm(t, model.memory.read(t))
        f = 0.95 * v + 0.05 * model.irm.out(model.irm.value(v))
        assert losses == {}
        torch.testing.assert_close(logits, s * f @ refined.t())


def test_training_writes_the_memory_and_it_round_trips_through_the_state_dict(clips):
    model = build(clips).train()
    before = model.memory.slots.clone()
    model(images())
    written = model.memory.slots.clone()
    assert not torch.equal(before, written)
    state = copy.deepcopy(model.state_dict())
    assert torch.equal(state["memory.slots"], written)
    other = build(clips, MEMORY__INIT_SEED=9)
    assert not torch.equal(other.memory.slots, before)  # MEMORY.INIT_SEED seeds the random init
    other.load_state_dict(state)
    assert torch.equal(other.memory.slots, written)
    assert "teacher_text" not in state and not any(k.startswith("clip.") for k in state)


def test_textrefiner_has_no_levels_irm_or_fusion(clips):
    model = build(clips, "textrefiner").train()
    assert model.irm is None
    logits, losses = model(images())
    assert list(losses) == ["kd", "sem", "mem"]
    model.eval()
    with torch.no_grad():
        _, v = model._tokens(images())
        t = model.teacher_text
        torch.testing.assert_close(model(images())[0],
                                   model.clip.logit_scale.exp() * v @ model.trm(t, model.memory.read(t)).t())


def test_paper_preset_writes_class_prototypes_of_the_teachers_top_class(clips):
    model = build(clips, "paper", explicit=False).train()
    protos = model.memory.prototypes.clone()
    x = images(batch=4)
    logits, losses = model(x)
    assert list(losses) == ["kd", "sem", "level1", "level2", "mem", "img"]
    sum(losses.values()).backward()
    with torch.no_grad():
        top = model.teacher.image_logits(x, model.teacher_text).argmax(dim=1).unique().tolist()
    changed = [c for c in range(len(NAMES)) if not torch.equal(protos[c], model.memory.prototypes[c])]
    assert changed == sorted(top)
    model.eval()
    assert model(x)[0].shape == (4, len(NAMES))


def test_parameter_counts_at_depth_nine_are_the_released_ones(tmp_path):
    """tkmc prints "Parameters count: 21" (its student module) at depth 9; its memory adds 9 tensors."""
    student = save_tiny_clip(tmp_path / "s.pt", seed=3, vision_layers=12)
    teacher = save_tiny_clip(tmp_path / "t.pt", seed=4, vision_width=128, transformer_width=128, embed_dim=96)
    model = build((student, teacher), vision_depth=9)
    counts = {k: len([p for p in m.parameters() if p.requires_grad]) for k, m in model.trainable_groups().items()}
    assert counts == {"student": 21, "memory": 9}
    assert sum(1 for p in model.parameters() if p.requires_grad) == 30
    tr = build((student, teacher), "textrefiner", vision_depth=9)
    assert {k: len(list(m.parameters())) for k, m in tr.trainable_groups().items()} == {"student": 21, "memory": 1}


def test_explicit_attention_changes_rounding_only_and_prompt_tokens_stay_out(clips):
    student_path, _ = clips
    fused = FrozenCLIP(load_clip("ViT-B/16", path=student_path))
    explicit = FrozenCLIP(load_clip("ViT-B/16", path=student_path), explicit_attention=True)
    x = images()
    prompt, deep = 0.02 * torch.randn(4, 64), [0.02 * torch.randn(4, 64)]
    with torch.no_grad():
        a = fused.encode_image(x, prompt, deep)
        b = explicit.encode_image(x, prompt, deep)
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
        tok = explicit.encode_image_tokens(x, shallow_prompt=prompt, deep_prompts=deep)
        torch.testing.assert_close(tok.global_feat, b, rtol=1e-5, atol=1e-6)
        assert tok.tokens.shape == (3, 17, 64) and tok.cls_attn.shape == (3, 16)
        assert (tok.cls_attn.sum(dim=1) < 1).all()  # the softmax also ran over CLS and the 4 prompts
        text = explicit.encode_text(["a photo of a cat."])
        torch.testing.assert_close(text, fused.encode_text(["a photo of a cat."]), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("changes, message", [
    (dict(LEVEL_SIZES=[2, 2]), r"LEVEL_SIZES = \[2, 2\] is invalid: expected positive sizes adding up to TOP_K = 5"),
    (dict(TOP_K=40, LEVEL_SIZES=[]), r"TOP_K = 40 is invalid: expected 1..16"),
    (dict(IRM__KIND="tokens"), r"IRM.KIND tokens attends over class prototypes: set MEMORY.KIND class"),
    (dict(IRM__KIND="none"), r"IRM.KIND none has no refined image feature: set FUSION.BETA 0"),
    (dict(MEMORY__KIND="slots"), r"MEMORY.KIND = 'slots' is invalid: expected one of \['shared', 'class'\]"),
    (dict(SCORE__SEMANTIC_WEIGHT=1.0), r"SCORE.SEMANTIC_WEIGHT needs class prototypes"),
    (dict(IRM__HEADS=7), r"IRM.HEADS = 7 must divide the teacher's embedding width 96"),
])
def test_bad_head_settings_are_clear_errors(clips, changes, message):
    with pytest.raises(ConfigError, match=r"TRAINER\.SPOTLIGHTERKD\." + message):
        build(clips, **changes)


# ------------------------------------------------------------------ the released code's own numbers
REFERENCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "tkmc_reference.pt")
REF_STEPS = 3


def digest(t: torch.Tensor) -> str:
    return hashlib.sha256(t.detach().contiguous().float().numpy().tobytes()).hexdigest()[:16]


def reference_run(tmp_path, preset: str, monkeypatch):
    """Our model at the released code's widths (student 512, teacher 768: its projectors and memory are
    hard-coded to them) on tiny fp16-representable CLIPs, trained REF_STEPS SGD steps, then evaluated.
    Returns (model, teacher, per-step records, evaluation logits); the records hold every loss term, the
    total, and digests of every gradient, the memory and every parameter after the step."""
    def half_clip(path, seed, **kw):
        from tiny_clip import build_tiny_clip

        model = build_tiny_clip(seed, **kw)
        torch.save({k: v.half().float() if v.is_floating_point() else v for k, v in model.state_dict().items()},
                   str(path))
        return str(path)

    student = half_clip(tmp_path / "s.pt", 3, embed_dim=512, vision_layers=3)
    teacher = half_clip(tmp_path / "t.pt", 4, embed_dim=768, vision_width=128, transformer_width=128,
                        vision_layers=3)
    model = build((student, teacher), preset, vision_depth=3)
    optim = torch.optim.SGD(list(model.parameters()), lr=0.002, momentum=0.9, weight_decay=5e-4)
    steps = []
    terms = []  # every KL and L1 the loss is made of, unweighted, in the order computed
    for name in ("kl_div", "l1_loss"):
        def spy(*args, _f=getattr(F, name), _n=name, **kw):
            out = _f(*args, **kw)
            terms.append((_n, out.item()))
            return out
        monkeypatch.setattr(ks.F, name, spy)
    for e in range(REF_STEPS):
        model.train()
        torch.manual_seed(100 + e)
        terms.clear()
        _, losses = model(images(batch=4, seed=10 + e))
        loss = sum(losses.values())
        optim.zero_grad()
        loss.backward()
        optim.step()
        steps.append({"terms": list(terms), "loss": loss.item(),
                      "grads": {k: digest(p.grad) for k, p in model.named_parameters() if p.grad is not None},
                      "state": {k: digest(v) for k, v in model.state_dict().items()}})
    monkeypatch.undo()
    model.eval()
    with torch.no_grad():
        logits = model(images(batch=5, seed=20))[0]
    return model, steps, logits


@pytest.mark.parametrize("preset", ["release", "textrefiner"])
def test_the_released_code_computes_the_same_numbers(tmp_path, preset, monkeypatch):
    """tests/data/tkmc_reference.pt holds what the released tkmc code (``spotlighter.py``, and
    ``textrefiner_old.py`` for TextRefiner) computed from this model's initial weights, in fp32: each loss
    term, the total, digests of every gradient, memory write and post-step parameter for 3 SGD steps,
    and the evaluation logits (TRM over the same classes). Bitwise equality holds for the torch build and
    CPU kernels it was saved with; elsewhere the digests are skipped and the numbers compared to 1e-4."""
    ref = torch.load(REFERENCE, weights_only=True)[preset]
    model, steps, logits = reference_run(tmp_path, preset, monkeypatch)
    same_kernels = (ref["torch"] == str(torch.__version__)
                    and ref["cpu"] == torch.backends.cpu.get_cpu_capability() and ref["cpu_name"] == cpu_name())
    assert len(steps) == len(ref["steps"]) == REF_STEPS
    for e, (got, want) in enumerate(zip(steps, ref["steps"])):
        assert [k for k, _ in got["terms"]] == [k for k, _ in want["terms"]]
        for (kind, a), (_, b) in zip(got["terms"], want["terms"]):
            assert a == b if same_kernels else a == pytest.approx(b, rel=1e-4, abs=1e-6), (e, kind, a, b)
        assert got["loss"] == want["loss"] if same_kernels else got["loss"] == pytest.approx(want["loss"], rel=1e-4)
        if same_kernels:
            assert got["grads"] == want["grads"], e
            assert got["state"] == want["state"], e
    if same_kernels:
        assert torch.equal(logits, ref["logits"])
    else:
        torch.testing.assert_close(logits, ref["logits"], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("mode", ["merge", "tome", "drop", "evit"])
def test_token_reduction_works_in_front_of_the_students_prompts(clips, mode):
    """MODEL.PRUNE on a prompted student: the patch tokens are reduced at the pruning block while the
    visual prompts keep their places (the deep prompts still replace them), the token branch sees
    CLS and the remaining patches (patch_index says which) and the prompts still learn."""
    from spotlighter.backbone import PruneSpec

    student_path, _ = clips
    spec = PruneSpec((0,), 0.5, fuse=True, mode=mode)
    clip = FrozenCLIP(load_clip("ViT-B/16", path=student_path), prune=spec)
    prompt = (0.02 * torch.randn(4, 64)).requires_grad_()
    deep = [(0.02 * torch.randn(4, 64)).requires_grad_()]
    x = images()
    tok = clip.encode_image_tokens(x, shallow_prompt=prompt, deep_prompts=deep)
    left = spec.remaining(clip.num_patches)
    assert left < 16 and tok.tokens.shape == (3, 1 + left, 64) and tok.cls_attn.shape == (3, left)
    assert tok.patch_index.shape == (3, left) and len(tok.kept_index) == 1
    for b in range(3):  # each remaining token names a distinct patch of the 4 x 4 grid
        idx = tok.patch_index[b].tolist()
        assert len(set(idx)) == left and all(0 <= i < 16 for i in idx)
    torch.testing.assert_close(tok.global_feat, clip.encode_image(x, prompt, deep), rtol=1e-5, atol=1e-6)
    unpruned = FrozenCLIP(clip.model).encode_image(x, prompt, deep)
    assert not torch.allclose(unpruned, tok.global_feat)  # the reduction happened
    (tok.tokens.sum() + tok.global_feat.sum()).backward()
    assert prompt.grad.abs().sum() > 0 and deep[0].grad.abs().sum() > 0
    # the whole model trains and evaluates on the reduced tokens
    head = ks.KDHeadConfig.from_cfg(kd_node("release"))
    model = ks.SpotlighterKD(clip, build(clips).teacher, NAMES, head, n_vision=4, vision_depth=2, kd_weight=LAMBDA)
    model.train()
    _, losses = model(x)
    sum(losses.values()).backward()
    model.eval()
    assert model(x)[0].shape == (3, len(NAMES))


def test_the_factory_leaves_the_callers_clip_as_it_is(clips):
    """SpotlighterKD's explicit attention is its own view of the frozen CLIP: a CLIP shared with other
    models (gpu_check, the benchmark) keeps the fused path."""
    from spotlighter.config import trainer_cfg
    from spotlighter.factory import build_model

    student_path, _ = clips
    shared = FrozenCLIP(load_clip("ViT-B/16", path=student_path))
    teacher = build(clips).teacher
    cfg = trainer_cfg("spotlighterkd", {"TRAINER.PROMPTKD.PROMPT_DEPTH_VISION": 2})
    model = build_model(cfg, NAMES, shared, teacher=teacher)
    assert cfg.TRAINER.SPOTLIGHTERKD.EXPLICIT_ATTENTION and model.clip.explicit_attention
    assert not shared.explicit_attention and model.clip.model is shared.model
