"""``python -m examples.forgetting [flags]``: see ``--help``."""

from examples import forgetting
from examples._shared import cli

if __name__ == '__main__':
  cli.example_main(
      'forgetting',
      forgetting.Config(),
      forgetting.train_and_evaluate,
      description=forgetting.train.__doc__.splitlines()[0],
  )
