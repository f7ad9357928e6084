"""spotlighter.method: scoring, selection, levels, memories (hand-computed), the head, parameter counts."""

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from yacs.config import CfgNode as CN

from spotlighter.backbone import ImageTokens
from spotlighter.config import apply_preset, default_cfg
from spotlighter.method import (ClassMemory, HeadConfig, ImageRefiner, ScoreWeights, SharedMemory, SpotlighterHead,
                                attention_read, gather_tokens, level_weights, sample_wise_score,
                                select_top_k, semantic_wise_score, split_levels, standardize, token_scores)
from spotlighter.models import count_trainable


pytestmark = pytest.mark.usefixtures("one_torch_thread")


S2 = 1 / math.sqrt(2)


def t(*rows):
    """t([1, 2]) -> shape (2,); t([1, 2], [3, 4]) -> (2, 2); t(1.0, 2.0) -> (2,)."""
    return torch.tensor(rows[0] if len(rows) == 1 else rows, dtype=torch.float32)


def close(a, b, **kw):
    torch.testing.assert_close(torch.as_tensor(a, dtype=torch.float32), torch.as_tensor(b, dtype=torch.float32),
                               **kw)


def spot_node(preset="paper", **changes) -> CN:
    cfg = default_cfg()
    apply_preset(cfg, preset)
    node = cfg.TRAINER.SPOTLIGHTER
    for dotted, value in changes.items():
        *parents, leaf = dotted.split("__")
        target = node
        for p in parents:
            target = target[p]
        target[leaf] = value
    return node


# ============================================================================ scoring
def test_standardize_hand_computed():
    x = t([1.0, 2.0, 3.0, 4.0])
    close(standardize(x, eps=0.0), (x - 2.5) / math.sqrt(1.25))  # population std of 1..4 = sqrt(1.25)


def test_standardize_mean_zero_population_std_one():
    x = torch.randn(3, 50, generator=torch.Generator().manual_seed(0)) * 7 + 3
    y = standardize(x, eps=0.0)
    close(y.mean(dim=-1), torch.zeros(3), atol=1e-6, rtol=0)
    close(y.std(dim=-1, unbiased=False), torch.ones(3))
    assert not torch.allclose(y.std(dim=-1, unbiased=True), torch.ones(3))  # not the sample std
    z = standardize(x.t(), eps=0.0, dim=0)
    close(z, y.t())


def test_standardize_constant_input_is_zero_not_nan():
    y = standardize(torch.full((1, 5), 3.0), eps=1e-6)
    assert torch.equal(y, torch.zeros(1, 5))


# patches z1 = e1, z2 = e2, z3 = (e1 + e2)/sqrt2; classes t1 = e1, t2 = e2; p = (0.75, 0.25)
PATCHES = t([[1.0, 0.0], [0.0, 1.0], [S2, S2]]).unsqueeze(0)
TEXT = t([1.0, 0.0], [0.0, 1.0])
PROBS = t([[0.75, 0.25]])
# class 0 prototypes: e1, (e1+e2)/sqrt2; class 1 prototypes: e2, -e1
PROTOS = t([[1.0, 0.0], [S2, S2]], [[0.0, 1.0], [-1.0, 0.0]])


def test_sample_wise_score_hand_computed():
    a = sample_wise_score(PATCHES, PROBS, TEXT)
    close(a, t([[0.75, 0.25, S2]]))  # sum_c p_c cos(z_n, t_c)


def test_semantic_wise_score_hand_computed():
    b = semantic_wise_score(PATCHES, PROBS, PROTOS)
    # z1: max cos class0 = 1, class1 = max(0, -1) = 0
    # z2: class0 = max(0, s) = s, class1 = 1;  z3: class0 = 1, class1 = max(s, -s) = s
    close(b, t([[0.75, 0.75 * S2 + 0.25, 0.75 + 0.25 * S2]]))
    close(semantic_wise_score(PATCHES, PROBS, PROTOS, class_chunk=1), b)


def test_semantic_wise_score_chunking_invariant():
    g = torch.Generator().manual_seed(1)
    patches = F.normalize(torch.randn(2, 9, 8, generator=g), dim=-1)
    protos = F.normalize(torch.randn(7, 3, 8, generator=g), dim=-1)
    probs = torch.randn(2, 7, generator=g).softmax(-1)
    full = semantic_wise_score(patches, probs, protos)
    for chunk in (1, 2, 3, 6, 7):
        close(semantic_wise_score(patches, probs, protos, class_chunk=chunk), full)
    # brute force
    want = torch.zeros(2, 9)
    for b in range(2):
        for n in range(9):
            want[b, n] = sum(probs[b, c] * (protos[c] @ patches[b, n]).max() for c in range(7))
    close(full, want)


