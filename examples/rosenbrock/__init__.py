"""The paper's Rosenbrock toy: Adam with several b1 against AdEMAMix."""

from examples.rosenbrock.train import Config
from examples.rosenbrock.train import train_and_evaluate

__all__ = ('Config', 'train_and_evaluate')
