"""Property-based tests: generated trees, hyperparameters and schedules.

For every generated case the package must give the float64 NumPy reference's
updates (``numpy_reference.py``) within float32 rounding, and every generated
invalid value must be refused at construction with a ``ValueError`` naming
the argument. The examples are fixed (``derandomize``, see ``conftest.py``)
and small: the transform runs un-jitted on trees of a few elements, so no
example compiles a step.
"""

import math

import hypothesis
from hypothesis import strategies as st
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import numpy_reference as ref
import optax
import pytest

import ademamix_optax as amx
from ademamix_optax import _rounding

SHAPES = ((), (0,), (1,), (3,), (2, 2), (0, 3), (1, 2, 1))
DTYPES = (np.float32, ml_dtypes.bfloat16, np.float16)
NAMES = ('a', 'b', 'c')


@st.composite
def trees(draw):
  """A dict of 1 to 3 leaves: shapes, dtypes, and per-leaf gradient scales."""
  n = draw(st.integers(1, 3))
  return {
      name: (
          draw(st.sampled_from(SHAPES)),
          draw(st.sampled_from(DTYPES)),
          draw(st.sampled_from((1e-3, 1.0, 30.0))),
      )
      for name in NAMES[:n]
  }


def _decay():
  return st.floats(0.0, 0.9999)


@st.composite
def hyperparameters(draw):
  """Keyword arguments of ``ademamix`` across their valid ranges, with
  schedules; each value is a plain function usable by both sides."""
  kw = {
      'b1': draw(st.one_of(st.just(0.0), _decay())),
      'b2': draw(_decay()),
      'eps': draw(st.one_of(st.just(1e-8), st.floats(1e-8, 1e-2))),
      'eps_root': draw(st.one_of(st.just(0.0), st.floats(0.0, 1e-2))),
      'weight_decay': draw(st.one_of(st.just(0.0), st.floats(0.0, 0.5))),
  }
  lr = draw(st.floats(1e-4, 0.1))
  if draw(st.booleans()):
    kw['learning_rate'] = lambda count, lr=lr: lr / (1.0 + 0.5 * count)
  else:
    kw['learning_rate'] = lr
  b3, alpha = draw(_decay()), draw(st.floats(0.0, 10.0))
  kind = draw(st.sampled_from(('constant', 'warmup', 'schedule')))
  if kind == 'schedule':
    kw['b3'] = lambda t, b3=b3: b3 * t / (t + 1.0)
    kw['alpha'] = lambda t, alpha=alpha: alpha * t / (t + 2.0)
  else:
    kw['b3'], kw['alpha'] = b3, alpha
    if kind == 'warmup':
      kw['t_alpha_beta3'] = draw(st.integers(1, 4))
  return kw, b3


def _package_bits(t, leaf, stream, shape):
  key = _rounding.stream_key(jnp.int32(t), leaf, stream)
  return np.asarray(_rounding.random_bits(tuple(shape), key))


def _tolerance(kw, b3):
  """float32 rounding, for the float32 leaves.

  A decay rate b is stored as float32 (as optax does), off by up to 2**-25;
  1 - b then is off by 2**-25 / (1 - b) relative, in the bias corrections
  1 - b**t and in the EMAs' weights. Each step adds a few float32 roundings
  of its own (2**-24 each); 16 of them cover the updates.
  """
  amplification = sum(1.0 / (1.0 - b) for b in (kw['b1'], kw['b2'], b3))
  return 2.0**-24 * (16.0 + 4.0 * amplification)


def _narrow_tolerance(dtype):
  """For the leaves stored and returned narrower than float32.

  The update is returned in the leaf's dtype (half a unit), and one stored
  moment can round the other way where float32 and float64 EMAs straddle a
  threshold (about 2**-13 a value in float16): a unit of the dtype in one
  element, moving its update by about as much. Four units of the dtype
  relative to the leaf's largest update cover both.
  """
  return 4.0 * float(ml_dtypes.finfo(dtype).eps)


