"""spotlighter.foreign: checkpoints of the original CoOp / CoCoOp / MaPLe code, read without executing
pickled code and converted to our models (see tests/original_ckpt.py for how the files are made)."""

import os

import pytest
import torch

from conftest import dassl_available
from original_ckpt import BUILD, coop_state, original_keys, perturbed, save_original
from spotlighter import foreign
from spotlighter.checkpoint import CheckpointError

pytestmark = pytest.mark.usefixtures("one_torch_thread")

WRITERS = ["plain", pytest.param("dassl", marks=pytest.mark.skipif(
    not dassl_available(), reason="upstream Dassl.pytorch is not installed: its save_checkpoint cannot be used"))]


def _images(n=2):
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(7))


@pytest.mark.parametrize("writer", WRITERS)
@pytest.mark.parametrize("source", ["CoOp", "CoCoOp", "MaPLe", "IVLP", "PromptSRC"])
def test_original_checkpoint_loads_into_our_model(source, writer, frozen_clip, tmp_path):
    build, module = BUILD[source]
    trained = perturbed(build(frozen_clip))
    path = save_original(tmp_path, module, original_keys(source, trained), epoch=2,
                         use_dassl=writer == "dassl")
    assert open(os.path.join(tmp_path, module, "checkpoint")).read().strip() == "model.pth.tar-2"
    with pytest.raises(Exception, match="weights_only|Unsupported global"):
        torch.load(path, weights_only=True)  # a plain safe load refuses the pickled scheduler

    data = foreign.read(path)
    assert foreign.is_original(data)
    successor = data["scheduler"]["successor"]
    assert isinstance(successor, torch.optim.lr_scheduler.CosineAnnealingLR)
    assert isinstance(successor.optimizer, torch.optim.SGD)
    state, epoch = foreign.convert(data, source, path)
    assert epoch == 2
    assert all(v.dtype == torch.float32 for v in state.values())
    fresh = build(frozen_clip)
    fresh.load_state_dict(state, strict=True)  # every key ours, nothing missing
    for k, v in trained.state_dict().items():
        assert torch.equal(fresh.state_dict()[k], v), k
    with torch.no_grad():
        torch.testing.assert_close(fresh.eval()(_images())[0], trained.eval()(_images())[0], rtol=0, atol=0)


def test_converters_map_the_original_names():
    ctx = torch.randn(4, 8, dtype=torch.float16)
    assert list(foreign.from_coop(coop_state(ctx, (3, 1, 8)))) == ["prompt_learner.ctx"]
    assert torch.equal(foreign.from_coop(coop_state(ctx, (3, 1, 8)))["prompt_learner.ctx"], ctx.float())
    csc = torch.randn(3, 4, 8)  # CSC: one context per class
    assert foreign.from_coop({"ctx": csc})["prompt_learner.ctx"].shape == (3, 4, 8)
    cocoop = foreign.from_cocoop({"ctx": ctx, "meta_net.linear1.weight": torch.ones(2, 8),
                                  "meta_net.linear1.bias": torch.ones(2), "meta_net.linear2.weight": torch.ones(8, 2),
                                  "meta_net.linear2.bias": torch.ones(8)})
    assert sorted(cocoop) == ["prompt_learner.ctx", "prompt_learner.meta_net.0.bias",
                              "prompt_learner.meta_net.0.weight", "prompt_learner.meta_net.2.bias",
                              "prompt_learner.meta_net.2.weight"]
    maple = foreign.from_maple({"prompt_learner.ctx": ctx, "prompt_learner.compound_prompts_text.0": ctx,
                                "prompt_learner.compound_prompt_projections.0.weight": torch.ones(8, 8),
                                "image_encoder.conv1.weight": torch.ones(1), "logit_scale": torch.ones(())})
    assert sorted(maple) == ["prompt_learner.compound_prompt_projections.0.weight",
                             "prompt_learner.compound_prompts_text.0", "prompt_learner.ctx"]


