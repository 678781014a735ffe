"""Switching a run from AdamW to AdEMAMix mid-training (paper, Section 5)."""

from examples.switching.train import Config
from examples.switching.train import train_and_evaluate

__all__ = ('Config', 'train_and_evaluate')
