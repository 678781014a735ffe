"""AdEMAMix in Flax training loops (Linen and NNX) and Orbax checkpoints.

A tiny MLP learns a small synthetic regression problem; a run checkpointed
half-way and resumed from the restored optimizer state must continue exactly
(bit for bit) like the uninterrupted run.
"""

import functools

import chex
from flax import nnx
import flax.linen as nn
from flax.training import train_state
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

import ademamix_optax as amx

_SIMPLIFIED_BF16 = dict(
    b1=0.999, alpha=3.0, t_b1=40, weight_decay=0.1, mu_dtype=jnp.bfloat16
)

# name -> (optimizer, steps, the loss ratio it must reach): a small run learns.
LEARN_CONFIGS = {
    'ademamix': (
        amx.ademamix(1e-2, b3=0.999, alpha=5.0, t_alpha_beta3=100),
        100,
        0.2,
    ),
    'simplified_bf16': (
        amx.simplified_ademamix(
            1e-3,
            b1=0.99,
            alpha=2.0,
            t_b1=50,
            weight_decay=1e-3,
            mu_dtype=jnp.bfloat16,
        ),
        50,
        0.5,
    ),
    'simplified_bias_correction1': (
        amx.simplified_ademamix(
            1e-2, b1=0.99, alpha=2.0, t_b1=50, bias_correction1=True
        ),
        50,
        0.5,
    ),
}

# The optimizers of the checkpoint tests, and the state fields they leave
# None: AdEMAMix with the fast EMA, and without it (no m1) with bfloat16
# moments stochastically rounded; Simplified AdEMAMix with a bfloat16
# momentum, without and with the scalar s of bias_correction1.
CHECKPOINT_CONFIGS = {
    'default': (
        amx.ademamix(
            1e-2, b3=0.999, alpha=5.0, weight_decay=1e-3, t_alpha_beta3=40
        ),
        {'m1': False},
    ),
    'b1_zero_bf16': (
        amx.ademamix(
            3e-3,
            b1=0.0,
            b3=0.999,
            alpha=8.0,
            mu_dtype=jnp.bfloat16,
            t_alpha_beta3=40,
        ),
        {'m1': True},
    ),
    'simplified_bf16': (
        amx.simplified_ademamix(1e-3, **_SIMPLIFIED_BF16),
        {'s': True},
    ),
    'simplified_bf16_bias_correction1': (
        amx.simplified_ademamix(
            1e-3, **_SIMPLIFIED_BF16, bias_correction1=True
        ),
        {'s': False},
    ),
}


def _assert_none_fields(state, config):
  """The optimizer state's fields are None exactly as the config says."""
  for field, none in CHECKPOINT_CONFIGS[config][1].items():
    assert (getattr(state, field) is None) == none, (config, field)


def _data():
  rng = np.random.default_rng(0)
  x = rng.standard_normal((64, 4)).astype(np.float32)
  y = np.sin(x[:, :1]) + 0.5 * x[:, 1:2] - 0.3 * x[:, 2:3] * x[:, 3:4]
  return jnp.asarray(x), jnp.asarray(y, jnp.float32)


# Same structure, shapes, dtypes and values.
_assert_trees_equal = functools.partial(
    chex.assert_trees_all_equal, strict=True
)


# Linen.


class _LinenMLP(nn.Module):

  @nn.compact
  def __call__(self, x):
    return nn.Dense(1)(nn.tanh(nn.Dense(16)(x)))


def _linen_state(tx, seed=0):
  model = _LinenMLP()
  x, _ = _data()
  params = model.init(jax.random.key(seed), x)['params']
  return train_state.TrainState.create(
      apply_fn=model.apply, params=params, tx=tx
  )


@jax.jit
def _linen_step(state, x, y):
  def loss_fn(params):
    prediction = state.apply_fn({'params': params}, x)
    return jnp.mean(jnp.square(prediction - y))

  loss, grads = jax.value_and_grad(loss_fn)(state.params)
  return state.apply_gradients(grads=grads), loss


@pytest.mark.parametrize('config', list(LEARN_CONFIGS))
def test_linen_train_state_learns(config):
  tx, steps, ratio = LEARN_CONFIGS[config]
  x, y = _data()
  state = _linen_state(tx)
  losses = []
  for _ in range(steps):
    state, loss = _linen_step(state, x, y)
    losses.append(float(loss))
  assert int(state.step) == steps
  assert int(state.opt_state[0].count) == steps
  assert losses[-1] < ratio * losses[0], losses[::10]


