"""apply_exact through optax's wrappers, bitwise against the same recipe in torch on shared gradients."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch

import jax_impl
from jax_impl.exact import UpdatesChangedError
from recipe_helpers import (add_grads, gradients, initial_params, mismatches, set_grads, to_jax,
                                  torch_params)

LR, WD, STEPS = 1e-2, 0.1, 12


def run_jax(tx, steps=STEPS, grads_fn=gradients, exact=True):
    params = to_jax(initial_params())
    state = tx.init(params)
    if exact:
        step = jax.jit(lambda g, s, p: jax_impl.apply_exact(tx, g, s, p))
    else:
        def step(g, s, p):
            u, s = tx.update(g, s, p)
            return optax.apply_updates(p, u), s
        step = jax.jit(step)
    for t in range(steps):
        params, state = step(to_jax(grads_fn(t)), state, params)
    return params, state


def run_torch(groups_of, steps=STEPS, grads_fn=gradients, before_step=None):
    """torch.optim.AdamW(fused=True) with the param groups ``groups_of(tparams)``; ``before_step`` may edit grads."""
    tparams = torch_params(initial_params())
    optimizer = torch.optim.AdamW(groups_of(tparams), fused=True)
    for t in range(steps):
        set_grads(tparams, grads_fn(t))
        if before_step is None or before_step(t, tparams) is not False:
            optimizer.step()
    return tparams


def one_group(tparams):
    return [{"params": list(tparams.values()), "lr": LR, "weight_decay": WD}]


def test_bare_adamw_through_apply_updates_loses_bits_near_zero():
    # Why the exact path exists (and that these tests can fail): p + (p_new - p) is not p_new near zero.
    params, _ = run_jax(optax.chain(optax.identity(), jax_impl.adamw(LR, weight_decay=WD)), exact=False)
    assert mismatches(params, run_torch(one_group))


def test_chain_before_adamw_is_bitwise():
    tx = optax.chain(optax.identity(), optax.scale(1.0), jax_impl.adamw(LR, weight_decay=WD))
    params, _ = run_jax(tx)
    assert mismatches(params, run_torch(one_group)) == {}


@pytest.mark.parametrize("k", [1, 3])
def test_multisteps_sum_is_torch_accumulation(k):
    # MultiSteps(use_grad_mean=False) sums acc + g in arrival order: torch's .grad accumulation.
    tx = optax.MultiSteps(jax_impl.adamw(LR, weight_decay=WD), k, use_grad_mean=False)
    params, _ = run_jax(tx, steps=k * 4)

    tparams = torch_params(initial_params())
    optimizer = torch.optim.AdamW(one_group(tparams), fused=True)
    for t in range(k * 4):
        add_grads(tparams, gradients(t))
        if (t + 1) % k == 0:  # step after k backward passes, then zero_grad
            optimizer.step()
            optimizer.zero_grad()
    assert mismatches(params, tparams) == {}


def test_multi_transform_param_groups_and_frozen_leaves():
    tx = optax.multi_transform(
        {"decay": jax_impl.adamw(LR, weight_decay=WD),
         "head": jax_impl.adamw(3 * LR, b1=0.8, b2=0.99, eps=1e-6, weight_decay=0.0, amsgrad=True),
         "frozen": optax.set_to_zero()},
        {"w": "decay", "head": "head", "b": "frozen"})
    params, _ = run_jax(tx)

    def groups(tp):
        tp["b"].requires_grad_(False)
        return [{"params": [tp["w"]], "lr": LR, "weight_decay": WD},
                {"params": [tp["head"]], "lr": 3 * LR, "betas": (0.8, 0.99), "eps": 1e-6, "weight_decay": 0.0,
                 "amsgrad": True}]

    tparams = run_torch(groups)
    assert mismatches(params, tparams) == {}
    np.testing.assert_array_equal(params["b"], initial_params()["b"])


def test_masked_adamw():
    tx = optax.masked(jax_impl.adamw(LR, weight_decay=WD), {"w": True, "b": False, "head": True})
    params, _ = run_jax(tx)
    tparams = run_torch(lambda tp: [{"params": [tp["w"], tp["head"]], "lr": LR, "weight_decay": WD}])
    assert mismatches({k: params[k] for k in ("w", "head")}, {k: tparams[k] for k in ("w", "head")}) == {}
    # optax.masked passes the gradient through as the update of a masked-out leaf: p + g.
    g_sum = sum(gradients(t)["b"] for t in range(STEPS))
    np.testing.assert_allclose(params["b"], initial_params()["b"] + g_sum, rtol=1e-5)


def test_apply_if_finite_skips_the_steps_torch_skips():
    bad = {3, 7}

    def grads_fn(t):
        g = gradients(t)
        if t in bad:
            g["w"][0, 0] = np.inf
        return g

    tx = optax.apply_if_finite(jax_impl.adamw(LR, weight_decay=WD), max_consecutive_errors=5)
    params, state = run_jax(tx, grads_fn=grads_fn)
    assert int(state.total_notfinite) == len(bad)

    def skip_nonfinite(t, tparams):
        return all(torch.isfinite(p.grad).all() for p in tparams.values())

    assert mismatches(params, run_torch(one_group, grads_fn=grads_fn, before_step=skip_nonfinite)) == {}


def test_transformation_after_adamw_is_refused():
    tx = optax.chain(jax_impl.adamw(LR, weight_decay=WD), optax.scale(0.5))
    params = to_jax(initial_params())
    with pytest.raises(Exception, match="changed them") as raised:
        new_params, _ = jax.jit(lambda g, s, p: jax_impl.apply_exact(tx, g, s, p))(
            to_jax(gradients(0)), tx.init(params), params)
        jax.block_until_ready(new_params)
    # jax.debug.callback re-raises the error inside XLA's runtime error; its type and message survive.
    assert UpdatesChangedError.__name__ in str(raised.value) or isinstance(raised.value, UpdatesChangedError)


def test_two_adamws_on_one_leaf_and_no_adamw_are_refused():
    params = to_jax(initial_params())
    grads = to_jax(gradients(0))
    tx = optax.chain(jax_impl.adamw(LR), jax_impl.adamw(LR))
    with pytest.raises((TypeError, ValueError)):
        jax_impl.apply_exact(tx, grads, tx.init(params), params)
    tx = optax.sgd(LR)
    with pytest.raises(TypeError, match="jax_impl.adamw"):
        jax_impl.apply_exact(tx, grads, tx.init(params), params)


def test_exact_optimizer_through_a_chain():
    from flax import nnx

    class Model(nnx.Module):
        def __init__(self):
            for k, v in initial_params().items():
                setattr(self, k, nnx.Param(jnp.asarray(v)))

    model = Model()
    optimizer = jax_impl.ExactOptimizer(model, optax.chain(optax.identity(), jax_impl.adamw(LR, weight_decay=WD)),
                                        wrt=nnx.Param)

    @nnx.jit
    def step(model, optimizer, grads):
        optimizer.update(model, grads)

    for t in range(STEPS):
        grad_model = Model()  # nnx gradients come as a model-shaped state
        for k, v in gradients(t).items():
            getattr(grad_model, k)[...] = jnp.asarray(v)
        step(model, optimizer, grad_model)
    params = {k: getattr(model, k)[...] for k in initial_params()}
    assert mismatches(params, run_torch(one_group)) == {}


LR_CHANGES = {0: 1e-2, 4: 3e-3, 9: 2.5e-2}  # step -> lr written from that step on (float32 values)


def _torch_with_lr_changes(steps, every_k=1):
    tparams = torch_params(initial_params())
    # inject_hyperparams holds its hyperparameters as float32 arrays: torch gets the same floats.
    optimizer = torch.optim.AdamW(tparams.values(), lr=LR, weight_decay=float(np.float32(WD)), fused=True)
    for t in range(steps):
        if t % every_k == 0 and t // every_k in LR_CHANGES:
            optimizer.param_groups[0]["lr"] = float(np.float32(LR_CHANGES[t // every_k]))
        add_grads(tparams, gradients(t))
        if (t + 1) % every_k == 0:
            optimizer.step()
            optimizer.zero_grad()
    return tparams


@pytest.mark.parametrize("every_k", [1, 2])
def test_injected_lr_changed_mid_run_under_jit(every_k):
    # b1, b2, eps static: injected, they would be float32(0.9) etc., not torch's 0.9.
    inner = optax.inject_hyperparams(jax_impl.adamw, static_args=("b1", "b2", "eps"))(learning_rate=LR,
                                                                                      weight_decay=WD)
    tx = inner if every_k == 1 else optax.MultiSteps(inner, every_k, use_grad_mean=False)
    params = to_jax(initial_params())
    state = tx.init(params)
    step = jax.jit(lambda g, s, p: jax_impl.apply_exact(tx, g, s, p))
    steps = 14 * every_k
    for t in range(steps):
        if t % every_k == 0 and t // every_k in LR_CHANGES:
            hyper = state.hyperparams if every_k == 1 else state.inner_opt_state.hyperparams
            hyper["learning_rate"] = jnp.asarray(LR_CHANGES[t // every_k], jnp.float32)
        params, state = step(to_jax(gradients(t)), state, params)
    assert mismatches(params, _torch_with_lr_changes(steps, every_k)) == {}


@pytest.mark.parametrize("options", [{"decay_rounding": "precise"}, {"amsgrad": True, "maximize": True},
                                     {"kernel": "xla", "b1": 0.3, "b2": 0.6}, {"dtype": "float64"}])
def test_wrapped_step_equals_the_bare_step_for_every_option(options, x64):
    # The params apply_exact recomputes from the moments are the kernel's own, whatever the options.
    options = dict(options)
    dtype = options.pop("dtype", "float32")
    tx = jax_impl.adamw(LR, weight_decay=WD, **options)
    wrapped = optax.chain(optax.identity(), tx)
    bare = jax.jit(lambda g, s, p: jax_impl.apply_exact(tx, g, s, p))
    through = jax.jit(lambda g, s, p: jax_impl.apply_exact(wrapped, g, s, p))
    p1 = p2 = {k: jnp.asarray(v, dtype) for k, v in initial_params().items()}
    s1, s2 = tx.init(p1), wrapped.init(p2)
    for t in range(15):
        g = {k: jnp.asarray(v, dtype) for k, v in gradients(t).items()}
        p1, s1 = bare(g, s1, p1)
        p2, s2 = through(g, s2, p2)
    for k in p1:
        assert np.asarray(p1[k]).tobytes() == np.asarray(p2[k]).tobytes(), k
