"""The paper's Rosenbrock toy: Adam with several b1 against AdEMAMix."""

from examples.rosenbrock.run import Config
from examples.rosenbrock.run import run_and_report

__all__ = ('Config', 'run_and_report')
