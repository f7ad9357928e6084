"""Token merging (MODEL.PRUNE.MODE merge, ToMe): the merged image forward against a hand-written
per-image reference, proportional attention against duplicated tokens, the invariants of a merge,
the models, the config checks and the setting syntax."""

import math

import pytest
import torch
import torch.nn.functional as F

from spotlighter.backbone import (FrozenCLIP, PruneSpec, _attention_with_cls_row, _block_attention, _merge_tokens,
                                  _tome_tokens)
from spotlighter.config import ConfigError, check_prune_cfg, default_cfg
from spotlighter.models import Spotlighter
from model_helpers import NAMES, check_reduced_forward, head_cfg, images, reduction_models
from tiny_clip import build_tiny_clip

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def deep_clip():
    """Tiny CLIP with 4 vision blocks and 2 heads (16 patches; merging can happen at blocks 0..2)."""
    return build_tiny_clip(seed=5, vision_layers=4, vision_width=128)


def _mha_sized(block, seq, size):
    """One image's attention sub-layer with nn.MultiheadAttention and log(size) added to every key."""
    ln = block.ln_1(seq)[:, None]  # (N, 1, D)
    bias = size.log()[None, :].expand(seq.shape[0], -1)  # (L, S) float mask: added to the logits
    out, w = block.attn(ln, ln, ln, need_weights=True, average_attn_weights=True, attn_mask=bias)
    return out[:, 0], w[0]


