"""A Flax Linen CNN on scikit-learn's 8x8 digits: AdamW against AdEMAMix."""

from examples.digits.train import Config
from examples.digits.train import train_and_evaluate

__all__ = ('Config', 'train_and_evaluate')
