"""Configurations of the language-model example.

``DEFAULT`` is what ``python -m examples.lm`` runs: AdamW and AdEMAMix, 2,000
steps each of a 125k-parameter model, each at the peak learning rate that
the budgets scan's sweep found best (see the README for the measured time
and losses). ``TINY`` shrinks it for the tests; it is derived from the
default, so it exercises the same code paths. ``SCAN`` is the base of every
run of the budgets scan (``python -m examples.lm.scan``), which sets each
run's learning rate, budget and seed; ``TINY_SCAN`` is the tests' version.
"""

from __future__ import annotations

import dataclasses
import typing
from typing import Any, Iterable, Literal, Optional

from examples._shared import cli

Optimizer = Literal['adamw', 'ademamix', 'simplified_ademamix']
# 'bfloat16-nearest': bfloat16 states rounded to nearest instead of
# stochastically, which stalls the slow EMA (kept for comparison).
StateDtype = Literal['float32', 'bfloat16', 'bfloat16-nearest']
StateFormat = Literal['compact', '8bit']
OPTIMIZERS: tuple[Optimizer, ...] = typing.get_args(Optimizer)
DEFAULT_OPTIMIZERS: tuple[Optimizer, ...] = ('adamw', 'ademamix')
STATE_DTYPES: tuple[StateDtype, ...] = typing.get_args(StateDtype)
# The field of each optimizer's own peak learning rate (``None``: ``lr``).
LR_FIELDS: dict[Optimizer, str] = {
    'adamw': 'adamw_lr',
    'ademamix': 'ademamix_lr',
    'simplified_ademamix': 'simplified_lr',
}
# The paper: b3 = 0.999 beats 0.9999 for runs of up to tens of thousands of
# steps.
LONG_RUN_STEPS = 20_000


@dataclasses.dataclass(frozen=True)
class Config:
  """Everything that determines a run's results.

  Attributes:
    data: A text file to train on; ``None`` for the Python stdlib sources.
    max_bytes: Cap on the bytes read from the corpus.
    val_fraction: Share of the corpus held out (by file for the stdlib, by
      position for ``data``).
    d_model: Transformer width.
    layers: Number of residual blocks.
    heads: Attention heads; must divide ``d_model``.
    context: Sequence length in bytes.
    mlp_ratio: MLP hidden width over ``d_model``.
    steps: Optimizer steps per optimizer.
    batch: Sequences per step (the global batch over all devices).
    lr: Peak learning rate of the warmup + cosine schedule, for every
      optimizer without its own below.
    adamw_lr: AdamW's peak learning rate; ``None``: ``lr``.
    ademamix_lr: AdEMAMix's; ``None``: ``lr``.
    simplified_lr: Simplified AdEMAMix's (before the scaling below);
      ``None``: ``lr``.
    warmup_fraction: Share of ``steps`` spent warming the learning rate up.
    end_lr_ratio: Final learning rate over ``lr``.
    weight_decay: Decoupled weight decay of the dense-layer kernels.
    clip_norm: Global gradient norm clip.
    b1: Fast EMA decay (both optimizers).
    b2: Second-moment EMA decay (both optimizers).
    b3: AdEMAMix slow EMA decay; ``None``: 0.999 below ``LONG_RUN_STEPS``
      (20,000) steps, else 0.9999.
    alpha: AdEMAMix slow EMA weight.
    state_dtype: Storage dtype of the optimizer states: 'float32',
      'bfloat16' (AdEMAMix: m1, m2 and nu, stochastically rounded; AdamW:
      mu), or 'bfloat16-nearest' (the same with round-to-nearest).
    state_format: AdEMAMix's (and Simplified AdEMAMix's) compact state,
      ``ademamix_optax``'s ``state_format``: 'compact' (4.7 bytes per
      parameter of the large leaves) or '8bit' (3.07); AdamW keeps
      ``state_dtype``.
    simplified_b1: Simplified AdEMAMix's momentum decay, warmed up from
      ``b1`` over the run (the authors' recipe; its learning rate is its
      peak learning rate times ``sqrt((1 - b1) (1 - simplified_b1))``).
    simplified_alpha: Simplified AdEMAMix's weight of the current gradient
      (the field's default is the authors' value at 32k tokens per batch;
      ``DEFAULT`` takes the budgets scan's swept one).
    optimizers: Which optimizers to train, in order.
    seed: Seeds the model init and the data order.
    eval_every: Evaluate the validation loss every this many steps (and at
      the last step).
    eval_batches: Validation batches of ``batch`` sequences per evaluation.
    log_every: Steps between progress updates (and NaN checks).
    checkpoint_every: Steps between checkpoints (and at the last step).
    mesh_data: Size of the ``data`` mesh axis; -1 for all devices left.
    mesh_model: Size of the ``model`` mesh axis (parameter sharding).
  """

  data: Optional[str] = None
  max_bytes: int = 8 * 2**20
  val_fraction: float = 0.1
  d_model: int = 64
  layers: int = 2
  heads: int = 4
  context: int = 128
  mlp_ratio: int = 4
  steps: int = 2000
  batch: int = 16
  lr: float = 1e-3
  adamw_lr: Optional[float] = None
  ademamix_lr: Optional[float] = None
  simplified_lr: Optional[float] = None
  warmup_fraction: float = 0.05
  end_lr_ratio: float = 0.01
  weight_decay: float = 0.1
  clip_norm: float = 0.5
  b1: float = 0.9
  b2: float = 0.999
  b3: Optional[float] = None
  alpha: float = 8.0
  state_dtype: StateDtype = 'float32'
  state_format: Optional[StateFormat] = None
  simplified_b1: float = 0.99
  simplified_alpha: float = 100.0
  optimizers: tuple[Optimizer, ...] = DEFAULT_OPTIMIZERS
  seed: int = 0
  eval_every: int = 50
  eval_batches: int = 8
  log_every: int = 10
  checkpoint_every: int = 100
  mesh_data: int = -1
  mesh_model: int = 1

  def __post_init__(self):
    rules = dict(
        nonnegative='end_lr_ratio weight_decay alpha seed',
        decays='b1 b2 b3 warmup_fraction',
        fractions='val_fraction',
    )
    # Every other number must be positive, but mesh_data (checked below),
    # simplified_b1 and simplified_alpha (not checked).
    others = ' '.join(rules.values()).split()
    others += ['mesh_data', 'simplified_b1', 'simplified_alpha']
    numbers = ('int', 'float', 'Optional[float]')  # Annotations are strings.
    positive = [
        f.name
        for f in dataclasses.fields(self)
        if f.type in numbers and f.name not in others
    ]
    cli.check_fields(self, positive=positive, **rules)
    if self.d_model % self.heads:
      raise ValueError(
          f'heads={self.heads} must divide d_model={self.d_model}.'
      )
    if self.state_format is not None and self.state_dtype != 'float32':
      raise ValueError(
          f"state_format={self.state_format!r} stores AdEMAMix's state: "
          f'leave state_dtype at float32, got {self.state_dtype!r}.'
      )
    if self.state_dtype not in STATE_DTYPES:
      raise ValueError(
          f'state_dtype must be one of {STATE_DTYPES}, got {self.state_dtype!r}.'
      )
    if set(self.optimizers) - set(OPTIMIZERS) or not self.optimizers:
      raise ValueError(
          f'optimizers must be a non-empty subset of {OPTIMIZERS}, got '
          f'{self.optimizers!r}.'
      )
    if self.mesh_data != -1 and self.mesh_data < 1:
      raise ValueError(
          f'mesh_data must be positive or -1, got {self.mesh_data}.'
      )

  def peak_lr(self, optimizer: Optimizer) -> float:
    """The peak learning rate of ``optimizer``."""
    own = getattr(self, LR_FIELDS[optimizer])
    return self.lr if own is None else own

  @property
  def warmup_steps(self) -> int:
    return int(self.warmup_fraction * self.steps)

  @property
  def resolved_b3(self) -> float:
    """``b3``, or the paper's advice for a run of ``steps`` steps."""
    if self.b3 is not None:
      return self.b3
    return 0.999 if self.steps < LONG_RUN_STEPS else 0.9999

  @property
  def tokens_per_step(self) -> int:
    return self.batch * self.context