def _keys(block, seq):
    D = seq.shape[-1]
    H = block.attn.num_heads
    k = F.linear(block.ln_1(seq), block.attn.in_proj_weight[D:2 * D], block.attn.in_proj_bias[D:2 * D])
    return k.reshape(seq.shape[0], H, D // H).mean(dim=1)


def reference_merged(model, x, spec):
    """ToMe by hand, image by image: explicit A/B split, best matches, weighted means and MHA with a
    log-size mask in every block after the first merge; returns global features and patch indices."""
    v = model.visual
    h = v.conv1(x)
    h = h.reshape(h.shape[0], h.shape[1], -1).permute(0, 2, 1)
    h = torch.cat([v.class_embedding.expand(h.shape[0], 1, -1), h], dim=1) + v.positional_embedding
    h = v.ln_pre(h)
    feats, indices = [], []
    for b in range(h.shape[0]):
        seq = h[b]  # (N, D), CLS first
        index = list(range(seq.shape[0] - 1))
        size = torch.ones(seq.shape[0])
        for i, block in enumerate(v.transformer.resblocks):
            out, _ = _mha_sized(block, seq, size)
            keys = F.normalize(_keys(block, seq)[1:], dim=-1)  # of the block's input
            seq = seq + out
            if i in spec.layers:
                n = len(index)
                r = n - math.ceil(spec.keep * n)
                A, B = list(range(0, n, 2)), list(range(1, n, 2))
                best = {a: max(B, key=lambda j: (keys[a] @ keys[j]).item()) for a in A}
                sim = {a: (keys[a] @ keys[best[a]]).item() for a in A}
                merged = sorted(A, key=lambda a: -sim[a])[:r]
                tokens = {j: (seq[1 + j] * size[1 + j], size[1 + j].clone()) for j in range(n)}
                for a in merged:
                    t, s = tokens.pop(a)
                    tb, sb = tokens[best[a]]
                    tokens[best[a]] = (tb + t, sb + s)
                left = sorted(tokens, key=lambda j: index[j])
                seq = torch.stack([seq[0]] + [tokens[j][0] / tokens[j][1] for j in left])
                size = torch.stack([size[0]] + [tokens[j][1] for j in left])
                index = [index[j] for j in left]
            seq = seq + block.mlp(block.ln_2(seq))
        feats.append(v.ln_post(seq[0]) @ v.proj)
        indices.append(torch.tensor(index))
    return torch.stack(feats), torch.stack(indices)


@pytest.mark.parametrize("spec", [PruneSpec((1,), 0.5, mode="merge"), PruneSpec((0, 2), 0.6, mode="merge"),
                                  PruneSpec((0, 1, 2), 0.75, mode="merge")])
def test_merged_forward_matches_hand_written_tome(deep_clip, spec):
    tok = check_reduced_forward(deep_clip, spec, reference_merged)
    assert torch.allclose(tok.cls_attn.sum(dim=1), torch.ones(3), atol=0.2)  # CLS row minus itself
    assert torch.equal(tok.patch_index, tok.patch_index.sort(dim=1).values)  # spatial order


def test_proportional_attention_equals_attention_over_duplicates(deep_clip):
    """A token that holds s patches is attended to exactly as s copies of it would be."""
    block = deep_clip.visual.transformer.resblocks[1]
    g = torch.Generator().manual_seed(3)
    x = torch.randn(6, 2, 128, generator=g)  # CLS + 5 tokens
    size = torch.tensor([[1.0, 3.0, 1.0, 2.0, 1.0, 1.0]] * 2)
    reps = size[0].long()
    dup = torch.repeat_interleave(x, reps, dim=0)  # each token repeated size times
    with torch.no_grad():
        out, cls = _attention_with_cls_row(block, x, size)
        ref, w = _block_attention(block, dup, need_weights=True)
    first = torch.cumsum(reps, 0) - reps  # position of each token's first copy
    assert torch.allclose(out, ref[first], atol=1e-5)
    cls_ref = torch.stack([w[:, 0, f:f + r].sum(dim=1) for f, r in zip(first.tolist(), reps.tolist())], dim=1)
    assert torch.allclose(cls, cls_ref, atol=1e-6)


def _merge_inputs(n=8, B=2, D=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1 + n, B, D, generator=g)
    keys = torch.randn(B, 1 + n, 3, generator=g)
    index = torch.arange(n).expand(B, -1)
    size = torch.rand(B, 1 + n, generator=g) * 3 + 1
    size[:, 0] = 1
    return x, keys, index, size


def test_merge_conserves_mass_and_size():
    x, keys, index, size = _merge_inputs()
    spec = PruneSpec((0,), 0.5, mode="merge")
    y, new_index, new_size = _merge_tokens(x, keys, index, size, spec)
    assert y.shape == (1 + 4, 2, 4) and new_index.shape == (2, 4) and new_size.shape == (2, 5)
    assert torch.equal(y[0], x[0]) and torch.equal(new_size[:, 0], size[:, 0])  # CLS untouched
    assert torch.allclose(new_size[:, 1:].sum(1), size[:, 1:].sum(1))
    mass = (x[1:].transpose(0, 1) * size[:, 1:, None]).sum(1)
    assert torch.allclose((y[1:].transpose(0, 1) * new_size[:, 1:, None]).sum(1), mass, atol=1e-5)
    assert torch.equal(new_index, new_index.sort(dim=1).values)


def test_merge_picks_the_most_similar_pairs():
    x, keys, index, size = _merge_inputs(n=8, B=1)
    # A = patches 0, 2, 4, 6; B = 1, 3, 5, 7. Make A2 ~ B5 and A6 ~ B1 (near-identical keys).
    keys[0, 1 + 2] = keys[0, 1 + 5] + 1e-3
    keys[0, 1 + 6] = keys[0, 1 + 1] - 1e-3
    y, new_index, new_size = _merge_tokens(x, keys, index, size, PruneSpec((0,), 0.75, mode="merge"))
    assert new_index[0].tolist() == [0, 1, 3, 4, 5, 7]  # 2 and 6 merged away
    s2, s5, s6, s1 = size[0, 3], size[0, 6], size[0, 7], size[0, 2]
    assert torch.allclose(new_size[0, 1:], torch.stack([size[0, 1], s1 + s6, size[0, 4], size[0, 5], s5 + s2,
                                                        size[0, 8]]))
    assert torch.allclose(y[1 + 4, 0], (x[1 + 5, 0] * s5 + x[1 + 2, 0] * s2) / (s5 + s2), atol=1e-6)
    assert torch.equal(y[1 + 0, 0], x[1 + 0, 0])  # unmerged tokens are passed through


def test_merge_with_nothing_to_merge_is_the_unpruned_forward(deep_clip):
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    spec = PruneSpec((1,), 0.99, mode="merge")  # ceil(0.99 * 16) = 16: nothing merges
    with torch.no_grad():
        ref = FrozenCLIP(deep_clip).encode_image_tokens(x)
        tok = FrozenCLIP(deep_clip, spec).encode_image_tokens(x)
    assert torch.allclose(tok.global_feat, ref.global_feat, atol=1e-5)
    assert torch.allclose(tok.tokens, ref.tokens, atol=1e-5)
    assert torch.equal(tok.patch_index, torch.arange(16).expand(2, -1))


def test_models_merge_at_test_and_train_through_it(deep_clip):
    x = images(3)
    y = torch.tensor([0, 1, 3])
    plain = reduction_models(FrozenCLIP(deep_clip))
    merged = reduction_models(FrozenCLIP(deep_clip, PruneSpec((1,), 0.5, mode="merge")))
    for kind in plain:
        plain[kind].eval(), merged[kind].eval()
        with torch.no_grad():
            a, b = plain[kind](x)[0], merged[kind](x)[0]
        assert b.shape == a.shape and torch.isfinite(b).all() and not torch.allclose(a, b), kind
        if kind == "zsclip":
            continue
        merged[kind].train()
        _, losses = merged[kind](x, y)
        loss = sum(losses.values())
        loss.backward()
        grads = [p.grad for p in merged[kind].parameters() if p.requires_grad]
        assert grads and all(g is not None and torch.isfinite(g).all() for g in grads), kind


def test_spotlighter_selects_among_merged_tokens(deep_clip):
    clip = FrozenCLIP(deep_clip, PruneSpec((0,), 0.5, mode="merge"))
    model = Spotlighter(clip, NAMES, head_cfg("paper", 8)).eval()
    with torch.no_grad():
        img = clip.encode_image_tokens(images(2), need_attn=False)
        out = model.head(img, model.text_features(), clip.logit_scale)
    assert torch.equal(out.patch_idx, img.patch_index.gather(1, out.token_idx - 1))
    assert out.scores.shape == (2, 8)


def test_parse_and_label_round_trip():
    for text in ("3:0.5", "3,6:0.7:merge", "0,1,2:0.75:merge", "6:0.25"):
        assert PruneSpec.parse(text).label == text
    assert PruneSpec.parse("3,6:0.5") == PruneSpec((3, 6), 0.5)
    assert PruneSpec.parse("3:0.6:merge").mode == "merge"
    for bad in ("3", "3:x", "3:0.5:blend", "a:0.5", "3:0.4:merge"):
        with pytest.raises(ValueError, match=r"LAYERS:KEEP\[:MODE\]|KEEP >= 0.5"):
            PruneSpec.parse(bad)


def test_spec_checks_mode_and_keep():
    with pytest.raises(ValueError, match="drop', 'merge'"):
        PruneSpec((1,), 0.5, mode="blend")
    with pytest.raises(ValueError, match="KEEP >= 0.5"):
        PruneSpec((1,), 0.4, mode="merge")
    assert PruneSpec((), 0.1, mode="merge").remaining(16) == 16  # inactive: nothing to check
    assert PruneSpec((1,), 0.5, mode="merge").extra_tokens == 0 and PruneSpec((1,), 0.5).extra_tokens == 1
    assert PruneSpec((1,), 0.5, fuse=False).extra_tokens == 0


@pytest.mark.parametrize("key,value,match", [("MODE", "blend", "drop.*merge"),
                                             ("KEEP", 0.4, r"\[0.5, 1\] with MODEL.PRUNE.MODE merge")])
def test_merge_cfg_errors(key, value, match):
    cfg = default_cfg()
    cfg.MODEL.PRUNE.MODE = "merge"
    cfg.MODEL.PRUNE.LAYERS = [1]
    cfg.MODEL.PRUNE[key] = value
    with pytest.raises(ConfigError, match=f"MODEL.PRUNE.{key}.*{match}"):
        check_prune_cfg(cfg.MODEL.PRUNE)


def test_merge_cfg_builds_the_spec():
    node = default_cfg().MODEL.PRUNE
    assert node.MODE == "drop"
    node.LAYERS, node.KEEP, node.MODE = [1, 2], 0.6, "merge"
    check_prune_cfg(node)
    assert PruneSpec.from_cfg(node) == PruneSpec((1, 2), 0.6, mode="merge")


# ----------------------------------------------------------------------------- ToMe's own rule (MODE tome)
def reference_tome(model, x, spec):
    """ToMe as its authors define it, by hand, image by image: the whole sequence (CLS included) split
    alternately into A (even positions) and B (odd), CLS never merged; r = R, or n - ceil(KEEP * n),
    at most n // 2; the r A tokens with the most similar B match are merged into it (sums of
    size-weighted tokens over sums of sizes); the sequence becomes [CLS, unmerged A, B] and the next
    block splits that; every attention after the first merge adds log(size) (MHA float mask).
    Returns global features, patch indices and the last block's projected tokens."""
    v = model.visual
    h = v.conv1(x)
    h = h.reshape(h.shape[0], h.shape[1], -1).permute(0, 2, 1)
    h = torch.cat([v.class_embedding.expand(h.shape[0], 1, -1), h], dim=1) + v.positional_embedding
    h = v.ln_pre(h)
    feats, indices, tokens = [], [], []
    for b in range(h.shape[0]):
        seq = h[b]  # (N, D), CLS first
        index = list(range(seq.shape[0] - 1))
        size = None
        for i, block in enumerate(v.transformer.resblocks):
            if size is None:
                ln = block.ln_1(seq)[:, None]
                out = block.attn(ln, ln, ln, need_weights=False)[0][:, 0]
            else:
                out, _ = _mha_sized(block, seq, size)
            keys = F.normalize(_keys(block, seq), dim=-1)  # every token's, CLS included
            seq = seq + out
            t = seq.shape[0]
            r = min(spec.r or (t - 1) - math.ceil(spec.keep * (t - 1)), (t - 1) // 2)
            if i in spec.layers and r > 0:
                size = torch.ones(t) if size is None else size
                A, B = list(range(0, t, 2)), list(range(1, t, 2))
                best = {a: max(B, key=lambda j: (keys[a] @ keys[j]).item()) for a in A[1:]}
                sim = {a: (keys[a] @ keys[best[a]]).item() for a in A[1:]}
                merged = sorted(A[1:], key=lambda a: -sim[a])[:r]
                total = {p: (seq[p] * size[p], size[p]) for p in range(t)}
                for a in merged:
                    total[best[a]] = (total[best[a]][0] + total[a][0], total[best[a]][1] + total[a][1])
                layout = [a for a in A if a not in merged] + B
                seq = torch.stack([total[p][0] / total[p][1] for p in layout])
                size = torch.stack([total[p][1] for p in layout])
                index = [index[p - 1] for p in layout[1:]]
            seq = seq + block.mlp(block.ln_2(seq))
        out = v.ln_post(seq) @ v.proj
        feats.append(out[0])
        tokens.append(out)
        indices.append(torch.tensor(index))
    return torch.stack(feats), torch.stack(indices), torch.stack(tokens)


# (spec, whether the kept tokens end in spatial order: only when every A token merges at one block)
TOME_SPECS = [(PruneSpec((0, 1, 2), mode="tome", r=3), False), (PruneSpec((0, 2), 0.6, mode="tome"), False),
              (PruneSpec((1,), 0.5, mode="tome"), True), (PruneSpec((0, 1), mode="tome", r=12), True)]


@pytest.mark.parametrize("spec,spatial", TOME_SPECS, ids=lambda s: getattr(s, "label", ""))
def test_tome_forward_matches_hand_written_tome(deep_clip, spec, spatial):
    tok = check_reduced_forward(deep_clip, spec, lambda m, x, s: reference_tome(m, x, s)[:2])
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))  # check_reduced_forward's
    with torch.no_grad():
        _, _, ref_tokens = reference_tome(deep_clip, x, spec)
    assert torch.allclose(tok.tokens, ref_tokens, atol=1e-5)
    # ToMe's layout [CLS, unmerged A, B], not spatial order (B alone: the even patches, in order)
    assert torch.equal(tok.patch_index, tok.patch_index.sort(dim=1).values) == spatial


