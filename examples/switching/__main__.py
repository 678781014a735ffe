"""``python -m examples.switching [flags]``: see ``--help``."""

from examples import switching
from examples._shared import cli

if __name__ == '__main__':
  cli.example_main(
      'switching',
      switching.Config(),
      switching.train_and_evaluate,
      description=switching.train.__doc__.splitlines()[0],
  )
