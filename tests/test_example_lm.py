"""Tests of the language-model example (examples/lm).

A tiny configuration (derived from the default) runs end to end through the
command line; the run is then repeated with an interruption and ``--resume``
(bit-identical), and on an 8-device simulated CPU mesh in a subprocess
(close, since the reductions are ordered differently).
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from examples._shared import corpus
from examples.lm import __main__ as cli
from examples.lm import configs
from examples.lm import report
from examples.lm import train

pytestmark = pytest.mark.slow

P = jax.sharding.PartitionSpec

# Measured (2-core CPU, jax 0.10.2): data=4,model=2 (also 2x4 and 8x1)
# differs from the single-device run by <= 1e-6 in the losses and <= 3.1e-6
# in the parameters after the tiny config's 6 steps (float32 reductions in
# another order); the bounds leave a 10x margin.
_MESH_LOSS_ATOL = 1e-5
_MESH_PARAM_ATOL = 3e-5


def _run_cli(flags: str) -> tuple[dict, str]:
  """``python -m examples.lm --config tiny FLAGS``: its result and output."""
  out = io.StringIO()
  with contextlib.redirect_stdout(out):
    result = cli.main(['--config', 'tiny', *flags.split()])
  return result, out.getvalue()


def _flat(tree: Any) -> dict[str, np.ndarray]:
  leaves = jax.tree_util.tree_leaves_with_path(tree)
  return {jax.tree_util.keystr(path): np.asarray(x) for path, x in leaves}


def _assert_close(got: dict, want: dict, atol: float = 0.0) -> None:
  """The same arrays by name, within ``atol`` (by default, bit for bit)."""
  assert set(got) == set(want)
  for key in want:
    np.testing.assert_allclose(got[key], want[key], 0, atol, err_msg=key)


@pytest.fixture(scope='module')
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> tuple:
  """The tiny config, both optimizers, through the command line."""
  workdir = tmp_path_factory.mktemp('tiny')
  return (workdir, *_run_cli(f'--workdir {workdir}'))


def test_tiny_config_is_derived_from_default():
  changed = {
      f.name
      for f in dataclasses.fields(configs.Config)
      if getattr(configs.TINY, f.name) != getattr(configs.DEFAULT, f.name)
  }
  assert changed <= set(
      'max_bytes d_model layers heads context steps batch eval_every '
      'eval_batches log_every checkpoint_every'.split()
  )
  assert configs.DEFAULT.resolved_b3 == 0.999
  long_run = dataclasses.replace(configs.DEFAULT, steps=100_000)
  assert long_run.resolved_b3 == 0.9999
  assert dataclasses.replace(long_run, b3=0.99).resolved_b3 == 0.99
  with pytest.raises(ValueError, match='heads'):
    dataclasses.replace(configs.DEFAULT, heads=3)
  with pytest.raises(ValueError, match='optimizers'):
    dataclasses.replace(configs.DEFAULT, optimizers=('sgd',))


def _config(flags: str) -> configs.Config:
  parser = cli.make_parser()
  return cli.make_config(parser, parser.parse_args(flags.split()))


def test_cli_flags_override_config():
  config = _config(
      '--steps 7 --d-model 64 --b3 0.99 --optimizers ademamix --mesh '
      'data=2,model=4 --state-dtype bfloat16 --clip_norm 2'
  )
  want = dict(steps=7, d_model=64, b3=0.99, optimizers=('ademamix',))
  want.update(mesh_data=2, mesh_model=4, state_dtype='bfloat16', clip_norm=2.0)
  assert config == dataclasses.replace(configs.DEFAULT, **want)
  # --lr sets every optimizer's peak learning rate, but those given their own.
  tiny = _config('--config tiny --optimizers ademamix adamw --lr 0.01')
  want = dict(adamw_lr=None, ademamix_lr=None, simplified_lr=None, lr=0.01)
  want.update(optimizers=('ademamix', 'adamw'))
  assert tiny == dataclasses.replace(configs.TINY, **want)
  config = _config('--lr 0.01 --adamw-lr 0.02')
  assert [config.peak_lr(n) for n in configs.OPTIMIZERS] == [0.02, 0.01, 0.01]
  config = _config('--ademamix-lr 0.03')
  assert config.peak_lr('ademamix') == 0.03
  assert config.peak_lr('adamw') == configs.ADAMW_LR
  # Every field but the mesh's (set by --mesh) has a flag.
  usage = cli.make_parser().format_usage()
  missing = {
      f.name
      for f in dataclasses.fields(configs.Config)
      if f'--{f.name.replace("_", "-")} ' not in usage
  }
  assert missing == {'mesh_data', 'mesh_model'}


def test_stdlib_split_is_by_file_and_deterministic(tmp_path):
  files = {'a.py': 'x = 1\n', 'b/c.py': 'y = 2', 'site-packages/d.py': 'z'}
  for name, text in files.items():
    (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
    (tmp_path / name).write_text(text)
  assert corpus.list_python_files(tmp_path) == ['a.py', 'b/c.py']
  # Take the validation fraction such that exactly one file is held out.
  for fraction in np.linspace(0.05, 0.95, 19):
    held = [corpus.is_validation_file(p, fraction) for p in ('a.py', 'b/c.py')]
    if sum(held) == 1:
      break
  else:
    pytest.skip('no fraction separates the two files')
  text = corpus.load_stdlib(10**6, fraction, root=tmp_path)
  a, c = b'x = 1\n', b'y = 2\n'
  assert (text.val_U8.tobytes(), text.train_U8.tobytes()) == (
      (a, c) if held[0] else (c, a)
  )


def test_batches_are_a_pure_function_of_seed_and_index():
  text_U8 = np.arange(1000, dtype=np.int64).astype(np.uint8)

  def batch(seed, index):
    return corpus.train_batch(text_U8, seed, index, batch=4, context=8)

  a = batch(3, 5)
  assert a.shape == (4, 9) and a.dtype == np.uint8
  np.testing.assert_array_equal(a, batch(3, 5))
  assert not np.array_equal(a, batch(3, 6))
  assert not np.array_equal(a, batch(4, 5))
  # Windows are contiguous text.
  np.testing.assert_array_equal(np.diff(a.astype(np.int64), axis=1) % 256, 1)


def test_fsdp_spec_and_decay_mask():
  assert train.fsdp_spec((256, 32), 2) == P('model', None)
  assert train.fsdp_spec((32, 128), 2) == P(None, 'model')
  assert train.fsdp_spec((3, 5), 2) == P()
  assert train.fsdp_spec((), 2) == P()
  assert train.fsdp_spec((64, 64), 1) == P()
  params = {
      'blocks': [{'mlp': {'up': {'kernel': 1, 'bias': 2}}, 'ln': {'scale': 3}}],
      'embed': {'embedding': 4},
      'pos_embed': 5,
  }
  is_kernel = jax.tree.map(lambda x: x == 1, params)
  assert train.decay_mask(params) == is_kernel


def test_changed_fields_name_each_difference_outside_ignore():
  saved = {'lr': 0.001, 'steps': 6, 'log_every': 2}
  current = {'lr': 0.002, 'steps': 6, 'log_every': 3, 'seed': 1}
  assert configs.changed_fields(saved, current, ['log_every']) == [
      'lr: 0.001 -> 0.002',
      'seed: None -> 1',
  ]
  assert configs.changed_fields(saved, saved) == []


def test_steps_to_reach_and_non_finite_losses():
  steps, losses = [10, 20, 30], [3.0, 2.0, 1.0]
  assert report.steps_to_reach(steps, losses, 2.5) == 15.0
  assert report.steps_to_reach(steps, losses, 3.5) == 10.0
  assert report.steps_to_reach(steps, losses, 0.5) is None
  with pytest.raises(FloatingPointError, match='adamw.*step 4'):
    train.check_finite('adamw', [3, 4], np.array([1.0, np.nan]))
  train.check_finite('adamw', [3, 4], np.array([1.0, 2.0]))


def test_tiny_run_writes_table_json_and_plot(tiny_run):
  workdir, result, text = tiny_run
  steps = configs.TINY.steps
  assert '| AdamW | 6 |' in text and '| AdEMAMix | 6 |' in text
  assert "AdamW steps to reach AdEMAMix's final val loss" in text
  assert (workdir / 'results.md').read_text().startswith('| optimizer')
  assert (workdir / 'loss_curves.png').read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
  payload = json.loads((workdir / 'curves.json').read_text())
  assert payload['config']['resolved_b3'] == 0.999
  for name in ('adamw', 'ademamix'):
    curves = payload['curves'][name]
    assert curves['step'] == list(range(1, steps + 1))
    assert len(curves['train_loss']) == len(curves['lr']) == steps
    assert curves['eval_step'] == [3, 6]
    assert all(np.isfinite(curves['val_loss']))
    # The loss starts near ln(256) and goes down.
    assert abs(curves['train_loss'][0] - np.log(256)) < 0.2
    assert curves['val_loss'][-1] < curves['train_loss'][0]
    assert curves['train_loss'] == result['runs'][name]['history']['train_loss']
  amx = payload['curves']['ademamix']
  assert amx['alpha'][-1] == 8.0 and amx['b3'][-1] == 0.999
  assert amx['alpha'][0] == pytest.approx(8.0 / steps)
  assert amx['b3'][0] < amx['b3'][-1]
  assert 'alpha' not in payload['curves']['adamw']
  # Same init and data: the first step's loss is the same for both.
  assert payload['curves']['adamw']['train_loss'][0] == amx['train_loss'][0]


def test_resume_is_bit_identical(tiny_run, tmp_path, capsys):
  # In one process the compiled step is shared (train.make_program caches
  # it); across processes XLA compiles the same program to the same code.
  # A preemptible job passes --resume every time, the first one included.
  _, reference, _ = tiny_run
  flags = f'--optimizers ademamix --workdir {tmp_path} --resume'
  stopped, text = _run_cli(f'{flags} --stop-after 4')
  ckpt_dir = tmp_path / 'checkpoints' / 'ademamix'
  assert (
      f'--resume: no checkpoint found in {ckpt_dir}; training starts '
      'from step 0.'
  ) in text
  assert 'continue with --resume' in text
  assert stopped['runs']['ademamix']['step'] == 4
  assert not (tmp_path / 'curves.json').exists()
  with pytest.raises(SystemExit) as exit_info:
    _run_cli(f'{flags} --ademamix-lr 0.1')
  assert exit_info.value.code == 2
  lr = configs.ADEMAMIX_LR
  assert f'Cannot resume: the config changed (ademamix_lr: {lr} -> 0.1)' in (
      capsys.readouterr().err
  )
  resumed, text = _run_cli(flags)
  assert 'no checkpoint found' not in text
  run, ref = resumed['runs']['ademamix'], reference['runs']['ademamix']
  assert run['step'] == configs.TINY.steps
  for key in ('step', 'train_loss', 'eval_step', 'val_loss'):
    assert run['history'][key] == ref['history'][key], key
  _assert_close(_flat(run['params']), _flat(ref['params']))
  assert (tmp_path / 'curves.json').exists()


def test_mesh_run_matches_single_device(tiny_run, tmp_path, worker):
  _, reference, _ = tiny_run
  path = os.path.join(os.path.dirname(__file__), 'lm_mesh_worker.py')
  got = worker(path, devices=8, timeout=300, args=[tmp_path])
  assert "'data': 4, 'model': 2" in got['log']
  ref = reference['runs']['ademamix']
  for key in ('train_loss', 'val_loss'):
    np.testing.assert_allclose(
        got['history'][key], ref['history'][key], rtol=0, atol=_MESH_LOSS_ATOL
    )
  want = _flat(ref['params'])
  with np.load(tmp_path / 'params.npz') as params:
    _assert_close(dict(params), want, _MESH_PARAM_ATOL)
  # Every moment of the optimizer is sharded like its parameter, and the
  # parameters follow the largest-divisible-dimension rule.
  specs, sharded = got['specs'], 0
  for path, spec in specs.items():
    if path.startswith('model'):
      param = path.removeprefix('model')
      shape = want[param.removesuffix('.value')].shape
      assert spec == train.spec_entries(train.fsdp_spec(shape, 2), len(shape))
      sharded += 'model' in spec
      moments = [
          p for p in specs if p.startswith('optimizer') and p.endswith(param)
      ]
      assert len(moments) == 3, (path, moments)  # m1, m2, nu.
      assert all(specs[p] == spec for p in moments), moments
  assert sharded > 0


_BF16 = {'mu_dtype': jnp.bfloat16, 'nu_dtype': jnp.bfloat16}


@pytest.mark.parametrize(
    'state_dtype, expected',
    [
        ('float32', {}),
        ('bfloat16', {**_BF16, 'stochastic_rounding': True}),
        ('bfloat16-nearest', {**_BF16, 'stochastic_rounding': False}),
    ],
)
def test_state_dtype_reaches_the_optimizers(state_dtype, expected):
  config = dataclasses.replace(configs.TINY, state_dtype=state_dtype)
  assert train.state_kwargs(config, 'ademamix') == expected
  adamw = train.state_kwargs(config, 'adamw')
  assert adamw == ({} if not expected else {'mu_dtype': jnp.bfloat16})
  # The optimizer state really is stored that way.
  state = train.make_optimizer('ademamix', config).init({'w': jnp.ones((4, 4))})
  dtypes = {x.dtype for x in jax.tree.leaves(state) if jnp.ndim(x) == 2}
  assert dtypes == {jnp.dtype(expected.get('mu_dtype', jnp.float32))}


@pytest.mark.parametrize('state_format', ['compact', '8bit'])
def test_state_format_trains_from_the_command_line(tmp_path, state_format):
  """--state-format packs AdEMAMix's large buffers (AdamW keeps float32)
  and the tiny run trains."""
  config = dataclasses.replace(configs.TINY, state_format=state_format)
  assert train.state_kwargs(config, 'ademamix') == {
      'state_format': state_format
  }
  assert train.state_kwargs(config, 'adamw') == {}
  tx = train.make_optimizer('ademamix', config)
  inner = tx.init({'w': jnp.ones((64, 128)), 'b': jnp.ones((128,))})[1][0]
  assert (inner.m2['w'].dtype, inner.m2['b'].dtype) == (jnp.uint8, jnp.float32)
  result, text = _run_cli(
      f'--workdir {tmp_path} --optimizers ademamix --state-format {state_format}'
  )
  assert '| AdEMAMix | 6 |' in text
  history = result['runs']['ademamix']['history']
  assert all(np.isfinite(history['train_loss']))
  assert history['train_loss'][-1] < history['train_loss'][0]


def test_simplified_ademamix_trains_from_the_command_line(tmp_path):
  flags = f'--workdir {tmp_path} --optimizers simplified_ademamix adamw'
  result, text = _run_cli(flags)
  assert 'Simplified AdEMAMix' in text
  runs = result['runs']
  assert set(runs) == {'simplified_ademamix', 'adamw'}
  losses = runs['simplified_ademamix']['history']['train_loss']
  assert np.all(np.isfinite(losses))
  assert losses[-1] < losses[0]  # It learns, even in 6 steps.


def test_simplified_ademamix_follows_the_authors_recipe():
  config = dataclasses.replace(
      configs.TINY, b1=0.9, simplified_b1=0.99, warmup_fraction=0.0
  )
  tx = train.make_optimizer('simplified_ademamix', config)
  params = {'kernel': jnp.ones((4, 4))}  # decay_mask: kernels decay.
  grads = {'kernel': jnp.full((4, 4), 0.5)}
  updates, _ = tx.update(grads, tx.init(params), params)
  # First step: m = g, nu = (1 - b2) g**2 bias-corrected to g**2, so the
  # direction is (alpha + 1) sign(g) (plus decay); the learning rate is
  # AdamW's scaled by sqrt((1 - 0.9) (1 - 0.99)).
  lr0 = float(train.learning_rate_schedule(config, 'simplified_ademamix')(0))
  scale = np.sqrt(0.1 * 0.01)
  expected = -scale * lr0 * (config.simplified_alpha + 1.0)
  # Weight decay times the learning rate stays AdamW's: lr0 * wd * param.
  decay = -lr0 * config.weight_decay * 1.0
  np.testing.assert_allclose(
      updates['kernel'], expected + decay, rtol=1e-5, atol=1e-12
  )