def test_tome_r_is_constant_and_capped_at_half():
    assert [PruneSpec((0,), mode="tome", r=3).kept(n) for n in (16, 13, 10, 5, 1)] == [13, 10, 7, 3, 1]
    assert PruneSpec((0, 1, 2), mode="tome", r=3).remaining(16) == 7
    assert PruneSpec((0, 1), mode="tome", r=12).remaining(16) == 4  # 16 -> 8 -> 4 (ToMe's cap)
    assert PruneSpec((0,), 0.7, mode="tome").kept(16) == PruneSpec((0,), 0.7, mode="merge").kept(16) == 12
    assert PruneSpec((0, 1), mode="tome", r=2).active and not PruneSpec((), mode="tome", r=2).active
    assert PruneSpec((0, 1), mode="tome", r=2).label == "0,1:r2:tome"


def test_tome_layout_is_cls_unmerged_a_then_b():
    """One merge on known keys: A = positions 0, 2, 4, 6, 8 (CLS, patches 1, 3, 5, 7), B = 1, 3, 5, 7
    (patches 0, 2, 4, 6); patch 5 ~ patch 0 and patch 1 ~ patch 6 are the two merges."""
    x, keys, index, size = _merge_inputs(n=8, B=1)
    keys[0, 1 + 5] = keys[0, 1 + 0] + 1e-3
    keys[0, 1 + 1] = keys[0, 1 + 6] - 1e-3
    keys[0, 0] = keys[0, 1 + 2]  # CLS looks like patch 2, and still is never merged
    y, new_index, new_size = _tome_tokens(x, keys, index, size, PruneSpec((0,), mode="tome", r=2))
    assert new_index[0].tolist() == [3, 7, 0, 2, 4, 6]  # unmerged A (3, 7), then every B
    assert torch.equal(y[0], x[0]) and new_size[0, 0] == size[0, 0]
    s = size[0]
    assert torch.allclose(new_size[0], torch.stack([s[0], s[4], s[8], s[1] + s[6], s[3], s[5], s[7] + s[2]]))
    assert torch.allclose(y[3, 0], (x[1, 0] * s[1] + x[6, 0] * s[6]) / (s[1] + s[6]), atol=1e-6)
    assert torch.allclose(y[1, 0], x[4, 0], atol=1e-6)  # unmerged: (x * s) / s


