"""AdamW for JAX with torch.optim.AdamW semantics and torch's CPU rounding."""

from jax_impl import schedules
from jax_impl._adamw import adamw
from jax_impl._cpu_rounding import torch_cpu_vector_width
from jax_impl._state import AdamWState, from_torch_view, torch_view
from jax_impl.cuda_rounding import CudaRounding
from jax_impl.exact import apply_exact
from jax_impl.fast_loops import apply_gradients_exact
from jax_impl.flat import FlatLayout
from jax_impl.masks import decay_mask_by_name
from jax_impl.groups import add_param_group, param_groups

__all__ = ["AdamWState", "CudaRounding", "ExactOptimizer", "FlatLayout", "adamw", "add_param_group", "apply_exact",
           "apply_gradients_exact", "decay_mask_by_name", "from_torch_view", "param_groups", "schedules",
           "torch_cpu_vector_width", "torch_view"]


def __getattr__(name):
    if name == "ExactOptimizer":  # imports Flax only when asked for
        from jax_impl.nnx_optimizer import ExactOptimizer

        return ExactOptimizer
    raise AttributeError(f"module 'jax_impl' has no attribute {name!r}")