def test_token_scores_attention_only_is_standardised_attention():
    attn = t([0.1, 0.4, 0.2, 0.3], [0.05, 0.05, 0.5, 0.1])
    patches = F.normalize(torch.randn(2, 4, 3), dim=-1)
    s = token_scores(patches, t([0.5, 0.5], [0.5, 0.5]), TEXT.new_zeros(2, 3) + 1, None, attn,
                     ScoreWeights(0.0, 0.0, 1.0, eps=0.0))
    close(s, standardize(attn, eps=0.0))
    s2 = token_scores(patches, t([0.5, 0.5], [0.5, 0.5]), TEXT.new_zeros(2, 3) + 1, None, attn,
                      ScoreWeights(0.0, 0.0, 2.0, eps=0.0))
    close(s2, 2 * standardize(attn, eps=0.0))


def test_token_scores_paper_is_sum_of_standardised_terms():
    probs = PROBS
    s = token_scores(PATCHES, probs, TEXT, PROTOS, None, ScoreWeights(1.0, 1.0, 0.0, eps=0.0))
    a = t([0.75, 0.25, S2])
    b = t([0.75, 0.75 * S2 + 0.25, 0.75 + 0.25 * S2])
    close(s, ((a - a.mean()) / a.std(unbiased=False) + (b - b.mean()) / b.std(unbiased=False)).unsqueeze(0))


def test_token_scores_missing_inputs():
    with pytest.raises(ValueError, match="prototypes"):
        token_scores(PATCHES, PROBS, TEXT, None, None, ScoreWeights(0.0, 1.0, 0.0, eps=0.0))
    with pytest.raises(ValueError, match="attention"):
        token_scores(PATCHES, PROBS, TEXT, None, None, ScoreWeights(0.0, 0.0, 1.0, eps=0.0))


# ============================================================================ selection and levels
def test_select_top_k_returns_token_indices():
    values, idx = select_top_k(t([[0.1, 0.9, 0.5, 0.7]]), 2)
    close(values, t([[0.9, 0.7]]))
    assert idx.tolist() == [[2, 4]]  # patches 1 and 3 are tokens 2 and 4 (CLS is token 0)


def test_select_top_k_ranked_and_first_patch_is_token_one():
    values, idx = select_top_k(t([5.0, 1.0, 3.0, 4.0, 2.0], [0.0, 0.0, 0.0, 9.0, 1.0]), 5)
    assert idx[0].tolist() == [1, 4, 3, 5, 2]
    assert idx[1, :2].tolist() == [4, 5]
    assert sorted(idx[1, 2:].tolist()) == [1, 2, 3]
    assert (values[:, :-1] >= values[:, 1:]).all()
    assert idx.min() >= 1 and idx.max() <= 5


def test_gather_tokens_reads_the_token_at_each_index():
    B, N, d = 2, 6, 3
    tokens = torch.arange(N, dtype=torch.float32).view(1, N, 1).expand(B, N, d).clone()
    tokens[1] += 100  # second image
    scores = t([0.0, 0.3, 0.1, 0.9, 0.2], [0.8, 0.1, 0.2, 0.3, 0.4])  # P = 5 patches
    _, idx = select_top_k(scores, 3)
    got = gather_tokens(tokens, idx)
    assert got.shape == (B, 3, d)
    assert got[0, :, 0].tolist() == [4.0, 2.0, 5.0]
    assert got[1, :, 0].tolist() == [101.0, 105.0, 104.0]
    assert (got[0] != 0).all()  # never the CLS token
    assert torch.equal(got[:, :, 0], got[:, :, 2])


def test_split_levels():
    x = torch.arange(2 * 5 * 3, dtype=torch.float32).view(2, 5, 3)
    l1, l2 = split_levels(x, [3, 2])
    assert l1.shape == (2, 3, 3) and l2.shape == (2, 2, 3)
    assert torch.equal(torch.cat([l1, l2], dim=1), x)
    assert torch.equal(l2, x[:, 3:])
    with pytest.raises(ValueError, match="do not add up to 5"):
        split_levels(x, [3, 3])
    with pytest.raises(ValueError):
        split_levels(x, (2, 2))


def test_level_weights_dynamic_and_fixed():
    top = t([[3.0, 2.0, 1.0, 0.0, -1.0]])
    # level means: (3+2+1)/3 = 2, (0-1)/2 = -0.5, all = 1
    e = [math.exp(2.0), math.exp(-0.5), math.exp(1.0)]
    close(level_weights(top, (3, 2), dynamic=True, include_all=False),
          t([[e[0] / (e[0] + e[1]), e[1] / (e[0] + e[1])]]))
    close(level_weights(top, (3, 2), dynamic=True, include_all=True), t([[v / sum(e) for v in e]]))
    assert torch.equal(level_weights(top, (3, 2), dynamic=False, include_all=True), torch.ones(1, 3))
    assert torch.equal(level_weights(top, (2, 3), dynamic=False, include_all=False), torch.ones(1, 2))
    # sizes 2 + 3: means 2.5 and 0
    close(level_weights(top, (2, 3), dynamic=True, include_all=False),
          t([[1 / (1 + math.exp(-2.5)), math.exp(-2.5) / (1 + math.exp(-2.5))]]))


