import logging

from dassl.engine import TRAINER_REGISTRY

from spotlighter import checkpoint as ckpt
from spotlighter import models

from .ivlp import IVLP

logger = logging.getLogger(__name__)


@TRAINER_REGISTRY.register()
class PromptSRC(IVLP):
    """PromptSRC (Khattak et al., ICCV 2023): IVLP prompts with self-regulating constraints and
    Gaussian prompt aggregation (GPA) over the epochs."""

    def build_custom_model(self, clip, classnames):
        n = self.node
        self.gpa = models.GaussianPromptAggregation(n.GPA_MEAN, n.GPA_STD, self.cfg.OPTIM.MAX_EPOCH)
        return super().build_custom_model(clip, classnames)

    def after_epoch(self):
        """Add this epoch's prompts to the aggregate; after the last epoch the aggregate replaces them
        (before the last checkpoint is written and the final test runs, as in the original)."""
        done = self.epoch + 1
        self.gpa.add(ckpt.trainable_state(self.model), done)
        if done == self.max_epoch:
            self.model.load_state_dict(self.gpa.sum, strict=True)
            logger.info("Gaussian prompt aggregation (mean %g, std %g over %d epochs): the aggregated prompts "
                        "replace the last epoch's", self.node.GPA_MEAN, self.node.GPA_STD, self.max_epoch)
        super().after_epoch()

    def trainer_state(self):
        return {"gpa": self.gpa.state_dict()}

    def load_trainer_state(self, state):
        self.gpa.load_state_dict(state["gpa"])
