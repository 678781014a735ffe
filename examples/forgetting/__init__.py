"""The paper's forgetting experiment, at the scale of a CPU."""

from examples.forgetting.train import Config
from examples.forgetting.train import train_and_evaluate

__all__ = ('Config', 'train_and_evaluate')