# ============================================================================ memories
def test_attention_read_hand_computed():
    keys = t([1.0, 0.0], [0.0, 1.0])
    q = t([3.0, 4.0])  # cos = 0.6, 0.8
    w0, w1 = math.exp(6.0), math.exp(8.0)
    close(attention_read(q, keys, 0.1), t([w0 / (w0 + w1), w1 / (w0 + w1)]))


def test_class_memory_init_is_normalised_text_repeated():
    text = t([3.0, 4.0], [0.0, -2.0], [1.0, 1.0])
    mem = ClassMemory(text, ["a", "b", "c"], per_class=4, momentum=0.8, temperature=0.1)
    assert mem.prototypes.shape == (3, 4, 2)
    close(mem.prototypes, F.normalize(text, dim=-1).unsqueeze(1).expand(3, 4, 2))
    close(mem.prototypes[0, 2], t(0.6, 0.8))
    assert mem.per_class == 4
    assert mem.keys().shape == (12, 2)
    assert "prototypes" not in mem.state_dict()  # class-dependent: saved by name, not in state_dict
    with pytest.raises(ValueError):
        ClassMemory(text, ["a", "b"], 4, 0.8, 0.1)


def test_class_memory_read_own_hand_computed():
    mem = ClassMemory(t([1.0, 0.0], [1.0, 0.0]), ["a", "b"], per_class=2, momentum=0.8, temperature=0.1)
    mem.prototypes = t([[1.0, 0.0], [0.0, 1.0]], [[-1.0, 0.0], [0.0, -1.0]])
    text = t([3.0, 4.0], [3.0, 4.0])
    # class a: cos 0.6, 0.8 -> softmax(6, 8); class b: cos -0.6, -0.8 -> softmax(-6, -8)
    wa = [math.exp(6.0), math.exp(8.0)]
    wb = [math.exp(-6.0), math.exp(-8.0)]
    want = t([wa[0] / sum(wa), wa[1] / sum(wa)], [-wb[0] / sum(wb), -wb[1] / sum(wb)])
    close(mem.read_own(text), want)


def test_class_memory_write_hand_computed():
    mem = ClassMemory(t([1.0, 0.0], [1.0, 0.0]), ["a", "b"], per_class=2, momentum=0.8, temperature=0.1)
    before = t([[1.0, 0.0], [0.0, 1.0]], [[-1.0, 0.0], [0.0, -1.0]])
    mem.prototypes = before.clone()
    tokens = t([2.0, 0.0],  # label 0, unnormalised e1 -> nearest P_a0
               [0.8, 0.6],  # label 0 -> nearest P_a0 (0.8 > 0.6)
               [0.6, 0.8])  # label 1 -> nearest *own-class* prototype P_b0 = -e1 (-0.6 > -0.8)
    labels = torch.tensor([0, 0, 1])
    scores = t(1.0, 0.0, 5.0)
    mem.write(tokens, labels, scores)

    w1, w2 = math.e / (1 + math.e), 1 / (1 + math.e)  # softmax(1, 0) among P_a0's tokens
    mean_a0 = t(w1 * 1.0 + w2 * 0.8, w2 * 0.6)
    want = before.clone()
    want[0, 0] = F.normalize(0.8 * before[0, 0] + 0.2 * mean_a0, dim=-1)
    want[1, 0] = F.normalize(0.8 * before[1, 0] + 0.2 * t(0.6, 0.8), dim=-1)  # a single token: weight 1
    close(mem.prototypes, want)
    assert torch.equal(mem.prototypes[0, 1], before[0, 1])  # untouched prototypes unchanged exactly
    assert torch.equal(mem.prototypes[1, 1], before[1, 1])
    close(mem.prototypes.norm(dim=-1), torch.ones(2, 2))


def test_class_memory_write_is_out_of_place():
    mem = ClassMemory(torch.randn(3, 4), ["a", "b", "c"], 2, 0.8, 0.1)
    old = mem.prototypes
    snapshot = old.clone()
    mem.write(torch.randn(5, 4), torch.tensor([0, 0, 1, 1, 1]), torch.randn(5))
    assert mem.prototypes is not old
    assert torch.equal(old, snapshot)
    assert torch.equal(mem.prototypes[2], snapshot[2])  # class c had no token
    assert not torch.equal(mem.prototypes[0], snapshot[0])


def test_class_memory_write_scores_are_shift_invariant():
    """w = softmax of the scores among a prototype's tokens: adding a constant changes nothing."""
    g = torch.Generator().manual_seed(3)
    text, tokens = torch.randn(2, 6, generator=g), torch.randn(8, 6, generator=g)
    labels, scores = torch.tensor([0, 1, 0, 1, 0, 0, 1, 1]), torch.randn(8, generator=g)
    a = ClassMemory(text, ["x", "y"], 3, 0.8, 0.1)
    b = ClassMemory(text, ["x", "y"], 3, 0.8, 0.1)
    a.write(tokens, labels, scores)
    b.write(tokens, labels, scores + 1000.0)
    close(a.prototypes, b.prototypes)


