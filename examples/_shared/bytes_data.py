"""A byte corpus from the Python standard library's own source files.

The text ships with every Python installation (found through
:mod:`sysconfig`), so the examples need no download. Files are read in
sorted order; every ``val_every``-th file goes to the validation split, so no
file is split between the two.
"""

from __future__ import annotations

import pathlib
import sysconfig

import jax
import jax.numpy as jnp
import numpy as np


def stdlib_dir() -> pathlib.Path:
  return pathlib.Path(sysconfig.get_paths()['stdlib'])


def load_corpus(
    max_train_bytes: int = 4_000_000,
    val_every: int = 10,
) -> tuple[np.ndarray, np.ndarray]:
  """Returns (train, val) byte arrays (uint8) of the stdlib's ``*.py`` files.

  Args:
    max_train_bytes: Stop adding training files beyond this many bytes.
    val_every: Every ``val_every``-th file (in sorted order) is held out.

  Returns:
    Two 1-D ``uint8`` arrays.
  """
  files = sorted(stdlib_dir().glob('*.py'))
  if len(files) < 2 * val_every:
    raise FileNotFoundError(f'Too few stdlib sources under {stdlib_dir()}.')
  train, val = [], []
  n_train = 0
  for i, f in enumerate(files):
    if i % val_every == val_every - 1:
      val.append(f.read_bytes())
    elif n_train < max_train_bytes:
      train.append(f.read_bytes())
      n_train += len(train[-1])
  to_array = lambda chunks: np.frombuffer(b''.join(chunks), np.uint8)
  return to_array(train)[:max_train_bytes], to_array(val)


def sample_windows(
    data: jax.Array, key: jax.Array, batch_size: int, length: int
) -> jax.Array:
  """``batch_size`` random windows of ``length`` bytes, as int32 (B, L)."""
  starts = jax.random.randint(key, (batch_size,), 0, data.shape[0] - length)
  take = lambda s: jax.lax.dynamic_slice(data, (s,), (length,))
  return jax.vmap(take)(starts).astype(jnp.int32)


def fixed_windows(
    data: np.ndarray, seed: int, batch_size: int, length: int
) -> jax.Array:
  """A fixed set of windows (for evaluation), drawn once from ``seed``."""
  return sample_windows(
      jnp.asarray(data), jax.random.key(seed), batch_size, length)


def training_batches(train: np.ndarray, key: jax.Array, batch_size: int,
                     length: int):
  """``batch(step)``: the step's random training windows of ``train``.

  A pure function of the (possibly traced) step, so a compiled training loop
  draws its batches itself and a rerun sees the same ones.
  """
  data = jnp.asarray(train)
  return lambda step: sample_windows(
      data, jax.random.fold_in(key, step), batch_size, length)
