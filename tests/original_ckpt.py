"""Checkpoint folders laid out and written the way the original CoOp/CoCoOp/MaPLe repositories write
them: Dassl's ``TrainerX.save_model`` -> ``save_checkpoint`` -> ``<dir>/<module>/model.pth.tar-N`` and
a ``checkpoint`` pointer file, with an SGD optimizer and a constant warm-up scheduler whose state
dict pickles the successor ``CosineAnnealingLR`` *object* (which holds the ``SGD`` object).

With Dassl installed, Dassl's own ``build_optimizer`` / ``build_lr_scheduler`` / ``save_checkpoint``
write the file (its warm-up scheduler passes ``verbose`` positionally, which torch >= 2.7 rejects:
``LRScheduler.__init__`` accepts it again while the scheduler is built, as the torch those repos ran
on did). Without Dassl a faithful equivalent of the same objects is written.
"""

import contextlib
import os
from collections import OrderedDict

import torch
import torch.nn as nn
from torch.optim import lr_scheduler

from spotlighter.models import IVLP, CoCoOp, CoOp, MaPLe, PromptSRC

EPOCHS = 5
LR = 0.002


def coop_state(ctx, prefix_suffix_shape=(3, 1, 64)):
    """The state_dict of CoOp's / CoCoOp's ``PromptLearner`` (ctx + the class-dependent buffers)."""
    return OrderedDict(ctx=ctx, token_prefix=torch.zeros(prefix_suffix_shape, dtype=ctx.dtype),
                       token_suffix=torch.zeros(prefix_suffix_shape[0], 72, prefix_suffix_shape[2],
                                                dtype=ctx.dtype))


FROZEN = ("token_prefix", "token_suffix", "prompt_learner.token_prefix", "prompt_learner.token_suffix",
          "image_encoder.", "text_encoder.", "logit_scale")


class _Holder(nn.Module):
    """The trainable tensors of ``state`` as parameters (what Dassl's optimizer is built on)."""

    def __init__(self, state):
        super().__init__()
        self.params = nn.ParameterList([nn.Parameter(v.clone()) for k, v in state.items()
                                        if not k.startswith(FROZEN) and v.is_floating_point()])


@contextlib.contextmanager
def _old_torch_scheduler_signature():
    """Let ``LRScheduler.__init__`` take Dassl's positional ``verbose`` again (torch < 2.7 did)."""
    original = lr_scheduler.LRScheduler.__init__

    def init(self, optimizer, last_epoch=-1, verbose=False):
        original(self, optimizer, last_epoch)

    lr_scheduler.LRScheduler.__init__ = init
    try:
        yield
    finally:
        lr_scheduler.LRScheduler.__init__ = original


class _ConstantWarmup(lr_scheduler.LRScheduler):
    """Dassl's ``ConstantWarmupScheduler`` (dassl/optim/lr_scheduler.py), without Dassl."""

    def __init__(self, optimizer, successor, warmup_epoch, cons_lr):
        self.successor, self.warmup_epoch, self.cons_lr = successor, warmup_epoch, cons_lr
        super().__init__(optimizer)

    def get_lr(self):
        if self.last_epoch >= self.warmup_epoch:
            return self.successor.get_last_lr()
        return [self.cons_lr for _ in self.base_lrs]

    def step(self, epoch=None):
        if self.last_epoch >= self.warmup_epoch:
            self.successor.step(epoch)
            self._last_lr = self.successor.get_last_lr()
        else:
            super().step(epoch)


def _train_a_little(module, optim, sched, epochs):
    for _ in range(epochs):
        for p in module.parameters():
            p.grad = torch.ones_like(p) * 1e-3
        optim.step()
        sched.step()


def save_original(out_dir, module_name, state, epoch=2, pointer=True, use_dassl=None):
    """Write ``<out_dir>/<module_name>/model.pth.tar-<epoch>`` as the original repos do; returns its
    path. Its ``state_dict`` is ``state`` (original key names) exactly."""
    if use_dassl is None:
        try:
            import dassl.utils  # noqa: F401
            use_dassl = True
        except Exception:
            use_dassl = False
    module = _Holder(state)
    folder = os.path.join(str(out_dir), module_name)
    if use_dassl:
        from dassl.config import get_cfg_default
        from dassl.optim import build_lr_scheduler, build_optimizer
        from dassl.utils import save_checkpoint

        cfg = get_cfg_default().OPTIM
        cfg.NAME, cfg.LR, cfg.MAX_EPOCH, cfg.LR_SCHEDULER = "sgd", LR, EPOCHS, "cosine"
        cfg.WARMUP_EPOCH, cfg.WARMUP_TYPE, cfg.WARMUP_CONS_LR = 1, "constant", 1e-5
        optim = build_optimizer(module, cfg)
        with _old_torch_scheduler_signature():
            sched = build_lr_scheduler(optim, cfg)
    else:
        optim = torch.optim.SGD(module.parameters(), lr=LR, momentum=0.9, weight_decay=5e-4)
        sched = _ConstantWarmup(optim, lr_scheduler.CosineAnnealingLR(optim, float(EPOCHS)), 1, 1e-5)
    _train_a_little(module, optim, sched, epoch)  # fills the momentum buffers, moves the schedule
    state = OrderedDict((k, v.clone()) for k, v in state.items())  # the values the caller asked for
    payload = {"state_dict": state, "epoch": epoch, "optimizer": optim.state_dict(),
               "scheduler": sched.state_dict(), "val_result": None}
    assert isinstance(payload["scheduler"]["successor"], lr_scheduler.CosineAnnealingLR)
    if use_dassl:
        save_checkpoint(payload, folder, is_best=False)  # also writes the 'checkpoint' pointer
        if not pointer:
            os.remove(os.path.join(folder, "checkpoint"))
    else:
        os.makedirs(folder, exist_ok=True)
        torch.save(payload, os.path.join(folder, f"model.pth.tar-{epoch}"))
        if pointer:
            with open(os.path.join(folder, "checkpoint"), "w") as f:
                f.write(f"model.pth.tar-{epoch}\n")
    return os.path.join(folder, f"model.pth.tar-{epoch}")