def test_class_memory_load_by_name():
    old = ClassMemory(t([1.0, 0.0], [0.0, 1.0]), ["a", "b"], per_class=2, momentum=0.8, temperature=0.1)
    old.prototypes = t([[1.0, 0.0], [S2, S2]], [[0.6, 0.8], [-0.8, 0.6]])
    state = old.class_state()
    assert state["classnames"] == ["a", "b"]

    new = ClassMemory(t([5.0, 5.0], [3.0, -4.0]), ["b", "c"], per_class=2, momentum=0.8, temperature=0.1)
    assert new.load_class_state(state) == (1, 1)
    close(new.prototypes[0], t([0.6, 0.8], [-0.8, 0.6]))  # "b" from the checkpoint
    close(new.prototypes[1], t([0.6, -0.8], [0.6, -0.8]))  # "c": text init kept
    assert new.classnames == ["b", "c"]


def test_class_memory_load_shape_mismatch():
    old = ClassMemory(torch.randn(2, 4), ["a", "b"], per_class=3, momentum=0.8, temperature=0.1)
    new = ClassMemory(torch.randn(2, 4), ["a", "b"], per_class=4, momentum=0.8, temperature=0.1)
    before = new.prototypes.clone()
    with pytest.raises(ValueError, match="shape"):
        new.load_class_state(old.class_state())
    assert torch.equal(new.prototypes, before)
    wide = ClassMemory(torch.randn(2, 5), ["a", "b"], per_class=4, momentum=0.8, temperature=0.1)
    with pytest.raises(ValueError):
        new.load_class_state(wide.class_state())


def test_shared_memory_write_hand_computed():
    mem = SharedMemory(3, 2, momentum=0.8, temperature=1.0)
    before = t([1.0, 0.0], [0.0, 1.0], [-1.0, 0.0])
    mem.slots = before.clone()
    tokens = t([1.0, 0.0], [0.8, 0.6], [0.6, 0.8])
    mem.write(tokens)
    # sims (T = 1): x1 (1, 0, -1) -> slot 0; x2 (0.8, 0.6, -0.8) -> slot 0; x3 (0.6, 0.8, -0.6) -> slot 1
    # weights: softmax over tokens of the slot's column, divided by that column's max:
    #   x1: 1; x2: exp(0.8)/exp(1) = exp(-0.2); x3: exp(0.8)/exp(0.8) = 1
    agg0 = t(1.0 + math.exp(-0.2) * 0.8, math.exp(-0.2) * 0.6)
    want = before.clone()
    want[0] = F.normalize(0.8 * before[0] + 0.2 * agg0, dim=-1)
    want[1] = F.normalize(0.8 * before[1] + 0.2 * t(0.6, 0.8), dim=-1)
    close(mem.slots, want)
    assert torch.equal(mem.slots[2], before[2])


def test_shared_memory_init_is_seeded_unit_and_persistent():
    a, b = SharedMemory(25, 8, 0.8, 1.0, seed=0), SharedMemory(25, 8, 0.8, 1.0, seed=0)
    assert torch.equal(a.slots, b.slots)
    assert not torch.equal(a.slots, SharedMemory(25, 8, 0.8, 1.0, seed=1).slots)
    close(a.slots.norm(dim=-1), torch.ones(25))
    assert "slots" in a.state_dict()  # not class-dependent: part of the checkpoint
    old = a.slots
    a.write(torch.randn(4, 8))
    assert a.slots is not old
    assert torch.equal(a.state_dict()["slots"], a.slots)  # the written slots are what gets saved
    assert not torch.equal(a.slots, old)


# ============================================================================ the head
D, P, C, B = 16, 16, 3, 4
NAMES = ["ant", "bee", "cat"]


def fake_image(seed=0, batch=B):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randn(batch, P + 1, D, generator=g)
    attn = torch.rand(batch, P, generator=g)
    attn = attn / attn.sum(-1, keepdim=True) * 0.9
    return ImageTokens(global_feat=tokens[:, 0].clone(), tokens=tokens, cls_attn=attn)


def class_text(seed=1):
    return torch.randn(C, D, generator=torch.Generator().manual_seed(seed))


LOGIT_SCALE = torch.tensor(math.log(100.0))
LABELS = torch.tensor([0, 1, 2, 1])


def make_head(preset="paper", **changes):
    torch.manual_seed(0)
    node = spot_node(preset, **changes)
    return SpotlighterHead(HeadConfig.from_cfg(node), D, NAMES, class_text())


