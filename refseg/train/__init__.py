"""Distributed training: Ray Train TorchTrainer + DeepSpeed ZeRO (see driver.run_training)."""

from refseg.train.driver import run_training

__all__ = ["run_training"]
