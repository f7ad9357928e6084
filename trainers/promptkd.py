import logging

from dassl.engine import TRAINER_REGISTRY

from spotlighter import kd, models
from spotlighter.backbone import FrozenCLIP, load_clip
from spotlighter.config import ConfigError
from spotlighter.openclip import check_same_images

from .base import DTYPES, PromptTrainer

logger = logging.getLogger(__name__)


@TRAINER_REGISTRY.register()
class PromptKD(PromptTrainer):
    """PromptKD (Li et al., CVPR 2024): a prompted student distilled from a frozen PromptSRC teacher."""

    CFG_NODE = "PROMPTKD"
    MODULE_NAME = "VLPromptLearner"  # the original repository's checkpoint folder
    CHECKPOINT_KEYS = "N_CTX_VISION / PROMPT_DEPTH_VISION (and MODEL.BACKBONE, TEACHER_NAME)"

    def _path(self, text: str) -> str:
        return text.replace("{root}", self.cfg.DATASET.ROOT).replace("{dataset}", self.cfg.DATASET.NAME)

    def build_custom_model(self, clip, classnames):
        n = self.node
        teacher_clip = FrozenCLIP(load_clip(n.TEACHER_NAME, self._path(n.TEACHER_PATH), self.device,
                                            DTYPES[self.precision]))
        problem = check_same_images(clip, teacher_clip, self.cfg.MODEL.BACKBONE.NAME, n.TEACHER_NAME)
        if problem:
            raise ConfigError(problem)
        teacher = models.IVLP(teacher_clip, classnames, n_text=n.TEACHER_N_CTX_TEXT, n_vision=n.TEACHER_N_CTX_VISION,
                              ctx_init=n.TEACHER_CTX_INIT, text_depth=n.TEACHER_PROMPT_DEPTH_TEXT,
                              vision_depth=n.TEACHER_PROMPT_DEPTH_VISION, round_prompts=n.ROUND_PROMPTS_FP16)
        teacher.to(self.device)
        logger.info("Teacher: %s", kd.load_teacher(teacher, kd.teacher_file(self._path(n.TEACHER))))
        return kd.PromptKD(clip, teacher, n_vision=n.N_CTX_VISION, vision_depth=n.PROMPT_DEPTH_VISION,
                           round_prompts=n.ROUND_PROMPTS_FP16, kd_weight=n.KD_WEIGHT, temperature=n.TEMPERATURE)