def test_spotlighter_selects_among_tome_tokens(deep_clip):
    clip = FrozenCLIP(deep_clip, PruneSpec((0, 1), mode="tome", r=4))
    model = Spotlighter(clip, NAMES, head_cfg("paper", 8)).eval()
    with torch.no_grad():
        img = clip.encode_image_tokens(images(2), need_attn=True)
        out = model.head(img, model.text_features(), clip.logit_scale)
    assert img.tokens.shape[1] == 1 + 8 and img.cls_attn.shape == (2, 8)
    assert torch.equal(out.patch_idx, img.patch_index.gather(1, out.token_idx - 1))
    assert all(len(set(p.tolist())) == 8 for p in img.patch_index)  # each a distinct real patch


@pytest.mark.parametrize("changes,match", [
    ({"MODE": "tome", "R": -1}, r"MODEL.PRUNE.R = -1 is invalid: expected an integer >= 0"),
    ({"MODE": "tome", "R": 2.5}, r"MODEL.PRUNE.R = 2.5 is invalid"),
    ({"MODE": "merge", "R": 4}, r"MODEL.PRUNE.R = 4 is invalid: expected 0 with MODEL.PRUNE.MODE merge .*MODE tome"),
    ({"MODE": "evit", "R": 4}, r"MODEL.PRUNE.R = 4 is invalid: expected 0 with MODEL.PRUNE.MODE evit"),
    ({"MODE": "tome", "KEEP": 0.4}, r"MODEL.PRUNE.KEEP = 0.4 is invalid: .*\[0.5, 1\] with MODEL.PRUNE.MODE tome"),
])
def test_tome_cfg_errors(changes, match):
    cfg = default_cfg()
    cfg.MODEL.PRUNE.LAYERS = [1]
    for key, value in changes.items():
        cfg.MODEL.PRUNE[key] = value
    with pytest.raises(ConfigError, match=match):
        check_prune_cfg(cfg.MODEL.PRUNE)


