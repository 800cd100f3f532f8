"""The training engine: the trainer (epochs, evaluation, lr schedule, stops), the training step it runs,
checkpoints, the run folder, and the `fastlm train` / `fastlm generate` commands."""

from fastlm.train.run_folder import RunFolder
from fastlm.train.trainer import Trainer, TrainingDiverged, TrainResult

__all__ = ["RunFolder", "Trainer", "TrainResult", "TrainingDiverged"]
