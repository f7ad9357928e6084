from dassl.engine import TRAINER_REGISTRY

from spotlighter import models
from spotlighter.templates import template_for

from .base import PromptTrainer


@TRAINER_REGISTRY.register()
class ZeroshotCLIP(PromptTrainer):
    """Zero-shot CLIP with the dataset's hand-written prompt; nothing is trained."""

    CFG_NODE = "ZSCLIP"

    def build_custom_model(self, clip, classnames):
        template = template_for(self.cfg.DATASET.NAME, self.node.TEMPLATE)
        return models.ZeroShotCLIP(clip, classnames, template)
