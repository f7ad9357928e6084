import logging

from dassl.engine import TRAINER_REGISTRY

from spotlighter.config import check_spotlighter_cfg

from .base import PromptTrainer

logger = logging.getLogger(__name__)


@TRAINER_REGISTRY.register()
class Spotlighter(PromptTrainer):
    """CoOp w/ Spotlighter (Gao et al., EMNLP 2025 Findings); presets ``paper`` and ``release``."""

    @property
    def preset(self):
        return self.cfg.TRAINER.SPOTLIGHTER.PRESET

    def check_cfg(self, cfg):
        super().check_cfg(cfg)
        check_spotlighter_cfg(cfg.TRAINER.SPOTLIGHTER)

    def class_state(self):
        return self.model.class_state()

    def load_class_state(self, state):
        counts = self.model.load_class_state(state)
        if counts is not None:
            logger.info("Class prototypes: %d classes loaded from the checkpoint by name, %d start from "
                        "their zero-shot text embedding", *counts)