def test_head_config_from_cfg_release():
    cfg = HeadConfig.from_cfg(spot_node("release"))
    assert cfg.level_sizes == (2, 3) and cfg.memory_kind == "shared" and cfg.shared_slots == 25
    assert (cfg.score.sample, cfg.score.semantic, cfg.score.attn) == (0.0, 0.0, 1.0)
    assert cfg.dynamic_level_weights is False and cfg.local_weight == pytest.approx(0.02)
    assert (cfg.beta_train, cfg.beta_test, cfg.test_local_gamma) == (0.05, 0.1, 0.0)
    paper = HeadConfig.from_cfg(spot_node("paper"))
    assert paper.level_sizes == (3, 2) and paper.dynamic_level_weights and paper.prototypes_per_class == 4


@pytest.mark.parametrize("preset", ["paper", "release"])
def test_head_training_losses_and_backward(preset):
    head = make_head(preset).train()
    text = class_text(2).requires_grad_(True)
    out = head(fake_image(), text, LOGIT_SCALE, LABELS)
    assert set(out.losses) == {"global", "local", "consistency"}
    assert out.logits.shape == (B, C)
    assert all(torch.isfinite(v) and v.dim() == 0 for v in out.losses.values())
    assert out.token_idx.shape == (B, 5) and out.token_idx.min() >= 1 and out.token_idx.max() <= P
    # memory has been written during forward, yet backward works (writes are out of place)
    sum(out.losses.values()).backward()
    assert text.grad is not None and torch.isfinite(text.grad).all() and text.grad.abs().sum() > 0
    for name, p in head.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert head.trm.proj.weight.grad.abs().sum() > 0
    assert head.mapper.net[0].weight.grad.abs().sum() > 0


def test_head_global_loss_is_ce_of_logits():
    head = make_head("paper").train()
    out = head(fake_image(), class_text(2), LOGIT_SCALE, LABELS)
    close(out.losses["global"], F.cross_entropy(out.logits, LABELS))


@pytest.mark.parametrize("preset", ["paper", "release"])
def test_head_eval_has_no_losses_and_keeps_memory(preset):
    head = make_head(preset).eval()
    mem_before = {k: v.clone() for k, v in head.memory.named_buffers()} | {
        "prototypes": head.memory.prototypes.clone() if hasattr(head.memory, "prototypes") else None}
    out = head(fake_image(), class_text(2), LOGIT_SCALE, LABELS)  # labels given, but eval
    assert out.losses == {}
    assert torch.isfinite(out.logits).all()
    for k, v in head.memory.named_buffers():
        assert torch.equal(v, mem_before[k]), k
    if preset == "paper":
        assert torch.equal(head.memory.prototypes, mem_before["prototypes"])


def test_head_training_forward_writes_own_class_prototypes_only():
    head = make_head("paper").train()
    before = head.memory.prototypes.clone()
    labels = torch.tensor([0, 0, 2, 2])
    head(fake_image(), class_text(2), LOGIT_SCALE, labels)
    after = head.memory.prototypes
    assert not torch.equal(after[0], before[0]) and not torch.equal(after[2], before[2])
    assert torch.equal(after[1], before[1])  # no image of class 1 in the batch
    close(after.norm(dim=-1), torch.ones(C, 4))


def test_head_release_training_writes_shared_slots():
    head = make_head("release").train()
    before = head.memory.slots.clone()
    head(fake_image(), class_text(2), LOGIT_SCALE, LABELS)
    assert not torch.equal(head.memory.slots, before)


def test_head_memory_write_uses_selected_raw_tokens_of_the_right_patch():
    """The tokens written to the prototypes are the selected ones (token_idx), not one position off."""
    head = make_head("paper").train()
    captured = {}
    original = head.memory.write

    def spy(tokens, labels, scores):
        captured.update(tokens=tokens.clone(), labels=labels.clone(), scores=scores.clone())
        return original(tokens, labels, scores)

    head.memory.write = spy
    img = fake_image()
    out = head(img, class_text(2), LOGIT_SCALE, LABELS)
    want = F.normalize(gather_tokens(img.tokens, out.token_idx), dim=-1).flatten(0, 1)
    close(captured["tokens"], want)
    assert captured["labels"].tolist() == LABELS.repeat_interleave(5).tolist()
    close(captured["scores"], out.top_scores.flatten())


def _paper_global_logits(head, img, text):
    """s * v' @ t_ref^T rebuilt from the head's own sub-modules (eval mode)."""
    s = 100.0
    v_hat = F.normalize(img.global_feat, dim=-1)
    t_hat = F.normalize(text, dim=-1)
    probs = (s * v_hat @ t_hat.t()).softmax(-1)
    patches = F.normalize(img.tokens[:, 1:], dim=-1)
    scores = standardize(sample_wise_score(patches, probs, t_hat), 1e-6) + standardize(
        semantic_wise_score(patches, probs, head.memory.prototypes), 1e-6)
    top, idx = select_top_k(scores, 5)
    selected = gather_tokens(head.mapper(img.tokens), idx)
    rep = selected + head.irm(selected, head.memory.keys())
    o = (top.softmax(1).unsqueeze(-1) * rep).sum(1)
    v_fused = 0.9 * v_hat + 0.1 * F.normalize(o, dim=-1)  # paper: FUSION.NORMALIZE
    t_ref = t_hat + 0.2 * head.trm.proj(torch.cat([t_hat, head.memory.read_own(t_hat)], dim=-1))
    return s * v_fused @ t_ref.t(), rep, top, t_ref


