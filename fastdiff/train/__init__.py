"""``fastdiff train``: trains a DDPM U-Net or a VAE end to end on fastdiff's fused ops.

Programmatic use: ``Trainer(TrainConfig(...)).run()`` (what the command runs on one process).
"""
from .trainer import TrainConfig, Trainer, TrainError

__all__ = ["TrainConfig", "TrainError", "Trainer"]
