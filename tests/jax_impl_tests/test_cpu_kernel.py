"""The one-pass C++ kernel and the XLA path of jax_impl.adamw agree bit for bit (and so both agree with torch)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jax_impl
from jax_impl import cpu_kernel
from helpers import OPTIONS, SHAPES

pytestmark = pytest.mark.skipif(not cpu_kernel.available(), reason="the CPU kernel could not be built here")


def _adamw(kernel: str, option: dict, layout=None):
    option = dict(option)
    mask = option.pop("decay_mask", None)
    lr = option.pop("lr", 1e-3)
    tx = jax_impl.adamw(lr, b1=option.pop("b1", 0.9), b2=option.pop("b2", 0.999), eps=option.pop("eps", 1e-8),
                        weight_decay=option.pop("weight_decay", 1e-2), mask=list(mask) if mask else None,
                        kernel=kernel, torch_layout=layout, **option)
    return tx


def _run(kernel: str, option: dict, grads, params, layout=None):
    tx = _adamw(kernel, option, layout)
    step = jax.jit(lambda g, p, s: jax_impl.apply_exact(tx, g, s, p), donate_argnums=(1, 2))
    leaves = [jnp.asarray(p) for p in params]
    state = tx.init(leaves)
    for g in grads:
        leaves, state = step([jnp.asarray(x) for x in g], leaves, state)
    return jax.tree.map(np.asarray, (leaves, state))


def _same_bits(a, b) -> bool:
    """Bitwise equal, except that a NaN may differ in its sign bit.

    With maximize, a NaN gradient is negated first; which operand's NaN an
    instruction passes on (so the NaN's sign) is up to each code generator,
    for XLA's code, GCC's and torch's alike.
    """
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        if x.tobytes() != y.tobytes():
            both_nan = np.isnan(x) & np.isnan(y) if x.dtype.kind == "f" else False
            if not np.array_equal(np.where(both_nan, 0, x), np.where(both_nan, 0, y)) or \
                    not np.array_equal(np.isnan(x), np.isnan(y)):
                return False
    return True


def _mixed_scale_stream(seed: int, steps: int):
    """Params for SHAPES and ``steps`` gradients of magnitudes 1e-6..1e2, with a NaN and an inf among them."""
    rng = np.random.default_rng(seed)
    params = [rng.standard_normal(s).astype(np.float32) for s in SHAPES]
    grads = [[(rng.standard_normal(s) * 10.0 ** rng.uniform(-6, 2, s)).astype(np.float32) for s in SHAPES]
             for _ in range(steps)]
    grads[7][5][3] = np.nan
    grads[9][6][0] = np.inf
    return params, grads


# Transposed leaves (torch's tail elsewhere) and a leaf big enough for the kernel's threads.
LARGE_SHAPES = [(36, 3), (3, 3, 3, 5), ((1 << 18) + 5,)]
LARGE_LAYOUT = [np.arange(108).reshape(3, 36).T, np.transpose(np.arange(135).reshape(5, 3, 3, 3), (2, 3, 1, 0)), None]


@pytest.mark.parametrize("option", list(OPTIONS), ids=list(OPTIONS))
def test_kernel_equals_xla_path(option):
    params, grads = _mixed_scale_stream(0, 100)
    assert _same_bits(_run("cpu", OPTIONS[option], grads, params), _run("xla", OPTIONS[option], grads, params))


def test_kernel_with_torch_layout_and_large_leaves():
    """Transposed leaves (the tail elsewhere) and a leaf big enough for the kernel's threads."""
    rng = np.random.default_rng(1)
    params = [rng.standard_normal(s).astype(np.float32) for s in LARGE_SHAPES]
    grads = [[rng.standard_normal(s).astype(np.float32) for s in LARGE_SHAPES] for _ in range(20)]
    for option in ({}, {"amsgrad": True, "maximize": True}):
        assert _same_bits(_run("cpu", option, grads, params, LARGE_LAYOUT),
                          _run("xla", option, grads, params, LARGE_LAYOUT))


def test_auto_uses_the_kernel_on_one_cpu_device():
    tx = jax_impl.adamw()
    params = [jnp.ones(10), jnp.ones(3, jnp.bfloat16)]
    text = jax.jit(lambda g, p, s: jax_impl.apply_exact(tx, g, s, p)).lower(params, params, tx.init(params)).as_text()
    assert text.count("jax_impl_adamw") == 1  # the float32 leaf; bfloat16 stays on the XLA path
    with pytest.raises(ValueError, match="Invalid kernel: 'gpu'"):
        jax_impl.adamw(kernel="gpu")


def _run_updates(kernel: str, option: dict, grads, params, layout=None):
    """The optax path: every step's updates (and the final state), params advanced by optax.apply_updates."""
    tx = _adamw(kernel, option, layout)

    @jax.jit
    def step(g, p, s):
        updates, s = tx.update(g, s, p)
        return updates, optax.apply_updates(p, updates), s

    leaves = [jnp.asarray(p) for p in params]
    state = tx.init(leaves)
    all_updates = []
    for g in grads:
        updates, leaves, state = step([jnp.asarray(x) for x in g], leaves, state)
        all_updates.append(updates)
    return jax.tree.map(np.asarray, (all_updates, leaves, state))


@pytest.mark.parametrize("option", list(OPTIONS), ids=list(OPTIONS))
def test_kernel_updates_equal_xla_path(option):
    """The kernel in optax's update (small leaves write p_new - p, large ones their moments): the XLA path's bits."""
    params, grads = _mixed_scale_stream(2, 30)
    assert _same_bits(_run_updates("cpu", OPTIONS[option], grads, params),
                      _run_updates("xla", OPTIONS[option], grads, params))


def test_kernel_updates_with_torch_layout_and_large_leaves():
    rng = np.random.default_rng(3)
    params = [rng.standard_normal(s).astype(np.float32) for s in LARGE_SHAPES]
    grads = [[rng.standard_normal(s).astype(np.float32) for s in LARGE_SHAPES] for _ in range(10)]
    grads[3][2][7], grads[5][2][100], grads[6][2][-1] = np.nan, np.inf, -np.inf  # the large leaf: moments mode
    for option in ({}, {"amsgrad": True, "maximize": True}, {"weight_decay": 0.0}):
        assert _same_bits(_run_updates("cpu", option, grads, params, LARGE_LAYOUT),
                          _run_updates("xla", option, grads, params, LARGE_LAYOUT))


def test_update_reads_params_without_copying_them():
    """The optax path under jit: no copy of params or moments, no buffer for a large leaf's update.

    The small leaf's update is written by the kernel (no subtraction outside
    it); the large leaf's kernel call returns its moments only, and XLA
    computes the param and its update in one pass.
    """
    tx = jax_impl.adamw(kernel="cpu")
    params = [jnp.ones(1000), jnp.ones((300, 400))]
    state = tx.init(params)

    def train_step(x, p, s):
        grads = jax.grad(lambda p: sum(jnp.sum(jnp.sin(w * x)) for w in p))(p)
        updates, s = tx.update(grads, s, p)
        return optax.apply_updates(p, updates), s

    # Donated buffers pair with outputs of their shape in order: (state, updates)
    # for the update alone, the state donated; (params, state) for the train step.
    for fn, args, donate in ((lambda g, p, s: tx.update(g, s, p)[::-1], (params, params, state), 2),
                             (train_step, (jnp.float32(0.5), params, state), (1, 2))):
        hlo = jax.jit(fn, donate_argnums=donate).lower(*args).compile().as_text()
        entry = hlo[hlo.index("\nENTRY"):]  # a fused computation may end in a copy that is no pass of its own
        assert " copy(" not in entry, entry
        calls = [line.split("custom-call(")[0] for line in entry.splitlines() if "jax_impl_adamw" in line]
        assert len(calls) == 2, calls  # one call per kernel mode
        small, large = sorted(calls, key=lambda c: "[300,400]" in c)
        assert small.count("f32[1000]") == 3 and large.count("f32[300,400]") == 2, calls


@pytest.mark.parametrize("kernel", ["xla", "auto", "cpu"])
@pytest.mark.parametrize("path", ["update", "apply_exact"])
def test_gradient_made_in_the_step_is_rounded_first(kernel, path):
    """A gradient computed in the jitted step (here a product, as a clip factor or loss scale makes it)
    gives the bits of the same gradient passed in rounded: XLA fuses the producer into the update's
    passes, and an FMA contracted across it would round differently (it did, in 41% of elements)."""
    rng = np.random.default_rng(5)
    shapes = [(37, 3), (16,), (5,)]
    params = [jnp.asarray(rng.standard_normal(s), jnp.float32) for s in shapes]
    raw = [[jnp.asarray(rng.standard_normal(s), jnp.float32) for s in shapes] for _ in range(8)]
    scale = jnp.float32(0.7317)
    tx = jax_impl.adamw(1e-2, weight_decay=0.1, kernel=kernel)

    def step(g, p, s):
        if path == "apply_exact":
            return jax_impl.apply_exact(tx, g, s, p)
        updates, s = tx.update(g, s, p)
        return optax.apply_updates(p, updates), s

    fused = jax.jit(lambda raw_g, p, s: step([x * scale for x in raw_g], p, s))
    rounded = jax.jit(step)
    a = b = (params, tx.init(params))
    for raw_g in raw:
        a = fused(raw_g, *a)
        b = rounded(jax.jit(lambda r: [x * scale for x in r])(raw_g), *b)
    assert _same_bits(a, b)
