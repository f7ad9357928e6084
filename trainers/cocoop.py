from dassl.engine import TRAINER_REGISTRY

from spotlighter import models

from .base import PromptTrainer


@TRAINER_REGISTRY.register()
class CoCoOp(PromptTrainer):
    """CoCoOp (Zhou et al., CVPR 2022): context conditioned on the image by a meta-net."""

    CFG_NODE = "COCOOP"

    def build_custom_model(self, clip, classnames):
        n = self.node
        return models.CoCoOp(clip, classnames, n_ctx=n.N_CTX, ctx_init=n.CTX_INIT,
                             reduction=n.META_NET_REDUCTION)