def test_head_gamma_zero_is_global_logit_only():
    head = make_head("paper", TEST__LOCAL_GAMMA=0.0).eval()
    img, text = fake_image(), class_text(2)
    with torch.no_grad():
        want, *_ = _paper_global_logits(head, img, text)
        got = head(img, text, LOGIT_SCALE).logits
    close(got, want, rtol=1e-4, atol=1e-4)


def test_head_gamma_adds_level_weighted_local_logits():
    head = make_head("paper").eval()  # gamma 0.5
    img, text = fake_image(), class_text(2)
    with torch.no_grad():
        base, rep, top, t_ref = _paper_global_logits(head, img, text)
        got = head(img, text, LOGIT_SCALE).logits
        tn = F.normalize(t_ref, dim=-1)
        m1 = (100.0 * F.normalize(rep[:, :3], dim=-1) @ tn.t()).mean(1)
        m2 = (100.0 * F.normalize(rep[:, 3:], dim=-1) @ tn.t()).mean(1)
        w = torch.stack([top[:, :3].mean(1), top[:, 3:].mean(1)], 1).softmax(1)
        want = base + 0.5 * (w[:, :1] * m1 + w[:, 1:] * m2)
    close(got, want, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(got, base, atol=1e-2)


def _release_local_ce_by_hand(head, img, text, labels, normalize_tokens=False):
    """The released local CE: ``s · u · T̂ᵀ`` of the unnormalised mapped tokens u (CLS, the 5
    attention-selected tokens split [2, 3], the mean token), fixed level weights, × 0.02."""
    import copy

    s = 100.0
    t_hat = F.normalize(text, dim=-1)
    top = standardize(img.cls_attn, 1e-6).topk(5, dim=-1).indices + 1  # release: attention score only
    u = copy.deepcopy(head.mapper).train()(img.tokens)  # batch statistics, as in the training forward
    selected = gather_tokens(u, top)
    cls, mean = u[:, :1], u.mean(dim=1, keepdim=True)
    total = 0.0
    for members in (selected[:, :2], selected[:, 2:], selected):  # Level-1, Level-2, all
        x = torch.cat([cls, members, mean], dim=1)
        if normalize_tokens:
            x = F.normalize(x, dim=-1)
        logits = s * x @ t_hat.t()
        ce = F.cross_entropy(logits.flatten(0, 1), labels.repeat_interleave(x.shape[1]), reduction="none")
        total = total + ce.view(x.shape[0], -1).mean(dim=1).mean()  # fixed level weight 1
    return 0.02 * total


def test_release_local_ce_is_the_released_dot_product():
    head = make_head("release").train()
    assert head.cfg.local_logits == "dot"
    img, text = fake_image(), class_text(2)
    want = _release_local_ce_by_hand(head, img, text, LABELS)
    cosine = _release_local_ce_by_hand(head, img, text, LABELS, normalize_tokens=True)
    got = head(img, text, LOGIT_SCALE, LABELS).losses["local"]
    close(got, want, rtol=1e-6, atol=1e-6)
    assert abs(want.item() - cosine.item()) > 0.1  # the key really changes the loss
    # the same preset with cosine local logits gives the cosine formula
    cos_head = make_head("release", LOSS__LOCAL_LOGITS="cosine").train()
    close(cos_head(img, text, LOGIT_SCALE, LABELS).losses["local"], cosine, rtol=1e-6, atol=1e-6)


def test_paper_local_logits_are_cosine():
    assert HeadConfig.from_cfg(spot_node("paper")).local_logits == "cosine"
    with pytest.raises(ValueError, match="LOCAL_LOGITS"):
        from spotlighter.config import check_spotlighter_cfg

        check_spotlighter_cfg(spot_node("paper", LOSS__LOCAL_LOGITS="raw"))


def test_head_release_test_logits_are_global_only():
    head = make_head("release").eval()
    img, text = fake_image(), class_text(2)
    with torch.no_grad():
        s = 100.0
        v_hat, t_hat = F.normalize(img.global_feat, dim=-1), F.normalize(text, dim=-1)
        read_v = head.memory.read(v_hat)
        o = head.irm(v_hat.unsqueeze(1), read_v.unsqueeze(1)).squeeze(1)
        v_fused = 0.9 * v_hat + 0.1 * o  # beta_test = 0.1
        t_ref = t_hat + 0.2 * head.trm.proj(torch.cat([t_hat, head.memory.read(t_hat)], dim=-1))
        want = s * v_fused @ t_ref.t()
        got = head(img, text, LOGIT_SCALE).logits
    close(got, want, rtol=1e-4, atol=1e-4)


class _Boom(nn.Module):
    def forward(self, x):
        raise AssertionError("mapper called")


def test_release_mapper_training_only():
    head = make_head("release")
    head.mapper = _Boom()
    head.eval()
    out = head(fake_image(), class_text(2), LOGIT_SCALE)
    assert out.logits.shape == (B, C)
    head.train()
    with pytest.raises(AssertionError, match="mapper called"):
        head(fake_image(), class_text(2), LOGIT_SCALE, LABELS)


def test_paper_mapper_used_at_test():
    head = make_head("paper")
    head.mapper = _Boom()
    head.eval()
    with pytest.raises(AssertionError, match="mapper called"):
        head(fake_image(), class_text(2), LOGIT_SCALE)


def test_release_selection_follows_cls_attention():
    head = make_head("release").eval()
    img = fake_image()
    out = head(img, class_text(2), LOGIT_SCALE)
    _, want = select_top_k(img.cls_attn, 5)
    assert torch.equal(out.token_idx, want)


def test_head_irm_heads_must_divide_width():
    with pytest.raises(ValueError, match="IRM.HEADS"):
        make_head("paper", IRM__HEADS=5)


# ============================================================================ parameter counts
@pytest.mark.parametrize("preset", ["paper", "release"])
def test_real_size_trainable_scalars(preset):
    """Spec section 6 item 7: d = 512 head + 4 x 512 context = 2,103,296 trainable scalars."""
    names = [f"class{i}" for i in range(10)]
    head = SpotlighterHead(HeadConfig.from_cfg(spot_node(preset)), 512, names, torch.randn(10, 512))
    n_head = count_trainable(head)
    # mapper 2 x (512*512 + 512) + BN 2*512; TRM 1024*512; IRM MHA 3*512*512 + 3*512 + 512*512 + 512
    assert n_head == 2 * (512 * 512 + 512) + 2 * 512 + 1024 * 512 + 4 * 512 * 512 + 4 * 512
    assert n_head + 4 * 512 == 2_103_296


def test_count_trainable_ignores_frozen():
    m = nn.Sequential(nn.Linear(3, 2), nn.Linear(2, 5))
    m[0].weight.requires_grad_(False)
    assert count_trainable(m) == 2 + 2 * 5 + 5


@pytest.mark.parametrize("training", [False, True])
@pytest.mark.parametrize("heads,memory_size", [(8, 12), (1, 3)])
def test_irm_projects_shared_memory_once_and_equals_mha_on_the_expanded_memory(training, heads, memory_size):
    """The once-per-forward key/value projection is exactly what nn.MultiheadAttention computed on
    the memory expanded over the batch (today's reference), with gradients. Bit for bit on some CPUs
    only: nn.MultiheadAttention hands the fused attention kernel differently strided tensors, and on
    others (seen: AMD EPYC, one head) the kernel then rounds differently, by ~4e-7."""
    torch.manual_seed(0)
    irm = ImageRefiner(64, heads, 0.0).train(training)
    queries = torch.randn(4, 5, 64, requires_grad=True)
    memory = torch.randn(memory_size, 64)
    expanded = memory.unsqueeze(0).expand(4, -1, -1)
    ref = irm.attn(queries, expanded, expanded, need_weights=False)[0]
    out = irm(queries, memory)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-6)
    g_ref, = torch.autograd.grad(ref.sum(), queries)
    g_out, = torch.autograd.grad(out.sum(), queries)
    assert torch.allclose(g_out, g_ref, atol=1e-6)


