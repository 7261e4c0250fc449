"""Distributed training: Ray Train TorchTrainer + DeepSpeed ZeRO (see driver.run_training)."""

from refseg.train.driver import run_training
from refseg.train.stop import TrainingStopped

__all__ = ["TrainingStopped", "run_training"]
