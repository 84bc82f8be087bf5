"""Gradient accumulation as torch users write it: ``(loss / k).backward()`` k times, then ``optimizer.step()``.

torch's recipe::

    for i, (x, y) in enumerate(batches):
        (loss_fn(model(x), y) / k).backward()   # the first backward writes .grad, the next ones add to it
        if (i + 1) % k == 0:
            optimizer.step()
            optimizer.zero_grad()                 # set_to_none: the next window starts from the first gradient

Each ``.grad`` is therefore ``((g_1 + g_2) + g_3) + ...`` in arrival order, where
``g_i`` is the gradient of ``loss_i / k``: one float add per micro-batch and
element, so the sum is the same on any device or sharding.  :func:`torch_accumulation`
is that recipe as an optax wrapper.  ``optax.MultiSteps`` differs: by default it
averages the *unscaled* gradients with Welford's update ``acc + (g - acc) / (n + 1)``,
a division by a broadcast scalar that XLA may turn into a multiplication by its
reciprocal, or not, depending on the compiled program; and it starts each window
from ``0 * acc`` (NaN after a non-finite window; ``0 + (-0.0) = +0.0``).  The README
gives the measured distance.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax


class TorchAccumulationState(NamedTuple):
    """State of :func:`torch_accumulation`."""

    mini_step: jax.Array  # shape=(), int32: backward passes in the current window (0 .. every_k - 1)
    acc_grads: optax.Updates  # the window's .grad so far (undefined when mini_step == 0)
    inner_opt_state: optax.OptState


def torch_accumulation(inner: optax.GradientTransformation, every_k: int) -> optax.GradientTransformation:
    """Sum ``every_k`` gradients in arrival order (torch's ``.grad``), then take one step of ``inner``.

    Feed it the gradients of ``loss / every_k`` (as torch users scale the loss
    before each ``backward()``).  The first gradient of a window is taken as it
    is (torch writes ``.grad``), each later one is added; on the ``every_k``-th
    call ``inner`` updates with the sum and the window restarts.  Other calls
    return zero updates and leave ``inner``'s state as it was, so
    :func:`jax_impl.apply_exact` writes the params of the step only when it is taken.
    """
    if not isinstance(every_k, int) or every_k < 1:
        raise ValueError(f"torch_accumulation: every_k must be an int >= 1, got {every_k!r}")

    def init_fn(params):
        return TorchAccumulationState(mini_step=jnp.zeros([], jnp.int32),
                                      acc_grads=jax.tree.map(jnp.zeros_like, params),
                                      inner_opt_state=inner.init(params))

    def update_fn(updates, state, params=None, **extra_args):
        first = state.mini_step == 0
        # A select, not an add to zeros: keeps -0.0 and does not carry a NaN from the last window.
        acc = jax.tree.map(lambda g, a: jnp.where(first, g, a + g), updates, state.acc_grads)
        emit = state.mini_step == every_k - 1
        new_updates, inner_state = inner_update_if(emit, inner, acc, state.inner_opt_state, params, **extra_args)
        new_state = TorchAccumulationState(mini_step=(state.mini_step + 1) % every_k, acc_grads=acc,
                                           inner_opt_state=inner_state)
        return new_updates, new_state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def inner_update_if(take, inner: optax.GradientTransformation, updates, inner_state, params, **extra_args):
    """``inner.update`` where ``take`` (traced bool), else zero updates and ``inner_state`` unchanged: one lax.cond."""

    def step(_):
        return inner.update(updates, inner_state, params, **extra_args)

    def hold(_):
        zero_updates, _ = jax.eval_shape(step, None)
        return optax.tree.zeros_like(zero_updates), inner_state

    return jax.lax.cond(take, step, hold, None)