def test_irm_does_not_project_the_memory_once_per_image(monkeypatch):
    """Cost: the memory's key/value projection runs on M rows, not B x M."""
    torch.manual_seed(0)
    irm = ImageRefiner(64, 8, 0.0).eval()
    rows = []
    real = F.linear

    def counting(x, w, b=None):
        rows.append((x.numel() // x.shape[-1], w.shape[0]))
        return real(x, w, b)

    monkeypatch.setattr(F, "linear", counting)
    irm(torch.randn(16, 5, 64), torch.randn(40, 64))
    assert (40, 128) in rows  # keys and values of the 40 memory entries, once
    assert all(n <= 16 * 5 for n, _ in rows)  # nothing of size B x M


@pytest.mark.parametrize("dropout,training,batch_dim", [(0.0, True, 1), (0.1, False, 1), (0.1, True, 16)])
def test_irm_attends_with_the_batch_folded_into_the_queries(monkeypatch, dropout, training, batch_dim):
    """Without dropout every query attends to the shared memory on its own, so the B x L queries
    run as one sequence against one copy of the keys (the fused kernel is ~2.5x faster so than on
    the keys expanded over the batch at 1000 classes); with dropout in training each image keeps its
    own batch entry. Equal to nn.MultiheadAttention either way (above, and here in eval)."""
    torch.manual_seed(0)
    irm = ImageRefiner(64, 8, dropout).train(training)
    shapes = []
    real = F.scaled_dot_product_attention

    def recording(q, k, v, *args, **kw):
        shapes.append((tuple(q.shape), tuple(k.shape)))
        return real(q, k, v, *args, **kw)

    queries, memory = torch.randn(16, 5, 64), torch.randn(40, 64)
    expanded = memory.unsqueeze(0).expand(16, -1, -1)
    ref = irm.attn(queries, expanded, expanded, need_weights=False)[0]
    monkeypatch.setattr(F, "scaled_dot_product_attention", recording)
    out = irm(queries, memory)
    assert shapes == [((batch_dim, 8, 16 * 5 // batch_dim, 8), (batch_dim, 8, 40, 8))]
    if not training:
        torch.testing.assert_close(out, ref, rtol=0, atol=1e-6)


def _spot_bn_stats(head):
    """Non-trivial BatchNorm running statistics, so token-wise equivalence is really tested."""
    bn = head.mapper.net[1]
    g = torch.Generator().manual_seed(5)
    bn.running_mean.copy_(torch.randn(bn.num_features, generator=g))
    bn.running_var.copy_(torch.rand(bn.num_features, generator=g) + 0.5)


def test_head_eval_maps_only_the_selected_tokens():
    """At evaluation BatchNorm uses running statistics, so mapping the k selected tokens equals
    mapping every token and gathering; the mapper sees (B, k, d) only."""
    head = make_head("paper")
    _spot_bn_stats(head)
    head.eval()
    seen = []
    head.mapper.register_forward_hook(lambda m, inp, out: seen.append(tuple(inp[0].shape)))
    img, text = fake_image(), class_text(2)
    with torch.no_grad():
        got = head(img, text, LOGIT_SCALE).logits
        want, *_ = _paper_global_logits(head, img, text)  # maps all P + 1 tokens, then gathers
        want = want + 0.0  # (the reference's local term is checked elsewhere)
    assert seen[0] == (B, 5, D)
    gamma0 = make_head("paper", TEST__LOCAL_GAMMA=0.0)
    gamma0.load_state_dict(head.state_dict())
    gamma0.eval()
    with torch.no_grad():
        close(gamma0(img, text, LOGIT_SCALE).logits, want, rtol=1e-5, atol=1e-5)
    assert torch.isfinite(got).all()
    # in training (labels) and in train mode without labels every token is mapped
    head.train()
    seen.clear()
    head(img, text, LOGIT_SCALE, LABELS)
    head(img, text, LOGIT_SCALE)
    assert seen == [(B, P + 1, D), (B, P + 1, D)]


def _count_class_side(head):
    calls = []
    real = head._class_side

    def counting(text):
        calls.append(1)
        return real(text)

    head._class_side = counting
    return calls


@pytest.mark.parametrize("preset", ["paper", "release"])
def test_head_class_side_cached_at_eval_and_invalidated(preset):
    """Without gradients TRM's refined text and IRM's memory keys/values are computed once and
    reused; a memory write, a parameter step, a checkpoint load or another text recomputes them,
    and every cached forward equals a fresh (gradient-enabled) one."""
    head = make_head(preset)
    calls = _count_class_side(head)
    img, text = fake_image(), class_text(2)

    def check(expected_calls):
        head.eval()
        with torch.no_grad():
            cached = head(img, text, LOGIT_SCALE).logits
            assert len(calls) == expected_calls
            head._class_side_cache = None
            fresh = head(img, text, LOGIT_SCALE).logits  # recomputed from scratch
        assert torch.equal(cached, fresh)
        head(img, text, LOGIT_SCALE)  # gradients on: never cached
        assert len(calls) == expected_calls + 2
        return cached

    first = check(1)
    with torch.no_grad():
        head(img, text, LOGIT_SCALE)
        head(fake_image(3), text, LOGIT_SCALE)
    assert len(calls) == 3  # reused by later batches
    head.train()
    head(img, text, LOGIT_SCALE, LABELS)  # training forward: writes the memory
    n = len(calls)
    written = check(n + 1)
    assert not torch.equal(written, first)
    with torch.no_grad():
        head.trm.proj.weight.add_(0.1)  # an optimizer step changes parameters in place
        head.irm.attn.in_proj_bias.add_(0.1)
    n = len(calls)
    stepped = check(n + 1)
    assert not torch.equal(stepped, written)
    other = make_head(preset)
    head.load_state_dict(other.state_dict())
    if preset == "paper":
        head.memory.load_class_state(other.memory.class_state())
    n = len(calls)
    check(n + 1)
    n = len(calls)
    text = class_text(2).clone()  # equal values, another tensor
    check(n + 1)
    n = len(calls)
    with torch.no_grad():
        text.mul_(2.0)  # in place
    check(n + 1)


def test_class_memory_refuses_repeated_class_names():
    import torch

    from spotlighter.method import ClassMemory

    with pytest.raises(ValueError, match=r"distinct class names; \['cat'\] name several classes"):
        ClassMemory(torch.randn(3, 8), ["cat", "dog", "cat"], per_class=2, momentum=0.8, temperature=0.1)