@pytest.mark.parametrize("convert, state, message", [
    (foreign.from_coop, {"ctx": torch.ones(2, 8), "meta_net.linear1.weight": torch.ones(1)},
     "key 'meta_net.linear1.weight' is not part of a CoOp prompt learner"),
    (foreign.from_cocoop, {"token_prefix": torch.ones(1)}, "has no context vectors"),
    (foreign.from_maple, {"prompt_learner.ctx": torch.ones(2, 8), "prompt_learner.VPT_shallow": torch.ones(1)},
     "key 'prompt_learner.VPT_shallow' is not part of a MaPLe prompt learner"),
])
def test_converters_refuse_what_they_do_not_know(convert, state, message):
    with pytest.raises(CheckpointError, match=message):
        convert(state, "f.pth")


class _Payload:
    """Would create a folder when unpickled (a stand-in for arbitrary code in a pickle)."""

    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return (os.mkdir, (self.target,))


def test_a_file_with_any_other_object_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "was_executed"
    path = tmp_path / "prompt_learner" / "model.pth.tar-1"
    path.parent.mkdir()
    torch.save({"state_dict": {"ctx": torch.ones(2, 8)}, "epoch": 1, "scheduler": _Payload(str(marker))}, path)
    with pytest.raises(CheckpointError) as err:
        foreign.read(str(path))
    assert str(path) in str(err.value) and "posix.mkdir" in str(err.value) and "never executed" in str(err.value)
    assert not marker.exists()


def test_our_own_checkpoints_read_through_the_same_door(tmp_path):
    from spotlighter import checkpoint as ckpt

    path = str(tmp_path / "ours.pth")
    ckpt.save(path, {"trainer": "CoOp", "state_dict": {"prompt_learner.ctx": torch.ones(2, 8)}, "epoch": 1})
    data = foreign.read(path)
    assert data["format"] == ckpt.FORMAT and not foreign.is_original(data)


def test_spotlighter_has_no_original_converter():
    with pytest.raises(CheckpointError, match="only CoOp, CoCoOp, MaPLe, IVLP, PromptSRC, PromptKD checkpoints"):
        foreign.convert({"state_dict": {}, "epoch": 1}, "Spotlighter", "x.pth")


def test_ivlp_converter_maps_block_numbers_and_refuses_gaps_and_strangers():
    p = torch.ones(2, 8)
    state = {"prompt_learner.ctx": p, "image_encoder.VPT": p, "image_encoder.conv1.weight": p,
             "image_encoder.transformer.resblocks.1.VPT_shallow": p * 2,
             "image_encoder.transformer.resblocks.2.VPT_shallow": p * 3,
             "text_encoder.transformer.resblocks.1.VPT_shallow": p * 4, "text_encoder.ln_final.weight": p,
             "prompt_learner.ZS_image_encoder.proj": p, "prompt_learner.token_suffix": p, "logit_scale": p}
    out = foreign.from_ivlp(state)
    assert sorted(out) == ["prompt_learner.ctx", "prompt_learner.text_prompts.0", "prompt_learner.visual_prompt",
                           "prompt_learner.visual_prompts.0", "prompt_learner.visual_prompts.1"]
    assert out["prompt_learner.visual_prompts.1"][0, 0] == 3 and out["prompt_learner.text_prompts.0"][0, 0] == 4
    gap = {k: v for k, v in state.items() if k != "image_encoder.transformer.resblocks.1.VPT_shallow"}
    with pytest.raises(CheckpointError, match="visual prompts are at blocks \\[2\\]"):
        foreign.from_ivlp(gap, "ckpt")
    with pytest.raises(CheckpointError, match="key 'prompt_learner.meta_net.w' is not part of a IVLP/PromptSRC"):
        foreign.from_ivlp({**state, "prompt_learner.meta_net.w": p}, "ckpt")