@pytest.mark.parametrize('config', list(CHECKPOINT_CONFIGS))
def test_linen_checkpoint_resume_is_bit_identical(tmp_path, config):
  tx = CHECKPOINT_CONFIGS[config][0]
  x, y = _data()

  uninterrupted = _linen_state(tx)
  for _ in range(40):
    uninterrupted, _ = _linen_step(uninterrupted, x, y)

  state = _linen_state(tx)
  for _ in range(20):
    state, _ = _linen_step(state, x, y)
  _assert_none_fields(state.opt_state[0], config)
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(tmp_path / 'step_20', state)
    checkpointer.wait_until_finished()
  del state

  # Restore into a state built afresh (other initial values), as a new
  # process would, against its abstract shapes, dtypes and shardings.
  fresh = _linen_state(tx, seed=1)
  fresh, _ = _linen_step(fresh, x, y)  # A jitted step, as the saved one.
  target = jax.tree.map(ocp.utils.to_shape_dtype_struct, fresh)
  with ocp.StandardCheckpointer() as checkpointer:
    restored = checkpointer.restore(tmp_path / 'step_20', target)
  assert isinstance(restored, train_state.TrainState)
  assert int(restored.step) == 20
  assert int(restored.opt_state[0].count) == 20
  _assert_none_fields(restored.opt_state[0], config)

  for _ in range(20):
    restored, _ = _linen_step(restored, x, y)
  _assert_trees_equal(restored.params, uninterrupted.params)
  _assert_trees_equal(restored.opt_state, uninterrupted.opt_state)
  assert int(restored.step) == int(uninterrupted.step) == 40


# NNX.


class _NNXMLP(nnx.Module):

  def __init__(self, rngs):
    self.hidden = nnx.Linear(4, 16, rngs=rngs)
    self.out = nnx.Linear(16, 1, rngs=rngs)

  def __call__(self, x):
    return self.out(jax.nn.tanh(self.hidden(x)))


def _nnx_setup(tx, seed=0):
  model = _NNXMLP(nnx.Rngs(seed))
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  return model, optimizer


@nnx.jit
def _nnx_step(model, optimizer, x, y):
  def loss_fn(model):
    return jnp.mean(jnp.square(model(x) - y))

  loss, grads = nnx.value_and_grad(loss_fn)(model)
  optimizer.update(model, grads)
  return loss


def _ademamix_state(optimizer):
  """The optimizer's own state inside an nnx.Optimizer."""
  return optimizer.opt_state[0]


@pytest.mark.parametrize('config', list(LEARN_CONFIGS))
def test_nnx_optimizer_learns(config):
  tx, steps, ratio = LEARN_CONFIGS[config]
  x, y = _data()
  model, optimizer = _nnx_setup(tx)
  losses = [float(_nnx_step(model, optimizer, x, y)) for _ in range(steps)]
  assert int(optimizer.step[...]) == steps
  inner = _ademamix_state(optimizer)
  assert int(inner.count[...]) == steps
  if config == 'simplified_bf16':  # The momentum as stored, in nnx state.
    assert inner.m['hidden']['kernel'][...].dtype == jnp.bfloat16
  assert losses[-1] < ratio * losses[0], losses[::10]


@pytest.mark.parametrize('config', list(CHECKPOINT_CONFIGS))
def test_nnx_checkpoint_resume_is_bit_identical(tmp_path, config):
  tx = CHECKPOINT_CONFIGS[config][0]
  x, y = _data()

  model_ref, optimizer_ref = _nnx_setup(tx)
  for _ in range(40):
    _nnx_step(model_ref, optimizer_ref, x, y)

  model, optimizer = _nnx_setup(tx)
  for _ in range(20):
    _nnx_step(model, optimizer, x, y)
  _assert_none_fields(_ademamix_state(optimizer), config)
  saved = {'model': nnx.state(model), 'optimizer': nnx.state(optimizer)}
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(tmp_path / 'step_20', saved)
    checkpointer.wait_until_finished()
  del model, optimizer, saved

  model, optimizer = _nnx_setup(tx, seed=1)
  target = jax.tree.map(
      ocp.utils.to_shape_dtype_struct,
      {'model': nnx.state(model), 'optimizer': nnx.state(optimizer)},
  )
  with ocp.StandardCheckpointer() as checkpointer:
    restored = checkpointer.restore(tmp_path / 'step_20', target)
  nnx.update(model, restored['model'])
  nnx.update(optimizer, restored['optimizer'])
  assert int(optimizer.step[...]) == 20
  assert int(_ademamix_state(optimizer).count[...]) == 20
  _assert_none_fields(_ademamix_state(optimizer), config)

  for _ in range(20):
    _nnx_step(model, optimizer, x, y)
  _assert_trees_equal(
      nnx.state(model, nnx.Param), nnx.state(model_ref, nnx.Param)
  )
  _assert_trees_equal(nnx.state(optimizer), nnx.state(optimizer_ref))
  assert int(optimizer.step[...]) == 40
