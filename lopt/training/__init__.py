"""The training layer (DESIGN.md): the compiled outer step (``trainer``), the host loop with
its hooks (``loop``), checkpoints, the curriculum driver, config building, evaluation,
distributed helpers, TensorBoard writing and the workdir lock.

It sits above ``estimators/``, which sits above the optimizer library (the rest of ``lopt``):
nothing below imports from here, and ``import lopt`` does not import this subpackage.
"""

from lopt.training.loop import TrainingStopped, train
from lopt.training.trainer import MetaTrainer, MetaTrainState

__all__ = ["MetaTrainState", "MetaTrainer", "TrainingStopped", "train"]
