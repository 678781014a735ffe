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

TRAIN_KWARGS = dict(learning_rate=1e-2, b3=0.999, alpha=5.0, t_alpha_beta3=100)

# The optimizers of the checkpoint tests: one with the fast EMA, one without
# it (m1 is None in the state) whose bfloat16 moments are stochastically
# rounded.
CHECKPOINT_CONFIGS = {
    'default': dict(
        learning_rate=1e-2,
        b3=0.999,
        alpha=5.0,
        weight_decay=1e-3,
        t_alpha_beta3=40,
    ),
    'b1_zero_bf16': dict(
        learning_rate=3e-3,
        b1=0.0,
        b3=0.999,
        alpha=8.0,
        mu_dtype=jnp.bfloat16,
        t_alpha_beta3=40,
    ),
}
CHECKPOINT_PARAMS = ['default', 'b1_zero_bf16']


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


def _linen_state(kwargs, seed=0):
  model = _LinenMLP()
  x, _ = _data()
  params = model.init(jax.random.key(seed), x)['params']
  return train_state.TrainState.create(
      apply_fn=model.apply, params=params, tx=amx.ademamix(**kwargs)
  )


@jax.jit
def _linen_step(state, x, y):
  def loss_fn(params):
    prediction = state.apply_fn({'params': params}, x)
    return jnp.mean(jnp.square(prediction - y))

  loss, grads = jax.value_and_grad(loss_fn)(state.params)
  return state.apply_gradients(grads=grads), loss


def test_linen_train_state_learns():
  x, y = _data()
  state = _linen_state(TRAIN_KWARGS)
  losses = []
  for _ in range(100):
    state, loss = _linen_step(state, x, y)
    losses.append(float(loss))
  assert int(state.step) == 100
  assert int(state.opt_state[0].count) == 100
  assert losses[-1] < 0.2 * losses[0], losses[::10]


@pytest.mark.parametrize('config', CHECKPOINT_PARAMS)
def test_linen_checkpoint_resume_is_bit_identical(tmp_path, config):
  kwargs = CHECKPOINT_CONFIGS[config]
  x, y = _data()

  uninterrupted = _linen_state(kwargs)
  for _ in range(40):
    uninterrupted, _ = _linen_step(uninterrupted, x, y)

  state = _linen_state(kwargs)
  for _ in range(20):
    state, _ = _linen_step(state, x, y)
  assert (state.opt_state[0].m1 is None) == (config == 'b1_zero_bf16')
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(tmp_path / 'step_20', state)
    checkpointer.wait_until_finished()
  del state

  # Restore into a state built afresh (other initial values), as a new
  # process would, against its abstract shapes, dtypes and shardings.
  fresh = _linen_state(kwargs, seed=1)
  fresh, _ = _linen_step(fresh, x, y)  # A jitted step, as the saved one.
  target = jax.tree.map(ocp.utils.to_shape_dtype_struct, fresh)
  with ocp.StandardCheckpointer() as checkpointer:
    restored = checkpointer.restore(tmp_path / 'step_20', target)
  assert isinstance(restored, train_state.TrainState)
  assert int(restored.step) == 20
  assert int(restored.opt_state[0].count) == 20
  assert (restored.opt_state[0].m1 is None) == (config == 'b1_zero_bf16')

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


def _nnx_setup(kwargs, seed=0):
  model = _NNXMLP(nnx.Rngs(seed))
  optimizer = nnx.Optimizer(model, amx.ademamix(**kwargs), wrt=nnx.Param)
  return model, optimizer


@nnx.jit
def _nnx_step(model, optimizer, x, y):
  def loss_fn(model):
    return jnp.mean(jnp.square(model(x) - y))

  loss, grads = nnx.value_and_grad(loss_fn)(model)
  optimizer.update(model, grads)
  return loss


def _ademamix_state(optimizer):
  """The ScaleByAdEMAMixState inside an nnx.Optimizer."""
  return optimizer.opt_state[0]


def test_nnx_optimizer_learns():
  x, y = _data()
  model, optimizer = _nnx_setup(TRAIN_KWARGS)
  losses = [float(_nnx_step(model, optimizer, x, y)) for _ in range(100)]
  assert int(optimizer.step[...]) == 100
  assert int(_ademamix_state(optimizer).count[...]) == 100
  assert losses[-1] < 0.2 * losses[0], losses[::10]


@pytest.mark.parametrize('config', CHECKPOINT_PARAMS)
def test_nnx_checkpoint_resume_is_bit_identical(tmp_path, config):
  kwargs = CHECKPOINT_CONFIGS[config]
  x, y = _data()

  model_ref, optimizer_ref = _nnx_setup(kwargs)
  for _ in range(40):
    _nnx_step(model_ref, optimizer_ref, x, y)

  model, optimizer = _nnx_setup(kwargs)
  for _ in range(20):
    _nnx_step(model, optimizer, x, y)
  assert (_ademamix_state(optimizer).m1 is None) == (config == 'b1_zero_bf16')
  saved = {'model': nnx.state(model), 'optimizer': nnx.state(optimizer)}
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(tmp_path / 'step_20', saved)
    checkpointer.wait_until_finished()
  del model, optimizer, saved

  model, optimizer = _nnx_setup(kwargs, seed=1)
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
  assert (_ademamix_state(optimizer).m1 is None) == (config == 'b1_zero_bf16')

  for _ in range(20):
    _nnx_step(model, optimizer, x, y)
  _assert_trees_equal(
      nnx.state(model, nnx.Param), nnx.state(model_ref, nnx.Param)
  )
  _assert_trees_equal(nnx.state(optimizer), nnx.state(optimizer_ref))
  assert int(optimizer.step[...]) == 40