def ivlp_original_state(model, with_zs_encoder=False):
    """The state_dict the PromptSRC repository saves for our IVLP/PromptSRC ``model`` after a PREC fp16
    run: its whole CustomCLIP (``VLPromptLearner``), i.e. the fp16 text context, the class buffers,
    the frozen CLIP copy (fp16 where ``convert_weights`` made it so) with the fp32 prompt parameters
    inside it (``image_encoder.VPT``, ``*.transformer.resblocks.<i>.VPT_shallow``), and for PromptSRC
    its frozen zero-shot image encoder ``prompt_learner.ZS_image_encoder.*``."""
    ours = {k: v.detach().clone() for k, v in model.state_dict().items()}
    clip = model.clip.model.state_dict()
    state = OrderedDict()
    state["prompt_learner.ctx"] = ours["prompt_learner.ctx"].half()
    n_cls = model.prompt_learner.classes.n_cls
    state["prompt_learner.token_prefix"] = torch.zeros(n_cls, 1, clip["ln_final.weight"].shape[0], dtype=torch.float16)
    if with_zs_encoder:
        state.update({f"prompt_learner.ZS_image_encoder.{k[7:]}": v.half() for k, v in clip.items()
                      if k.startswith("visual.")})
    state.update({f"image_encoder.{k[7:]}": v.half() for k, v in clip.items() if k.startswith("visual.")})
    state["image_encoder.VPT"] = ours["prompt_learner.visual_prompt"]
    for k, v in ours.items():
        if k.startswith("prompt_learner.visual_prompts."):
            state[f"image_encoder.transformer.resblocks.{int(k.rsplit('.', 1)[1]) + 1}.VPT_shallow"] = v
    state.update({f"text_encoder.{k}": v for k, v in clip.items()
                  if k.startswith(("transformer.", "ln_final.", "positional_embedding", "text_projection"))})
    for k, v in ours.items():
        if k.startswith("prompt_learner.text_prompts."):
            state[f"text_encoder.transformer.resblocks.{int(k.rsplit('.', 1)[1]) + 1}.VPT_shallow"] = v
    state["logit_scale"] = clip["logit_scale"]
    return state


# ------------------------------------------------------------------ our models as the originals save them
#: Class names of the tiny models below.
NAMES = ["ant", "bee", "cat"]


def perturbed(model, seed=1):
    """Give the trainable tensors non-initial, fp16-representable values (as a PREC fp16 run has)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn(p.shape, generator=g)).copy_(p.half().float())
    return model


def original_keys(source, model):
    """Our trained tensors under the original repository's names and dtypes (PREC fp16)."""
    ours = {k: v.detach().clone() for k, v in model.state_dict().items()}
    if source == "CoOp":
        return coop_state(ours["prompt_learner.ctx"].half())
    if source == "CoCoOp":
        state = coop_state(ours["prompt_learner.ctx"].half())
        for i, name in (("0", "linear1"), ("2", "linear2")):
            for p in ("weight", "bias"):
                state[f"meta_net.{name}.{p}"] = ours[f"prompt_learner.meta_net.{i}.{p}"].half()  # meta_net.half()
        return state
    if source in ("IVLP", "PromptSRC"):
        return ivlp_original_state(model, with_zs_encoder=source == "PromptSRC")
    state = OrderedDict((k, v) for k, v in ours.items())
    state["prompt_learner.ctx"] = state["prompt_learner.ctx"].half()
    state["prompt_learner.proj.weight"] = state["prompt_learner.proj.weight"].half()  # self.proj.half()
    state["prompt_learner.proj.bias"] = state["prompt_learner.proj.bias"].half()
    state["prompt_learner.token_prefix"] = torch.zeros(3, 1, 64, dtype=torch.float16)
    clip = model.clip.model.state_dict()  # MaPLe saves the whole CustomCLIP, frozen CLIP included
    state.update({f"image_encoder.{k[7:]}": v.half() for k, v in clip.items() if k.startswith("visual.")})
    state["text_encoder.ln_final.weight"] = clip["ln_final.weight"]
    state["logit_scale"] = clip["logit_scale"]
    return state


IVLP_TINY = dict(n_text=4, n_vision=4, ctx_init="a photo of a", text_depth=2, vision_depth=2)
BUILD = {
    "IVLP": (lambda clip: IVLP(clip, NAMES, **IVLP_TINY), "VLPromptLearner"),
    "PromptSRC": (lambda clip: PromptSRC(clip, NAMES, **IVLP_TINY), "VLPromptLearner"),
    "CoOp": (lambda clip: CoOp(clip, NAMES, n_ctx=4, ctx_init="a photo of a"), "prompt_learner"),
    "CoCoOp": (lambda clip: CoCoOp(clip, NAMES, n_ctx=4, ctx_init="a photo of a"), "prompt_learner"),
    "MaPLe": (lambda clip: MaPLe(clip, NAMES, n_ctx=2, ctx_init="a photo of a", depth=2),
              "MultiModalPromptLearner"),
}
