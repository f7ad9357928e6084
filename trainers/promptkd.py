from dassl.engine import TRAINER_REGISTRY

from .base import PromptTrainer


@TRAINER_REGISTRY.register()
class PromptKD(PromptTrainer):
    """PromptKD (Li et al., CVPR 2024): a prompted student distilled from a frozen PromptSRC teacher."""

    CHECKPOINT_KEYS = "N_CTX_VISION / PROMPT_DEPTH_VISION (and MODEL.BACKBONE, TEACHER_NAME)"
