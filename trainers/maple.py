from dassl.engine import TRAINER_REGISTRY

from .base import PromptTrainer


@TRAINER_REGISTRY.register()
class MaPLe(PromptTrainer):
    """MaPLe (Khattak et al., CVPR 2023): coupled vision-language prompts in the first layers."""
