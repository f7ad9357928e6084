from dassl.engine import TRAINER_REGISTRY

from .base import PromptTrainer


@TRAINER_REGISTRY.register()
class ZeroshotCLIP(PromptTrainer):
    """Zero-shot CLIP with the dataset's hand-written prompt; nothing is trained."""
