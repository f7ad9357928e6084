import logging

from dassl.engine import TRAINER_REGISTRY

from spotlighter.method import ClassMemory

from .promptkd import PromptKD

logger = logging.getLogger(__name__)


@TRAINER_REGISTRY.register()
class SpotlighterKD(PromptKD):
    """PromptKD w/ Spotlighter (the paper's headline row) and PromptKD w/ TextRefiner, as presets
    ``release``, ``paper`` and ``textrefiner`` of TRAINER.SPOTLIGHTERKD; TRAINER.PROMPTKD holds the
    student's prompts, the teacher and the distillation keys."""

    CHECKPOINT_KEYS = ("N_CTX_VISION / PROMPT_DEPTH_VISION (and MODEL.BACKBONE, TEACHER_NAME, "
                       "TRAINER.SPOTLIGHTERKD.MEMORY / IRM)")

    @property
    def preset(self):
        return self.cfg.TRAINER.SPOTLIGHTERKD.PRESET

    def log_trainable(self) -> None:
        for name, module in self.model.trainable_groups().items():
            params = [p for p in module.parameters() if p.requires_grad]
            logger.info("Trainable %s: %d tensors, %s scalars", name, len(params),
                        f"{sum(p.numel() for p in params):,}")

    def _memory(self):
        memory = self.model.memory
        return memory if isinstance(memory, ClassMemory) else None

    def class_state(self):
        memory = self._memory()
        return memory.class_state() if memory is not None else None

    def load_class_state(self, state):
        memory = self._memory()
        if memory is None:
            return
        loaded, fresh = memory.load_class_state(state)
        logger.info("Class prototypes: %d classes loaded from the checkpoint by name, %d start from "
                    "the teacher's text", loaded, fresh)
