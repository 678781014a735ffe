"""``python -m examples.rosenbrock [flags]``: see ``--help``."""

from examples import rosenbrock
from examples._shared import cli

if __name__ == '__main__':
  cli.example_main(
      'rosenbrock',
      rosenbrock.Config(),
      rosenbrock.train_and_evaluate,
      description=rosenbrock.train.__doc__.splitlines()[0],
  )
