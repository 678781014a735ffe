"""Experimental parts of ademamix_optax: not measured, may change or go.

:func:`scale_by_ademamix_pallas` and :func:`ademamix_pallas` compute each
leaf's update with a one-pass Pallas kernel (Triton on GPU, Mosaic on TPU,
interpreted on CPU). They give the results of the main factories but have
not been measured faster than XLA on any device.
"""

from ademamix_optax.experimental._pallas import ademamix_pallas
from ademamix_optax.experimental._pallas import fused_leaf_update
from ademamix_optax.experimental._pallas import scale_by_ademamix_pallas

__all__ = (
    'ademamix_pallas',
    'fused_leaf_update',
    'scale_by_ademamix_pallas',
)
