"""The fast training-loop forms of the README (donated, split graph) give the exact step's bits."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from flax.training.train_state import TrainState

import jax_impl

STEPS = 4


def _grads(step: int, params):
    rng = np.random.default_rng(step)
    return jax.tree.map(lambda p: jnp.asarray(rng.standard_normal(p.shape), p.dtype), params)


def _reference(tx, params):
    """apply_exact, step by step, unjitted: the bits every loop form must reproduce."""
    state = tx.init(params)
    for step in range(STEPS):
        params, state = jax_impl.apply_exact(tx, _grads(step, params), state, params)
    return params, state


def _bits(tree):
    return [np.asarray(x).tobytes() for x in jax.tree.leaves(tree)]


def test_apply_gradients_exact_is_apply_exact_in_a_train_state():
    tx = jax_impl.adamw(1e-2, weight_decay=0.1)
    params = {"w": jnp.linspace(-1.0, 1.0, 37, dtype=jnp.float32).reshape(37, 1), "b": jnp.zeros(3, jnp.float32)}
    expected_params, expected_state = _reference(tx, params)

    state = TrainState.create(apply_fn=None, params=jax.tree.map(jnp.copy, params), tx=tx)  # donated below
    step = jax.jit(lambda s, g: jax_impl.apply_gradients_exact(s, grads=g), donate_argnums=0)
    for t in range(STEPS):
        state = step(state, _grads(t, state.params))
    assert int(state.step) == STEPS
    assert _bits(state.params) == _bits(expected_params)
    assert _bits(state.opt_state) == _bits(expected_state)


def test_nnx_split_loop_with_exact_optimizer_is_apply_exact():
    model = nnx.Linear(5, 3, rngs=nnx.Rngs(0))
    tx = jax_impl.adamw(1e-3)
    param_variables = nnx.state(model, nnx.Param)  # grads are States of nnx.Param, as nnx.grad gives
    params = nnx.as_pure(param_variables)
    expected_params, _ = _reference(tx, params)

    optimizer = jax_impl.ExactOptimizer(model, tx, wrt=nnx.Param)
    graphdef, state = nnx.split((model, optimizer))

    @functools.partial(jax.jit, donate_argnums=0)
    def update(state, grads):
        model, optimizer = nnx.merge(graphdef, state)
        optimizer.update(model, grads)
        return nnx.state((model, optimizer))

    for t in range(STEPS):
        state = update(state, _grads(t, param_variables))  # shapes only: the buffers were donated
    nnx.update((model, optimizer), state)
    assert int(optimizer.step[...]) == STEPS
    assert _bits(nnx.as_pure(nnx.state(model, nnx.Param))) == _bits(expected_params)


def test_readme_nnx_loop_over_leaves_is_apply_exact():
    """The README's loop: the split state passed as its list of leaves, donated, gives the exact step's bits."""
    model = nnx.Linear(5, 3, rngs=nnx.Rngs(0))
    tx = jax_impl.adamw(1e-3)
    param_variables = nnx.state(model, nnx.Param)
    expected_params, expected_state = _reference(tx, nnx.as_pure(param_variables))

    optimizer = jax_impl.ExactOptimizer(model, tx, wrt=nnx.Param)
    graphdef, state = nnx.split((model, optimizer))
    treedef, leaves = jax.tree.structure(state), jax.tree.leaves(state)

    @functools.partial(jax.jit, donate_argnums=0)
    def update(leaves, grads):
        model, optimizer = nnx.merge(graphdef, jax.tree.unflatten(treedef, leaves))
        optimizer.update(model, grads)
        return jax.tree.leaves(nnx.state((model, optimizer)))

    donated = leaves
    for t in range(STEPS):
        leaves = update(leaves, _grads(t, param_variables))
    assert all(x.is_deleted() for x in donated if x.ndim)  # updated in place, not copied
    nnx.update((model, optimizer), jax.tree.unflatten(treedef, leaves))
    assert int(optimizer.step[...]) == STEPS
    assert _bits(nnx.as_pure(nnx.state(model, nnx.Param))) == _bits(expected_params)
    assert _bits(nnx.as_pure(optimizer.opt_state)) == _bits(expected_state)
