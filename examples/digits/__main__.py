"""``python -m examples.digits [flags]``: see ``--help``."""

from examples import digits
from examples._shared import cli

if __name__ == '__main__':
  cli.example_main(
      'digits',
      digits.Config(),
      digits.train_and_evaluate,
      description=digits.train.__doc__.splitlines()[0],
  )