def test_tome_and_evit_cfg_build_the_spec():
    node = default_cfg().MODEL.PRUNE
    assert node.R == 0
    node.LAYERS, node.MODE, node.R, node.KEEP = [0, 1, 2], "tome", 8, 0.3  # R replaces KEEP (no KEEP check)
    check_prune_cfg(node)
    assert PruneSpec.from_cfg(node) == PruneSpec((0, 1, 2), 0.3, mode="tome", r=8)
    node.MODE, node.R, node.KEEP = "evit", 0, 0.7
    check_prune_cfg(node)
    assert PruneSpec.from_cfg(node) == PruneSpec((0, 1, 2), 0.7, mode="evit")
    assert PruneSpec.parse("0,1:0.6:tome") == PruneSpec((0, 1), 0.6, mode="tome")
    assert PruneSpec.parse("3:0.5:evit").label == "3:0.5:evit"
    with pytest.raises(ValueError, match="R .* must be 0, or > 0 with mode tome"):
        PruneSpec((1,), 0.5, mode="merge", r=2)


@pytest.mark.parametrize("spec", [PruneSpec((1,), mode="tome", r=4), PruneSpec((0, 1), 0.6, mode="evit")],
                         ids=lambda s: s.label)
def test_models_reduce_with_the_authors_rules_and_train_through_them(deep_clip, spec):
    x = images(3)
    y = torch.tensor([0, 1, 3])
    plain = reduction_models(FrozenCLIP(deep_clip))
    reduced = reduction_models(FrozenCLIP(deep_clip, spec))
    for kind in plain:
        plain[kind].eval(), reduced[kind].eval()
        with torch.no_grad():
            a, b = plain[kind](x)[0], reduced[kind](x)[0]
        assert b.shape == a.shape and torch.isfinite(b).all() and not torch.allclose(a, b), kind
        if kind == "zsclip":
            continue
        reduced[kind].train()
        _, losses = reduced[kind](x, y)
        sum(losses.values()).backward()
        grads = [p.grad for p in reduced[kind].parameters() if p.requires_grad]
        assert grads and all(g is not None and torch.isfinite(g).all() for g in grads), kind


def test_our_merge_and_tomes_rule_differ_on_identical_inputs(deep_clip):
    """The same merge counts per block, different sets (CLS aside vs in A; spatial order vs ToMe's
    layout): the features differ; docs/efficiency.md says how."""
    x = images(3)
    with torch.no_grad():
        ours = FrozenCLIP(deep_clip, PruneSpec((0, 1, 2), 0.8, mode="merge")).encode_image(x)
        tome = FrozenCLIP(deep_clip, PruneSpec((0, 1, 2), 0.8, mode="tome")).encode_image(x)
    assert PruneSpec((0, 1, 2), 0.8, mode="merge").remaining(16) == PruneSpec((0, 1, 2), 0.8, mode="tome").remaining(16)
    assert (ours - tome).abs().max() > 1e-3
