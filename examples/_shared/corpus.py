"""The byte corpus of the text examples, and its training windows.

The Python standard library's own ``.py`` files (they ship with every Python,
so nothing is downloaded), or one text file. The split is stated here only: a
stdlib file goes to validation by a CRC32 of its path
(:func:`is_validation_file`, about ``val_fraction`` of the files); a single
file holds out its last ``val_fraction`` of bytes (:func:`load_corpus`).

Everything is deterministic: the corpus is read in a fixed order and split in
a fixed way, and training batch ``i`` is a pure function of ``(seed, i)``, so
a run resumed at step ``i`` sees the batches an uninterrupted run would have,
with no data-loader state to save.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import sysconfig
from typing import Optional
import zlib

import numpy as np

from examples._shared import cli

# Third-party packages installed next to the standard library are not in it.
_SKIP_DIRS = frozenset({'site-packages', 'dist-packages', '__pycache__'})


@dataclasses.dataclass(frozen=True)
class Corpus:
  """Train and validation bytes, with where they came from.

  Attributes:
    train_U8: The training text as a flat ``uint8`` array.
    val_U8: The validation text, never seen in training.
    source: A human-readable description of the origin.
    num_train_files: Files in the training split (0 for a single file).
    num_val_files: Files in the validation split (0 for a single file).
  """

  train_U8: np.ndarray
  val_U8: np.ndarray
  source: str
  num_train_files: int = 0
  num_val_files: int = 0


def is_validation_file(relative_path: str, val_fraction: float) -> bool:
  """The split rule: a CRC32 of the file's relative POSIX path.

  Stable across runs, machines and Python's hash seed, and a file's side does
  not depend on which other files exist.
  """
  bucket = zlib.crc32(relative_path.encode('utf-8')) % 10_000
  return bucket < round(val_fraction * 10_000)


def list_python_files(root: pathlib.Path) -> list[str]:
  """Relative POSIX paths of the ``.py`` files under ``root``, sorted."""
  paths = []
  for dirpath, dirnames, filenames in os.walk(root):
    dirnames[:] = [d for d in dirnames if d not in _SKIP_DIRS]
    relative_dir = pathlib.Path(dirpath).relative_to(root)
    paths += [
        (relative_dir / f).as_posix() for f in filenames if f.endswith('.py')
    ]
  return sorted(paths)


def load_stdlib(
    max_bytes: int, val_fraction: float, root: Optional[pathlib.Path] = None
) -> Corpus:
  """The ``.py`` files under ``root`` (default: the stdlib), split by file.

  Read in sorted order until ``max_bytes`` (the file that crosses it is the
  last), each ending with a newline.
  """
  root = root or pathlib.Path(sysconfig.get_paths()['stdlib'])
  split: dict[bool, list[bytes]] = {False: [], True: []}
  total = 0
  for relative in list_python_files(root):
    if total >= max_bytes:
      break
    text = (root / relative).read_bytes()
    text += b'' if text.endswith(b'\n') else b'\n'
    total += len(text)
    split[is_validation_file(relative, val_fraction)].append(text)
  train, val = split[False], split[True]
  if not train or not val:
    raise cli.UsageError(
        f'{root} gave {len(train)} training and {len(val)} validation files '
        f'under max_bytes={max_bytes}; raise max_bytes.'
    )
  return Corpus(
      train_U8=np.frombuffer(b''.join(train), dtype=np.uint8).copy(),
      val_U8=np.frombuffer(b''.join(val), dtype=np.uint8).copy(),
      source=f'Python stdlib .py files under {root}',
      num_train_files=len(train),
      num_val_files=len(val),
  )


def load_corpus(
    path: Optional[str], max_bytes: int, val_fraction: float
) -> Corpus:
  """The stdlib when ``path`` is ``None``, else the named text file."""
  if path is None:
    return load_stdlib(max_bytes, val_fraction)
  try:
    with open(path, 'rb') as f:
      u8 = np.frombuffer(f.read(max_bytes), dtype=np.uint8)
  except OSError as e:
    raise cli.UsageError(f'Cannot read the data file: {e}') from e
  split = len(u8) - int(len(u8) * val_fraction)  # The last bytes: validation.
  source = f'{path} (last {val_fraction:.0%} of bytes held out)'
  return Corpus(u8[:split].copy(), u8[split:].copy(), source)


def check_length(corpus: Corpus, context: int, val_sequences: int) -> None:
  """Raises if a split is too short for the requested windows."""
  if len(corpus.train_U8) < context + 2:
    raise cli.UsageError(
        f'Training text has {len(corpus.train_U8)} bytes, fewer than '
        f'context + 2 = {context + 2}.'
    )
  if len(corpus.val_U8) < val_sequences * (context + 1):
    raise cli.UsageError(
        f'Validation text has {len(corpus.val_U8)} bytes, fewer than '
        f'{val_sequences} windows of {context + 1}; lower the number of '
        'evaluation batches or raise max_bytes.'
    )


def train_batch(
    train_U8: np.ndarray, seed: int, index: int, batch: int, context: int
) -> np.ndarray:
  """Training batch ``index``, random windows: a pure function of the args.

  Returns ``uint8`` of shape ``(batch, context + 1)``: inputs are ``[:, :-1]``
  and next-byte targets ``[:, 1:]``.
  """
  rng = np.random.default_rng([seed, index])
  starts_B = rng.integers(0, len(train_U8) - context, size=batch)
  return train_U8[starts_B[:, None] + np.arange(context + 1)[None, :]]


def val_batches(
    val_U8: np.ndarray, num_batches: int, batch: int, context: int
) -> np.ndarray:
  """Fixed validation windows, spread evenly over the validation text.

  Returns ``uint8`` of shape ``(num_batches, batch, context + 1)``.
  """
  n = num_batches * batch
  starts = np.linspace(0, len(val_U8) - (context + 1), n).astype(np.int64)
  windows = val_U8[starts[:, None] + np.arange(context + 1)[None, :]]
  return windows.reshape(num_batches, batch, context + 1)
