"""Exact steps for Flax's training-loop containers, and the fast way to call them.

``nnx.Optimizer.update`` and linen's ``TrainState.apply_gradients`` run
``tx.update`` then ``optax.apply_updates``: on the CPU two passes over memory
for a large leaf, 36 bytes per float32 parameter (the kernel updates the
moments in place; XLA computes the new param and ``p + (p_new - p)`` in one
pass), and ``p + (p_new - p)`` can lose low bits near zero.  The exact step
writes ``p_new`` itself, 28 bytes per parameter, torch's result bit for bit:

* nnx: :class:`jax_impl.ExactOptimizer` in place of ``nnx.Optimizer``;
* linen: :func:`apply_gradients_exact` in place of ``state.apply_gradients``.

Either way, on the CPU most of a step's time is outside the optimizer unless
the loop is written as Flax recommends for speed: with nnx, split the graph
once and call a ``jax.jit`` function of the pure state (``nnx.split`` /
``nnx.merge``), so that nothing traverses the object graph per call, and pass
that state as its list of leaves (``jax.tree.leaves``), which JAX flattens in
C++ where an ``nnx.State`` takes a Python call per ``Variable``; in both,
donate the state so that the update happens in place (README, "Speed").
``benchmarks/step_time.py`` measures each (rows ``nnx.*`` and ``TrainState.*``).
"""

from __future__ import annotations

from typing import Any

from jax_impl.exact import apply_exact


def apply_gradients_exact(state: Any, *, grads: Any, **kwargs) -> Any:
    """``TrainState.apply_gradients`` that writes :func:`jax_impl.adamw`'s new params themselves.

    Same signature and result as ``state.apply_gradients(grads=grads)`` (step
    incremented, params and opt_state replaced, ``kwargs`` replaced too), but
    the params are torch's bit for bit and the step moves 28 B/param instead of
    36.  ``state.tx`` must be a :func:`jax_impl.adamw` transformation; the
    gradients must have the params' dtypes, as torch's ``.grad`` must
    (``RuntimeError`` otherwise; ``apply_gradients`` casts them).  Jit it
    with the state donated::

        @functools.partial(jax.jit, donate_argnums=0)
        def train_step(state, batch):
            grads = jax.grad(loss_fn)(state.params, batch)
            return jax_impl.apply_gradients_exact(state, grads=grads)
    """
    new_params, new_opt_state = apply_exact(state.tx, grads, state.opt_state, state.params)
    return state.replace(step=state.step + 1, params=new_params, opt_state=new_opt_state, **kwargs)
