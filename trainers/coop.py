from dassl.engine import TRAINER_REGISTRY

from spotlighter import models

from .base import PromptTrainer


@TRAINER_REGISTRY.register()
class CoOp(PromptTrainer):
    """CoOp (Zhou et al., IJCV 2022): learnable context tokens for the text prompt."""

    CFG_NODE = "COOP"

    def build_custom_model(self, clip, classnames):
        n = self.node
        return models.CoOp(clip, classnames, n_ctx=n.N_CTX, ctx_init=n.CTX_INIT, csc=n.CSC,
                           class_token_position=n.CLASS_TOKEN_POSITION)
