from dassl.engine import TRAINER_REGISTRY

from .base import PromptTrainer


@TRAINER_REGISTRY.register()
class CoOp(PromptTrainer):
    """CoOp (Zhou et al., IJCV 2022): learnable context tokens for the text prompt."""
