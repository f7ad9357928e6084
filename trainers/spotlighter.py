import logging

from dassl.engine import TRAINER_REGISTRY

from spotlighter import models
from spotlighter.config import check_spotlighter_cfg
from spotlighter.method import ClassMemory, HeadConfig

from .base import PromptTrainer

logger = logging.getLogger(__name__)


@TRAINER_REGISTRY.register()
class Spotlighter(PromptTrainer):
    """CoOp w/ Spotlighter (Gao et al., EMNLP 2025 Findings); presets ``paper`` and ``release``."""

    CFG_NODE = "SPOTLIGHTER"
    MODULE_NAME = "spotlighter"

    @property
    def preset(self):
        return self.cfg.TRAINER.SPOTLIGHTER.PRESET

    def check_cfg(self, cfg):
        super().check_cfg(cfg)
        check_spotlighter_cfg(cfg.TRAINER.SPOTLIGHTER)

    def build_custom_model(self, clip, classnames):
        n = self.node
        patches = (clip.input_resolution // clip.model.visual.conv1.kernel_size[0]) ** 2
        check_spotlighter_cfg(n, num_patches=patches, width=clip.embed_dim)
        return models.Spotlighter(clip, classnames, HeadConfig.from_cfg(n), n_ctx=n.N_CTX,
                                  ctx_init=n.CTX_INIT, csc=n.CSC, class_token_position=n.CLASS_TOKEN_POSITION)

    def _memory(self):
        memory = self.model.head.memory
        return memory if isinstance(memory, ClassMemory) else None

    def class_state(self):
        memory = self._memory()
        return memory.class_state() if memory is not None else None

    def load_class_state(self, state):
        memory = self._memory()
        if memory is None:
            return
        saved = state.get("prototypes")
        if getattr(saved, "dim", lambda: 0)() != 3:
            raise ValueError("class_state['prototypes'] is not a (classes, prototypes, dim) tensor")
        if saved.shape[1] != memory.per_class:
            raise ValueError(
                f"class_state['prototypes'] holds {saved.shape[1]} prototypes per class, but "
                f"TRAINER.SPOTLIGHTER.MEMORY.PROTOTYPES_PER_CLASS = {memory.per_class}: evaluate it with the "
                f"value it was trained with ({saved.shape[1]})")
        if saved.shape[2] != memory.prototypes.shape[2]:
            raise ValueError(f"class_state['prototypes'] has dimension {saved.shape[2]}, this CLIP's embedding "
                             f"{memory.prototypes.shape[2]}: it was trained with another MODEL.BACKBONE")
        loaded, fresh = memory.load_class_state(state)
        logger.info("Class prototypes: %d classes loaded from the checkpoint by name, %d start from "
                    "their zero-shot text embedding", loaded, fresh)
