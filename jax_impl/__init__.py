"""AdamW for JAX with torch.optim.AdamW semantics and torch's CPU rounding."""

from jax_impl import schedules
from jax_impl._adamw import AdamWState, adamw, apply_exact, torch_cpu_vector_width

__all__ = ["AdamWState", "adamw", "apply_exact", "schedules", "torch_cpu_vector_width"]
