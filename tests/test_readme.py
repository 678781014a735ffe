"""The README stays true: its commands, and its usage snippet runs."""

import pathlib
import re

import jax
import jax.numpy as jnp
import numpy as np

ROOT = pathlib.Path(__file__).resolve().parent.parent
README = (ROOT / 'README.md').read_text()


def _bash_blocks():
  return re.findall(r'```bash\n(.*?)```', README, flags=re.S)


def test_readme_starts_with_the_two_commands():
  blocks = _bash_blocks()
  main_job, tests = blocks[0].strip(), blocks[1].strip()
  assert main_job.endswith('python -m examples.lm')
  assert "pip install -e '.[examples]'" in main_job
  assert (ROOT / 'examples' / 'lm' / '__main__.py').exists()
  assert "pip install -e '.[test]'" in tests
  # CI runs the README's test command word for word.
  ci = (ROOT / '.ci' / 'run').read_text().strip().splitlines()
  assert ci[-1] == tests


def test_readme_usage_snippet_runs():
  code = re.findall(r'```python\n(.*?)```', README, flags=re.S)[0]
  params = {'w': jnp.ones((3, 4)), 'b': jnp.zeros((4,))}
  grads = jax.tree.map(lambda p: jnp.full_like(p, 0.5), params)
  namespace = {'params': params, 'grads': grads}
  exec(compile(code, 'README.md', 'exec'), namespace)  # pylint: disable=exec-used
  # The schedule starts at lr 0: take a second step to see the params move.
  tx, opt_state = namespace['tx'], namespace['opt_state']
  updates, _ = tx.update(grads, opt_state, namespace['params'])
  new = namespace['optax'].apply_updates(namespace['params'], updates)
  assert jax.tree.structure(new) == jax.tree.structure(params)
  assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(new))
  assert (np.asarray(new['w']) < 1.0).all()  # moved against the gradient
