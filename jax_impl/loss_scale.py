"""A twin of ``torch.amp.GradScaler`` driving an optax transformation: same scale, same skipped steps.

torch's recipe with a fused AdamW::

    scaler = torch.amp.GradScaler("cpu")            # init_scale=2**16, growth 2, backoff 0.5, interval 2000
    scaler.scale(loss).backward()                   # gradients of loss * scale
    scaler.step(optimizer)                          # fused: the kernel divides each grad by the scale;
                                                    # any inf/NaN gradient: the step is skipped (step count too)
    scaler.update()                                 # inf: scale *= 0.5; growth_interval clean steps: scale *= 2

JAX::

    tx = jax_impl.loss_scale.grad_scaler(jax_impl.adamw(...))
    loss, grads = jax.value_and_grad(lambda p: loss_fn(p) * state.scale)(params)
    params, state = jax_impl.apply_exact(tx, grads, state, params)

:func:`grad_scaler` takes the gradients of ``loss * scale``, checks them for
inf/NaN, divides them by the scale as torch's fused kernel does (an
elementwise float32 division, not a multiplication by ``1/scale``), takes the
inner step only when all are finite (``lax.cond``: the inner state, its count
included, is kept on a skipped step, so :func:`jax_impl.apply_exact` leaves
the params), and updates the scale as ``torch._amp_update_scale_``.  With
``unscale_first=True`` it is the ``scaler.unscale_(optimizer)`` flow (for
clipping between unscale and step): gradients multiplied by ``1/scale``, then
the inner transformation (e.g. ``optax.chain(jax_impl.clipping.clip_grad_norm(...), adamw)``).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from jax_impl.accumulation import inner_update_if


class GradScalerState(NamedTuple):
    """State of :func:`grad_scaler`: torch's ``GradScaler`` ``_scale`` and ``_growth_tracker``, and the inner state."""

    scale: jax.Array  # shape=(), float32: multiply the loss by this
    growth_tracker: jax.Array  # shape=(), int32: consecutive finite steps since the last change
    found_inf: jax.Array  # shape=(), bool: whether the last step was skipped
    inner_opt_state: optax.OptState


def grad_scaler(inner: optax.GradientTransformation, init_scale: float = 2.0 ** 16, growth_factor: float = 2.0,
                backoff_factor: float = 0.5, growth_interval: int = 2000, *,
                unscale_first: bool = False) -> optax.GradientTransformation:
    """Dynamic loss scaling with ``torch.amp.GradScaler``'s arguments, defaults and skipping (see the module doc)."""
    if not init_scale > 0:
        raise ValueError(f"grad_scaler: init_scale must be > 0, got {init_scale}")
    if not growth_factor > 1.0:
        raise ValueError(f"grad_scaler: growth_factor must be > 1.0, got {growth_factor}")
    if not 0.0 < backoff_factor < 1.0:
        raise ValueError(f"grad_scaler: backoff_factor must be in (0, 1), got {backoff_factor}")
    if not isinstance(growth_interval, int) or growth_interval < 1:
        raise ValueError(f"grad_scaler: growth_interval must be an int >= 1, got {growth_interval!r}")

    def init_fn(params):
        return GradScalerState(scale=jnp.asarray(init_scale, jnp.float32), growth_tracker=jnp.zeros([], jnp.int32),
                               found_inf=jnp.zeros([], bool), inner_opt_state=inner.init(params))

    def update_fn(updates, state, params=None, **extra_args):
        leaves = jax.tree.leaves(updates)
        found_inf = ~jnp.all(jnp.stack([jnp.all(jnp.isfinite(g)) for g in leaves])) if leaves else jnp.array(False)
        scale = state.scale

        def unscale(g):
            wide = jnp.promote_types(g.dtype, jnp.float32)  # the kernel's opmath
            g = g.astype(wide)
            if unscale_first:  # scaler.unscale_: grads * (1 / scale), the reciprocal rounded to float32
                return g * (1 / scale).astype(wide)
            # The fused kernel's grad / grad_scale; + (-0.0) keeps XLA from turning it into * (1 / scale).
            return g / (scale.astype(wide) - jnp.minimum(jnp.abs(g), 0))

        unscaled = jax.tree.map(lambda g, p: unscale(g).astype(jnp.result_type(p)) if p is not None else unscale(g),
                                updates, params if params is not None else updates)

        new_updates, inner_state = inner_update_if(~found_inf, inner, unscaled, state.inner_opt_state, params,
                                                   **extra_args)
        # torch._amp_update_scale_
        grown = state.growth_tracker + 1
        grow = ~found_inf & (grown == growth_interval)
        grown_scale = scale * jnp.float32(growth_factor)
        new_scale = jnp.where(found_inf, scale * jnp.float32(backoff_factor),
                              jnp.where(grow & jnp.isfinite(grown_scale), grown_scale, scale))
        tracker = jnp.where(found_inf | grow, 0, grown).astype(jnp.int32)
        return new_updates, GradScalerState(scale=new_scale, growth_tracker=tracker, found_inf=found_inf,
                                            inner_opt_state=inner_state)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
