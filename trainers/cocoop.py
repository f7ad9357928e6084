from dassl.engine import TRAINER_REGISTRY

from .base import PromptTrainer


@TRAINER_REGISTRY.register()
class CoCoOp(PromptTrainer):
    """CoCoOp (Zhou et al., CVPR 2022): context conditioned on the image by a meta-net."""