@hypothesis.settings(max_examples=30)
@hypothesis.given(
    trees(), hyperparameters(), st.integers(1, 3), st.integers(0, 2**31 - 1)
)
def test_updates_equal_the_reference(tree, hyper, steps, seed):
  kw, b3 = hyper
  rng = np.random.default_rng(seed)
  params = {
      name: (rng.normal(size=shape)).astype(dtype)
      for name, (shape, dtype, _) in tree.items()
  }
  grads = [
      {
          name: (scale * (rng.normal(size=shape) + 0.5)).astype(dtype)
          for name, (shape, dtype, scale) in tree.items()
      }
      for _ in range(steps)
  ]
  dtypes = {name: dtype for name, (_, dtype, _) in tree.items()}
  narrow = {
      name: (None if d == np.float32 else d) for name, d in dtypes.items()
  }
  nu_narrow = narrow
  if np.float16 in dtypes.values():
    # nu follows the parameters' dtype by default, and float16 cannot hold
    # it: (1 - b2) g**2 underflows (nu_dtype=float16 is refused for that,
    # see test_validation.py). A rounding of a subnormal nu the other way
    # moves the update by percents, beyond any float16 tolerance.
    kw = {**kw, 'nu_dtype': jnp.float32}
    nu_narrow = None
  tx = amx.ademamix(**kw)
  p = {k: jnp.asarray(v) for k, v in params.items()}
  state = tx.init(p)
  got = []
  for g in grads:
    u, state = tx.update({k: jnp.asarray(v) for k, v in g.items()}, state, p)
    p = optax.apply_updates(p, u)
    got.append(u)
  kw.pop('nu_dtype', None)
  want = ref.run_reference(
      params,
      grads,
      mu_dtype=narrow,
      nu_dtype=nu_narrow,
      rounding_bits=_package_bits,
      **kw,
  )['updates']
  for step, (u, w) in enumerate(zip(got, want)):
    for name, dtype in dtypes.items():
      a = np.asarray(u[name], np.float64)
      assert u[name].dtype == dtype and a.shape == w[name].shape
      if not a.size:
        continue
      rtol = (
          _tolerance(kw, b3)
          if dtype == np.float32
          else _narrow_tolerance(dtype)
      )
      # The reference's update is the change of its float64 parameters;
      # the package's is returned in the leaf's dtype.
      np.testing.assert_allclose(
          a,
          w[name],
          rtol=rtol,
          atol=rtol * np.abs(w[name]).max(),
          err_msg=f'{name} ({np.dtype(dtype).name}) at step {step + 1}',
      )


_NOT_NUMBERS = st.one_of(
    st.none(),
    st.text(max_size=3),
    st.lists(st.floats(0, 0.5), max_size=2),
    st.complex_numbers(
        min_magnitude=1e-3,
        max_magnitude=1.0,
        allow_nan=False,
        allow_infinity=False,
    ).filter(lambda z: z.imag != 0),
    st.booleans(),
)
_NON_FINITE = st.sampled_from((math.nan, math.inf, -math.inf))
_NEGATIVE = st.floats(max_value=-1e-12, allow_nan=False, allow_infinity=False)


def _invalid(name):
  """Values outside the argument's range, or not numbers at all."""
  if name in ('b1', 'b2', 'b3'):
    out_of_range = st.one_of(
        _NEGATIVE, st.floats(min_value=1.0, allow_infinity=False)
    )
  else:
    out_of_range = _NEGATIVE
  return st.one_of(out_of_range, _NON_FINITE, _NOT_NUMBERS)


ARGUMENTS = (
    'learning_rate',
    'b1',
    'b2',
    'b3',
    'alpha',
    'eps',
    'eps_root',
    'weight_decay',
)


@st.composite
def invalid_arguments(draw):
  name = draw(st.sampled_from(ARGUMENTS))
  return name, draw(_invalid(name))


@hypothesis.settings(max_examples=200)
@hypothesis.given(invalid_arguments())
def test_invalid_values_raise_naming_the_argument(case):
  name, value = case
  kwargs = {'learning_rate': 1e-3, name: value}
  with pytest.raises(ValueError, match=rf'\b{name}\b'):
    amx.ademamix(**kwargs)
  if name not in ('learning_rate', 'weight_decay'):
    with pytest.raises(ValueError, match=rf'\b{name}\b'):
      amx.scale_by_ademamix(**{name: value})


@hypothesis.settings(max_examples=60)
@hypothesis.given(
    st.sampled_from(['mu_dtype', 'nu_dtype']),
    st.sampled_from(
        [
            'int8',
            'int32',
            'uint16',
            'bool',
            'float4_e2m1fn',
            'float8_e8m0fnu',
            'not_a_dtype',
            'float6_e3m2fn',
        ]
    ),
)
def test_invalid_dtypes_raise_naming_the_argument(name, dtype):
  with pytest.raises(ValueError, match=rf'\b{name}\b'):
    amx.scale_by_ademamix(**{name: dtype})
