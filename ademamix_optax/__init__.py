"""AdEMAMix for Optax: Adam with a mixture of a fast and a slow EMA.

Pagliardini, Ablin, Grangier, "The AdEMAMix Optimizer: Better, Faster, Older"
(arXiv 2409.03137).
"""

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