def changed_fields(
    saved: dict[str, Any], current: dict[str, Any], ignore: Iterable[str] = ()
) -> list[str]:
  """``'field: saved -> current'`` for each field outside ``ignore`` whose
  value differs between two configs saved as JSON (a missing field reads as
  ``None``)."""
  ignore = set(ignore)
  return [
      f'{k}: {saved.get(k)!r} -> {current.get(k)!r}'
      for k in sorted(saved.keys() | current.keys())
      if k not in ignore and saved.get(k) != current.get(k)
  ]


# The budgets scan's sweeps (1000 steps, seeds 100 and 101;
# examples/lm/budgets_scan.md): each optimizer's best peak learning rate of
# values a factor of 2 apart, and Simplified AdEMAMix's best alpha.
ADAMW_LR = 4e-3
ADEMAMIX_LR = 4e-3
SIMPLIFIED_LR = 2e-3
SIMPLIFIED_ALPHA = 30.0

DEFAULT = Config(
    adamw_lr=ADAMW_LR,
    ademamix_lr=ADEMAMIX_LR,
    simplified_lr=SIMPLIFIED_LR,
    simplified_alpha=SIMPLIFIED_ALPHA,
)

# Seconds on a 2-core CPU: a handful of steps of a model a few KB in size.
_TINY = dict(
    max_bytes=2**20,
    d_model=32,
    layers=1,
    heads=2,
    context=32,
    steps=6,
    batch=8,
    eval_every=3,
    eval_batches=2,
    log_every=2,
    checkpoint_every=3,
)
TINY = dataclasses.replace(DEFAULT, **_TINY)
CONFIGS = {'default': DEFAULT, 'tiny': TINY}

# The budgets scan (``python -m examples.lm.scan``): the default model and
# data; the scan sets every run's ``steps``, ``seed``, ``optimizers``,
# ``eval_every = steps`` and learning rate (``lr``, swept), and evaluates
# once, at the end, over 64 batches (1,024 held-out windows).
SCAN = Config(
    optimizers=OPTIMIZERS, eval_batches=64, log_every=50, checkpoint_every=500
)
TINY_SCAN = dataclasses.replace(SCAN, **_TINY)  # The tests' scan.
SCAN_CONFIGS = {'scan': SCAN, 'tiny': TINY_SCAN}
