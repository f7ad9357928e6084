from dassl.engine import TRAINER_REGISTRY

from spotlighter import models

from .base import PromptTrainer


@TRAINER_REGISTRY.register()
class MaPLe(PromptTrainer):
    """MaPLe (Khattak et al., CVPR 2023): coupled vision-language prompts in the first layers."""

    CFG_NODE = "MAPLE"
    MODULE_NAME = "MultiModalPromptLearner"

    def build_custom_model(self, clip, classnames):
        n = self.node
        return models.MaPLe(clip, classnames, n_ctx=n.N_CTX, ctx_init=n.CTX_INIT, depth=n.PROMPT_DEPTH)
