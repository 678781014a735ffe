"""AdEMAMix for Optax: Adam with a mixture of a fast and a slow EMA.

Pagliardini, Ablin, Grangier, "The AdEMAMix Optimizer: Better, Faster, Older"
(arXiv 2409.03137).
"""

import jax
import optax

from ademamix_optax._ademamix import ScaleByAdEMAMixState
from ademamix_optax._ademamix import ademamix
from ademamix_optax._ademamix import scale_by_ademamix
from ademamix_optax._convert import adam_state_to_ademamix
from ademamix_optax._schedules import alpha_warmup
from ademamix_optax._schedules import beta3_warmup
from ademamix_optax._simplified import ScaleBySimplifiedAdEMAMixState
from ademamix_optax._simplified import scale_by_simplified_ademamix
from ademamix_optax._simplified import simplified_ademamix

__version__ = '0.1.0'


def _register_for_export() -> None:
  """Makes the states our optimizers build serializable by jax.export.

  An exported step (:func:`jax.export.export`) serializes only the named
  tuples registered for it: ours, and optax's that our aliases chain in
  (unless optax registers them itself, or they are registered already).
  The names are the packages' (``ademamix_optax``, ``optax``).
  """
  package = __name__
  for cls, name in (
      (ScaleByAdEMAMixState, f'{package}.ScaleByAdEMAMixState'),
      (
          ScaleBySimplifiedAdEMAMixState,
          f'{package}.ScaleBySimplifiedAdEMAMixState',
      ),
      (optax.EmptyState, 'optax.EmptyState'),
      (optax.ScaleByScheduleState, 'optax.ScaleByScheduleState'),
      (optax.MaskedState, 'optax.MaskedState'),
  ):
    try:
      jax.export.register_namedtuple_serialization(cls, serialized_name=name)
    except ValueError:  # Registered already.
      pass


_register_for_export()

__all__ = (
    'ScaleByAdEMAMixState',
    'ScaleBySimplifiedAdEMAMixState',
    'adam_state_to_ademamix',
    'ademamix',
    'alpha_warmup',
    'beta3_warmup',
    'scale_by_ademamix',
    'scale_by_simplified_ademamix',
    'simplified_ademamix',
)
