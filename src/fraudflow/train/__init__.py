"""Training: the one loop for neural models, checkpoints, and the run that ties them together."""

from fraudflow.train.loop import EpochLog, FitResult, LoopObserver, TensorData, fit, predict_scores
from fraudflow.train.run import DONE, RunOutcome, train_run

__all__ = [
    "DONE",
    "EpochLog",
    "FitResult",
    "LoopObserver",
    "RunOutcome",
    "TensorData",
    "fit",
    "predict_scores",
    "train_run",
]
