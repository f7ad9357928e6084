from dassl.engine import TRAINER_REGISTRY

from .base import PromptTrainer


@TRAINER_REGISTRY.register()
class IVLP(PromptTrainer):
    """Independent vision-language prompting (Khattak et al.): deep text and visual prompts."""

    CHECKPOINT_KEYS = "N_CTX_TEXT / N_CTX_VISION / PROMPT_DEPTH_TEXT / PROMPT_DEPTH_VISION (and MODEL.BACKBONE)"
