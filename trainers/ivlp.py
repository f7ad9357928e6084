from dassl.engine import TRAINER_REGISTRY

from spotlighter import models

from .base import PromptTrainer


@TRAINER_REGISTRY.register()
class IVLP(PromptTrainer):
    """Independent vision-language prompting (Khattak et al.): deep text and visual prompts."""

    CFG_NODE = "IVLP"
    MODULE_NAME = "VLPromptLearner"  # the original repository's checkpoint folder
    CHECKPOINT_KEYS = "N_CTX_TEXT / N_CTX_VISION / PROMPT_DEPTH_TEXT / PROMPT_DEPTH_VISION (and MODEL.BACKBONE)"

    def ivlp_kwargs(self) -> dict:
        n = self.node
        return dict(n_text=n.N_CTX_TEXT, n_vision=n.N_CTX_VISION, ctx_init=n.CTX_INIT,
                    text_depth=n.PROMPT_DEPTH_TEXT, vision_depth=n.PROMPT_DEPTH_VISION,
                    round_prompts=n.ROUND_PROMPTS_FP16)

    def build_custom_model(self, clip, classnames):
        return models.IVLP(clip, classnames, **self.ivlp_kwargs())
